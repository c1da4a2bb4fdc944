"""Check a host's QEMU TLS set-up where it lives, and whether two hosts can migrate.

Every check runs over the FS interface plus a command runner, so `verify HOST` (RemoteFS
and a transport.Connection over SSH) and `verify --local` (LocalFS and LocalRunner) are
one code path. The certificate checks are profile.check_host / check_ca, the same ones
issue and inspect use, so what we issue and what we accept cannot drift apart.

A check gives pass, warn, fail or skip (could not be checked here, with a note), the
reason, and the fix. Nothing is written on a host, except that `--handshake` runs
`openssl s_server` / `s_client` for a few seconds and always kills them by PID.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import posixpath
import subprocess
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from qemuca.errors import InvalidInput, NotFound, QemucaError, RemoteError
from qemuca.hosts import qemuconf
from qemuca.hosts.layout import (
    ALL_FILES,
    CA_BUNDLE,
    CLIENT_CERT,
    CLIENT_KEY,
    CRL,
    KEY_FILES,
    SERVER_CERT,
    SERVER_KEY,
    host_modes,
)
from qemuca.names import host_port
from qemuca.pki import profile
from qemuca.pki.checks import fingerprint, issued_by

PASS, WARN, FAIL, SKIP = profile.PASS, profile.WARN, profile.FAIL, "skip"
RANK = {SKIP: 0, PASS: 0, WARN: 1, FAIL: 2}

DEFAULT_CERT_DIR = "/etc/pki/qemu"
DEFAULT_QEMU_CONF = qemuconf.DEFAULT_PATH
DEFAULT_WARN_DAYS = 30
CRL_WARN_DAYS = 7  # a CRL is re-signed every 30 days by default: warn in its last week
MAX_BUNDLE = 16  # QEMU before 10.1 refuses a ca-cert.pem with more CAs
LIBVIRT_CA = "/etc/pki/CA/cacert.pem"
LIBVIRT_CERTS = ("/etc/pki/libvirt/servercert.pem", "/etc/pki/libvirt/clientcert.pem")
DAEMONS = ("virtqemud", "libvirtd")
CLK_TCK = 100  # USER_HZ: /proc/PID/stat start times are in 1/100 s on every Linux ABI
DEFAULT_PORT = 49152  # first port of libvirt's migration range: same firewall path
HANDSHAKE_TIMEOUT = 15.0
REQUIRED = (CA_BUNDLE, SERVER_CERT, SERVER_KEY, CLIENT_CERT, CLIENT_KEY)


# ---------------------------------------------------------------- results


@dataclass(frozen=True)
class Check:
    check: str
    result: str  # pass | warn | fail | skip
    detail: str
    fix: str = ""

    def as_dict(self) -> dict:
        return {"check": self.check, "result": self.result, "detail": self.detail, "fix": self.fix}


def overall(checks: Sequence[Check]) -> str:
    worst = max((RANK[c.result] for c in checks), default=0)
    return {0: PASS, 1: WARN, 2: FAIL}[worst]


class _Outcome:
    """result and failed() of a report holding `checks` and maybe an `error`."""

    @property
    def result(self) -> str:
        return FAIL if self.error else overall(self.checks)

    def failed(self, strict: bool = False) -> bool:
        return self.result == FAIL or (strict and self.result == WARN)


@dataclass
class HostReport(_Outcome):
    """Every check on one host; `error` when the host could not be reached."""

    host: str
    checks: List[Check] = field(default_factory=list)
    error: Optional[str] = None
    exit_code: Optional[int] = None  # the error's exit code (unreachable host)


    def as_dict(self) -> dict:
        return {"host": self.host, "result": self.result, "error": self.error,
                "checks": [c.as_dict() for c in self.checks]}


@dataclass
class PairReport(_Outcome):
    source: str
    destination: str
    tls_destination: Optional[str] = None
    checks: List[Check] = field(default_factory=list)
    error: Optional[str] = None
    exit_code: Optional[int] = None

    @property
    def host(self) -> str:
        return f"{self.source} -> {self.destination}"


    def as_dict(self) -> dict:
        return {"source": self.source, "destination": self.destination,
                "tls_destination": self.tls_destination, "result": self.result,
                "error": self.error, "checks": [c.as_dict() for c in self.checks]}


@dataclass(frozen=True)
class VerifyOptions:
    cert_dir: str = DEFAULT_CERT_DIR
    qemu_conf_path: str = DEFAULT_QEMU_CONF
    group: Optional[str] = None  # None: as deploy resolves it (qemu.conf, qemu, libvirt-qemu)
    hostname: Optional[str] = None  # None: `hostname -f` on the host
    warn_days: int = DEFAULT_WARN_DAYS
    # Host paths, overridable so that tests can point them into a temporary dir.
    libvirt_ca: str = LIBVIRT_CA
    libvirt_certs: Tuple[str, ...] = LIBVIRT_CERTS
    run_dir: str = "/run"
    proc: str = "/proc"

    def validate(self) -> None:
        if not self.cert_dir.startswith("/"):
            raise InvalidInput(f"--cert-dir {self.cert_dir!r} must be an absolute path")
        if self.warn_days < 0:
            raise InvalidInput("--warn-days must not be negative")


@dataclass(frozen=True)
class Reference:
    """What the CA store knows, read once in the calling thread (SQLite stays there)."""

    trusted: Tuple[x509.Certificate, ...]  # the CAs hosts must trust (two during a rollover)
    crls: Tuple[x509.CertificateRevocationList, ...]  # the store's crl.pem (one CRL per CA)
    deployed: Dict[str, Tuple[str, str]]  # host -> (fingerprint, time) of the last deploy
    bundles: Dict[str, Optional[str]]  # host -> sha256 of the ca-cert.pem last deployed
    index: Dict[str, Tuple[str, str, str]]  # fingerprint -> (host, status, serial)
    current: Dict[str, str]  # host -> fingerprint of its valid certificate

    @property
    def ca_cert(self) -> x509.Certificate:
        return self.trusted[0]

    @classmethod
    def from_store(cls, store) -> Reference:
        from qemuca.pki.ca import CertificateAuthority
        from qemuca.pki.certinfo import read_pem_blocks

        authority = CertificateAuthority(store)
        crls: List[x509.CertificateRevocationList] = []
        try:
            data = store.fs.read_bytes(store.crl_path)
            crls = [x509.load_pem_x509_crl(b) for label, b in read_pem_blocks(data, store.crl_path)
                    if label == "X509 CRL"]
        except FileNotFoundError:
            pass
        except (ValueError, InvalidInput):
            raise InvalidInput(f"the store's CRL {store.crl_path} is corrupt: run 'qemuca crl'") from None
        records = store.certificates()
        bundles = store.deployed_bundles() if hasattr(store, "deployed_bundles") else {}
        return cls(tuple(s.cert for s in authority.trusted()), tuple(crls), store.deployed(), bundles,
                   {r.fingerprint_sha256: (r.host, r.status, r.serial) for r in records},
                   {r.host: r.fingerprint_sha256 for r in records if r.status == "valid"})


# ---------------------------------------------------------------- running commands


class LocalRunner:
    """Runs the same allowlisted argv as transport.Connection.run, on this machine."""

    name = "localhost"

    def run(self, argv: Sequence[str], stdin: Optional[bytes] = None, timeout: Optional[float] = None,
            check: bool = False):
        from qemuca.hosts.ssh import DEFAULT_COMMAND_TIMEOUT, RunResult, command_line

        command_line(argv)  # the allowlist applies here too
        try:
            p = subprocess.run(list(argv), input=stdin or b"", capture_output=True,
                               timeout=timeout or DEFAULT_COMMAND_TIMEOUT)
        except FileNotFoundError:
            return RunResult(127, b"", f"{argv[0]}: command not found\n".encode())
        except subprocess.TimeoutExpired:
            raise RemoteError(f"{self.name}: {argv[0]}: timed out") from None
        result = RunResult(p.returncode, p.stdout, p.stderr)
        if check and not result.ok:
            raise RemoteError(f"{self.name}: {argv[0]} failed (exit {result.rc})")
        return result

    def run_command(self, name: str, stdin: Optional[bytes] = None, timeout: Optional[float] = None,
                    check: bool = False, **args: str):
        from qemuca.hosts.ssh import command

        return self.run(command(name, **args), stdin=stdin, timeout=timeout, check=check)


# ---------------------------------------------------------------- the files of a cert dir


@dataclass
class Placed:
    """One layout name in the cert dir: where it leads and what it holds."""

    name: str
    path: str  # cert_dir/name
    resolved: Optional[str] = None  # the regular file it resolves to, inside the dir
    stat: object = None  # FileStat of `resolved`
    data: Optional[bytes] = None
    problem: Optional[str] = None  # missing, escapes the dir, not a regular file, unreadable


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def resolve_inside(fs, root: str, name: str, limit: int = 40) -> Tuple[Optional[str], Optional[str]]:
    """(path, None) when root/name resolves, every link on the way staying inside root;
    (None, why) otherwise. Each component is looked at, so a link to a directory counts."""
    root = posixpath.normpath(root)
    todo = [p for p in name.split("/") if p]
    cur, hops = root, 0
    while todo:
        part = todo.pop(0)
        if part == ".":
            continue
        nxt = posixpath.dirname(cur) if part == ".." else posixpath.join(cur, part)
        if not _inside(nxt, root):
            return None, f"leads out of {root} (to {nxt})"
        st = fs.stat(nxt, follow=False)
        if st is None:
            return None, "missing" if cur == root else f"missing ({nxt} does not exist)"
        if st.is_link:
            hops += 1
            if hops > limit:
                return None, "too many levels of symbolic links"
            target = fs.readlink(nxt)
            base = "/" if target.startswith("/") else posixpath.dirname(nxt)
            joined = posixpath.normpath(posixpath.join(base, target))
            if not _inside(joined, root):
                return None, f"is a link leading out of {root} (to {joined})"
            # Continue from the root with the rest of the path appended.
            rel = posixpath.relpath(joined, root)
            todo = [p for p in rel.split("/") if p and p != "."] + todo
            cur = root
            continue
        cur = nxt
    return cur, None


def read_placed(fs, cert_dir: str, name: str) -> Placed:
    placed = Placed(name, posixpath.join(cert_dir, name))
    try:
        path, why = resolve_inside(fs, cert_dir, name)
        if path is None:
            placed.problem = why
            return placed
        st = fs.stat(path, follow=False)
        if not st.is_file:
            placed.problem = f"{path} is not a regular file"
            return placed
        placed.resolved, placed.stat = path, st
        placed.data = fs.read_bytes(path)
    except OSError as e:
        placed.problem = f"cannot read it: {e.strerror or e}"
    return placed


@dataclass
class CertSet:
    """A cert dir's files, parsed; each parse problem kept for the report."""

    cert_dir: str
    exists: bool
    files: Dict[str, Placed]
    bundle: List[x509.Certificate] = field(default_factory=list)
    certs: Dict[str, x509.Certificate] = field(default_factory=dict)
    keys: Dict[str, object] = field(default_factory=dict)
    crls: List[x509.CertificateRevocationList] = field(default_factory=list)
    parse_errors: Dict[str, str] = field(default_factory=dict)

    def present(self, name: str) -> bool:
        return self.files[name].data is not None


def read_set(fs, cert_dir: str) -> CertSet:
    from qemuca.pki.certinfo import load_certificates, read_pem_blocks

    cert_dir = posixpath.normpath(cert_dir)
    st = fs.stat(cert_dir)
    cs = CertSet(cert_dir, bool(st and st.is_dir), {})
    for name in ALL_FILES:
        cs.files[name] = read_placed(fs, cert_dir, name) if cs.exists else Placed(name, posixpath.join(
            cert_dir, name), problem="missing")
    for name, placed in cs.files.items():
        if placed.data is None:
            continue
        try:
            if name == CA_BUNDLE:
                cs.bundle = load_certificates(placed.data, name)
            elif name in (SERVER_CERT, CLIENT_CERT):
                certs = load_certificates(placed.data, name)
                cs.certs[name] = certs[0]
                if len(certs) > 1:
                    cs.parse_errors[name] = (f"holds {len(certs)} certificates: the first is the host's, "
                                             "the others go to peers as its chain (qemuca writes one)")
            elif name in KEY_FILES:
                cs.keys[name] = _load_key(placed.data, name)
            elif name == CRL:
                blocks = [b for label, b in read_pem_blocks(placed.data, name) if label == "X509 CRL"]
                if not blocks:
                    raise InvalidInput(f"{name} holds no CRL")
                cs.crls = [x509.load_pem_x509_crl(b) for b in blocks]
        except (InvalidInput, ValueError) as e:
            cs.parse_errors[name] = str(e) if isinstance(e, InvalidInput) else f"{name} is corrupt"
    return cs


def _load_key(data: bytes, name: str):
    try:
        return serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise InvalidInput(f"{name} is encrypted: QEMU needs a libvirt secret for it and qemuca "
                           "cannot check it") from None
    except Exception:  # ValueError, or a key type this cryptography cannot load
        raise InvalidInput(f"{name} holds no usable private key") from None


# ---------------------------------------------------------------- certificate helpers


def issuer_in(cert: x509.Certificate, bundle: Sequence[x509.Certificate]) -> Optional[x509.Certificate]:
    """The CA of the bundle that signed cert. GnuTLS takes every certificate of the CA
    file as a trust anchor, so direct issuance is exactly what QEMU accepts."""
    return next((ca for ca in bundle if issued_by(cert, ca)), None)


def crl_signed_by(crl: x509.CertificateRevocationList, ca: x509.Certificate) -> bool:
    try:
        return crl.issuer == ca.subject and crl.is_signature_valid(ca.public_key())
    except Exception:
        return False


def _next_update(crl) -> Optional[dt.datetime]:
    return getattr(crl, "next_update_utc", None) or (
        crl.next_update.replace(tzinfo=dt.timezone.utc) if crl.next_update else None)


def _revocation_date(entry) -> dt.datetime:
    return getattr(entry, "revocation_date_utc", None) or entry.revocation_date.replace(tzinfo=dt.timezone.utc)


def revoked_in(cert: x509.Certificate, crls: Sequence[x509.CertificateRevocationList],
               issuer: Optional[x509.Certificate]) -> Optional[str]:
    """How cert is revoked by one of the CRLs its issuer signed, or None."""
    for crl in crls:
        if issuer is not None and not crl_signed_by(crl, issuer):
            continue
        if issuer is None and crl.issuer != cert.issuer:
            continue
        entry = crl.get_revoked_certificate_by_serial_number(cert.serial_number)
        if entry is not None:
            reason = ""
            try:
                reason = " (" + entry.extensions.get_extension_for_class(x509.CRLReason).value.reason.value + ")"
            except x509.ExtensionNotFound:
                pass
            return f"revoked on {_revocation_date(entry).date().isoformat()}{reason}"
    return None


def cn_of(cert: x509.Certificate) -> str:
    cns = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    return str(cns[0].value) if cns else cert.subject.rfc4514_string()


def _short(fp: Optional[str]) -> str:
    return (fp or "")[:16]


def _same_key(a, b) -> bool:
    fmt = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    try:
        return a.public_bytes(*fmt) == b.public_bytes(*fmt)
    except Exception:
        return False


def bundle_problems(bundle: Sequence[x509.Certificate], now: dt.datetime,
                    own: Optional[x509.Certificate] = None) -> List[str]:
    """Why QEMU (before 10.1 / 10.2) would refuse ca-cert.pem, if it would. QEMU before
    10.1 reads only the first 16 CAs for its load-time checks: its own certificate
    (`own`) must be issued by one of those, and a later CA is not checked at all."""
    out = []
    if len(bundle) > MAX_BUNDLE:
        pos = next((i for i, ca in enumerate(bundle) if own is not None and issued_by(own, ca)), None)
        if pos is not None and pos >= MAX_BUNDLE:
            out.append(f"holds {len(bundle)} CAs and the one that issued this host's certificate is "
                       f"#{pos + 1}: QEMU before 10.1 reads only the first {MAX_BUNDLE} and refuses "
                       "its own certificate")
        else:
            out.append(f"holds {len(bundle)} CAs: QEMU before 10.1 reads only the first {MAX_BUNDLE} "
                       "(a certificate issued by a later one is refused); keep at most "
                       f"{MAX_BUNDLE}")
    for ca in bundle:
        if now > ca.not_valid_after_utc:
            out.append(f"CA '{cn_of(ca)}' expired on {ca.not_valid_after_utc.date().isoformat()}: "
                       "QEMU before 10.2 then refuses the whole bundle")
        elif now < ca.not_valid_before_utc:
            out.append(f"CA '{cn_of(ca)}' is not valid before {ca.not_valid_before_utc.isoformat()}: "
                       "QEMU before 10.2 then refuses the whole bundle")
    return out


# ---------------------------------------------------------------- one host


class _Host:
    """The context of one host's checks: collects Check rows."""

    def __init__(self, name: str, fs, runner, opts: VerifyOptions, reference: Optional[Reference],
                 now: dt.datetime):
        self.name, self.fs, self.runner, self.opts = name, fs, runner, opts
        self.reference, self.now = reference, now
        self.checks: List[Check] = []
        self.redeploy = f"qemuca deploy {name}" if reference is not None else "redeploy with 'qemuca deploy'"
        self.reissue = (f"qemuca issue --force {name} && qemuca deploy {name}" if reference is not None
                        else "issue a new certificate with qemuca and deploy it")

    def add(self, check: str, result: str, detail: str, fix: str = "") -> None:
        self.checks.append(Check(check, result, detail, fix if result in (WARN, FAIL) else ""))


def host_name_of(runner, override: Optional[str]) -> Tuple[Optional[str], Optional[Check]]:
    """The name libvirt announces for the host (`hostname -f`, as virGetHostname)."""
    if override:
        return override, Check("host name", PASS, f"{override} (given with --hostname)")
    result = runner.run_command("hostname_f")
    name = result.text.strip()
    if result.ok and name:
        return name, Check("host name", PASS, f"{name} (hostname -f)")
    first = (result.stderr.decode("utf-8", "replace").strip().splitlines() or [f"exit {result.rc}"])[0]
    plain = runner.run(["hostname"])
    if plain.ok and plain.text.strip():
        name = plain.text.strip()
        return name, Check("host name", WARN, f"hostname -f failed ({first}); using {name}",
                           "give the host a fully qualified name (/etc/hosts or DNS), or use --hostname")
    return None, Check("host name", FAIL, f"cannot read the host name: {first}",
                       "fix the host's name resolution, or give --hostname")


def verify_host(host: Optional[str], fs, runner, opts: VerifyOptions = VerifyOptions(),
                reference: Optional[Reference] = None, now: Optional[dt.datetime] = None) -> HostReport:
    """Run every check on one host (any FS + runner); host None (--local) names the report
    after the host name found. Raises RemoteError only when the connection is lost;
    everything else becomes a failed check."""
    opts.validate()
    hostname, row = host_name_of(runner, opts.hostname)
    host = host or hostname or runner.name
    h = _Host(host, fs, runner, opts, reference, now or profile.utcnow())
    h.checks.append(row)

    doc, doc_error = None, None
    try:
        doc = qemuconf.read_document(fs, opts.qemu_conf_path)
    except (NotFound, InvalidInput) as e:
        doc_error = str(e)
    except OSError as e:
        doc_error = f"{opts.qemu_conf_path}: {e.strerror or e}"

    cs = read_set(fs, opts.cert_dir)
    _check_dir(h, cs)
    if cs.exists:
        _check_files(h, cs, doc)
        _check_pem(h, cs)
        _check_bundle(h, cs)
        _check_leaves(h, cs, hostname)
        _check_crl(h, cs)
        if reference is not None:
            _check_store(h, cs)
        _check_separation(h, cs)
    _check_qemu_conf(h, doc, doc_error)
    _check_daemon(h, doc)
    return HostReport(host, h.checks)


def _check_dir(h: _Host, cs: CertSet) -> None:
    d = cs.cert_dir
    if not cs.exists:
        h.add("cert dir", FAIL, f"{d} does not exist or is not a directory",
              f"{h.redeploy} (or give the right --cert-dir)")
        return
    st = h.fs.stat(d)
    problems = []
    if st.uid != 0:
        problems.append(f"owner uid {st.uid}, not root")
    if st.perms & 0o022:
        who = {0o022: "group and others", 0o020: "group", 0o002: "others"}[st.perms & 0o022]
        problems.append(f"mode {st.perms:04o}: writable by {who}")
    if problems:
        h.add("cert dir", FAIL, f"{d}: " + "; ".join(problems),
              f"chown root {d} && chmod 0755 {d}")
    else:
        h.add("cert dir", PASS, f"{d} (mode {st.perms:04o}, root)")


def _dirs_on_path(cert_dir: str, path: str) -> List[str]:
    """The directories from cert_dir down to path's parent."""
    out, cur = [], posixpath.dirname(path)
    while _inside(cur, cert_dir) and cur != cert_dir:
        out.append(cur)
        cur = posixpath.dirname(cur)
    return out


def _check_files(h: _Host, cs: CertSet, doc) -> None:
    from qemuca.ops.deploy import resolve_group

    gid, group_problem = None, None
    try:
        gid = resolve_group(h.runner, doc, h.opts.group)
    except QemucaError as e:
        group_problem = str(e)
    modes = host_modes(gid if gid is not None else -1)
    for name in ALL_FILES:
        placed = cs.files[name]
        check = f"file {name}"
        if placed.data is None:
            if name == CRL and placed.problem == "missing":
                h.add(check, PASS, "absent (optional: QEMU then checks no revocation)")
                continue
            h.add(check, FAIL, f"{placed.path}: {placed.problem}",
                  h.redeploy if "link" not in (placed.problem or "") else
                  f"make {name} a file (or a link) inside {cs.cert_dir}: {h.redeploy}")
            continue
        st, path = placed.stat, placed.resolved
        where = path if path == placed.path else f"{placed.path} -> {path}"
        problems, fixes = [], []
        want = modes.of(name)
        if st.uid != 0:
            problems.append(f"owner uid {st.uid}, want root")
            fixes.append(f"chown root {path}")
        if gid is not None and st.gid != gid:
            problems.append(f"group gid {st.gid}, want {gid} (QEMU's group)")
            fixes.append(f"chgrp {gid} {path}")
        if st.perms != want:
            problems.append(f"mode {st.perms:04o}, want {want:04o}")
            fixes.append(f"chmod {want:04o} {path}")
        if name in KEY_FILES and st.perms & 0o007:
            problems.append("the private key is readable by others")
        for d in _dirs_on_path(cs.cert_dir, path):
            dst = h.fs.stat(d)
            if dst is not None and (dst.uid != 0 or dst.perms & 0o022):
                problems.append(f"directory {d} is writable by others than root (mode {dst.perms:04o}, uid {dst.uid})")
                fixes.append(f"chown root {d} && chmod 0755 {d}")
        if problems:
            h.add(check, FAIL, f"{where}: " + "; ".join(problems), " && ".join(fixes) + f" (or {h.redeploy})")
        else:
            h.add(check, PASS, f"{where} ({st.perms:04o}, root, gid {st.gid})")
    if group_problem:
        h.add("files group", FAIL, group_problem, "install libvirt's QEMU driver or give --group")


def _check_pem(h: _Host, cs: CertSet) -> None:
    for name in (CA_BUNDLE, SERVER_CERT, SERVER_KEY, CLIENT_CERT, CLIENT_KEY, CRL):
        if not cs.present(name):
            continue
        if name in cs.parse_errors:
            level = WARN if name in cs.certs else FAIL  # extra certificates after the first
            h.add(f"{name} parses", level, cs.parse_errors[name], h.redeploy)
        elif name == CA_BUNDLE:
            h.add(f"{name} parses", PASS, f"{len(cs.bundle)} CA certificate{'s' if len(cs.bundle) != 1 else ''}")
        elif name == CRL:
            h.add(f"{name} parses", PASS, f"{len(cs.crls)} CRL{'s' if len(cs.crls) != 1 else ''}")
        elif name in cs.keys:
            h.add(f"{name} parses", PASS, profile.describe_key(cs.keys[name].public_key()) + " private key")
        else:
            h.add(f"{name} parses", PASS, f"certificate {cn_of(cs.certs[name])}")
    for key_name, cert_name in ((SERVER_KEY, SERVER_CERT), (CLIENT_KEY, CLIENT_CERT)):
        key, cert = cs.keys.get(key_name), cs.certs.get(cert_name)
        if key is None or cert is None:
            continue
        if _same_key(key.public_key(), cert.public_key()):
            h.add(f"{key_name} matches {cert_name}", PASS, "the key belongs to the certificate")
        else:
            h.add(f"{key_name} matches {cert_name}", FAIL,
                  f"{key_name} is the key of another certificate: QEMU cannot use the pair", h.redeploy)


def _check_bundle(h: _Host, cs: CertSet) -> None:
    if not cs.bundle:
        return
    problems = bundle_problems(cs.bundle, h.now, cs.certs.get(SERVER_CERT))
    if problems:
        h.add("ca-cert.pem bundle", FAIL, "; ".join(problems),
              "remove expired and surplus CAs from the bundle: " + h.redeploy)
    else:
        h.add("ca-cert.pem bundle", PASS, f"{len(cs.bundle)} of at most {MAX_BUNDLE} CAs, none expired")
    for i, ca in enumerate(cs.bundle):
        findings = profile.check_ca(ca, h.now, h.opts.warn_days)
        label = f"CA '{cn_of(ca)}'" + (f" (#{i + 1})" if len(cs.bundle) > 1 else "")
        bad = [f for f in findings if f.result != PASS]
        if not bad:
            validity = findings[0].detail
            h.add(label, PASS, f"CA:TRUE, keyCertSign; {validity}")
            continue
        for f in bad:
            h.add(f"{label} {f.check}", f.result, f.detail,
                  "renew the CA (qemuca init on a new home, then roll it out) or drop it from the bundle"
                  if f.check == "validity" else "use a CA made by 'qemuca init'")


def _leaf_fix(h: _Host, check: str) -> str:
    if check == "subjectAltName":
        return f"issue a certificate with the host's name: {h.reissue} (add names with --san)"
    return h.reissue


def _check_leaves(h: _Host, cs: CertSet, hostname: Optional[str]) -> None:
    names = [SERVER_CERT]
    if CLIENT_CERT in cs.certs and SERVER_CERT in cs.certs and \
            cs.certs[CLIENT_CERT].public_bytes(serialization.Encoding.DER) == \
            cs.certs[SERVER_CERT].public_bytes(serialization.Encoding.DER):
        h.add(f"{CLIENT_CERT} same as {SERVER_CERT}", PASS, "one certificate for both roles")
    else:
        names.append(CLIENT_CERT)
    for name in names:
        cert = cs.certs.get(name)
        if cert is None:
            continue
        issuer = issuer_in(cert, cs.bundle)
        if issuer is not None:
            h.add(f"{name} chain", PASS, f"issued by '{cn_of(issuer)}' in {CA_BUNDLE}")
        elif cs.bundle:
            h.add(f"{name} chain", FAIL, f"issuer '{cert.issuer.rfc4514_string()}' is not a CA of "
                  f"{CA_BUNDLE}: QEMU refuses it, and peers refuse this host", h.redeploy)
        for f in profile.check_host(cert, h.now, h.opts.warn_days, hostname):
            detail = f.detail
            if f.check == "subjectAltName" and hostname and f.result == PASS:
                detail = f"{hostname} is among {detail}"
            h.add(f"{name} {f.check}", f.result, detail, _leaf_fix(h, f.check))
        crls = list(cs.crls)
        why = revoked_in(cert, crls, issuer)
        source = CRL
        if why is None and h.reference is not None and h.reference.crls:
            why = revoked_in(cert, h.reference.crls, issuer)
            source = "the CA's current CRL"
        if why:
            h.add(f"{name} revocation", FAIL, f"{why} in {source}: peers with the CRL refuse this host",
                  h.reissue)
        elif crls or (h.reference is not None and h.reference.crls):
            h.add(f"{name} revocation", PASS, "not revoked")
        else:
            h.add(f"{name} revocation", PASS, "no CRL to check against")


def _check_crl(h: _Host, cs: CertSet) -> None:
    for i, crl in enumerate(cs.crls):
        label = CRL + (f" #{i + 1}" if len(cs.crls) > 1 else "")
        signer = next((ca for ca in cs.bundle if crl_signed_by(crl, ca)), None)
        if signer is None:
            h.add(f"{label} signature", FAIL, f"not signed by a CA of {CA_BUNDLE} "
                  f"(issuer '{crl.issuer.rfc4514_string()}')", f"qemuca crl && {h.redeploy}")
        else:
            h.add(f"{label} signature", PASS, f"signed by '{cn_of(signer)}'")
        nxt = _next_update(crl)
        if nxt is None:
            h.add(f"{label} next update", WARN, "the CRL has no next update", f"qemuca crl && {h.redeploy}")
        elif nxt < h.now:
            h.add(f"{label} next update", FAIL, f"stale: its next update was {nxt.isoformat()}; QEMU "
                  "still uses it, so any revocation since then is unknown to this host",
                  f"qemuca crl && {h.redeploy}")
        elif nxt - h.now < dt.timedelta(days=CRL_WARN_DAYS):
            h.add(f"{label} next update", WARN, f"next update {nxt.isoformat()}, less than "
                  f"{CRL_WARN_DAYS} days away", f"qemuca crl && {h.redeploy}")
        else:
            h.add(f"{label} next update", PASS, f"{nxt.isoformat()}")


def _check_store(h: _Host, cs: CertSet) -> None:
    ref = h.reference
    cert = cs.certs.get(SERVER_CERT)
    names = " and ".join(f"'{cn_of(c)}' ({_short(fingerprint(c))})" for c in ref.trusted)
    problems = []
    have = {fingerprint(c) for c in cs.bundle}
    missing = [c for c in ref.trusted if fingerprint(c) not in have]
    if cs.bundle and missing:
        problems.append(f"{CA_BUNDLE} lacks this store's CA '{cn_of(missing[0])}' "
                        f"({_short(fingerprint(missing[0]))}): the host refuses this CA's other hosts")
    if cert is not None and not any(issued_by(cert, ca) for ca in ref.trusted):
        problems.append(f"{SERVER_CERT} was issued by '{cert.issuer.rfc4514_string()}', not by this "
                        f"store's CA {names}")
    if problems:
        h.add("store CA", FAIL, "; ".join(problems), h.redeploy)
    else:
        h.add("store CA", PASS, f"this store's CA {names}")
    bundle = cs.files[CA_BUNDLE].data
    recorded = ref.bundles.get(h.name)
    if bundle is not None and recorded:
        if hashlib.sha256(bundle).hexdigest() == recorded:
            h.add("store bundle", PASS, f"the {CA_BUNDLE} last deployed")
        else:
            h.add("store bundle", FAIL, f"{CA_BUNDLE} is not the bundle last deployed "
                  f"(sha256 {_short(hashlib.sha256(bundle).hexdigest())}, deployed {_short(recorded)})",
                  h.redeploy)
    if cert is None:
        return
    fp = fingerprint(cert)
    deployed = ref.deployed.get(h.name)
    if deployed is not None:
        if deployed[0] == fp:
            h.add("store deployed", PASS, f"the certificate deployed on {deployed[1]} ({_short(fp)})")
        else:
            h.add("store deployed", FAIL, f"{SERVER_CERT} ({_short(fp)}) is not the certificate "
                  f"deployed on {deployed[1]} ({_short(deployed[0])})", h.redeploy)
    else:
        current = ref.current.get(h.name)
        if current == fp:
            h.add("store deployed", WARN, "the host's current certificate, but the index records no "
                  "deployment of it", h.redeploy)
        else:
            h.add("store deployed", FAIL if current else WARN,
                  f"no deployment to {h.name} recorded" + (f"; the index's certificate is {_short(current)}"
                                                           if current else ""), h.redeploy)
    entry = ref.index.get(fp)
    if entry is None:
        h.add("store index", FAIL, f"{SERVER_CERT} ({_short(fp)}) is not in this store's index", h.reissue)
    else:
        owner, status, serial = entry
        level = {"valid": PASS, "superseded": WARN}.get(status, FAIL)
        text = f"serial {serial} of {owner}: {status}"
        if owner != h.name:
            level, text = FAIL, text + f" (issued to {owner}, not {h.name})"
        h.add("store index", level, text, h.redeploy if status == "superseded" else h.reissue)
    if ref.crls:
        store_revoked = {(crl.issuer.public_bytes(), e.serial_number) for crl in ref.crls for e in crl}
        host_revoked = {(crl.issuer.public_bytes(), e.serial_number) for crl in cs.crls for e in crl}
        missing = store_revoked - host_revoked
        if missing:
            h.add("store CRL", FAIL, f"{len(missing)} certificate(s) revoked by the CA are missing from "
                  f"the host's {CRL}: it still accepts migrations from them", h.redeploy)
        else:
            h.add("store CRL", PASS, f"the host's {CRL} holds every revocation of the CA's CRL"
                  if store_revoked else "nothing revoked")


def _read_certs(fs, path: str) -> Tuple[List[x509.Certificate], Optional[str]]:
    from qemuca.pki.certinfo import load_certificates

    try:
        if fs.stat(path) is None:
            return [], None
        return load_certificates(fs.read_bytes(path), path), None
    except (InvalidInput, ValueError) as e:
        return [], str(e)
    except OSError as e:
        return [], f"{path}: {e.strerror or e}"


def _check_separation(h: _Host, cs: CertSet) -> None:
    if not cs.bundle:
        return
    ours = {fingerprint(c): c for c in cs.bundle}
    libvirt_cas, problem = _read_certs(h.fs, h.opts.libvirt_ca)
    if problem:
        h.add("libvirt CA separate", WARN, f"cannot read libvirt's CA: {problem}")
    elif not libvirt_cas:
        h.add("libvirt CA separate", PASS, f"no libvirt CA at {h.opts.libvirt_ca}")
    else:
        shared = [c for c in libvirt_cas if fingerprint(c) in ours
                  or any(_same_key(c.public_key(), o.public_key()) for o in cs.bundle)]
        if shared:
            h.add("libvirt CA separate", FAIL, f"{h.opts.libvirt_ca} holds the QEMU CA '{cn_of(shared[0])}': "
                  "a QEMU certificate can then log in to libvirtd, and libvirt's certificates "
                  "are accepted for migrations",
                  "give QEMU a dedicated CA (qemuca init) and deploy it, or give libvirt its own CA")
        else:
            h.add("libvirt CA separate", PASS, f"{h.opts.libvirt_ca} is another CA")
    for path in h.opts.libvirt_certs:
        certs, problem = _read_certs(h.fs, path)
        label = f"libvirt {posixpath.basename(path)} separate"
        if problem:
            h.add(label, WARN, f"cannot read it: {problem}")
        elif not certs:
            h.add(label, PASS, f"no {path}")
        else:
            issuer = issuer_in(certs[0], cs.bundle)
            if issuer is not None:
                h.add(label, FAIL, f"{path} was issued by the QEMU CA '{cn_of(issuer)}': libvirt's "
                      "certificates must come from libvirt's own CA",
                      f"reissue {path} from libvirt's CA")
            else:
                h.add(label, PASS, f"{path} is not issued by the QEMU CA")


def _check_qemu_conf(h: _Host, doc, doc_error: Optional[str]) -> None:
    path = h.opts.qemu_conf_path
    fix = f"qemuca qemu-conf apply --cert-dir {h.opts.cert_dir} on the host (or {h.redeploy})"
    if doc is None:
        h.add("qemu.conf", FAIL, doc_error or f"cannot read {path}",
              "install libvirt's QEMU driver, fix the file, or give --qemu-conf")
        return
    try:
        tls = qemuconf.resolve_migration_tls(doc, lambda p: h.fs.stat(p) is not None)
    except InvalidInput as e:
        h.add("qemu.conf", FAIL, str(e), fix)
        return
    want = posixpath.normpath(h.opts.cert_dir)
    got = posixpath.normpath(str(tls.cert_dir.value))
    if got != want:
        h.add("qemu.conf migrate cert dir", FAIL, f"libvirt uses {got} ({tls.cert_dir.source}), not {want}"
              + (" (the first occurrence of a key wins)" if tls.cert_dir.line else ""), fix)
    elif tls.cert_dir.source.startswith("default"):
        h.add("qemu.conf migrate cert dir", WARN, f"{got} by libvirt's default only: "
              f"{qemuconf.CERT_DIR} is not set (creating {qemuconf.LIBVIRT_MIGRATE_DIR} would change it)", fix)
    else:
        h.add("qemu.conf migrate cert dir", PASS, f"{got} ({tls.cert_dir.source})")
    if not tls.verify.value:
        h.add("qemu.conf migrate verify", FAIL, f"0 ({tls.verify.source}): a destination accepts "
              "migrations from any client", fix)
    elif tls.verify.source == "default":
        h.add("qemu.conf migrate verify", WARN, f"{qemuconf.VERIFY} is not set: libvirt before 6.10 "
              "defaults to 0 (no client check)", fix)
    else:
        h.add("qemu.conf migrate verify", PASS, f"1 ({tls.verify.source})")
    for note in tls.warnings:
        if note.startswith("verify is off") or note.startswith(qemuconf.DEFAULT_CERT_DIR + " does not"):
            continue
        h.add("qemu.conf", FAIL if "refuses to start" in note else WARN, note,
              "create the directory or fix the setting" if "does not exist" in note else fix)


def _proc_start(fs, proc: str, pid: int, name: str) -> Optional[float]:
    """Start time (epoch) of pid when it runs `name`, else None."""
    try:
        stat = fs.read_bytes(f"{proc}/{pid}/stat").decode("ascii", "replace")
        comm = stat[stat.index("(") + 1:stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2:].split()
        if comm != name[:15] or fields[0] in ("Z", "X"):
            return None
        start_ticks = int(fields[19])
        btime = next(int(line.split()[1]) for line in fs.read_bytes(f"{proc}/stat").decode().splitlines()
                     if line.startswith("btime "))
        return btime + start_ticks / CLK_TCK
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def _iso(t: float) -> str:
    return dt.datetime.fromtimestamp(t, dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _check_daemon(h: _Host, doc) -> None:
    """Whether the running daemon read qemu.conf before its last change (no reload exists)."""
    if doc is None:
        return
    st = h.fs.stat(doc.path)
    running, notes = [], []
    for daemon in DAEMONS:
        pidfile = posixpath.join(h.opts.run_dir, f"{daemon}.pid")
        try:
            if h.fs.stat(pidfile) is None:
                continue
            pid = int(h.fs.read_bytes(pidfile).split()[0])
        except (OSError, ValueError, IndexError):
            notes.append(f"{pidfile} is unreadable")
            continue
        start = _proc_start(h.fs, h.opts.proc, pid, daemon)
        if start is None:
            notes.append(f"{pidfile} names pid {pid}, which is not a running {daemon}")
            continue
        running.append((daemon, pid, start))
    if not running:
        h.add("daemon settings", SKIP, f"no {' or '.join(DAEMONS)} running (no live pid file in "
              f"{h.opts.run_dir}){': ' + '; '.join(notes) if notes else ''}: it reads qemu.conf when it starts")
        return
    for daemon, pid, start in running:
        if st is not None and st.mtime > start + 1:
            h.add(f"daemon settings ({daemon})", WARN,
                  f"{doc.path} changed at {_iso(st.mtime)}, after {daemon} (pid {pid}) started at "
                  f"{_iso(start)}: it may still use the older settings",
                  f"systemctl try-restart {daemon} (running VMs keep running)")
        else:
            h.add(f"daemon settings ({daemon})", PASS,
                  f"{daemon} (pid {pid}) started at {_iso(start)}, after the last change of {doc.path}")


# ---------------------------------------------------------------- over SSH


def report_unreachable(host: str, error: Exception) -> HostReport:
    code = getattr(error, "exit_code", None)
    text = str(error)
    if isinstance(error, OSError):
        text = f"{host}: {error.strerror or error}" + (f" ({error.filename})" if error.filename else "")
    return HostReport(host, [Check("connection", FAIL, text, "check the host, ssh_config and known_hosts")],
                      error=text, exit_code=code)


def verify_remote(host: str, connect: Callable, opts: VerifyOptions = VerifyOptions(),
                  reference: Optional[Reference] = None, now: Optional[dt.datetime] = None) -> HostReport:
    """Connect, verify, close: an unreachable host or a lost connection is a failed report."""
    from qemuca.hosts.remotefs import RemoteFS

    try:
        with connect(host) as conn:
            return verify_host(host, RemoteFS(conn), conn, opts, reference, now)
    except QemucaError as e:
        return report_unreachable(host, e)
    except OSError as e:
        return report_unreachable(host, e)


# ---------------------------------------------------------------- pairs


@dataclass
class Side:
    """One host of a pair: its name (as qemuca calls it), FS and command runner."""

    name: str
    fs: object
    runner: object


@dataclass(frozen=True)
class PairOptions:
    cert_dir: str = DEFAULT_CERT_DIR
    tls_destination: Optional[str] = None  # None: the destination's `hostname -f`
    warn_days: int = DEFAULT_WARN_DAYS
    handshake: bool = False
    address: Optional[str] = None  # where the source connects (None: the TLS name)
    port: int = DEFAULT_PORT
    timeout: float = HANDSHAKE_TIMEOUT


def _files_row(rows, label: str, host: str, cs: CertSet, names: Sequence[str], key: str, cert: str) -> None:
    problems = []
    for name in names:
        placed = cs.files[name]
        if placed.data is None and not (name == CRL and placed.problem == "missing"):
            problems.append(f"{name}: {placed.problem}")
        elif name in cs.parse_errors and name not in cs.certs:
            problems.append(cs.parse_errors[name])
    if key in cs.keys and cert in cs.certs and not _same_key(cs.keys[key].public_key(), cs.certs[cert].public_key()):
        problems.append(f"{key} does not match {cert}")
    if problems:
        rows.append(Check(label, FAIL, f"{host}: " + "; ".join(problems), f"see 'qemuca verify {host}'"))
    else:
        rows.append(Check(label, PASS, f"{host}: " + ", ".join(n for n in names if cs.present(n))))


def _trust_check(label: str, cert, issuer, owner: str, truster: str) -> Check:
    """Whether `truster`'s bundle holds the CA that issued `owner`'s certificate."""
    if issuer is not None:
        return Check(label, PASS, f"issued by '{cn_of(issuer)}' in {truster}'s bundle")
    return Check(label, FAIL, f"{owner}'s certificate (issuer '{cert.issuer.rfc4514_string()}') "
                 f"chains to no CA of {truster}'s {CA_BUNDLE}", "deploy both hosts from the same CA")


def verify_pair(src: Side, dst: Side, opts: PairOptions = PairOptions(),
                reference: Optional[Reference] = None, now: Optional[dt.datetime] = None) -> PairReport:
    """Will QEMU on src (client endpoint) migrate to QEMU on dst (server endpoint)?"""
    now = now or profile.utcnow()
    s, d = read_set(src.fs, opts.cert_dir), read_set(dst.fs, opts.cert_dir)
    name = opts.tls_destination
    rows: List[Check] = []
    if name is None:
        name, row = host_name_of(dst.runner, None)
        rows.append(Check("destination name", row.result, row.detail.replace("hostname -f", f"hostname -f on {dst.name}"), row.fix))
    report = PairReport(src.name, dst.name, name, rows)
    _files_row(rows, "source files", src.name, s, (CA_BUNDLE, CLIENT_CERT, CLIENT_KEY), CLIENT_KEY, CLIENT_CERT)
    _files_row(rows, "destination files", dst.name, d, (CA_BUNDLE, SERVER_CERT, SERVER_KEY, CRL),
               SERVER_KEY, SERVER_CERT)
    for label, side, cs, own in (("source bundle", src, s, CLIENT_CERT), ("destination bundle", dst, d, SERVER_CERT)):
        if cs.bundle:
            problems = bundle_problems(cs.bundle, now, cs.certs.get(own))
            rows.append(Check(label, FAIL, f"{side.name}: " + "; ".join(problems),
                              f"fix the bundle: qemuca deploy {side.name}")
                        if problems else Check(label, PASS, f"{side.name}: {len(cs.bundle)} CA(s), loadable"))
    client, server = s.certs.get(CLIENT_CERT), d.certs.get(SERVER_CERT)
    for label, side, cert, purpose in (("source certificate", src, client, "clientAuth"),
                                       ("destination certificate", dst, server, "serverAuth")):
        if cert is None:
            continue
        bad = [f for f in profile.check_host(cert, now, opts.warn_days) if f.result != PASS]
        if any(f.result == FAIL for f in bad):
            rows.append(Check(label, FAIL, f"{side.name}: " + "; ".join(
                f"{f.check}: {f.detail}" for f in bad if f.result == FAIL),
                f"qemuca issue --force {side.name} && qemuca deploy {side.name}"))
        elif bad:
            rows.append(Check(label, WARN, f"{side.name}: " + "; ".join(f"{f.check}: {f.detail}" for f in bad),
                              f"qemuca issue --force {side.name} && qemuca deploy {side.name}"))
        else:
            rows.append(Check(label, PASS, f"{side.name}: {cn_of(cert)}, valid, {purpose}"))
    if client is not None and d.bundle:
        issuer = issuer_in(client, d.bundle)
        rows.append(_trust_check("destination trusts source", client, issuer, src.name, dst.name))
        why = revoked_in(client, d.crls, issuer)
        stale = [c for c in d.crls if (_next_update(c) or now) < now]
        if why:
            rows.append(Check("source not revoked (destination's CRL)", FAIL,
                              f"{src.name}'s certificate is {why} in {dst.name}'s {CRL}",
                              f"qemuca issue --force {src.name} && qemuca deploy {src.name}"))
        elif stale:
            rows.append(Check("source not revoked (destination's CRL)", WARN,
                              f"not revoked, but {dst.name}'s {CRL} is stale (next update "
                              f"{_next_update(stale[0]).isoformat()}): QEMU still uses it; later "
                              "revocations are unknown there", f"qemuca crl && qemuca deploy {dst.name}"))
        else:
            rows.append(Check("source not revoked (destination's CRL)", PASS,
                              "not revoked" if d.crls else f"{dst.name} has no {CRL}"))
    if server is not None and s.bundle:
        issuer = issuer_in(server, s.bundle)
        rows.append(_trust_check("source trusts destination", server, issuer, dst.name, src.name))
        if reference is not None:
            crls = list(reference.crls)
            source = "the CA's current CRL" if crls else "the CA store (it has no CRL)"
        else:
            crls, source = s.crls + d.crls, "the hosts' CRLs (no CA store here)"
        why = revoked_in(server, crls, issuer)
        rows.append(Check("destination not revoked (CA's CRL)", FAIL,
                          f"{dst.name}'s certificate is {why} in {source}; QEMU's source never reads a CRL, "
                          "so the migration would go ahead", f"qemuca issue --force {dst.name} && qemuca deploy {dst.name}")
                    if why else Check("destination not revoked (CA's CRL)", PASS, f"not revoked in {source}"))
    if server is not None and name:
        sans = profile.sans_of(server)
        ok = _name_matches(name, sans)
        rows.append(Check("destination name in SANs", PASS, f"{name} is among {', '.join(sans)}") if ok else
                    Check("destination name in SANs", FAIL, f"{name} is not among {', '.join(sans) or 'no SANs'}: "
                          "the source refuses the destination",
                          f"migrate with --tls-destination set to one of them, or add it: "
                          f"qemuca issue --force {dst.name} --san {name}"))
    if opts.handshake:
        if any(c.result == FAIL for c in rows if " files " in f" {c.check} "):
            rows.append(Check("TLS handshake", SKIP, "not tried: files are missing or unreadable"))
        else:
            rows.append(handshake(src, dst, name, opts))
    return report


def _name_matches(name: str, sans: Sequence[str]) -> bool:
    """As the source's GnuTLS does: an IP matches an iPAddress SAN, a name a dNSName."""
    try:
        ip = ipaddress.ip_address(name)
        return any(_ip_equal(ip, s) for s in sans)
    except ValueError:
        pass
    name = name.lower().rstrip(".")
    for san in sans:
        san = san.lower()
        if san == name:
            return True
        if san.startswith("*.") and "." in name and name.split(".", 1)[1] == san[2:]:
            return True
    return False


def _ip_equal(ip, text: str) -> bool:
    try:
        return ipaddress.ip_address(text) == ip
    except ValueError:
        return False


# ---------------------------------------------------------------- the handshake


def _argv_of(fs, proc: str, pid: str) -> Optional[List[str]]:
    try:
        raw = fs.read_bytes(f"{proc}/{pid}/cmdline")
    except OSError:
        return None
    return raw.decode("utf-8", "replace").split("\0")[:-1] if raw else None


def find_pids(fs, argv: Sequence[str], proc: str = "/proc", first: bool = False) -> List[int]:
    """PIDs whose command line is exactly argv (how we find what we started, to kill it).
    Newest (highest) PIDs are looked at first: what we just started is found at once."""
    wanted = list(argv)
    out = []
    try:
        pids = sorted((int(e) for e in fs.listdir(proc) if e.isdigit()), reverse=True)
    except OSError:
        return out
    for pid in pids:
        if _argv_of(fs, proc, str(pid)) == wanted:
            out.append(pid)
            if first:
                break
    return out


def _listening(fs, port: int, proc: str = "/proc") -> bool:
    for table in ("tcp", "tcp6"):
        try:
            text = fs.read_bytes(f"{proc}/net/{table}").decode("ascii", "replace")
        except OSError:
            continue
        for line in text.splitlines()[1:]:
            fields = line.split()
            if len(fields) > 3 and fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                return True
    return False


def _reasons(stderr: bytes) -> List[str]:
    """The lines of openssl's output that say why (verify errors, alerts, connect errors)."""
    out = []
    for line in stderr.decode("utf-8", "replace").splitlines():
        line = line.strip()
        if line.startswith("verify error:"):
            out.append(line)
        elif ":error:" in line and "routines:" in line:
            parts = line.split(":")
            if len(parts) > 5:
                out.append(parts[5])
        elif "errno=" in line or "connect:" in line or "bind" in line.lower() or "Address already" in line:
            out.append(line)
    return list(dict.fromkeys(out))


def _kill(side: Side, pid: int) -> None:
    try:
        side.runner.run(["kill", "-KILL", str(pid)], timeout=10)
    except QemucaError:
        pass


def _has(side: Side, argv: Sequence[str]) -> bool:
    try:
        return side.runner.run(list(argv), timeout=10).ok
    except QemucaError:
        return False


def handshake(src: Side, dst: Side, name: str, opts: PairOptions) -> Check:
    """openssl s_server with dst's server set, s_client on src with its client set and
    -verify_hostname name: both peers authenticated, as in a migration. Each runs under
    `timeout` where the host has it, and whatever still runs at the end is killed by PID."""
    for side in (src, dst):
        if not _has(side, ["openssl", "version"]):
            return Check("TLS handshake", SKIP, f"{side.name} has no openssl: handshake not tried",
                         "install openssl on the host to run --handshake")
    d = posixpath.normpath(opts.cert_dir)
    address = opts.address or name
    try:
        ipaddress.ip_address(address)
        accept = host_port(address, opts.port)
    except ValueError:
        accept = str(opts.port)  # a name: listen on every address of the destination
    seconds = str(max(1, int(opts.timeout)))
    server = ["openssl", "s_server", "-accept", accept, "-naccept", "1", "-www",
              "-cert", f"{d}/{SERVER_CERT}", "-key", f"{d}/{SERVER_KEY}", "-CAfile", f"{d}/{CA_BUNDLE}",
              "-Verify", "1", "-verify_return_error"]
    if dst.fs.stat(f"{d}/{CRL}") is not None:
        server += ["-CRL", f"{d}/{CRL}", "-crl_check"]
    client = ["openssl", "s_client", "-connect", host_port(address, opts.port), "-ign_eof",
              "-cert", f"{d}/{CLIENT_CERT}", "-key", f"{d}/{CLIENT_KEY}", "-CAfile", f"{d}/{CA_BUNDLE}",
              "-verify_return_error", "-verify_hostname", name]
    bound = {side.name: (["timeout", "-s", "KILL", seconds] if _has(side, ["timeout", "--version"]) else [])
             for side in (src, dst)}
    if _listening(dst.fs, opts.port):
        return Check("TLS handshake", FAIL, f"port {opts.port} is already in use on {dst.name}",
                     "choose a free port with --port")
    done: List[object] = []

    def serve():
        try:
            done.append(dst.runner.run(bound[dst.name] + server, timeout=opts.timeout + 5))
        except QemucaError as e:
            done.append(e)

    thread = threading.Thread(target=serve, name="qemuca-s_server", daemon=True)
    deadline = time.monotonic() + opts.timeout
    thread.start()
    server_pid, client_result, client_started = None, None, False
    try:
        while time.monotonic() < deadline and thread.is_alive():
            if _listening(dst.fs, opts.port):
                pids = find_pids(dst.fs, server, first=True)
                if pids:
                    server_pid = pids[0]
                    break
            time.sleep(0.05)
        if server_pid is None:
            thread.join(max(0.0, deadline - time.monotonic()))
            out = done[0] if done else None
            why = "; ".join(_reasons(out.stderr)) if out is not None and not isinstance(out, Exception) else str(out or "")
            return Check("TLS handshake", FAIL, f"openssl s_server did not start on {dst.name} at {accept}"
                         + (f": {why}" if why else ""), "choose a free port with --port")
        client_started = True
        try:
            client_result = src.runner.run(bound[src.name] + client, stdin=b"GET / HTTP/1.0\r\n\r\n",
                                           timeout=opts.timeout + 5)
        except QemucaError as e:
            client_result = e
        thread.join(max(0.5, deadline - time.monotonic()))
    finally:
        if server_pid is not None and _argv_of(dst.fs, "/proc", str(server_pid)) == server:
            _kill(dst, server_pid)
        if client_started and (client_result is None or isinstance(client_result, Exception)):
            for pid in find_pids(src.fs, client):
                _kill(src, pid)
        thread.join(5)
    where = f"{src.name} -> {dst.name} at {host_port(address, opts.port)}, name {name}"
    if isinstance(client_result, Exception):
        return Check("TLS handshake", FAIL, f"{where}: {client_result}", "check the address and firewall")
    ok = client_result.ok and b"HTTP/1.0 200" in client_result.stdout
    if ok:
        return Check("TLS handshake", PASS, f"{where}: both certificates verified by openssl")
    server_out = done[0] if done and not isinstance(done[0], Exception) else None
    parts = []
    reasons = _reasons(client_result.stderr)
    if reasons:
        parts.append(f"{src.name} (client): " + "; ".join(reasons))
    if server_out is not None and _reasons(server_out.stderr):
        parts.append(f"{dst.name} (server): " + "; ".join(_reasons(server_out.stderr)))
    return Check("TLS handshake", FAIL, f"{where}: " + (" / ".join(parts) or f"openssl s_client exit {client_result.rc}"),
                 "fix what the checks above report (or --address / --port)")


def verify_pair_remote(src: str, dst: str, connect: Callable, opts: PairOptions = PairOptions(),
                       reference: Optional[Reference] = None, now: Optional[dt.datetime] = None) -> PairReport:
    """Connect to both hosts (an unreachable one makes the report an error)."""
    from qemuca.hosts.remotefs import RemoteFS

    conns = []
    try:
        for host in (src, dst):
            try:
                conns.append(connect(host))
            except QemucaError as e:
                return PairReport(src, dst, opts.tls_destination,
                                  [Check("connection", FAIL, str(e), "check the host, ssh_config and known_hosts")],
                                  error=str(e), exit_code=e.exit_code)
        a, b = (Side(h, RemoteFS(c), c) for h, c in zip((src, dst), conns))
        try:
            return verify_pair(a, b, opts, reference, now)
        except QemucaError as e:
            return PairReport(src, dst, opts.tls_destination, [Check("connection", FAIL, str(e))],
                              error=str(e), exit_code=e.exit_code)
    finally:
        for c in conns:
            c.close()
