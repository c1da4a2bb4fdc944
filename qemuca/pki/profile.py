"""What a QEMU CA and a QEMU host certificate must contain, and the checks for it.

The profile follows what QEMU's crypto/tlscredsx509.c checks when it loads
credentials (sanity-check=on) and what GnuTLS needs for the handshake:
- CA: basicConstraints CA:TRUE (critical), keyUsage keyCertSign+cRLSign (critical).
- Host: CA:FALSE; keyUsage critical digitalSignature+keyEncipherment (QEMU before
  10.2 demands keyEncipherment whenever keyUsage is critical, for EC keys too);
  EKU serverAuth+clientAuth, because one certificate serves QEMU as migration
  destination (server) and source (client); SAN dNSName = the host name.
The same definitions build certificates and check them (issue, sign, inspect,
verify), so what we issue and what we accept can never drift apart.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from typing import Iterable, List, Optional, Sequence

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from qemuca.errors import InvalidInput
from qemuca.findings import FAIL, PASS, WARN, Finding
from qemuca.names import is_ip

KEY_TYPES = ("rsa2048", "rsa3072", "rsa4096", "ecdsa-p256", "ecdsa-p384")
DEFAULT_CA_KEY_TYPE = "rsa3072"
DEFAULT_HOST_KEY_TYPE = "ecdsa-p256"
DEFAULT_CA_DAYS = 3650
DEFAULT_HOST_DAYS = 730
CLOCK_SKEW = dt.timedelta(minutes=5)
MIN_RSA_BITS = 2048
ALLOWED_CURVES = ("secp256r1", "secp384r1")
MAX_CN = 64


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc).replace(microsecond=0)


def generate_key(key_type: str):
    if key_type.startswith("rsa"):
        return rsa.generate_private_key(public_exponent=65537, key_size=int(key_type[3:]))
    if key_type == "ecdsa-p256":
        return ec.generate_private_key(ec.SECP256R1())
    if key_type == "ecdsa-p384":
        return ec.generate_private_key(ec.SECP384R1())
    raise InvalidInput(f"unknown key type '{key_type}' (choose from {', '.join(KEY_TYPES)})")


def describe_key(public_key) -> str:
    if isinstance(public_key, rsa.RSAPublicKey):
        return f"RSA {public_key.key_size}"
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        return f"ECDSA {public_key.curve.name}"
    if isinstance(public_key, (ed25519.Ed25519PublicKey, ed448.Ed448PublicKey)):
        return type(public_key).__name__.replace("PublicKey", "")
    return type(public_key).__name__


def key_problem(public_key) -> Optional[str]:
    """Why a key is unacceptable for a QEMU certificate, or None."""
    if isinstance(public_key, rsa.RSAPublicKey):
        if public_key.key_size < MIN_RSA_BITS:
            return f"RSA key of {public_key.key_size} bits is too weak (at least {MIN_RSA_BITS})"
        return None
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        if public_key.curve.name not in ALLOWED_CURVES:
            return f"curve {public_key.curve.name} is not accepted (P-256 or P-384 only)"
        return None
    return f"{describe_key(public_key)} keys are not accepted (RSA >= 2048, P-256 or P-384)"


def signature_hash(signing_key):
    """SHA-384 for a P-384 signer, SHA-256 otherwise."""
    if isinstance(signing_key, ec.EllipticCurvePrivateKey) and signing_key.curve.key_size >= 384:
        return hashes.SHA384()
    return hashes.SHA256()


def ca_name(common_name: str, organization: Optional[str]) -> x509.Name:
    attrs = []
    if organization:
        attrs.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization))
    attrs.append(x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "qemu"))
    attrs.append(x509.NameAttribute(NameOID.COMMON_NAME, common_name))
    return x509.Name(attrs)


def build_ca_certificate(key, subject: x509.Name, days: int, now: Optional[dt.datetime] = None
                         ) -> x509.Certificate:
    now = now or utcnow()
    public = key.public_key()
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(cert_sign=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .sign(key, signature_hash(key))
    )


def _key_usage(cert_sign: bool = False, leaf: bool = False) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=leaf, content_commitment=False, key_encipherment=leaf,
        data_encipherment=False, key_agreement=False, key_cert_sign=cert_sign,
        crl_sign=cert_sign, encipher_only=False, decipher_only=False)


def authority_key_id(ca_cert: x509.Certificate) -> x509.AuthorityKeyIdentifier:
    """The AKI of what `ca_cert` signs: its SKI, or one computed from its key when the CA
    has none (an imported CA may lack the extension)."""
    try:
        ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    except x509.ExtensionNotFound:
        return x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_cert.public_key())  # type: ignore[arg-type]
    return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)


def san_entries(host: str, extra: Iterable) -> List[x509.GeneralName]:
    """dNSName host first, then each extra SAN (str -> dNSName, IP -> iPAddress), no repeats."""
    entries: List[x509.GeneralName] = [x509.DNSName(host)]
    for value in extra:
        entry: x509.GeneralName
        if isinstance(value, (ipaddress.IPv4Address, ipaddress.IPv6Address)):
            entry = x509.IPAddress(value)
        else:
            entry = x509.DNSName(value)
        if entry not in entries:
            entries.append(entry)
    return entries


def build_host_certificate(ca_cert: x509.Certificate, ca_key, host: str, sans: Sequence,
                           public_key, days: int, now: Optional[dt.datetime] = None
                           ) -> x509.Certificate:
    """A host certificate; never valid past its CA (QEMU rejects an expired chain)."""
    now = now or utcnow()
    not_after = min(now + dt.timedelta(days=days), ca_cert.not_valid_after_utc)
    if len(host) > MAX_CN:
        # RFC 5280 caps a CN at 64 characters, and QEMU refuses a peer whose subject DN is
        # empty ("Cannot get client distinguished name"): CN=HOST must fit.
        raise InvalidInput(f"host name '{host}' is longer than {MAX_CN} characters, the limit "
                           "of a certificate's CN")
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)]))
        .issuer_name(ca_cert.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(leaf=True), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                              ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(san_entries(host, sans)), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(authority_key_id(ca_cert), critical=False)
        .sign(ca_key, signature_hash(ca_key))
    )


# ---------------------------------------------------------------- conformance checks

def _ext(cert, cls):
    try:
        return cert.extensions.get_extension_for_class(cls)
    except x509.ExtensionNotFound:
        return None


def is_ca(cert: x509.Certificate) -> bool:
    bc = _ext(cert, x509.BasicConstraints)
    return bool(bc and bc.value.ca)


def sans_of(cert: x509.Certificate) -> List[str]:
    """SAN values as strings: DNS names and IP addresses, in certificate order."""
    ext = _ext(cert, x509.SubjectAlternativeName)
    if ext is None:
        return []
    out = []
    for entry in ext.value:
        if isinstance(entry, (x509.DNSName, x509.IPAddress)):
            out.append(str(entry.value))
    return out


def check_validity(cert: x509.Certificate, now: dt.datetime, warn_days: int) -> Finding:
    if now < cert.not_valid_before_utc:
        return Finding("validity", FAIL, f"not valid before {cert.not_valid_before_utc.isoformat()}")
    if now > cert.not_valid_after_utc:
        return Finding("validity", FAIL, f"expired on {cert.not_valid_after_utc.isoformat()}")
    left = cert.not_valid_after_utc - now
    text = f"{left.days} days left (until {cert.not_valid_after_utc.date().isoformat()})"
    return Finding("validity", WARN if left.days < warn_days else PASS, text)


def check_ca(cert: x509.Certificate, now: Optional[dt.datetime] = None, warn_days: int = 30
             ) -> List[Finding]:
    """QEMU's CA checks: CA:TRUE, keyCertSign when keyUsage is critical, validity."""
    now = now or utcnow()
    found = [check_validity(cert, now, warn_days)]
    bc = _ext(cert, x509.BasicConstraints)
    if bc is None or not bc.value.ca:
        found.append(Finding("basicConstraints", FAIL, "not a CA certificate (CA:TRUE missing)"))
    else:
        found.append(Finding("basicConstraints", PASS, "CA:TRUE"))
    ku = _ext(cert, x509.KeyUsage)
    if ku is not None and not ku.value.key_cert_sign:
        level = FAIL if ku.critical else WARN
        found.append(Finding("keyUsage", level, "keyCertSign missing"))
    else:
        found.append(Finding("keyUsage", PASS, "keyCertSign" if ku else "absent (allowed)"))
    found.append(_key_finding(cert))
    return found


def check_host(cert: x509.Certificate, now: Optional[dt.datetime] = None, warn_days: int = 30,
               hostname: Optional[str] = None) -> List[Finding]:
    """QEMU's leaf checks plus ours: EKU must be present with both purposes, SANs set."""
    now = now or utcnow()
    found = [check_validity(cert, now, warn_days)]
    found.append(Finding("basicConstraints", FAIL, "a CA certificate cannot be a host certificate")
                 if is_ca(cert) else Finding("basicConstraints", PASS, "CA:FALSE"))
    ku = _ext(cert, x509.KeyUsage)
    if ku is None:
        found.append(Finding("keyUsage", WARN, "absent (QEMU accepts it; qemuca issues it critical)"))
    else:
        missing = [n for n, ok in (("digitalSignature", ku.value.digital_signature),
                                   ("keyEncipherment", ku.value.key_encipherment)) if not ok]
        if missing:
            level = FAIL if ku.critical else WARN
            found.append(Finding("keyUsage", level, "missing " + "+".join(missing)
                                 + (" (QEMU refuses a critical keyUsage without it)" if ku.critical else "")))
        else:
            found.append(Finding("keyUsage", PASS, "digitalSignature+keyEncipherment"))
    eku = _ext(cert, x509.ExtendedKeyUsage)
    if eku is None:
        found.append(Finding("extendedKeyUsage", FAIL, "absent: serverAuth and clientAuth needed"))
    else:
        purposes = set(eku.value)
        missing = [n for n, oid in (("serverAuth", ExtendedKeyUsageOID.SERVER_AUTH),
                                    ("clientAuth", ExtendedKeyUsageOID.CLIENT_AUTH))
                   if oid not in purposes]
        found.append(Finding("extendedKeyUsage", FAIL, "missing " + "+".join(missing))
                     if missing else Finding("extendedKeyUsage", PASS, "serverAuth+clientAuth"))
    sans = sans_of(cert)
    if not any(not is_ip(s) for s in sans):
        found.append(Finding("subjectAltName", FAIL, "no dNSName SAN (names are matched on SANs)"))
    elif hostname is not None and hostname.lower() not in [s.lower() for s in sans]:
        found.append(Finding("subjectAltName", FAIL, f"{hostname} is not among {', '.join(sans)}"))
    else:
        found.append(Finding("subjectAltName", PASS, ", ".join(sans)))
    found.append(_key_finding(cert))
    return found


def _key_finding(cert: x509.Certificate) -> Finding:
    try:
        public = cert.public_key()
    except Exception:  # unsupported algorithm
        return Finding("key", FAIL, "unsupported public key algorithm")
    problem = key_problem(public)
    return Finding("key", FAIL, problem) if problem else Finding("key", PASS, describe_key(public))
