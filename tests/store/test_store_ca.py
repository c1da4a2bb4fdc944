"""The CA home, its SQLite index and audit log, and the CA operations on top of them."""

from __future__ import annotations

import os
import sqlite3
import stat

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import NameOID

from qemuca.errors import Conflict, InvalidInput, NotFound, PassphraseError, StoreError
from qemuca.hosts.layout import CA_BUNDLE, CRL, SERVER_KEY
from qemuca.pki import ca, profile
from qemuca.pki.checks import fingerprint
from qemuca.store.index import Store
from tests.support.pki import (
    audit_actions,
    authority,
    index_rows,
    issue,
    make_store,
    revoke,
    snapshot_store,
    tamper_signature,
    write_secret,
)

SECRET = b"correct horse battery staple"


def _mode(path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def _csr(key, cn="c.qemu.test", ca_true=False, hash_=None):
    b = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
    if ca_true:
        b = b.add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
    from cryptography.hazmat.primitives import serialization

    return b.sign(key, hash_ or hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


@pytest.fixture
def home(tmp_path):
    return make_store(tmp_path)


# ---------------------------------------------------------------- init

def test_init_creates_a_private_home(home):
    store = Store.open(home)
    assert _mode(home) == 0o700
    assert _mode(store.ca_key_path) == 0o600
    # The index holds the host keys qemuca generated: never readable by others.
    assert _mode(store.index_path) == 0o600
    assert not any(n.startswith(".ca-new") for n in os.listdir(home))
    cert = x509.load_pem_x509_certificate(open(store.ca_cert_path, "rb").read())
    rows = index_rows(home)
    assert ("ca_fingerprint", fingerprint(cert)) in rows["meta"]
    assert audit_actions(home) == ["init"]
    assert b"ENCRYPTED" not in open(store.ca_key_path, "rb").read()


def test_an_encrypted_ca_key_needs_its_passphrase(tmp_path):
    home = make_store(tmp_path, passphrase=SECRET)
    store = Store.open(home)
    assert open(store.ca_key_path, "rb").readline() == b"-----BEGIN ENCRYPTED PRIVATE KEY-----\n"
    assert authority(home, SECRET).key is not None
    with pytest.raises(PassphraseError, match="wrong passphrase"):
        authority(home, b"wrong").unlock()
    with pytest.raises(PassphraseError, match="encrypted"):
        ca.CertificateAuthority(store).unlock()


def test_init_refuses_an_existing_ca_and_leaves_it(home):
    before = snapshot_store(home)
    with pytest.raises(Conflict, match="already exists"):
        ca.init_ca(home, common_name="x", organization=None, key_type="ecdsa-p256", days=10,
                   passphrase=None, force=False)
    assert snapshot_store(home) == before


def test_init_force_retires_the_old_ca(home):
    issue(home, "a.qemu.test")
    old_key = open(os.path.join(home, "ca", "ca-key.pem"), "rb").read()
    old_rows = index_rows(home)["certificates"]
    ca.init_ca(home, common_name="new", organization=None, key_type="ecdsa-p256", days=10,
               passphrase=None, force=True).close()
    (stamp,) = os.listdir(os.path.join(home, "retired"))
    retired = os.path.join(home, "retired", stamp)
    assert open(os.path.join(retired, "ca", "ca-key.pem"), "rb").read() == old_key
    assert index_rows(retired)["certificates"] == old_rows
    assert index_rows(home)["certificates"] == []
    assert authority(home).cert.subject.rfc4514_string() == "CN=new,OU=qemu"


def test_init_rejects_bad_days(tmp_path):
    with pytest.raises(InvalidInput):
        ca.init_ca(str(tmp_path / "h"), common_name="x", organization=None, key_type="ecdsa-p256",
                   days=0, passphrase=None, force=False)
    assert not (tmp_path / "h").exists()


# ---------------------------------------------------------------- passphrase files

def test_passphrase_file_rules(tmp_path):
    assert ca.read_passphrase_file(write_secret(tmp_path / "ok", "s3cret\r\nignored")) == b"s3cret"
    with pytest.raises(PassphraseError, match="accessible by others"):
        ca.read_passphrase_file(write_secret(tmp_path / "open", mode=0o644))
    with pytest.raises(PassphraseError, match="accessible by others"):
        ca.read_passphrase_file(write_secret(tmp_path / "group", mode=0o640))
    with pytest.raises(PassphraseError, match="does not exist"):
        ca.read_passphrase_file(str(tmp_path / "missing"))
    with pytest.raises(PassphraseError, match="empty"):
        ca.read_passphrase_file(write_secret(tmp_path / "empty", ""))
    os.mkdir(tmp_path / "dir", 0o700)
    with pytest.raises(PassphraseError, match="directory"):
        ca.read_passphrase_file(str(tmp_path / "dir"))


# ---------------------------------------------------------------- opening a damaged store

def test_open_reports_missing_and_damaged_stores(tmp_path, home):
    with pytest.raises(NotFound, match="no QEMU CA"):
        Store.open(str(tmp_path / "nothing"))
    store = Store(home)
    os.chmod(store.ca_key_path, 0o640)
    with pytest.raises(StoreError, match="chmod 600"):
        Store.open(home)
    os.chmod(store.ca_key_path, 0o600)
    os.rename(store.ca_cert_path, store.ca_cert_path + ".bak")
    with pytest.raises(StoreError, match="ca-cert.pem is missing"):
        Store.open(home)
    os.rename(store.ca_cert_path + ".bak", store.ca_cert_path)
    with open(store.ca_cert_path, "ab") as f:
        f.truncate(100)
    with pytest.raises(StoreError, match="corrupt"):
        authority(home)


def test_a_garbage_index_is_a_store_error(home):
    with open(os.path.join(home, "index.sqlite"), "wb") as f:
        f.write(b"this is not SQLite\n" * 100)
    store = Store.open(home)
    with pytest.raises(StoreError, match="index"):
        store.certificates()


def test_a_ca_key_that_does_not_match_is_refused(tmp_path, home):
    other = make_store(tmp_path, name="other")
    os.replace(os.path.join(other, "ca", "ca-key.pem"), os.path.join(home, "ca", "ca-key.pem"))
    with pytest.raises(StoreError, match="does not match"):
        authority(home).unlock()


# ---------------------------------------------------------------- issue

def test_issue_records_every_host_in_the_index(home):
    issued = issue(home, "b.qemu.test", "A.QEMU.TEST", "a.qemu.test.", sans=["10.0.0.7"], force=True)
    assert [i.record.host for i in issued] == ["b.qemu.test", "a.qemu.test"]  # normalised, once
    store = Store.open(home)
    for item in issued:
        rec = store.valid_for_host(item.record.host)
        assert rec == item.record and rec.key_source == "generated" and rec.key_type == "ecdsa-p256"
        assert rec.sans == [rec.host, "10.0.0.7"]
        cert = x509.load_pem_x509_certificate(rec.cert_pem.encode())
        assert format(cert.serial_number, "x") == rec.serial
        assert store.key_pem(rec.serial).startswith("-----BEGIN PRIVATE KEY-----")
    assert audit_actions(home) == ["init", "issue", "issue"]


def test_issue_default_validity_and_the_ca_limit(tmp_path):
    home = make_store(tmp_path, days=100)
    (short,) = issue(home, "a.qemu.test", days=profile.DEFAULT_HOST_DAYS)
    cert = x509.load_pem_x509_certificate(short.record.cert_pem.encode())
    assert cert.not_valid_after_utc == authority(home).cert.not_valid_after_utc
    with pytest.raises(InvalidInput):
        issue(home, "b.qemu.test", days=0)


def test_one_bad_host_stops_the_whole_run(home):
    before = snapshot_store(home)
    with pytest.raises(InvalidInput, match="longer than 64"):
        issue(home, "a.qemu.test", "b" * 61 + ".test")
    assert snapshot_store(home) == before


def test_one_conflicting_host_stops_the_whole_run(home):
    issue(home, "b.qemu.test")
    before = snapshot_store(home)
    with pytest.raises(Conflict, match="b.qemu.test"):
        issue(home, "a.qemu.test", "b.qemu.test", "c.qemu.test")
    assert snapshot_store(home) == before


def test_force_supersedes_and_links_the_old_serial(home):
    (old,) = issue(home, "a.qemu.test")
    (new,) = issue(home, "a.qemu.test", force=True)
    assert new.replaced == old.record.serial == new.record.replaces
    store = Store.open(home)
    assert store.by_serial(old.record.serial).status == "superseded"
    assert store.valid_for_host("a.qemu.test").serial == new.record.serial
    assert store.valid_for_host("a.qemu.test").replaces == old.record.serial


def test_the_index_allows_one_valid_certificate_per_host(home):
    """The database itself enforces it, whatever a buggy writer tries."""
    (first,) = issue(home, "a.qemu.test")
    db = sqlite3.connect(os.path.join(home, "index.sqlite"))
    with pytest.raises(sqlite3.IntegrityError):
        db.execute("INSERT INTO certificates SELECT 'ff', host, sans, not_before, not_after, 'x', "
                   "status, replaces, issued_at, ca_fingerprint, key_source, key_type, cert_pem, "
                   "key_pem, revoked_at, revocation_reason FROM certificates WHERE serial = ?",
                   (first.record.serial,))
    db.close()


# ---------------------------------------------------------------- sign

def test_sign_uses_the_profile_not_the_csr(home):
    key = profile.generate_key("ecdsa-p384")
    issued = authority(home).sign(_csr(key, ca_true=True), None, ["10.9.9.9"], 30, False)
    cert = x509.load_pem_x509_certificate(issued.record.cert_pem.encode())
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert issued.record.host == "c.qemu.test" and issued.record.key_source == "csr"
    assert issued.record.key_type == "ecdsa-p384"
    assert issued.record.sans == ["c.qemu.test", "10.9.9.9"]
    assert Store.open(home).key_pem(issued.record.serial) is None
    with pytest.raises(NotFound, match="CSR"):
        ca.credential_set(Store.open(home), authority(home), "c.qemu.test")
    assert audit_actions(home)[-1] == "sign"


def test_sign_host_overrides_the_cn_and_is_validated(home):
    key = profile.generate_key("ecdsa-p256")
    issued = authority(home).sign(_csr(key, cn="ignored.example"), "D.QEMU.TEST", [], 30, False)
    assert issued.record.host == "d.qemu.test"
    assert x509.load_pem_x509_certificate(issued.record.cert_pem.encode()).subject.rfc4514_string() \
        == "CN=d.qemu.test"
    with pytest.raises(InvalidInput):
        authority(home).sign(_csr(key, cn="bad name"), None, [], 30, False)


def test_sign_refuses_bad_csrs(home):
    before = snapshot_store(home)
    good = _csr(profile.generate_key("ecdsa-p256"))
    x509.load_pem_x509_csr(tamper_signature(good))  # still a well-formed CSR...
    with pytest.raises(InvalidInput, match="signature does not verify"):  # ...signed by nobody
        authority(home).sign(tamper_signature(good), None, [], 30, False)
    with pytest.raises(InvalidInput, match="not a valid certificate signing request"):
        authority(home).sign(b"garbage", None, [], 30, False)
    from cryptography.hazmat.primitives.asymmetric import ec

    with pytest.raises(InvalidInput, match="secp521r1"):
        authority(home).sign(_csr(ec.generate_private_key(ec.SECP521R1())), None, [], 30, False)
    assert snapshot_store(home) == before


# ---------------------------------------------------------------- find, revoke, CRL, audit

def test_find_by_host_and_by_serial_in_any_spelling(home):
    (item,) = issue(home, "a.qemu.test")
    serial = item.record.serial
    store = Store.open(home)
    padded = serial.zfill(len(serial) + len(serial) % 2 + 2).upper()  # openssl prints 00-padded bytes
    colons = ":".join(padded[i:i + 2] for i in range(0, len(padded), 2))
    for spelling in ("a.qemu.test", "A.QEMU.TEST", serial, serial.upper(), colons, colons.lower(),
                     padded, "0x" + serial):
        assert store.find(spelling).serial == serial, spelling
    with pytest.raises(NotFound):
        store.find("nobody.qemu.test")


def test_revoke_rewrites_the_crl(home):
    issue(home, "a.qemu.test", "b.qemu.test")
    rec = revoke(home, "a.qemu.test", "key-compromise")
    assert rec.status == "revoked" and rec.revocation_reason == "key-compromise"
    crl = x509.load_pem_x509_crl(open(os.path.join(home, "crl.pem"), "rb").read())
    entry = crl.get_revoked_certificate_by_serial_number(int(rec.serial, 16))
    assert entry is not None
    assert entry.extensions.get_extension_for_class(x509.CRLReason).value.reason == \
        x509.ReasonFlags.key_compromise
    assert crl.is_signature_valid(authority(home).cert.public_key())
    number = crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    b = revoke(home, "b.qemu.test")
    crl2 = x509.load_pem_x509_crl(open(os.path.join(home, "crl.pem"), "rb").read())
    assert crl2.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number == number + 1
    assert {r.serial_number for r in crl2} == {int(rec.serial, 16), int(b.serial, 16)}
    assert audit_actions(home)[-4:] == ["revoke", "crl", "revoke", "crl"]
    # The set of a revoked host cannot be exported; another host's set carries the CRL.
    issue(home, "c.qemu.test")
    creds = ca.credential_set(Store.open(home), authority(home), "c.qemu.test")
    assert creds.files[CRL] == open(os.path.join(home, "crl.pem"), "rb").read()
    with pytest.raises(NotFound):
        ca.credential_set(Store.open(home), authority(home), "a.qemu.test")


def test_revoke_twice_or_unknown_changes_nothing(home):
    issue(home, "a.qemu.test")
    revoke(home, "a.qemu.test")
    before = snapshot_store(home)
    with pytest.raises(Conflict, match="already revoked"):
        revoke(home, "a.qemu.test")
    with pytest.raises(NotFound):
        revoke(home, "nobody.qemu.test")
    with pytest.raises(InvalidInput, match="reason"):
        revoke(home, "a.qemu.test", reason="bored")
    assert snapshot_store(home) == before


def test_revoke_with_a_wrong_passphrase_changes_nothing(tmp_path):
    home = make_store(tmp_path, passphrase=SECRET, hosts=["a.qemu.test"])
    before = snapshot_store(home)
    with pytest.raises(PassphraseError):
        revoke(home, "a.qemu.test", passphrase=b"wrong")
    assert snapshot_store(home) == before


def test_credential_set_without_revocations_has_no_crl(home):
    issue(home, "a.qemu.test")
    creds = ca.credential_set(Store.open(home), authority(home), "a.qemu.test")
    assert CRL not in creds.files
    assert creds.files[CA_BUNDLE] == authority(home).bundle()
    assert creds.files[SERVER_KEY] == Store.open(home).key_pem(
        Store.open(home).valid_for_host("a.qemu.test").serial).encode()


def test_the_audit_log_is_append_only(home):
    issue(home, "a.qemu.test")
    db = sqlite3.connect(os.path.join(home, "index.sqlite"))
    for statement in ("UPDATE audit SET action = 'x'", "DELETE FROM audit"):
        with pytest.raises(sqlite3.DatabaseError, match="append-only"):
            db.execute(statement)
    db.close()
    log = Store.open(home).audit_log()
    assert [e["action"] for e in log] == ["init", "issue"]
    assert log[1]["subject"] == "a.qemu.test" and log[1]["pid"] == os.getpid()
    assert log[1]["detail"]["serial"] == Store.open(home).valid_for_host("a.qemu.test").serial
