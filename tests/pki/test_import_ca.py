"""Taking over an existing QEMU CA: a certtool CA made as libvirt's TLS guide says, an
oVirt-style qemu-ca.pem with an encrypted key; and the CAs that must be refused."""

from __future__ import annotations

import datetime as dt
import subprocess

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from qemuca.errors import InvalidInput, PassphraseError
from qemuca.pki import ca, profile
from qemuca.pki.checks import fingerprint, issued_by
from qemuca.pki.import_ca import load_foreign_ca
from qemuca.store.index import Store
from tests.support.tools import require_tool


def certtool_ca(tmp_path):
    """libvirt's guide: certtool --generate-privkey; a template with `ca` and `cert_signing_key`."""
    certtool = require_tool("certtool")
    key, cert, info = tmp_path / "cakey.pem", tmp_path / "cacert.pem", tmp_path / "ca.info"
    info.write_text("cn = Example Org QEMU CA\nca\ncert_signing_key\nexpiration_days = 3650\n")
    subprocess.run([certtool, "--generate-privkey", "--outfile", key], check=True, capture_output=True)
    subprocess.run([certtool, "--generate-self-signed", "--load-privkey", key, "--template", info,
                    "--outfile", cert], check=True, capture_output=True)
    return cert.read_bytes(), key.read_bytes()


def ovirt_style_ca(tmp_path, passphrase=b"engine secret"):
    """RSA 2048, OU=qemu, 20 years, the key encrypted (openssl, as the engine's PKI scripts)."""
    openssl = require_tool("openssl")
    key, cert = tmp_path / "qemu-ca.key", tmp_path / "qemu-ca.pem"
    (tmp_path / "pass").write_bytes(passphrase)
    subprocess.run([openssl, "req", "-x509", "-newkey", "rsa:2048", "-days", "7300", "-subj",
                    "/C=US/O=engine.example.org/OU=qemu/CN=engine.example.org.12345",
                    "-addext", "basicConstraints=critical,CA:true",
                    "-addext", "keyUsage=critical,keyCertSign,cRLSign",
                    "-passout", f"file:{tmp_path / 'pass'}", "-keyout", key, "-out", cert],
                   check=True, capture_output=True)
    return cert.read_bytes(), key.read_bytes()


def made_ca(*, ca_flag=True, cert_sign=True, days=(-1, 365), ski=True):
    """A CA built by hand, with whichever defect a test needs."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "hand-made CA")])
    now = dt.datetime.now(dt.timezone.utc)
    builder = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
               .serial_number(x509.random_serial_number())
               .not_valid_before(now + dt.timedelta(days=days[0]))
               .not_valid_after(now + dt.timedelta(days=days[1]))
               .add_extension(x509.BasicConstraints(ca=ca_flag, path_length=None), critical=True)
               .add_extension(x509.KeyUsage(True, False, False, False, False, cert_sign, cert_sign, False, False),
                              critical=True))
    if ski:
        builder = builder.add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    cert = builder.sign(key, hashes.SHA256())
    return (cert.public_bytes(serialization.Encoding.PEM),
            key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption()))


def take_over(tmp_path, cert_pem, key_pem, passphrase=None, store_passphrase=b"new store secret"):
    cert, key = load_foreign_ca(cert_pem, "ca.pem", key_pem, "ca.key", passphrase)
    home = tmp_path / "home"
    ca.init_ca(str(home), common_name="unused", organization=None, key_type="rsa3072", days=3650,
               passphrase=store_passphrase, force=False,
               imported=ca.ImportedCA(cert, key, "/srv/ca.pem", "/srv/ca.key"))
    store = Store.open(str(home))
    return store, ca.CertificateAuthority(store, lambda: store_passphrase)


@pytest.mark.parametrize("kind", ["certtool", "ovirt"])
def test_an_existing_ca_signs_qemu_certificates_after_import(tmp_path, kind):
    if kind == "certtool":
        cert_pem, key_pem = certtool_ca(tmp_path)
        store, authority = take_over(tmp_path, cert_pem, key_pem)
    else:
        cert_pem, key_pem = ovirt_style_ca(tmp_path)
        store, authority = take_over(tmp_path, cert_pem, key_pem, passphrase=b"engine secret")
    original = x509.load_pem_x509_certificate(cert_pem)
    assert authority.fingerprint == fingerprint(original)
    stored_key = open(store.ca_key_path, "rb").read()
    assert b"ENCRYPTED PRIVATE KEY" in stored_key  # encrypted with the store's passphrase
    (issued,) = authority.issue(["hv1.example.org"], [], 365, "ecdsa-p256", force=False)
    leaf = x509.load_pem_x509_certificate(issued.record.cert_pem.encode())
    assert issued_by(leaf, original)
    assert all(f.result != "fail" for f in profile.check_host(leaf, hostname="hv1.example.org"))
    (entry,) = [a for a in store.audit_log() if a["action"] == "init"]
    assert entry["detail"]["imported_from"] == {"cert": "/srv/ca.pem", "key": "/srv/ca.key"}
    assert authority.write_crl()  # the imported key signs CRLs too


def test_a_ca_without_subject_key_identifier_still_chains(tmp_path):
    cert_pem, key_pem = made_ca(ski=False)
    _, authority = take_over(tmp_path, cert_pem, key_pem)
    (issued,) = authority.issue(["hv1.example.org"], [], 30, "ecdsa-p256", force=False)
    leaf = x509.load_pem_x509_certificate(issued.record.cert_pem.encode())
    assert issued_by(leaf, authority.cert)
    aki = leaf.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    assert aki.key_identifier == x509.SubjectKeyIdentifier.from_public_key(authority.cert.public_key()).digest


def test_unfit_cas_are_refused_with_the_reason(tmp_path):
    cases = {
        "not a CA certificate": made_ca(ca_flag=False),
        "lacks keyCertSign": made_ca(cert_sign=False),
        "expired": made_ca(days=(-30, -1)),
        "not valid before": made_ca(days=(2, 30)),
    }
    for needle, (cert_pem, key_pem) in cases.items():
        with pytest.raises(InvalidInput, match=needle):
            load_foreign_ca(cert_pem, "ca.pem", key_pem, "ca.key", None)
    cert_pem, _ = made_ca()
    _, other_key = made_ca()
    with pytest.raises(InvalidInput, match="does not match"):
        load_foreign_ca(cert_pem, "ca.pem", other_key, "ca.key", None)
    with pytest.raises(InvalidInput, match="holds 2 certificates"):
        load_foreign_ca(cert_pem + made_ca()[0], "ca.pem", made_ca()[1], "ca.key", None)
    with pytest.raises(InvalidInput, match="no private key"):
        load_foreign_ca(cert_pem, "ca.pem", cert_pem, "ca.key", None)
    weak = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "weak")])
    now = dt.datetime.now(dt.timezone.utc)
    weak_cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(weak.public_key())
                 .serial_number(1).not_valid_before(now).not_valid_after(now + dt.timedelta(days=9))
                 .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                 .sign(weak, hashes.SHA256()))
    with pytest.raises(InvalidInput, match="too weak"):
        load_foreign_ca(weak_cert.public_bytes(serialization.Encoding.PEM), "ca.pem",
                        weak.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()), "ca.key", None)


def test_an_encrypted_key_needs_its_passphrase(tmp_path):
    cert_pem, key_pem = ovirt_style_ca(tmp_path)
    with pytest.raises(PassphraseError, match="encrypted"):
        load_foreign_ca(cert_pem, "ca.pem", key_pem, "ca.key", None)
    with pytest.raises(PassphraseError, match="wrong passphrase"):
        load_foreign_ca(cert_pem, "ca.pem", key_pem, "ca.key", b"not it")
