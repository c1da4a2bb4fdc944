"""Secrets (issue 7.5): the CA key, host keys and the passphrase go nowhere they should not.

- The CA key is only ever written encrypted when a passphrase is set: checked on every
  byte any process of the run wrote (strace dumps each write), not only on the files left.
- No key body and no passphrase in any output, error line, traceback, audit row, sshd
  log, or command line run on a host.
- No temp file or staging directory is left behind, locally or on the hosts.
- Every private file is created with its final mode, whatever the umask: under umask 000,
  strace shows each open(O_CREAT) of a key or store file asking for a mode without group
  or other bits (so it is never briefly readable), and the same on the hosts' side, where
  sftp-server creates the key files.
"""

from __future__ import annotations

import base64
import json
import os
import re
import signal
import sqlite3
import stat
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, List, Optional, Sequence

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from qemuca.errors import EXIT_FAILED, EXIT_PASSPHRASE
from tests.support.pki import QEMUCA, assert_ok, clean_env, run_qemuca, write_secret
from tests.support.tools import require_tool

PASSPHRASE = "Tr0ub4dor&3 qemuca-secret-passphrase"
WRONG = "wrong-passphrase-also-secret-9431"
TRACED = ("openat,open,creat,mkdir,mkdirat,chmod,fchmod,fchmodat,rename,renameat,renameat2,"
          "unlink,unlinkat,write,pwrite64,writev,execve,fchown")


# ---------------------------------------------------------------- strace, parsed

@dataclass
class Event:
    time: float
    pid: int
    call: str
    strings: List[bytes]        # the quoted arguments, decoded (paths, data, argv)
    fd_path: Optional[str]      # <path> of the first argument (a descriptor), with -y
    ret_path: Optional[str]     # <path> of a returned descriptor
    mode: Optional[int]
    creates: bool               # O_CREAT in the flags (or creat, mkdir)
    ok: bool

    @property
    def path(self) -> Optional[str]:
        """The file the call acts on: a returned descriptor's path, else its path argument."""
        if self.ret_path:
            return self.ret_path
        if self.call in ("fchmod", "fchown", "write", "pwrite64", "writev"):
            return self.fd_path
        return self.strings[0].decode("utf-8", "surrogateescape") if self.strings else None

    @property
    def payload(self) -> bytes:
        if self.call in ("write", "pwrite64"):
            return self.strings[0] if self.strings else b""
        if self.call == "writev":
            return b"".join(self.strings)
        return b""


_HEX = re.compile(r"\\x([0-9a-f]{2})")
_LINE = re.compile(r"^(?:(\d+) +)?(\d+\.\d+) (\w+)\((.*)\) += (-?\d+|\?)(?:<((?:\\x[0-9a-f]{2})*)>)?")


def _bytes(escaped: str) -> bytes:
    return bytes(int(h, 16) for h in _HEX.findall(escaped))


def parse_trace(files: Iterable[Path]) -> List[Event]:
    """Events of `strace -ff -ttt -y -xx` output files (one per thread), in time order."""
    events = []
    for path in files:
        pid = int(path.name.rsplit(".", 1)[1])
        for line in path.read_text(errors="replace").splitlines():
            m = _LINE.match(line)
            if not m:
                continue  # signals, exits, "resumed" fragments of calls we do not need
            _, when, call, args, ret, ret_path = m.groups()
            strings = [_bytes(s) for s in re.findall(r'"((?:\\x[0-9a-f]{2})*)"', args)]
            decorations = re.findall(r"<((?:\\x[0-9a-f]{2})*)>", args)
            bare = re.sub(r'"(?:\\x[0-9a-f]{2})*"|<(?:\\x[0-9a-f]{2})*>', "", args)
            modes = re.findall(r"(?<![\w])0[0-7]{3,4}(?![\w])", bare)
            fd_path = (_bytes(decorations[0]).decode("utf-8", "surrogateescape")
                       if decorations and re.match(r"\d+<", args) else None)
            events.append(Event(
                time=float(when), pid=pid, call=call, strings=strings, fd_path=fd_path,
                ret_path=_bytes(ret_path).decode("utf-8", "surrogateescape") if ret_path else None,
                mode=int(modes[-1], 8) if modes else None,
                creates="O_CREAT" in bare or call in ("creat", "mkdir", "mkdirat"),
                ok=ret != "?" and int(ret) >= 0))
    return sorted(events, key=lambda e: e.time)


def strace_cmd(out_prefix: Path) -> List[str]:
    strace = require_tool("strace")
    return [strace, "-f", "-ff", "-ttt", "-y", "-xx", "-s", str(8 << 20), "-e", f"trace={TRACED}",
            "-o", str(out_prefix)]


def run_traced(tmp: Path, name: str, home, *args: str, umask0: bool = True):
    """`qemuca --home HOME ARGS` under strace (and umask 000): (process, events)."""
    tdir = tmp / f"trace-{name}"
    tdir.mkdir()
    proc = subprocess.run(
        [*strace_cmd(tdir / "t"), *QEMUCA, "--home", str(home), *args],
        stdin=subprocess.DEVNULL, capture_output=True, text=True, env=clean_env(), timeout=300,
        preexec_fn=(lambda: os.umask(0)) if umask0 else None)
    return proc, parse_trace(tdir.glob("t.*"))


class Attached:
    """strace attached to a running process tree (a fake host's sshd), until stop()."""

    def __init__(self, pid: int, tmp: Path):
        self.dir = tmp
        self.dir.mkdir()
        self.proc = subprocess.Popen([*strace_cmd(self.dir / "t"), "-p", str(pid)],
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 20
        while not list(self.dir.glob("t.*")):  # attached once the first output file exists
            assert self.proc.poll() is None and time.monotonic() < deadline, "strace could not attach"
            time.sleep(0.02)

    def stop(self) -> List[Event]:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # strace detaches and leaves sshd running
        self.proc.wait(timeout=30)
        return parse_trace(self.dir.glob("t.*"))


# ---------------------------------------------------------------- secrets as needles

def pem_lines(pem: bytes) -> List[bytes]:
    """The base64 lines of a PEM body: any of them in an output means key material leaked."""
    return [ln.strip() for ln in pem.splitlines() if ln.strip() and not ln.startswith(b"-----")
            and len(ln.strip()) >= 20]


def key_needles(key) -> List[bytes]:
    """Every form the unencrypted key could be written in: PEM lines and DER (PKCS#8 and
    traditional) and the private scalar itself."""
    out = []
    public = _public_part(key)
    for fmt in (serialization.PrivateFormat.PKCS8, serialization.PrivateFormat.TraditionalOpenSSL):
        # A private key's PEM also carries its public half (an EC point, an RSA modulus);
        # a line made of public bytes only may rightly stand in a certificate: not a needle.
        out += [ln for ln in pem_lines(key.private_bytes(serialization.Encoding.PEM, fmt,
                                                         serialization.NoEncryption()))
                if base64.b64decode(ln + b"=" * (-len(ln) % 4)) not in public]
        out.append(key.private_bytes(serialization.Encoding.DER, fmt, serialization.NoEncryption()))
    numbers = key.private_numbers()
    secret = getattr(numbers, "private_value", None) or numbers.d
    raw = secret.to_bytes((secret.bit_length() + 7) // 8, "big")
    return out + [raw, raw.hex().encode()]


def _public_part(key) -> bytes:
    """The public bytes a private key's encodings embed."""
    pub = key.public_key()
    if hasattr(pub, "public_numbers") and hasattr(pub.public_numbers(), "n"):
        n = pub.public_numbers().n
        return n.to_bytes((n.bit_length() + 7) // 8, "big")
    return pub.public_bytes(serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)


def leaks(data: bytes, needles: Sequence[bytes]) -> List[bytes]:
    return [n[:24] for n in needles if n and n in data]


def _base(name: str) -> str:
    """The file a temp name stands for: .server-key.pem.qemuca-tmp-ab12 -> server-key.pem."""
    m = re.match(r"^\.(.+)\.qemuca-tmp-[0-9a-f]+$", name)
    return m.group(1) if m else name


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def _umask0_works():
    """The umask the traced runs get really is 000 (the check below relies on it)."""
    out = subprocess.run(["python3", "-c", "import os; print(os.umask(0))"], capture_output=True, text=True,
                         preexec_fn=lambda: os.umask(0), check=True).stdout
    assert out.strip() == "0"


def check_creation_modes(events: Sequence[Event], private, existed: set, chmod_mask: int = 0o077) -> List[str]:
    """Problems: a private path created (open O_CREAT, mkdir) with a mode that gives group or
    others any bit, or chmod-ed to a mode with a `chmod_mask` bit (on hosts, keys end up
    0640 for QEMU's group). A path that already existed is not created by O_CREAT."""
    problems, known = [], set(existed)
    for e in events:
        path = e.path
        if not e.ok or path is None:
            continue
        if e.call in ("rename", "renameat", "renameat2") and len(e.strings) >= 2:
            known.add(e.strings[-1].decode("utf-8", "surrogateescape"))
            continue
        if e.call in ("unlink", "unlinkat"):
            known.discard(path)
            continue
        creating = e.creates and path not in known
        chmod = e.call in ("chmod", "fchmod", "fchmodat")
        mask = chmod_mask if chmod else 0o077
        if (creating or chmod) and private(path) and e.mode is not None and e.mode & mask:
            problems.append(f"{e.call} {path} with mode {e.mode:04o}")
        if e.call in ("open", "openat", "creat", "mkdir", "mkdirat"):
            known.add(path)
    return problems


def existing(*roots: Path) -> set:
    return {str(p) for root in roots if root.exists() for p in [root, *root.rglob("*")]}


# ---------------------------------------------------------------- local: CA key and modes

def test_ca_key_is_only_written_encrypted_and_private_files_are_born_private(tmp_path):
    """init, issue and export under umask 000 and strace: the CA key never travels through
    any write() unencrypted, and every private file and directory is created private."""
    _umask0_works()
    home, out = tmp_path / "home", tmp_path / "export"
    secret = write_secret(tmp_path / "pass", PASSPHRASE)

    proc, init = run_traced(tmp_path, "init", home, "init", "--passphrase-file", secret,
                            "--key-type", "ecdsa-p256", "--json")
    assert_ok(proc)
    key_pem = (home / "ca" / "ca-key.pem").read_bytes()
    assert key_pem.startswith(b"-----BEGIN ENCRYPTED PRIVATE KEY-----\n")
    with pytest.raises(TypeError):
        serialization.load_pem_private_key(key_pem, None)  # not readable without the passphrase
    ca_key = serialization.load_pem_private_key(key_pem, PASSPHRASE.encode())
    plain = key_needles(ca_key)

    existed = existing(home)
    proc, issue = run_traced(tmp_path, "issue", home, "issue", "a.qemu.test", "--passphrase-file", secret,
                             "--json")
    assert_ok(proc)
    existed_export = existing(home, out)
    proc, export = run_traced(tmp_path, "export", home, "export", "a.qemu.test", "--dir", str(out),
                              "--passphrase-file", secret, "--json")
    assert_ok(proc)

    # The trace really holds what was written: the encrypted key, byte for byte, went
    # through one write() (so a clear one would have been seen too).
    assert any(key_pem in e.payload for e in init), "strace did not capture the key file's write"
    for name, events in (("init", init), ("issue", issue), ("export", export)):
        written = [e for e in events if e.payload]
        assert written, name
        for e in written:
            found = leaks(e.payload, plain + [PASSPHRASE.encode()])
            assert not found, f"{name}: {e.call} to {e.path} carried the clear CA key or passphrase {found}"
        for e in events:  # no helper process ever got a secret on its command line
            if e.call == "execve":
                assert not leaks(b" ".join(e.strings), plain + [PASSPHRASE.encode()]), e.strings

    # Files left behind (and every file the runs created that still exists): clear key nowhere.
    created = {e.path for ev in (init, issue, export) for e in ev if e.ok and e.creates and e.path}
    for path in sorted(created | {str(p) for p in home.rglob("*")} | {str(p) for p in out.rglob("*")}):
        p = Path(path)
        if p.is_file() and not p.is_symlink() and not path.startswith("/dev/"):
            assert not leaks(p.read_bytes(), plain + [PASSPHRASE.encode()]), path

    # Born private, under umask 000.
    public = {"ca-cert.pem", "crl.pem", "server-cert.pem", "client-cert.pem", "manifest.json"}

    def private_in_home(path: str) -> bool:
        return path.startswith(str(home)) and _base(os.path.basename(path)) not in public

    def private_in_export(path: str) -> bool:
        return path.startswith(str(out)) and "key" in os.path.basename(path)

    assert not check_creation_modes(init, private_in_home, set())
    assert not check_creation_modes(issue, private_in_home, existed)
    assert not check_creation_modes(export, private_in_export, existed_export)
    created_names = {os.path.basename(e.path) for e in init if e.ok and e.creates and e.path}
    assert "index.sqlite" in created_names, created_names  # the checks above saw the store being made
    assert any(n.startswith(".ca-key.pem.qemuca-tmp-") for n in created_names), created_names
    sqlite_side = [e for ev in (init, issue) for e in ev
                   if e.ok and e.creates and e.path and e.path.endswith(("-wal", "-shm", "-journal"))]
    assert sqlite_side and all(e.mode is not None and e.mode & 0o077 == 0 for e in sqlite_side), \
        [(e.path, e.mode) for e in sqlite_side]

    assert _mode(home) == 0o700 and _mode(home / "ca") == 0o700
    assert _mode(home / "ca" / "ca-key.pem") == 0o600
    for name in ("index.sqlite", "index.sqlite-wal", "index.sqlite-shm"):
        if (home / name).exists():
            assert _mode(home / name) == 0o600, name
    for name in ("server-key.pem", "client-key.pem"):
        assert _mode(out / name) == 0o600  # through the links, the set's file
    key_files = [e for e in export if e.ok and e.creates and e.path and "key" in os.path.basename(e.path)]
    assert key_files, "export created no key file (trace parsing broke?)"


# ---------------------------------------------------------------- the whole tour, hosts included

def _csr_and_key(cn: str):
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
           .sign(key, hashes.SHA256()))
    return csr.public_bytes(serialization.Encoding.PEM), key


def _ssh(fleet) -> List[str]:
    return ["--ssh-config", str(fleet.ssh_config), "--known-hosts", str(fleet.known_hosts)]


def _leftovers(root: Path) -> List[str]:
    return [str(p) for p in root.rglob("*")
            if ".qemuca-tmp-" in p.name or p.name.startswith(("staging-", ".ca-new-"))]


@pytest.mark.sshd
def test_no_secret_in_outputs_logs_command_lines_or_leftovers(tmp_path, fleet_factory):
    fleet = fleet_factory(2)
    h1, h2 = fleet.hosts
    home, out = tmp_path / "home", tmp_path / "export"
    secret = write_secret(tmp_path / "pass", PASSPHRASE)
    wrong = write_secret(tmp_path / "wrong", WRONG)
    csr_pem, csr_key = _csr_and_key("signed.qemu.test")
    (tmp_path / "host.csr").write_bytes(csr_pem)
    (tmp_path / "csr-key.pem").write_bytes(csr_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    os.chmod(tmp_path / "csr-key.pem", 0o600)
    h1.write("/etc/pki/blocked", "a file where the failing deploy wants a directory\n")
    pf = ["--passphrase-file", secret]

    runs = []

    def q(*args, code=(0,)):
        proc = run_qemuca(home, *args)
        codes = code if isinstance(code, tuple) else (code,)
        assert proc.returncode in codes, f"{args}: rc={proc.returncode}\n{proc.stdout}\n{proc.stderr}"
        runs.append((args, proc))
        return proc

    q("init", *pf, "--key-type", "ecdsa-p256", "--json")
    q("issue", h1.name, "export.qemu.test", *pf, "--json")
    q("sign", tmp_path / "host.csr", *pf, "--json")
    q("export", "export.qemu.test", "--dir", out, *pf, "--json")
    q("list", "--json")
    q("list", "--all")
    q("show", h1.name, "--json")
    q("show", "export.qemu.test")
    q("inspect", out / "server-key.pem")
    q("inspect", out / "server-key.pem", "--json")
    q("inspect", home / "ca" / "ca-key.pem", "--json")
    q("inspect", tmp_path / "csr-key.pem")
    q("deploy", h1.name, *_ssh(fleet), *pf, "--json")
    q("deploy", h1.name, *_ssh(fleet), *pf, "--dry-run")
    q("enroll", h2.name, *_ssh(fleet), *pf, "--json")
    failed = q("deploy", h1.name, *_ssh(fleet), *pf, "--cert-dir", "/etc/pki/blocked/qemu", "--json",
               code=EXIT_FAILED)
    assert json.loads(failed.stdout)[0]["result"] == "failed"
    q("verify", h1.name, h2.name, *_ssh(fleet), "--json", code=(0, EXIT_FAILED))  # reads the hosts' sets
    debug = q("--debug", "issue", "x.qemu.test", "--passphrase-file", wrong, code=(EXIT_FAILED, EXIT_PASSPHRASE))
    q("revoke", "export.qemu.test", *pf, "--json")
    q("crl", *pf, "--json")
    q("crl", *pf)

    # Every secret of the run, in every form it could leak in.
    ca_pem = (home / "ca" / "ca-key.pem").read_bytes()
    needles = [PASSPHRASE.encode(), WRONG.encode()] + pem_lines(ca_pem)
    needles += key_needles(serialization.load_pem_private_key(ca_pem, PASSPHRASE.encode()))
    host_keys = [row[0].encode() for row in sqlite3.connect(f"file:{home / 'index.sqlite'}?mode=ro", uri=True)
                 .execute("SELECT key_pem FROM certificates WHERE key_pem IS NOT NULL")]
    host_keys += [h2.read("/etc/pki/qemu/server-key.pem"), (tmp_path / "csr-key.pem").read_bytes()]
    assert len(host_keys) == 4  # h1 and export.qemu.test (made here), h2 (enrolled), the CSR's
    for key in host_keys:  # those made here are stored encrypted under the CA passphrase
        password = PASSPHRASE.encode() if b"ENCRYPTED" in key.split(b"\n", 1)[0] else None
        needles += key_needles(serialization.load_pem_private_key(key, password))
        needles += pem_lines(key) if password else []

    # (b) outputs, error lines and the --debug traceback.
    assert "Traceback" in debug.stderr  # --debug did print one: it holds no secret either
    for args, proc in runs:
        found = leaks((proc.stdout + proc.stderr).encode(), needles)
        assert not found, f"{args} printed secret material {found}"
    # ... nor the audit log and meta of the index (host keys live in certificates.key_pem, 0600).
    db = sqlite3.connect(f"file:{home / 'index.sqlite'}?mode=ro", uri=True)
    audit = json.dumps(db.execute("SELECT * FROM audit").fetchall() + db.execute("SELECT * FROM meta").fetchall())
    assert db.execute("SELECT count(*) FROM audit").fetchone()[0] >= 8
    assert not leaks(audit.encode(), needles)
    for path in home.rglob("*"):
        if path.is_file():
            assert not leaks(path.read_bytes(), [PASSPHRASE.encode(), WRONG.encode()] + key_needles(
                serialization.load_pem_private_key(ca_pem, PASSPHRASE.encode()))), path

    # (c) no secret on any command line a host ran, nor in its sshd log.
    for host in fleet.hosts:
        commands = host.commands()
        assert commands, f"{host.name} ran no command: the check below would be empty"
        found = leaks("\n".join(commands).encode(), needles)
        assert not found, f"{host.name} ran a command line holding {found}"
        assert not leaks(host.sshd_log().encode(), needles)
    assert any(c.startswith("openssl genpkey") for c in h2.commands())  # enroll made the key there

    # (d) nothing half-done left anywhere.
    assert not _leftovers(home) and not _leftovers(out)
    for host in fleet.hosts:
        for root in ("/etc/pki", "/etc/libvirt"):
            assert not _leftovers(host.path(root)), host.name
    assert (h1.path("/etc/pki/qemu/.qemuca/sets")).is_dir() and (h2.path("/etc/pki/qemu/.qemuca/sets")).is_dir()


# ---------------------------------------------------------------- remote: born private on the host

@pytest.mark.sshd
def test_keys_are_born_private_on_the_hosts(tmp_path, fleet_factory):
    """strace on the fake hosts' sshd (sftp-server, openssl): during deploy and enroll every
    key file on a host is created without group or other bits and only then given its
    final 0640 (owner root, group QEMU's), before a key byte is written."""
    fleet = fleet_factory(2)
    h1, h2 = fleet.hosts
    home = tmp_path / "home"
    assert_ok(run_qemuca(home, "init", "--no-passphrase", "--key-type", "ecdsa-p256"))
    tracers = [Attached(h.pid, tmp_path / f"remote-{h.name}") for h in fleet.hosts]
    try:
        assert_ok(run_qemuca(home, "deploy", h1.name, "--issue", *_ssh(fleet), "--json"))
        assert_ok(run_qemuca(home, "enroll", h2.name, *_ssh(fleet), "--json"))
    finally:
        traces = [t.stop() for t in tracers]

    def key_path(path: str) -> bool:
        return path.startswith("/etc/pki/qemu") and "key" in os.path.basename(path)

    for host, events in zip(fleet.hosts, traces):
        problems = check_creation_modes(events, key_path, set(), chmod_mask=0o037)
        assert not problems, f"{host.name}: {problems}"
        made = [e for e in events if e.ok and e.creates and e.path and key_path(e.path)
                and e.call in ("open", "openat", "creat")]
        assert made, f"{host.name}: no key file creation seen"
        for e in events:  # the final mode never gives others anything, and never 'x'
            if e.ok and e.call in ("chmod", "fchmod", "fchmodat") and e.path and key_path(e.path):
                assert e.mode in (0o600, 0o640), (host.name, e.path, oct(e.mode))
    # deploy: sftp-server creates the key in the new set's dir 0600 (O_EXCL; no reader uses
    # that dir yet), then fchmod 0640/fchown, then writes it.
    sftp = [e for e in traces[0] if e.path and "/.qemuca/sets/" in e.path and e.ok
            and e.path.endswith("/server-key.pem")]
    calls = [e.call for e in sftp]
    assert calls[0] == "openat" and sftp[0].mode == 0o600, calls
    assert calls.index("fchmod") < calls.index("write"), calls
    assert stat.S_IMODE(h1.stat("/etc/pki/qemu/.qemuca/current/server-key.pem").st_mode) == 0o640
