"""Deploy a host's credential set and qemu.conf over SSH, all or nothing per host.

Per host, over one SSH connection: find the group QEMU runs as, place the set in the
cert dir (install.py: staged, read back, switched in one rename), check what landed
(fingerprint, chain, key), then set the qemu.conf TLS directives through the same
core as `qemuca qemu-conf apply`. If anything after the switch fails, the host is
switched back to its previous set and reported failed.
"""

from __future__ import annotations

import hashlib
import posixpath
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, List, Optional

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from qemuca.errors import Conflict, NotFound, RemoteError
from qemuca.hosts import install, layout, qemuconf
from qemuca.hosts.hostinfo import DAEMONS, QemuGroup, resolve_group
from qemuca.hosts.layout import CA_BUNDLE, CRL, SERVER_CERT, SERVER_KEY, CredentialSet, Modes, host_modes
from qemuca.ops.fleet import connected, failure
from qemuca.pki.ca import require_host
from qemuca.pki.checks import fingerprint, issued_by, key_matches


@dataclass(frozen=True)
class DeployOptions:
    cert_dir: str = layout.DEFAULT_CERT_DIR
    group: Optional[str] = None  # None: the group libvirt runs QEMU as (hostinfo.resolve_group)
    qemu_conf: bool = True
    qemu_conf_path: str = qemuconf.DEFAULT_PATH
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
    bundle_sha256: Optional[str] = None  # the ca-cert.pem deployed (rollover tracking)
    qemu_group: Optional[dict] = None  # the group the set is readable by, and why that one

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def check_landed(conn, fs, cert_dir: str, creds: CredentialSet) -> None:
    """What the names give QEMU now: our certificate, chained to the CA, with its key.

    install() has just compared every byte behind the names with `creds` (read back
    through them after the switch, or as the set found in place), so the checks run on
    those bytes rather than reading them over the network again. A key made on the host
    is compared there (public key out of `openssl pkey`), so it never travels.
    """
    cert = x509.load_pem_x509_certificate(creds.files[SERVER_CERT])
    if fingerprint(cert) != creds.fingerprint_sha256:
        raise install.InstallError(f"{cert_dir}/{SERVER_CERT} is not the certificate deployed")
    bundle = x509.load_pem_x509_certificates(creds.files[CA_BUNDLE])
    if not any(issued_by(cert, ca) for ca in bundle):
        raise install.InstallError(f"{cert_dir}/{SERVER_CERT} does not chain to {CA_BUNDLE}")
    key_path = posixpath.join(cert_dir, SERVER_KEY)
    if SERVER_KEY in creds.files:
        matches = key_matches(serialization.load_pem_private_key(creds.files[SERVER_KEY], None), cert)
    else:
        spki = serialization.PublicFormat.SubjectPublicKeyInfo
        out = conn.run(["openssl", "pkey", "-in", key_path, "-pubout", "-outform", "DER"], check=True)
        matches = out.stdout == cert.public_key().public_bytes(serialization.Encoding.DER, spki)
    if not matches:
        raise install.InstallError(f"{cert_dir}/{SERVER_KEY} does not match the certificate")


def sync_host(conn, fs, cert_dir: str, placed: install.InstallResult, creds: CredentialSet,
              conf_dir: Optional[str]) -> None:
    """Make the renames durable: fsync the directories whose entries changed (and a key
    made on the host, which nothing has synced yet). Over SFTP (fsync@openssh.com on
    each directory, one round trip); where the server cannot, coreutils `sync FILE...`
    on the host, and a plain `sync` (which flushes every file system of the host: on a
    hypervisor busy writing VM disks that can take minutes) where `sync` takes no
    arguments."""
    dirs = placed.changed_dirs + ([conf_dir] if conf_dir else [])
    if not dirs:
        return
    directory = posixpath.join(cert_dir, install.STATE_DIR, install.SETS, creds.set_id)
    key = [posixpath.join(directory, SERVER_KEY)] if creds.key_on_host and placed.changed else []
    try:
        fs.sync(key + dirs)
        return
    except OSError:
        pass
    files = [posixpath.join(directory, n) for n in sorted(creds.names)] if placed.changed else []
    if not conn.run(["sync", "--", *files, *dirs]).ok:
        conn.run(["sync"])


def restart_daemon(conn) -> str:
    """try-restart virtqemud where the host has it (modular daemons), else libvirtd."""
    for unit, binary in DAEMONS:
        if conn.run(["test", "-x", binary]).ok:
            conn.run_command("systemctl_try_restart", unit=unit, check=True)
            return unit
    raise RemoteError(f"{conn.name}: neither virtqemud nor libvirtd is installed")


@dataclass(frozen=True)
class Placement:
    """How a set is placed on one host: root-owned, readable by the group QEMU runs as;
    with the host's qemu.conf as read to find that group (edited without a second read)."""

    group: QemuGroup
    conf: Optional[qemuconf.ConfFile] = None

    @property
    def modes(self) -> Modes:
        return host_modes(self.group.gid)


def placement(conn, fs, opts: DeployOptions) -> Placement:
    """The host's placement, from its qemu.conf (which must exist unless not needed)."""
    conf = None
    try:
        conf = qemuconf.read_file(fs, opts.qemu_conf_path)
    except NotFound:
        if opts.group is None and opts.qemu_conf:
            raise NotFound(f"{conn.name}: {opts.qemu_conf_path} does not exist: is libvirt "
                           "installed? (--no-qemu-conf to deploy certificates only)") from None
    return Placement(resolve_group(conn, fs, conf.doc if conf else None, opts.group), conf)


def deploy_host(conn, fs, creds: CredentialSet, opts: DeployOptions) -> HostReport:
    """Deploy to one connected host; raises QemucaError on failure (nothing half-done)."""
    where = placement(conn, fs, opts)
    if opts.dry_run:
        return dry_run(fs, creds, opts, where)
    return switch_in(conn, fs, creds, opts, where)


def dry_run(fs, creds: CredentialSet, opts: DeployOptions, where: Placement) -> HostReport:
    """What switch_in would change, changing nothing."""
    report = HostReport(creds.host, fingerprint_sha256=creds.fingerprint_sha256,
                        qemu_group=where.group.to_dict())
    plan = install.plan(fs, opts.cert_dir, creds, where.modes)
    report.actions = plan.actions + [f"replace {n} (not written by qemuca; kept for rollback)"
                                     for n in plan.adopted]
    changed = preview_qemu_conf(fs, opts, where, report) or plan.changed
    report.result = "would-change" if changed else "unchanged"
    return report


def preview_qemu_conf(fs, opts: DeployOptions, where: Placement, report: HostReport) -> bool:
    """Whether qemu.conf would change (the diff and the restart noted in `report`);
    from the file as placement() read it, writing nothing."""
    if not opts.qemu_conf:
        return False
    settings = opts.tls_settings()
    edit = qemuconf.edit_file(fs, opts.qemu_conf_path, lambda d: qemuconf.apply_tls(d, settings),
                              dry_run=True, current=where.conf)
    if edit.changed:
        report.qemu_conf_diff = qemuconf.unified_diff(edit.before, edit.after, edit.path)
        report.restart_needed = True
    return edit.changed


def switch_in(conn, fs, creds: CredentialSet, opts: DeployOptions, where: Placement,
              then: Optional[Callable[[], None]] = None) -> HostReport:
    """Install the set, check it, update qemu.conf, run `then`; any failure after the
    switch switches the host back to its previous set."""
    report = HostReport(creds.host, fingerprint_sha256=creds.fingerprint_sha256,
                        bundle_sha256=hashlib.sha256(creds.files[CA_BUNDLE]).hexdigest(),
                        qemu_group=where.group.to_dict())
    placed = install.install(fs, opts.cert_dir, creds, where.modes, force=opts.force)
    try:
        check_landed(conn, fs, opts.cert_dir, creds)
        report.actions += placed.actions
        conf_dir = None
        if opts.qemu_conf:
            settings = opts.tls_settings()
            edit = qemuconf.edit_file(fs, opts.qemu_conf_path, lambda d: qemuconf.apply_tls(d, settings),
                                      current=where.conf)
            if edit.written:
                report.qemu_conf_diff = qemuconf.unified_diff(edit.before, edit.after, edit.path)
                report.actions.append(f"updated {edit.path} (backup {edit.backup})")
                report.restart_needed = True
                conf_dir = posixpath.dirname(edit.path)
        if then is not None:
            then()
        sync_host(conn, fs, opts.cert_dir, placed, creds, conf_dir)
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


# openssl genpkey arguments per key type, for keys made on the host.
GENPKEY = {
    "ecdsa-p256": ["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256",
                   "-pkeyopt", "ec_param_enc:named_curve"],
    "ecdsa-p384": ["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-384",
                   "-pkeyopt", "ec_param_enc:named_curve"],
    "rsa2048": ["-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048"],
    "rsa3072": ["-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:3072"],
    "rsa4096": ["-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:4096"],
}


def key_and_csr_on_host(conn, directory: str, host: str, key_type: str):
    """Make a key in `directory` (0700) with the host's openssl; return its path and a CSR."""
    if not conn.run(["openssl", "version"]).ok:
        raise RemoteError(f"{conn.name}: openssl is not installed (it makes the key on the host)")
    key = posixpath.join(directory, SERVER_KEY)
    conn.run(["openssl", "genpkey", *GENPKEY[key_type], "-out", key], check=True)
    csr = conn.run(["openssl", "req", "-new", "-key", key, "-subj", f"/CN={host}", "-outform", "PEM"],
                   check=True)
    return key, csr.stdout


def enroll_host(conn, fs, authority, host: str, opts: DeployOptions, key_type: str,
                sans, days: int, force: bool, action: str = "enroll") -> HostReport:
    """Key made on the host, CSR signed here, set switched in; the key never travels.

    The certificate is recorded in the index only once it is in place and checked;
    if recording fails the host goes back to its previous set.
    """
    if not force and authority.store.valid_for_host(host) is not None:
        raise Conflict(f"{host} already has a valid certificate: use --replace to enroll it anew")
    if not force:
        authority.check_names(host, sans)
    where = placement(conn, fs, opts)
    staging = install.make_staging(fs, opts.cert_dir, where.modes)
    try:
        key_path, csr = key_and_csr_on_host(conn, staging, host, key_type)
        new = authority.certify(csr, host, sans, days)
        creds = CredentialSet.build(host, new.record.fingerprint_sha256, authority.bundle(),
                                    new.record.cert_pem.encode(), None, authority.crl_pem(),
                                    key_on_host=key_path)
        return switch_in(conn, fs, creds, opts, where,
                          then=lambda: authority.record(new, force, action))
    finally:
        if fs.stat(staging, follow=False) is not None:
            fs.rmtree(staging)


@contextmanager
def staged_key_copy(conn, fs, cert_dir: str, modes):
    """A copy, made on the host, of the key in use (for a new set around the same key);
    the staging directory is removed afterwards, whatever happens."""
    source = posixpath.join(cert_dir, SERVER_KEY)
    if fs.stat(source) is None:
        raise NotFound(f"{conn.name}: no key in {cert_dir}: enroll the host first")
    staging = install.make_staging(fs, cert_dir, modes)
    try:
        copy = posixpath.join(staging, SERVER_KEY)
        fs.copy(source, copy)
        yield copy
    finally:
        if fs.stat(staging, follow=False) is not None:
            fs.rmtree(staging)


def deploy_from_store(conn, fs, authority, host: str, opts: DeployOptions) -> HostReport:
    """The host's current certificate from the index, with the CA's bundle and CRL.

    An enrolled host's key is not in the store: the key already on the host is reused
    (copied there; check_landed proves it matches before anything is kept).
    """
    record = require_host(authority.store, host)
    key = authority.host_key_pem(record.serial)
    where = placement(conn, fs, opts)

    def creds_with(key_bytes=None, key_on_host=None):
        return CredentialSet.build(record.host, record.fingerprint_sha256, authority.bundle(),
                                   record.cert_pem.encode(), key_bytes, authority.crl_pem(), key_on_host)

    if key is not None:
        creds = creds_with(key)
        return dry_run(fs, creds, opts, where) if opts.dry_run else switch_in(conn, fs, creds, opts, where)
    if opts.dry_run:
        return dry_run(fs, creds_with(key_on_host=posixpath.join(opts.cert_dir, SERVER_KEY)), opts, where)
    with staged_key_copy(conn, fs, opts.cert_dir, where.modes) as key_path:
        return switch_in(conn, fs, creds_with(key_on_host=key_path), opts, where)


def refresh_host(conn, fs, authority, host: str, opts: DeployOptions, bundle: bool, crl: bool
                 ) -> HostReport:
    """Re-place the host's current set with only the CA bundle and/or the CRL renewed
    (revocation rollout, CA rollover): certificates and key stay as they are."""

    where = placement(conn, fs, opts)
    target = install.CertDir(fs, opts.cert_dir)
    current = target.current_id()
    if current is None:
        raise NotFound(f"{conn.name}: nothing deployed in {opts.cert_dir} yet: run deploy or enroll")
    files = target.set_files(current, keys=False)
    if SERVER_CERT not in files or CA_BUNDLE not in files:
        raise NotFound(f"{conn.name}: the set in use in {opts.cert_dir} is incomplete: redeploy it")
    new_crl = authority.crl_pem() if crl else files.get(CRL)
    new_bundle = authority.bundle() if bundle else files[CA_BUNDLE]
    fp = fingerprint(x509.load_pem_x509_certificate(files[SERVER_CERT]))

    def creds_with(key_on_host):
        return CredentialSet.build(host, fp, new_bundle, files[SERVER_CERT], None, new_crl, key_on_host)

    if opts.dry_run:
        return dry_run(fs, creds_with(posixpath.join(opts.cert_dir, SERVER_KEY)), opts, where)
    with staged_key_copy(conn, fs, opts.cert_dir, where.modes) as key_path:
        return switch_in(conn, fs, creds_with(key_path), opts, where)


def rollback_host(conn, fs, cert_dir: str) -> HostReport:
    """Switch back to the previous set; the report names the certificate now in use."""

    result = install.rollback(fs, cert_dir)
    cert = x509.load_pem_x509_certificate(fs.read_bytes(posixpath.join(cert_dir, SERVER_CERT)))
    return HostReport(conn.name, result="changed", fingerprint_sha256=fingerprint(cert),
                      actions=result.actions)


def run_on_host(host: str, connect: Callable, work: Callable) -> HostReport:
    """Connect, run `work(conn, fs)`, always close; any error becomes a failed report."""
    try:
        with connected(connect, host) as [(conn, fs)]:
            return work(conn, fs)
    except Exception as e:
        return HostReport(host, error=failure(host, e)[0])
