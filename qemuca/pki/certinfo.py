"""Reading PEM files of any kind and describing what they hold, for inspect and show.

Only public facts are described: a private key is reported by type, never printed.
"""

from __future__ import annotations

import datetime as dt
import re
from typing import List, Optional, Tuple

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization

from qemuca.errors import InvalidInput
from qemuca.findings import FAIL
from qemuca.pki import profile
from qemuca.pki.checks import fingerprint
from qemuca.text import printable

_BLOCK = re.compile(rb"-----BEGIN ([A-Z0-9 ]+)-----\r?\n.*?-----END \1-----", re.S)
MAX_PEM = 1 << 20

# What cryptography raises for malformed DER besides ValueError: found by fuzzing
# (tests/pki/test_fuzz_readers.py). Its parsers are lazy, so these can come from any
# attribute access on a loaded object, not only from load_*.
PARSE_ERRORS = (ValueError, TypeError, UnsupportedAlgorithm, x509.InvalidVersion,
                x509.DuplicateExtension, x509.UnsupportedGeneralNameType)


def read_pem_blocks(data: bytes, source: str) -> List[Tuple[str, bytes]]:
    """(label, block) for each PEM block; InvalidInput when there is none."""
    if len(data) > MAX_PEM:
        raise InvalidInput(f"{source} is larger than 1 MiB: not a PEM file qemuca reads")
    blocks = [(m.group(1).decode("ascii"), m.group(0)) for m in _BLOCK.finditer(data)]
    if not blocks:
        raise InvalidInput(f"{source} holds no PEM block")
    return blocks


def load_certificates(data: bytes, source: str) -> List[x509.Certificate]:
    certs = []
    for label, block in read_pem_blocks(data, source):
        if label != "CERTIFICATE":
            continue
        try:
            certs.append(x509.load_pem_x509_certificate(block))
        except PARSE_ERRORS:
            raise InvalidInput(f"{source} holds a corrupt certificate") from None
    if not certs:
        raise InvalidInput(f"{source} holds no certificate")
    return certs


def describe_certificate(cert: x509.Certificate, now: Optional[dt.datetime] = None) -> dict:
    now = now or profile.utcnow()
    role = "ca" if profile.is_ca(cert) else "host"
    findings = profile.check_ca(cert, now) if role == "ca" else profile.check_host(cert, now)
    return {
        "kind": "certificate",
        "role": role,
        "subject": printable(cert.subject.rfc4514_string()),
        "issuer": printable(cert.issuer.rfc4514_string()),
        "serial": format(cert.serial_number, "x"),
        "sans": [printable(s) for s in profile.sans_of(cert)],
        "not_before": cert.not_valid_before_utc.isoformat(),
        "not_after": cert.not_valid_after_utc.isoformat(),
        "days_left": (cert.not_valid_after_utc - now).days,
        "key": _key_text(cert),
        "signature_hash": cert.signature_hash_algorithm.name if cert.signature_hash_algorithm else None,
        "fingerprint_sha256": fingerprint(cert),
        "extensions": [_extension_text(e) for e in cert.extensions],
        "conforms": all(f.result is not FAIL for f in findings),
        "checks": [f.as_dict() for f in findings],
    }


def _key_text(cert) -> str:
    try:
        return profile.describe_key(cert.public_key())
    except Exception:
        return "unsupported"


def _extension_text(ext: x509.Extension) -> str:
    value = ext.value
    name = getattr(ext.oid, "_name", None) or ext.oid.dotted_string
    if isinstance(value, x509.BasicConstraints):
        text = f"CA:{str(value.ca).upper()}" + (f", pathlen:{value.path_length}"
                                                if value.path_length is not None else "")
    elif isinstance(value, x509.KeyUsage):
        bits = ["digital_signature", "content_commitment", "key_encipherment", "data_encipherment",
                "key_agreement", "key_cert_sign", "crl_sign"]
        text = ", ".join(b for b in bits if getattr(value, b))
    elif isinstance(value, x509.ExtendedKeyUsage):
        text = ", ".join(getattr(o, "_name", o.dotted_string) for o in value)
    elif isinstance(value, x509.SubjectAlternativeName):
        text = ", ".join(f"{type(g).__name__}:{g.value}" for g in value)
    elif isinstance(value, (x509.SubjectKeyIdentifier,)):
        text = value.digest.hex()
    elif isinstance(value, x509.AuthorityKeyIdentifier):
        text = (value.key_identifier or b"").hex()
    else:
        text = type(value).__name__
    return printable(f"{name}{' (critical)' if ext.critical else ''}: {text}")


def describe_pem(data: bytes, source: str, now: Optional[dt.datetime] = None) -> List[dict]:
    """One description per PEM block: certificates, CSRs, CRLs and keys.

    Whatever the bytes, the only exception is InvalidInput."""
    out = []
    for label, block in read_pem_blocks(data, source):
        try:
            out.append(_describe_block(label, block, now))
        except PARSE_ERRORS:
            raise InvalidInput(f"{source} holds a corrupt or unsupported {label.lower()}") from None
    return out


def _describe_block(label: str, block: bytes, now) -> dict:
    if label == "CERTIFICATE":
        return describe_certificate(x509.load_pem_x509_certificate(block), now)
    if label in ("CERTIFICATE REQUEST", "NEW CERTIFICATE REQUEST"):
        csr = x509.load_pem_x509_csr(block)
        problem = profile.key_problem(csr.public_key())
        return {"kind": "csr", "subject": printable(csr.subject.rfc4514_string()),
                "key": profile.describe_key(csr.public_key()),
                "signature_valid": csr.is_signature_valid, "key_acceptable": problem is None,
                "problem": problem}
    if label == "X509 CRL":
        crl = x509.load_pem_x509_crl(block)
        return {"kind": "crl", "issuer": printable(crl.issuer.rfc4514_string()),
                "last_update": crl.last_update_utc.isoformat(),
                "next_update": crl.next_update_utc.isoformat() if crl.next_update_utc else None,
                "revoked_serials": [format(r.serial_number, "x") for r in crl]}
    if label.endswith("PRIVATE KEY"):
        if "ENCRYPTED" in label:
            return {"kind": "private-key", "key": "encrypted"}
        try:
            key = serialization.load_pem_private_key(block, password=None)
        except TypeError:  # a traditional key with a Proc-Type: 4,ENCRYPTED header
            return {"kind": "private-key", "key": "encrypted"}
        return {"kind": "private-key", "key": profile.describe_key(key.public_key())}
    if label == "DH PARAMETERS":  # QEMU's optional dh-params.pem
        return {"kind": "dh-parameters"}
    raise InvalidInput(f"a '{label}' PEM block is not something qemuca inspects "
                       "(certificates, CSRs, CRLs, keys)")
