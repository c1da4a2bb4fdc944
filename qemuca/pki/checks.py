"""Small X.509 facts every part asks: fingerprints, key matches, who signed what.

Written once here so that issue, deploy, verify, probe, doctor and monitor can never
disagree on, say, whether a CRL belongs to a CA.
"""

from __future__ import annotations

from typing import Optional, Sequence

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes


def fingerprint(cert: x509.Certificate) -> str:
    """SHA-256 of the DER certificate, lower-case hex (what the index and reports show)."""
    return cert.fingerprint(hashes.SHA256()).hex()


def same_public_key(a, b) -> bool:
    """Whether two public keys are the same key (cryptography's keys compare by value).

    Keys of different types, or a key cryptography cannot compare, are not the same."""
    try:
        return bool(a == b)
    except Exception:  # an unsupported key type raises rather than compares
        return False


def key_matches(private_key, cert: x509.Certificate) -> bool:
    """Whether a private key is the one a certificate binds."""
    return same_public_key(private_key.public_key(), cert.public_key())


def issued_by(cert: x509.Certificate, ca: x509.Certificate) -> bool:
    """Whether `ca` signed `cert` (names and signature)."""
    if cert.issuer != ca.subject:
        return False
    try:
        cert.verify_directly_issued_by(ca)
        return True
    except (ValueError, TypeError, InvalidSignature):
        return False


def issuer_in(cert: x509.Certificate, bundle: Sequence[x509.Certificate]) -> Optional[x509.Certificate]:
    """The CA of the bundle that signed cert. GnuTLS takes every certificate of the CA
    file as a trust anchor, so direct issuance is exactly what QEMU accepts."""
    return next((ca for ca in bundle if issued_by(cert, ca)), None)


def crl_signed_by(crl: x509.CertificateRevocationList, ca: x509.Certificate) -> bool:
    """Whether the CRL is the CA's: its issuer name and a valid signature."""
    try:
        # A CA's key type cryptography cannot check a CRL with raises: not a match.
        return crl.issuer == ca.subject and crl.is_signature_valid(ca.public_key())  # type: ignore[arg-type]
    except Exception:  # a key type the CRL cannot be checked with is not a match
        return False


def is_encrypted_pem(data: bytes) -> bool:
    """Whether a PEM private key is encrypted: PKCS#8 `ENCRYPTED PRIVATE KEY`, or a
    traditional key with a `Proc-Type: 4,ENCRYPTED` header."""
    head = data[:200]
    return b"ENCRYPTED" in head


def cn_of(cert: x509.Certificate) -> str:
    """The subject's CN, else the whole subject (for messages)."""
    cns = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    return str(cns[0].value) if cns else cert.subject.rfc4514_string()


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
            return f"revoked on {entry.revocation_date_utc.date().isoformat()}{reason}"
    return None
