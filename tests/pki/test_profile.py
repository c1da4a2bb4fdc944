"""The QEMU profile: what issued certificates contain, and the checks shared with inspect."""

from __future__ import annotations

import datetime as dt
import ipaddress

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from qemuca.pki import profile
from qemuca.pki.profile import FAIL, PASS, WARN

NOW = dt.datetime(2030, 1, 1, tzinfo=dt.timezone.utc)


@pytest.fixture(scope="module")
def ca_pair():
    key = profile.generate_key("ecdsa-p256")
    cert = profile.build_ca_certificate(key, profile.ca_name("QEMU CA t", "Acme"), 3650, now=NOW)
    return cert, key


@pytest.fixture(scope="module")
def host_key():
    return profile.generate_key("ecdsa-p256")


def _host(ca_pair, host_key, host="a.qemu.test", sans=(), days=730, now=NOW):
    cert, key = ca_pair
    return profile.build_host_certificate(cert, key, host, list(sans), host_key.public_key(), days, now=now)


def _ext(cert, cls):
    return cert.extensions.get_extension_for_class(cls)


def test_ca_certificate_contents(ca_pair):
    cert, key = ca_pair
    assert cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)[0].value == "qemu"
    assert cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value == "Acme"
    assert cert.subject == cert.issuer
    bc = _ext(cert, x509.BasicConstraints)
    assert bc.critical and bc.value.ca
    ku = _ext(cert, x509.KeyUsage)
    assert ku.critical and ku.value.key_cert_sign and ku.value.crl_sign
    assert not ku.value.digital_signature
    assert _ext(cert, x509.SubjectKeyIdentifier).value == \
        x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    assert cert.not_valid_before_utc == NOW - profile.CLOCK_SKEW
    assert cert.not_valid_after_utc == NOW + dt.timedelta(days=3650)
    assert all(f.result == PASS for f in profile.check_ca(cert, NOW))


def test_ca_name_without_organisation():
    name = profile.ca_name("X", None)
    assert name.get_attributes_for_oid(NameOID.ORGANIZATION_NAME) == []
    assert name.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "X"


@pytest.mark.parametrize("key_type", ["ecdsa-p256", "ecdsa-p384", "rsa2048"])
def test_host_certificate_contents(ca_pair, key_type):
    """QEMU's leaf checks and ours, for RSA and EC host keys alike."""
    hkey = profile.generate_key(key_type)
    ips = [ipaddress.ip_address("10.1.2.3"), ipaddress.ip_address("fd00::1")]
    cert = _host(ca_pair, hkey, sans=[ips[0], "mig.a.qemu.test", ips[1]])
    assert cert.subject.rfc4514_string() == "CN=a.qemu.test"
    assert cert.issuer == ca_pair[0].subject
    bc = _ext(cert, x509.BasicConstraints)
    assert bc.critical and not bc.value.ca
    ku = _ext(cert, x509.KeyUsage)
    # keyEncipherment for EC keys too: QEMU before 10.2 demands it when keyUsage is critical.
    assert ku.critical and ku.value.digital_signature and ku.value.key_encipherment
    assert not ku.value.key_cert_sign
    eku = _ext(cert, x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    san = _ext(cert, x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["a.qemu.test", "mig.a.qemu.test"]
    assert san.get_values_for_type(x509.IPAddress) == ips
    assert profile.sans_of(cert) == ["a.qemu.test", "10.1.2.3", "mig.a.qemu.test", "fd00::1"]
    assert _ext(cert, x509.SubjectKeyIdentifier).value == \
        x509.SubjectKeyIdentifier.from_public_key(hkey.public_key())
    assert _ext(cert, x509.AuthorityKeyIdentifier).value.key_identifier == \
        _ext(ca_pair[0], x509.SubjectKeyIdentifier).value.digest
    assert cert.serial_number.bit_length() >= 64
    assert cert.not_valid_before_utc == NOW - profile.CLOCK_SKEW
    assert cert.not_valid_after_utc == NOW + dt.timedelta(days=730)
    assert all(f.result == PASS for f in profile.check_host(cert, NOW, hostname="a.qemu.test"))


def test_san_entries_start_with_the_host_and_have_no_repeats():
    entries = profile.san_entries("a.test", ["a.test", ipaddress.ip_address("10.0.0.1"),
                                            ipaddress.ip_address("10.0.0.1"), "b.test"])
    assert entries == [x509.DNSName("a.test"), x509.IPAddress(ipaddress.ip_address("10.0.0.1")),
                       x509.DNSName("b.test")]


def test_serials_are_random(ca_pair, host_key):
    serials = {_host(ca_pair, host_key).serial_number for _ in range(20)}
    assert len(serials) == 20 and min(s.bit_length() for s in serials) >= 64


def test_host_certificate_never_outlives_its_ca(ca_pair, host_key):
    cert = _host(ca_pair, host_key, days=36500)
    assert cert.not_valid_after_utc == ca_pair[0].not_valid_after_utc


def test_a_host_name_must_fit_in_a_cn(ca_pair, host_key):
    """A CN holds 64 characters (RFC 5280), and QEMU refuses a peer without a subject DN."""
    from qemuca.errors import InvalidInput

    assert _host(ca_pair, host_key, host="c" * 64).subject.rfc4514_string() == "CN=" + "c" * 64
    with pytest.raises(InvalidInput, match="longer than 64"):
        _host(ca_pair, host_key, host="a" * 60 + ".test")


def test_signature_hash_follows_the_ca_key():
    assert isinstance(profile.signature_hash(profile.generate_key("ecdsa-p384")), hashes.SHA384)
    assert isinstance(profile.signature_hash(profile.generate_key("ecdsa-p256")), hashes.SHA256)


def test_unknown_key_type_is_invalid_input():
    from qemuca.errors import InvalidInput

    with pytest.raises(InvalidInput, match="unknown key type"):
        profile.generate_key("dsa1024")


def test_key_problems():
    assert profile.key_problem(profile.generate_key("ecdsa-p384").public_key()) is None
    weak = rsa.generate_private_key(public_exponent=65537, key_size=1024).public_key()
    assert "too weak" in profile.key_problem(weak)
    assert "secp521r1" in profile.key_problem(ec.generate_private_key(ec.SECP521R1()).public_key())
    assert "Ed25519" in profile.key_problem(ed25519.Ed25519PrivateKey.generate().public_key())


# ---------------------------------------------------------------- checks of foreign certs

def _foreign(ca_pair, key, *, ca=False, ku=None, ku_critical=True, eku=None, sans=("x.test",),
             not_before=NOW - dt.timedelta(days=1), not_after=NOW + dt.timedelta(days=100)):
    """A certificate made without the profile (as another tool would make it)."""
    ca_cert, ca_key = ca_pair
    b = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "x")]))
         .issuer_name(ca_cert.subject).public_key(key.public_key())
         .serial_number(x509.random_serial_number())
         .not_valid_before(not_before).not_valid_after(not_after)
         .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if ku is not None:
        b = b.add_extension(ku, critical=ku_critical)
    if eku is not None:
        b = b.add_extension(x509.ExtendedKeyUsage(eku), critical=False)
    if sans:
        b = b.add_extension(x509.SubjectAlternativeName([x509.DNSName(s) for s in sans]), critical=False)
    return b.sign(ca_key, hashes.SHA256())


def _results(findings):
    return {f.check: f.result for f in findings}


def _ku(digital=True, encipher=True, cert_sign=False):
    return x509.KeyUsage(digital_signature=digital, content_commitment=False, key_encipherment=encipher,
                         data_encipherment=False, key_agreement=False, key_cert_sign=cert_sign,
                         crl_sign=cert_sign, encipher_only=False, decipher_only=False)


BOTH = [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]


def test_check_host_flags_each_problem(ca_pair, host_key):
    ok = _foreign(ca_pair, host_key, ku=_ku(), eku=BOTH)
    assert set(_results(profile.check_host(ok, NOW)).values()) == {PASS}
    no_eku = _results(profile.check_host(_foreign(ca_pair, host_key, ku=_ku()), NOW))
    assert no_eku["extendedKeyUsage"] == FAIL
    server_only = _foreign(ca_pair, host_key, ku=_ku(), eku=[ExtendedKeyUsageOID.SERVER_AUTH])
    finding = [f for f in profile.check_host(server_only, NOW) if f.check == "extendedKeyUsage"][0]
    assert finding.result == FAIL and "clientAuth" in finding.detail
    no_encipher = _foreign(ca_pair, host_key, ku=_ku(encipher=False), eku=BOTH)
    assert _results(profile.check_host(no_encipher, NOW))["keyUsage"] == FAIL
    lax = _foreign(ca_pair, host_key, ku=_ku(encipher=False), ku_critical=False, eku=BOTH)
    assert _results(profile.check_host(lax, NOW))["keyUsage"] == WARN
    no_ku = _foreign(ca_pair, host_key, eku=BOTH)
    assert _results(profile.check_host(no_ku, NOW))["keyUsage"] == WARN
    as_ca = _foreign(ca_pair, host_key, ca=True, ku=_ku(), eku=BOTH)
    assert _results(profile.check_host(as_ca, NOW))["basicConstraints"] == FAIL
    no_san = _foreign(ca_pair, host_key, ku=_ku(), eku=BOTH, sans=())
    assert _results(profile.check_host(no_san, NOW))["subjectAltName"] == FAIL
    assert _results(profile.check_host(ok, NOW, hostname="other.test"))["subjectAltName"] == FAIL
    assert _results(profile.check_host(ok, NOW, hostname="X.TEST"))["subjectAltName"] == PASS


def test_check_validity_window(ca_pair, host_key):
    cert = _foreign(ca_pair, host_key, ku=_ku(), eku=BOTH)
    assert profile.check_validity(cert, NOW, 30).result == PASS
    assert profile.check_validity(cert, NOW + dt.timedelta(days=80), 30).result == WARN
    assert "expired" in profile.check_validity(cert, NOW + dt.timedelta(days=101), 30).detail
    assert profile.check_validity(cert, NOW - dt.timedelta(days=2), 30).result == FAIL


def test_check_ca_flags_a_leaf_and_a_missing_cert_sign(ca_pair, host_key):
    leaf = _foreign(ca_pair, host_key, ku=_ku(), eku=BOTH)
    assert _results(profile.check_ca(leaf, NOW))["basicConstraints"] == FAIL
    ca_without_sign = _foreign(ca_pair, host_key, ca=True, ku=_ku())
    assert _results(profile.check_ca(ca_without_sign, NOW))["keyUsage"] == FAIL


def test_check_flags_a_weak_key(ca_pair):
    weak = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    cert = _foreign(ca_pair, weak, ku=_ku(), eku=BOTH)
    assert _results(profile.check_host(cert, NOW))["key"] == FAIL
