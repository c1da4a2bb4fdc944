"""Deploy a host's credential set and qemu.conf over SSH, all or nothing per host.

Per host, over one SSH connection: find the group QEMU runs as, place the set in the
cert dir (install.py: staged, read back, switched in one rename), check what landed
(fingerprint, chain, key), then set the qemu.conf TLS directives through the same
core as `qemuca qemu-conf apply`. If anything after the switch fails, the host is
switched back to its previous set and reported failed.
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass, field
from typing import Callable, List, Optional

from cryptography import x509

from qemuca import install, qemuconf
from qemuca.errors import InvalidInput, NotFound, QemucaError, RemoteError
from qemuca.layout import CA_BUNDLE, SERVER_CERT, SERVER_KEY, CredentialSet, host_modes

DEFAULT_CERT_DIR = "/etc/pki/qemu"
DEFAULT_QEMU_CONF = "/etc/libvirt/qemu.conf"
QEMU_GROUPS = ("qemu", "libvirt-qemu")  # RHEL/Fedora, Debian/Ubuntu
DAEMONS = (("virtqemud", "/usr/sbin/virtqemud"), ("libvirtd", "/usr/sbin/libvirtd"))


@dataclass(frozen=True)
class DeployOptions:
    cert_dir: str = DEFAULT_CERT_DIR
    group: Optional[str] = None  # None: qemu.conf's group, else qemu / libvirt-qemu
    qemu_conf: bool = True
    qemu_conf_path: str = DEFAULT_QEMU_CONF
    force_tls: Optional[bool] = None
    default_dir: bool = False
    restart: bool = False
    dry_run: bool = False
    force: bool = False  # replace layout files qemuca did not write

    def tls_settings(self) -> qemuconf.TlsSettings:
        settings = qemuconf.TlsSettings(cert_dir=self.cert_dir, verify=True, force=self.force_tls,
                                        default_dir=self.default_dir)
        settings.validate()
        return settings


@dataclass
class HostReport:
    """What happened on one host; `result` is changed, unchanged, would-change or failed."""

    host: str
    result: str = "failed"
    fingerprint_sha256: Optional[str] = None
    restart_needed: bool = False
    restarted: Optional[str] = None
    error: Optional[str] = None
    actions: List[str] = field(default_factory=list)
    qemu_conf_diff: str = ""

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def resolve_group(conn, doc: Optional[qemuconf.Document], wanted: Optional[str]) -> int:
    """The gid QEMU runs as: --group, else qemu.conf's `group`, else qemu / libvirt-qemu."""
    if wanted:
        candidates, source = [wanted], "--group"
    else:
        setting = doc.first("group") if doc is not None else None
        if setting is not None and isinstance(setting.value, str):
            candidates, source = [setting.value], f"qemu.conf group (line {setting.line})"
        else:
            candidates, source = list(QEMU_GROUPS), "default"
    for name in candidates:
        if name.startswith("+") and name[1:].isdigit():  # libvirt's numeric "+107"
            return int(name[1:])
        result = conn.run_command("getent_group", group=name)
        if result.ok and result.text.count(":") >= 2:
            return int(result.text.split(":")[2])
    raise NotFound(f"{conn.name}: no group {' or '.join(candidates)} ({source}) on the host: "
                   "is libvirt's QEMU driver installed? Give --group")


def check_landed(fs, cert_dir: str, creds: CredentialSet) -> None:
    """Read the files back through their names: our certificate, chained to the CA, with its key."""
    cert = x509.load_pem_x509_certificate(fs.read_bytes(posixpath.join(cert_dir, SERVER_CERT)))
    from qemuca.ca import fingerprint

    if fingerprint(cert) != creds.fingerprint_sha256:
        raise install.InstallError(f"{cert_dir}/{SERVER_CERT} is not the certificate deployed")
    bundle = x509.load_pem_x509_certificates(fs.read_bytes(posixpath.join(cert_dir, CA_BUNDLE)))
    if not any(_issued_by(cert, ca) for ca in bundle):
        raise install.InstallError(f"{cert_dir}/{SERVER_CERT} does not chain to {CA_BUNDLE}")
    if SERVER_KEY in creds.files:
        from cryptography.hazmat.primitives import serialization

        key = serialization.load_pem_private_key(fs.read_bytes(posixpath.join(cert_dir, SERVER_KEY)), None)
        if key.public_key().public_numbers() != cert.public_key().public_numbers():
            raise install.InstallError(f"{cert_dir}/{SERVER_KEY} does not match the certificate")


def _issued_by(cert: x509.Certificate, ca: x509.Certificate) -> bool:
    from cryptography.exceptions import InvalidSignature

    try:
        cert.verify_directly_issued_by(ca)
        return True
    except (ValueError, TypeError, InvalidSignature):
        return False


def restart_daemon(conn) -> str:
    """try-restart virtqemud where the host has it (modular daemons), else libvirtd."""
    for unit, binary in DAEMONS:
        if conn.run(["test", "-x", binary]).ok:
            conn.run_command("systemctl_try_restart", unit=unit, check=True)
            return unit
    raise RemoteError(f"{conn.name}: neither virtqemud nor libvirtd is installed")


def deploy_host(conn, fs, creds: CredentialSet, opts: DeployOptions) -> HostReport:
    """Deploy to one connected host; raises QemucaError on failure (nothing half-done)."""
    report = HostReport(creds.host, fingerprint_sha256=creds.fingerprint_sha256)
    settings = opts.tls_settings() if opts.qemu_conf else None
    doc = None
    try:
        doc = qemuconf.read_document(fs, opts.qemu_conf_path)
    except NotFound:
        if opts.group is None and opts.qemu_conf:
            raise NotFound(f"{conn.name}: {opts.qemu_conf_path} does not exist: is libvirt "
                           "installed? (--no-qemu-conf to deploy certificates only)") from None
    modes = host_modes(resolve_group(conn, doc, opts.group))

    if opts.dry_run:
        plan = install.plan(fs, opts.cert_dir, creds, modes)
        report.actions = plan.actions + [f"keep {n} (foreign file, replaced with --force)" for n in plan.adopted]
        changed = plan.changed
        if settings is not None:
            edit = qemuconf.edit_file(fs, opts.qemu_conf_path,
                                      lambda d: qemuconf.apply_tls(d, settings), dry_run=True)
            if edit.changed:
                report.qemu_conf_diff = qemuconf.unified_diff(edit.before, edit.after, edit.path)
                report.restart_needed = changed = True
        report.result = "would-change" if changed else "unchanged"
        return report

    placed = install.install(fs, opts.cert_dir, creds, modes, force=opts.force)
    try:
        check_landed(fs, opts.cert_dir, creds)
        report.actions += placed.actions
        if settings is not None:
            edit = qemuconf.edit_file(fs, opts.qemu_conf_path, lambda d: qemuconf.apply_tls(d, settings))
            if edit.written:
                report.qemu_conf_diff = qemuconf.unified_diff(edit.before, edit.after, edit.path)
                report.actions.append(f"updated {edit.path} (backup {edit.backup})")
                report.restart_needed = True
        conn.run(["sync"])
    except BaseException:
        if placed.changed and placed.previous_id:
            try:
                install.rollback(fs, opts.cert_dir)
            except Exception:  # the original error is what the admin must see
                pass
        raise
    if opts.restart and report.restart_needed:
        report.restarted = restart_daemon(conn)
        report.restart_needed = False
    report.result = "changed" if placed.changed or report.qemu_conf_diff else "unchanged"
    return report


def rollback_host(conn, fs, cert_dir: str) -> HostReport:
    """Switch back to the previous set; the report names the certificate now in use."""
    from qemuca.ca import fingerprint

    result = install.rollback(fs, cert_dir)
    cert = x509.load_pem_x509_certificate(fs.read_bytes(posixpath.join(cert_dir, SERVER_CERT)))
    return HostReport(conn.name, result="changed", fingerprint_sha256=fingerprint(cert),
                      actions=result.actions)


def run_on_host(host: str, connect: Callable, work: Callable) -> HostReport:
    """Connect, run `work(conn, fs)`, always close; any error becomes a failed report."""
    from qemuca.remotefs import RemoteFS

    try:
        with connect(host) as conn:
            return work(conn, RemoteFS(conn))
    except QemucaError as e:
        return HostReport(host, error=str(e))
    except OSError as e:
        where = f" ({e.filename})" if e.filename else ""
        return HostReport(host, error=f"{host}: {e.strerror or e}{where}")
    except (ValueError, InvalidInput) as e:
        return HostReport(host, error=f"{host}: {e}")
