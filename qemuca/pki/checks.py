"""Small X.509 facts every part asks: fingerprints, key matches, who signed what.

Written once here so that issue, deploy, verify, probe, doctor and monitor can never
disagree on, say, whether a CRL belongs to a CA.
"""

from __future__ import annotations

import datetime as dt
from typing import List, Optional, Sequence

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes

MAX_BUNDLE = 16  # QEMU before 10.1 refuses a ca-cert.pem with more CAs


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
