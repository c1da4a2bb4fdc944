"""Adopt a set qemuca did not deploy: the brownfield host joins the index, its key stays.

Clusters that already encrypt migrations have sets made by oVirt's engine, by certtool
after libvirt's guide, or by kolla/edpm roles. `adopt` reads such a set over SSH
(certificates only: whether the key matches is checked on the host, by its public half),
and when the certificate chains to a CA this store trusts — its own, or the previous
one of a rollover (`ca rollover start --from-cert` makes a foreign CA that) — records
it (key on the host, as if enrolled) and switches the very same certificate and key in
as a qemuca set, with the store's CA bundle and CRL: from then on `list`, `check`,
`renew` (a CSR made on the host), `rekey`, `revoke` and `ca rollover` cover the host.
The files found stay in the set kept for rollback.
"""

from __future__ import annotations

import dataclasses
import posixpath
from typing import Optional

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from qemuca.errors import Conflict, InvalidInput, NotFound
from qemuca.findings import FAIL
from qemuca.hosts.layout import CLIENT_CERT, SERVER_CERT, SERVER_KEY, CredentialSet
from qemuca.ops.deploy import DeployOptions, HostReport, placement, staged_key_copy, switch_in
from qemuca.pki import profile
from qemuca.pki.ca import CertificateAuthority, NewCert, Signer, key_type_name
from qemuca.pki.checks import fingerprint, issued_by


def adopt_host(conn, fs, authority: CertificateAuthority, host: str, opts: DeployOptions,
               force: bool = False) -> HostReport:
    """Record the host's deployed certificate and make its set a qemuca set (same bytes
    for QEMU); raises QemucaError with the way out when it cannot be adopted."""
    cert = _read_cert(fs, opts.cert_dir, conn.name)
    issuer = _issuer(authority, cert)
    if issuer is None:
        raise Conflict(
            f"{host}: its certificate was issued by '{cert.issuer.rfc4514_string()}', not by a CA this "
            "store trusts: take that CA over first (qemuca ca rollover start --from-cert ITS_CA.pem, "
            f"then adopt), or replace the set (qemuca enroll --replace --force {host})")
    problems = [f"{f.check}: {f.detail}" for f in profile.check_host(cert, hostname=host) if f.result is FAIL]
    if problems:
        raise InvalidInput(f"{host}: its certificate is not one QEMU accepts for this host: {problems[0]}")
    _check_key_on_host(conn, opts.cert_dir, cert)
    current = authority.store.valid_for_host(host)
    fp = fingerprint(cert)
    new = current is None or current.fingerprint_sha256 != fp  # else recorded already: unchanged
    if new and not force:
        if current is not None:
            raise Conflict(f"{host} already has another valid certificate in the index (serial "
                           f"{current.serial}): use --force to record the one on the host instead")
        authority.check_names(host, [s for s in profile.sans_of(cert) if s != host])
    where = placement(conn, fs, opts)
    record = dataclasses.replace(authority.record_for(cert, host, "csr", key_type_name(cert.public_key())),
                                 ca_fingerprint=issuer.fingerprint)
    pem = cert.public_bytes(serialization.Encoding.PEM)

    def recorded() -> None:
        if new:
            authority.record(NewCert(record, None), True, "adopt")

    adopt_opts = dataclasses.replace(opts, force=True)  # the files found are not qemuca's: kept for rollback
    with staged_key_copy(conn, fs, opts.cert_dir, where.modes) as key_path:
        creds = CredentialSet.build(host, fp, authority.bundle(), pem, None, authority.crl_pem(), key_path)
        report = switch_in(conn, fs, creds, adopt_opts, where, then=recorded)
    report.actions.insert(0, f"adopted the certificate issued by '{cert.issuer.rfc4514_string()}' "
                             f"(serial {format(cert.serial_number, 'x')}); its key stays on the host")
    return report


def _read_cert(fs, cert_dir: str, name: str) -> x509.Certificate:
    for file in (SERVER_CERT, CLIENT_CERT):
        path = posixpath.join(cert_dir, file)
        try:
            data = fs.read_bytes(path)
        except FileNotFoundError:
            continue
        except OSError as e:
            raise NotFound(f"{name}: {path}: {e.strerror or e}") from None
        try:
            return x509.load_pem_x509_certificate(data)
        except ValueError:
            raise InvalidInput(f"{name}: {path} is not a PEM certificate") from None
    raise NotFound(f"{name}: no {SERVER_CERT} in {cert_dir}: nothing to adopt (enroll the host instead)")


def _issuer(authority: CertificateAuthority, cert: x509.Certificate) -> Optional[Signer]:
    return next((s for s in (authority.current, authority.previous)
                 if s is not None and issued_by(cert, s.cert)), None)


def _check_key_on_host(conn, cert_dir: str, cert: x509.Certificate) -> None:
    """The key beside the certificate belongs to it: compared on the host by its public
    half (`openssl pkey -pubout`), so the private key never leaves the host."""
    key = posixpath.join(cert_dir, SERVER_KEY)
    out = conn.run(["openssl", "pkey", "-in", key, "-pubout", "-outform", "DER"])
    if not out.ok:
        raise InvalidInput(f"{conn.name}: {key} cannot be read as a private key by the host's openssl "
                           "(missing, or encrypted: QEMU could not use it either)")
    spki = cert.public_key().public_bytes(serialization.Encoding.DER,
                                          serialization.PublicFormat.SubjectPublicKeyInfo)
    if out.stdout != spki:
        raise InvalidInput(f"{conn.name}: {key} is not the key of {SERVER_CERT}: QEMU could not use the pair")
