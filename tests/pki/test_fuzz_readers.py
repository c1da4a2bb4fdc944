"""Fuzzing the readers of untrusted bytes: PEM files (inspect), CSRs (sign) and hosts files.

Whatever the bytes, the only exception allowed out is InvalidInput (one line): anything
else would reach the user as an "internal error". cryptography parses lazily and raises
more than ValueError on malformed DER (InvalidVersion, DuplicateExtension, TypeError from
odd name attributes...), so the mutations aim inside valid structures too, not only at
random bytes. qemu.conf and inventories have their own fuzz tests.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import os
import tempfile
import unicodedata

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from qemuca.errors import InvalidInput
from qemuca.hosts.inventory import read_hosts_file
from qemuca.pki import ca, certinfo, profile

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ---------------------------------------------------------------- minimal DER, to build odd CSRs

def _der_len(n: int) -> bytes:
    if n < 0x80:
        return bytes([n])
    raw = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(raw)]) + raw


def tlv(tag: int, body: bytes) -> bytes:
    return bytes([tag]) + _der_len(len(body)) + body


def split_der(der: bytes):
    """(tag, body, rest) of the first DER element of `der`."""
    tag, n, i = der[0], der[1], 2
    if n & 0x80:
        k = n & 0x7F
        n, i = int.from_bytes(der[2:2 + k], "big"), 2 + k
    return tag, der[i:i + n], der[i + n:]


def pem(label: str, der: bytes) -> bytes:
    return f"-----BEGIN {label}-----\n".encode() + base64.encodebytes(der) + f"-----END {label}-----\n".encode()


def resigned_csr(common_name: str, edit) -> bytes:
    """A P-256 CSR (DER) whose CertificationRequestInfo went through `edit` and was signed
    again: the signature verifies, so only the edited field can make it bad."""
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
           .sign(key, hashes.SHA256()))
    _, body, _ = split_der(csr.public_bytes(serialization.Encoding.DER))
    _, info, rest = split_der(body)
    info = edit(tlv(0x30, info))
    alg_tag, alg, _ = split_der(rest)
    signature = key.sign(info, ec.ECDSA(hashes.SHA256()))
    return tlv(0x30, info + tlv(alg_tag, alg) + tlv(0x03, b"\0" + signature))


def csr_with_version(version: int) -> bytes:
    """Version is the first INTEGER of the info (02 01 00): only v1 (0) exists."""
    return resigned_csr("v.qemu.test", lambda info: info.replace(b"\x02\x01\x00", bytes([2, 1, version]), 1))


def csr_with_bitstring_cn() -> bytes:
    """The CN's UTF8String turned into a BIT STRING, which cryptography refuses (TypeError)
    only when the subject is read."""
    return resigned_csr("AAAA", lambda info: info.replace(b"\x0c\x04AAAA", b"\x03\x04\x00AAA", 1))


# ---------------------------------------------------------------- valid samples to mutate

def _samples() -> dict:
    now = profile.utcnow()
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = profile.build_ca_certificate(ca_key, profile.ca_name("Fuzz CA", "Fuzz"), 30)
    host_key = ec.generate_private_key(ec.SECP256R1())
    host = profile.build_host_certificate(ca_cert, ca_key, "h.qemu.test",
                                          [profile_ip("10.0.0.1"), "mig.qemu.test"], host_key.public_key(), 30)
    crl = (x509.CertificateRevocationListBuilder().issuer_name(ca_cert.subject).last_update(now)
           .next_update(now + dt.timedelta(days=7))
           .add_revoked_certificate(x509.RevokedCertificateBuilder().serial_number(7).revocation_date(now).build())
           .add_extension(x509.CRLNumber(3), critical=False)
           .sign(ca_key, hashes.SHA256()))
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "c.qemu.test")]))
           .add_extension(x509.SubjectAlternativeName([x509.DNSName("c.qemu.test")]), critical=False)
           .sign(host_key, hashes.SHA256()))
    rsa_key = rsa.generate_private_key(65537, 2048)
    rsa_csr = (x509.CertificateSigningRequestBuilder()
               .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "r.qemu.test")]))
               .sign(rsa_key, hashes.SHA256()))
    der = serialization.Encoding.DER
    return {
        "CERTIFICATE": [host.public_bytes(der), ca_cert.public_bytes(der)],
        "CERTIFICATE REQUEST": [csr.public_bytes(der), rsa_csr.public_bytes(der)],
        "X509 CRL": [crl.public_bytes(der)],
        "PRIVATE KEY": [host_key.private_bytes(der, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption())],
        "RSA PRIVATE KEY": [rsa_key.private_bytes(der, serialization.PrivateFormat.TraditionalOpenSSL,
                                                  serialization.NoEncryption())],
        "ENCRYPTED PRIVATE KEY": [host_key.private_bytes(der, serialization.PrivateFormat.PKCS8,
                                                         serialization.BestAvailableEncryption(b"pw"))],
    }


def profile_ip(text: str):
    import ipaddress

    return ipaddress.ip_address(text)


SAMPLES = _samples()
VALID = [(label, der) for label, ders in SAMPLES.items() for der in ders]
CSRS = SAMPLES["CERTIFICATE REQUEST"]


def _mutate(der: bytes, edits) -> bytes:
    """Apply (position, kind, byte) edits: overwrite, delete, insert, or flip a bit."""
    out = bytearray(der)
    for where, kind, value in edits:
        if not out:
            break
        i = where % len(out)
        if kind == "set":
            out[i] = value
        elif kind == "flip":
            out[i] ^= 1 << (value % 8)
        elif kind == "delete":
            del out[i]
        else:
            out.insert(i, value)
    return bytes(out)


edits = st.lists(st.tuples(st.integers(0, 1 << 16), st.sampled_from(["set", "flip", "delete", "insert"]),
                           st.integers(0, 255)), min_size=1, max_size=4)
labels = st.sampled_from(["CERTIFICATE", "CERTIFICATE REQUEST", "NEW CERTIFICATE REQUEST", "X509 CRL",
                          "PRIVATE KEY", "EC PRIVATE KEY", "RSA PRIVATE KEY", "ENCRYPTED PRIVATE KEY",
                          "DH PARAMETERS", "PUBLIC KEY", "PKCS7", "OPENSSH PRIVATE KEY"])

mutated_pems = st.builds(lambda sample, e: pem(sample[0], _mutate(sample[1], e)), st.sampled_from(VALID), edits)
# The label of one kind over the body of another: a key where a certificate is expected...
relabelled = st.builds(lambda sample, label: pem(label, sample[1]), st.sampled_from(VALID), labels)
pem_shaped = st.builds(lambda label, body: pem(label, body), labels, st.binary(max_size=600))
text_mutations = st.builds(lambda sample, e: _mutate(pem(*sample), e), st.sampled_from(VALID), edits)
any_input = st.one_of(st.binary(max_size=2000), mutated_pems, relabelled, pem_shaped, text_mutations,
                      st.lists(mutated_pems, min_size=2, max_size=3).map(b"".join))


def _one_printable_line(text: str) -> bool:
    return not any(unicodedata.category(c) in ("Cc", "Cf", "Zl", "Zp") for c in text)


# ---------------------------------------------------------------- the readers

@FUZZ
@given(any_input)
@example(pem("CERTIFICATE REQUEST", csr_with_version(5)))
@example(pem("CERTIFICATE REQUEST", csr_with_bitstring_cn()))
@example(pem("CERTIFICATE", b"\x30\x03\x02\x01\x05"))
def test_describe_pem_raises_only_invalid_input(data):
    """What inspect does with a file: describe each block, or one InvalidInput line."""
    try:
        items = certinfo.describe_pem(data, "fuzz.pem")
    except InvalidInput as e:
        assert "\n" not in str(e)
        return
    json.dumps(items)  # --json must be able to print whatever was described
    for item in items:
        assert item["kind"] in ("certificate", "csr", "crl", "private-key", "dh-parameters")
        for field in ("subject", "issuer"):
            assert _one_printable_line(item.get(field, "")), item
        assert all(_one_printable_line(e) for e in item.get("extensions", []))


@FUZZ
@given(any_input)
def test_read_pem_blocks_raises_only_invalid_input(data):
    try:
        blocks = certinfo.read_pem_blocks(data, "fuzz.pem")
    except InvalidInput as e:
        assert "\n" not in str(e)
        return
    assert blocks and all(isinstance(label, str) and block.startswith(b"-----BEGIN ") for label, block in blocks)


def test_describe_pem_refuses_more_than_a_mebibyte():
    block = pem("CERTIFICATE", SAMPLES["CERTIFICATE"][0])
    with pytest.raises(InvalidInput, match="larger than 1 MiB"):
        certinfo.describe_pem(block * (certinfo.MAX_PEM // len(block) + 1), "big.pem")


csr_inputs = st.one_of(
    st.builds(lambda der, e: _mutate(der, e), st.sampled_from(CSRS), edits),           # DER, as `sign` takes it
    st.builds(lambda der, e: pem("CERTIFICATE REQUEST", _mutate(der, e)), st.sampled_from(CSRS), edits),
    st.builds(lambda der, e: _mutate(pem("CERTIFICATE REQUEST", der), e), st.sampled_from(CSRS), edits),
    st.binary(max_size=600))


@FUZZ
@given(csr_inputs)
@example(csr_with_version(5))
@example(csr_with_bitstring_cn())
def test_load_csr_raises_only_invalid_input(data):
    """What sign does with a CSR: accept it whole (signature, key, subject readable) or
    refuse it with InvalidInput."""
    try:
        csr = ca.load_csr(data)
    except InvalidInput as e:
        assert "\n" not in str(e)
        return
    assert csr.is_signature_valid
    assert profile.key_problem(csr.public_key()) is None
    csr.subject.rfc4514_string()  # sign reads the CN next: it must be readable


@pytest.fixture(scope="module")
def scratch():
    with tempfile.TemporaryDirectory(prefix="fuzz-hosts-") as d:
        yield d


@FUZZ
@given(st.one_of(st.binary(max_size=400),
                 st.text(max_size=200).map(lambda t: t.encode("utf-8", "surrogatepass")),
                 st.lists(st.sampled_from(["a.qemu.test", "  b  ", "# c", "d # e", "", "\r", "\x00",
                                           "\u2028", "\x85", "\ufeff", "\t", "#"]),
                          max_size=12).map(lambda parts: "\n".join(parts).encode())))
def test_read_hosts_file_raises_only_invalid_input(scratch, data):
    path = os.path.join(scratch, "hosts")
    with open(path, "wb") as f:
        f.write(data)
    try:
        hosts = read_hosts_file(path)
    except InvalidInput as e:
        assert "\n" not in str(e) and path in str(e)
        return
    for host in hosts:  # names still to be validated by names.host_name, but never blank or a comment
        assert isinstance(host, str) and host == host.strip() and host
        assert "#" not in host and "\n" not in host and "\r" not in host


def test_read_hosts_file_refuses_what_is_not_a_regular_file(scratch):
    fifo = os.path.join(scratch, "fifo")
    os.mkfifo(fifo)
    try:
        for path in (fifo, "/dev/zero", scratch):
            with pytest.raises(InvalidInput, match=f"cannot read hosts file {path}: "):
                read_hosts_file(path)  # returns at once: never blocks on the FIFO, never reads /dev/zero
    finally:
        os.unlink(fifo)
