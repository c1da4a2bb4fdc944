"""Taking over an existing QEMU CA: oVirt's `qemu-ca.pem`, a CA made with certtool per
libvirt's TLS guide, a kolla/edpm one.

The certificate and key are checked before any store is made of them: a CA that QEMU
would refuse, or that cannot sign, or a key that is not the certificate's, must fail
at `init`, not at the first deploy.
"""

from __future__ import annotations

from typing import Optional, Tuple

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from qemuca.errors import InvalidInput, PassphraseError
from qemuca.pki import profile
from qemuca.pki.certinfo import PARSE_ERRORS, load_certificates, read_pem_blocks
from qemuca.pki.checks import is_encrypted_pem, key_matches


def ca_problem(cert: x509.Certificate, source: str) -> Optional[str]:
    """Why `cert` cannot be the store's signing CA, or None."""
    now = profile.utcnow()
    if not profile.is_ca(cert):
        return f"{source} is not a CA certificate (basicConstraints CA:TRUE missing)"
    try:
        usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        usage = None
    if usage is not None and not usage.key_cert_sign:
        return f"{source}: the CA's keyUsage lacks keyCertSign, so it cannot sign certificates"
    if now < cert.not_valid_before_utc:
        return f"{source}: the CA is not valid before {cert.not_valid_before_utc.isoformat()}"
    if now >= cert.not_valid_after_utc:
        return f"{source}: the CA expired on {cert.not_valid_after_utc.isoformat()}"
    try:
        problem = profile.key_problem(cert.public_key())
    except PARSE_ERRORS:
        problem = "its public key is of an unsupported type"
    return f"{source}: {problem}" if problem else None


def load_foreign_ca(cert_data: bytes, cert_source: str, key_data: bytes, key_source: str,
                    passphrase: Optional[bytes]) -> Tuple[x509.Certificate, object]:
    """The CA certificate and its private key, checked; InvalidInput or PassphraseError
    with the reason otherwise. `passphrase` decrypts an encrypted key."""
    certs = load_certificates(cert_data, cert_source)
    if len(certs) != 1:
        raise InvalidInput(f"{cert_source} holds {len(certs)} certificates: give the CA certificate alone")
    cert = certs[0]
    problem = ca_problem(cert, cert_source)
    if problem:
        raise InvalidInput(problem)
    labels = [label for label, _ in read_pem_blocks(key_data, key_source)]
    if not any(label.endswith("PRIVATE KEY") for label in labels):
        raise InvalidInput(f"{key_source} holds no private key")
    encrypted = is_encrypted_pem(key_data)
    if encrypted and passphrase is None:
        raise PassphraseError(f"{key_source} is encrypted: give its passphrase with --import-passphrase-file")
    try:
        key = serialization.load_pem_private_key(key_data, password=passphrase if encrypted else None)
    except (ValueError, TypeError):
        if encrypted:
            raise PassphraseError(f"wrong passphrase for {key_source}") from None
        raise InvalidInput(f"{key_source} holds a corrupt or unsupported private key") from None
    except PARSE_ERRORS:
        raise InvalidInput(f"{key_source} holds a corrupt or unsupported private key") from None
    if not key_matches(key, cert):
        raise InvalidInput(f"the key in {key_source} does not match the CA certificate in {cert_source}")
    return cert, key
