"""Helpers for tests of the CA foundation: run the real CLI, build stores, snapshot them.

Stores are built with the core API (fast, no subprocess); the command under test is
always run as a real `python -m qemuca` process, so exit codes, stderr and the lack
of tracebacks are what a user sees.
"""

from __future__ import annotations

import os
import sqlite3
import stat
import subprocess
import sys
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence

from cryptography import x509

from qemuca.hosts import install
from qemuca.hosts.fs import LocalFS
from qemuca.hosts.layout import EXPORT_MODES
from qemuca.pki import ca
from qemuca.store.index import Store

QEMUCA = [sys.executable, "-m", "qemuca"]
INDEX_FILES = ("index.sqlite", "index.sqlite-wal", "index.sqlite-shm")


def clean_env(extra: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    """The test's environment without QEMUCA_* settings that would leak into a run."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("QEMUCA_")}
    env["COLUMNS"] = "250"  # rich tables: no truncated serials in human output
    env.update(extra or {})
    return env


def run_qemuca(home, *args: str, input: Optional[str] = None, env: Optional[Dict[str, str]] = None,
               timeout: float = 120) -> subprocess.CompletedProcess:
    """`python -m qemuca --home HOME ARGS...`; stdin is /dev/null (no terminal) unless
    `input` is given. Returns the CompletedProcess with text stdout/stderr."""
    return subprocess.run(
        [*QEMUCA, "--home", str(home), *[str(a) for a in args]],
        input=input, stdin=None if input is not None else subprocess.DEVNULL,
        capture_output=True, text=True, env=clean_env(env), timeout=timeout)


def run_many(home, arglists: Sequence[Sequence[str]], env: Optional[Dict[str, str]] = None,
             workers: int = 4) -> List[subprocess.CompletedProcess]:
    """Several independent runs at once (results in the order given): error cases that
    must not write are checked side by side to keep the suite fast."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(lambda args: run_qemuca(home, *args, env=env), arglists))


def popen_qemuca(home, *args: str, env: Optional[Dict[str, str]] = None) -> subprocess.Popen:
    """Start qemuca without waiting (concurrency tests)."""
    return subprocess.Popen([*QEMUCA, "--home", str(home), *[str(a) for a in args]],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=clean_env(env))


def assert_error(proc: subprocess.CompletedProcess, code: int, *needles: str) -> str:
    """The documented error shape: exit `code`, exactly one stderr line starting with
    'qemuca: error:', no traceback. Returns that line (lower-cased needles must occur)."""
    detail = f"rc={proc.returncode}\nstdout={proc.stdout!r}\nstderr={proc.stderr!r}"
    assert proc.returncode == code, detail
    assert "Traceback" not in proc.stderr + proc.stdout, detail
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("qemuca: error: "), detail
    for needle in needles:
        assert needle.lower() in lines[0].lower(), detail
    return lines[0]


def assert_ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, f"rc={proc.returncode}\nstdout={proc.stdout}\nstderr={proc.stderr}"
    assert "Traceback" not in proc.stderr
    return proc


def write_secret(path, text: str = "correct horse battery staple", mode: int = 0o600) -> str:
    """A passphrase file (first line = passphrase) with `mode`."""
    path = Path(path)
    path.write_text(text + "\n")
    os.chmod(path, mode)
    return str(path)


def make_store(tmp_path, key_type: str = "ecdsa-p256", *, name: str = "home",
               passphrase: Optional[bytes] = None, hosts: Sequence[str] = (),
               host_key_type: str = "ecdsa-p256", common_name: str = "QEMU CA test",
               organization: Optional[str] = None, days: int = 3650) -> str:
    """A fresh CA home under tmp_path (core API), optionally with `hosts` issued.
    Returns the home path."""
    home = str(Path(tmp_path) / name)
    store = ca.init_ca(home, common_name=common_name, organization=organization,
                       key_type=key_type, days=days, passphrase=passphrase, force=False)
    store.close()
    if hosts:
        issue(home, *hosts, key_type=host_key_type, passphrase=passphrase)
    return home


def authority(home, passphrase: Optional[bytes] = None) -> ca.CertificateAuthority:
    return ca.CertificateAuthority(Store.open(home), (lambda: passphrase) if passphrase else None)


def issue(home, *hosts: str, key_type: str = "ecdsa-p256", sans: Sequence[str] = (),
          days: int = 730, force: bool = False, passphrase: Optional[bytes] = None) -> List[ca.Issued]:
    """Issue certificates with the core API (setup for tests of other commands)."""
    authority_ = authority(home, passphrase)
    try:
        return authority_.issue(list(hosts), list(sans), days, key_type, force)
    finally:
        authority_.store.close()


def revoke(home, host_or_serial: str, reason: str = "unspecified",
           passphrase: Optional[bytes] = None):
    authority_ = authority(home, passphrase)
    try:
        return authority_.revoke(host_or_serial, reason)
    finally:
        authority_.store.close()


def export_set(home, host: str, directory, force: bool = False) -> install.InstallResult:
    """What `qemuca export` does, in-process: the host's set switched into `directory`."""
    store = Store.open(home)
    try:
        authority_ = ca.CertificateAuthority(store)
        creds = ca.credential_set(store, authority_, host)
        return install.install(LocalFS(), os.path.abspath(str(directory)), creds, EXPORT_MODES,
                               force=force)
    finally:
        store.close()


def index_rows(home, tables: Iterable[str] = ("certificates", "audit", "meta")) -> Dict[str, list]:
    """Every row of the index tables, sorted (a read-only connection)."""
    db = sqlite3.connect(f"file:{Path(home) / 'index.sqlite'}?mode=ro", uri=True)
    try:
        return {t: sorted(db.execute(f"SELECT * FROM {t}").fetchall(), key=repr) for t in tables}
    finally:
        db.close()


def snapshot_store(home) -> dict:
    """Every file under home (bytes, mode, symlink targets) and the index rows.

    The SQLite files themselves are compared through their rows: a reader may
    checkpoint the WAL into the main file without changing any content.
    """
    home = Path(home)
    files = {}
    for path in sorted(home.rglob("*")):
        rel = str(path.relative_to(home))
        if rel in INDEX_FILES:
            continue
        st = path.lstat()
        if stat.S_ISLNK(st.st_mode):
            files[rel] = ("link", os.readlink(path))
        elif stat.S_ISDIR(st.st_mode):
            files[rel] = ("dir", stat.S_IMODE(st.st_mode))
        else:
            files[rel] = ("file", stat.S_IMODE(st.st_mode), path.read_bytes())
    snap = {"files": files, "home_mode": stat.S_IMODE(home.stat().st_mode)}
    if (home / "index.sqlite").exists():
        try:
            snap["rows"] = index_rows(home)
        except sqlite3.DatabaseError:  # a test that broke the index on purpose
            snap["index_bytes"] = (home / "index.sqlite").read_bytes()
    return snap


def snapshot_dir(path) -> Dict[str, tuple]:
    """Every entry under a directory (an export target): bytes, modes, link targets."""
    path = Path(path)
    out = {}
    for p in sorted(path.rglob("*")):
        st = p.lstat()
        rel = str(p.relative_to(path))
        if stat.S_ISLNK(st.st_mode):
            out[rel] = ("link", os.readlink(p))
        elif stat.S_ISDIR(st.st_mode):
            out[rel] = ("dir", stat.S_IMODE(st.st_mode))
        else:
            out[rel] = ("file", stat.S_IMODE(st.st_mode), p.read_bytes())
    return out


def current(home, host: str):
    """The host's valid CertRecord, read with the core (no subprocess)."""
    store = Store.open(home)
    try:
        record = store.valid_for_host(host)
        assert record is not None, f"{host} has no valid certificate in {home}"
        return record
    finally:
        store.close()


def current_cert(home, host: str) -> x509.Certificate:
    return load_cert(current(home, host).cert_pem)


def load_cert(path_or_pem) -> x509.Certificate:
    """A certificate from PEM text/bytes or from a file path."""
    if isinstance(path_or_pem, str) and path_or_pem.startswith("-----BEGIN"):
        path_or_pem = path_or_pem.encode()
    data = path_or_pem if isinstance(path_or_pem, bytes) else Path(path_or_pem).read_bytes()
    return x509.load_pem_x509_certificate(data)


def tamper_signature(csr_pem: bytes) -> bytes:
    """The CSR with the last byte of its signature flipped: still parseable DER, but the
    signature no longer verifies."""
    import base64

    lines = csr_pem.strip().split(b"\n")
    der = bytearray(base64.b64decode(b"".join(lines[1:-1])))
    der[-1] ^= 0x01
    body = base64.encodebytes(bytes(der)).replace(b"\n", b"")
    chunks = [body[i:i + 64] for i in range(0, len(body), 64)]
    return b"\n".join([lines[0], *chunks, lines[-1]]) + b"\n"


def audit_actions(home) -> List[str]:
    db = sqlite3.connect(f"file:{Path(home) / 'index.sqlite'}?mode=ro", uri=True)
    try:
        return [r[0] for r in db.execute("SELECT action FROM audit ORDER BY id")]
    finally:
        db.close()
