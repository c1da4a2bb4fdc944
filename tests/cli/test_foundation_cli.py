"""The foundation commands as a user runs them: init, issue, sign, export, list, show,
inspect, revoke, crl. Every run is a real `python -m qemuca` process; every error must
be one 'qemuca: error:' line with the documented exit code, and leave the store as it was.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import socket
import sqlite3
import stat
import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from qemuca.errors import EXIT_CONFLICT, EXIT_FAILED, EXIT_INVALID_INPUT, EXIT_NOT_FOUND, EXIT_PASSPHRASE, EXIT_STORE
from qemuca.hosts.layout import CRL
from tests.support.pki import (
    assert_error,
    assert_ok,
    audit_actions,
    current,
    current_cert,
    export_set,
    issue,
    load_cert,
    make_store,
    revoke,
    run_many,
    run_qemuca,
    snapshot_dir,
    snapshot_store,
    tamper_signature,
    write_secret,
)
from tests.support.tools import require_tool

SECRET = "correct horse battery staple"
LAYOUT = {"ca-cert.pem", "server-cert.pem", "server-key.pem", "client-cert.pem", "client-key.pem"}


def _now():
    return dt.datetime.now(dt.timezone.utc)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def _json(proc):
    assert_ok(proc)
    return json.loads(proc.stdout)


def _errors_leave_store(home, cases, env=None):
    """Run error cases side by side: each must fail as documented and change nothing.
    cases: [(args, exit_code, needle...)]."""
    before = snapshot_store(home)
    results = run_many(home, [c[0] for c in cases], env=env)
    for (_args, code, *needles), proc in zip(cases, results):
        assert_error(proc, code, *needles)
    assert snapshot_store(home) == before


def _csr(tmp_path, name, newkey, *extra):
    """A CSR made by `openssl req`, as on a real host."""
    openssl = require_tool("openssl")
    path = tmp_path / f"{name}.csr"
    subprocess.run([openssl, "req", "-new", "-newkey", newkey, "-nodes", "-keyout",
                    str(tmp_path / f"{name}.key"), "-subj", f"/CN={name}.qemu.test",
                    "-out", str(path), *extra], check=True, capture_output=True)
    return path


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """A store for read-only commands and error cases: a and b issued (b with extra SANs
    and 10 days), c revoked, d superseded once."""
    base = tmp_path_factory.mktemp("shared")
    home = make_store(base, hosts=["a.qemu.test", "d.qemu.test", "c.qemu.test"])
    issue(home, "b.qemu.test", sans=["10.0.0.2", "mig-b.qemu.test"], days=10)
    issue(home, "d.qemu.test", force=True)
    revoke(home, "c.qemu.test", "key-compromise")
    return home


# ---------------------------------------------------------------- init

def test_init_defaults(tmp_path):
    home = tmp_path / "h"
    info = _json(run_qemuca(home, "init", "--no-passphrase", "--json"))
    assert info["key_type"] == "rsa3072" and info["key_encrypted"] is False
    cert = load_cert(home / "ca" / "ca-cert.pem")
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == \
        f"QEMU CA {socket.getfqdn()}"
    assert cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)[0].value == "qemu"
    assert cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME) == []
    assert cert.public_key().key_size == 3072
    assert abs(cert.not_valid_after_utc - (_now() + dt.timedelta(days=3650))) < dt.timedelta(minutes=2)
    assert dt.timedelta(minutes=2) < _now() - cert.not_valid_before_utc < dt.timedelta(minutes=10)
    bc = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca
    ku = cert.extensions.get_extension_for_class(x509.KeyUsage)
    assert ku.critical and ku.value.key_cert_sign and ku.value.crl_sign
    assert cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value == \
        x509.SubjectKeyIdentifier.from_public_key(cert.public_key())
    assert _mode(home) == 0o700 and _mode(home / "ca" / "ca-key.pem") == 0o600
    assert b"ENCRYPTED" not in (home / "ca" / "ca-key.pem").read_bytes()
    assert info["fingerprint_sha256"] == cert.fingerprint(hashes.SHA256()).hex()


def test_init_with_options_and_an_encrypted_key(tmp_path):
    home = tmp_path / "h"
    secret = write_secret(tmp_path / "pass", SECRET)
    assert_ok(run_qemuca(home, "init", "--cn", "Cluster QEMU CA", "--org", "Acme", "--key-type",
                         "ecdsa-p384", "--days", "100", "--passphrase-file", secret))
    cert = load_cert(home / "ca" / "ca-cert.pem")
    assert cert.subject.rfc4514_string() == "CN=Cluster QEMU CA,OU=qemu,O=Acme"
    assert cert.public_key().curve.name == "secp384r1"
    assert abs(cert.not_valid_after_utc - (_now() + dt.timedelta(days=100))) < dt.timedelta(minutes=2)
    assert (home / "ca" / "ca-key.pem").read_text().startswith("-----BEGIN ENCRYPTED PRIVATE KEY-----")


def test_init_needs_a_passphrase_source(tmp_path):
    proc = run_qemuca(tmp_path / "h", "init")  # stdin is not a terminal
    assert_error(proc, EXIT_PASSPHRASE, "--no-passphrase")
    assert not (tmp_path / "h" / "ca").exists()
    bad = write_secret(tmp_path / "open", mode=0o644)
    assert_error(run_qemuca(tmp_path / "h2", "init", "--passphrase-file", bad), EXIT_PASSPHRASE, "chmod 600")
    assert not (tmp_path / "h2").exists()


def test_init_over_an_existing_ca(tmp_path):
    home = make_store(tmp_path, hosts=["a.qemu.test"])
    before = snapshot_store(home)
    assert_error(run_qemuca(home, "init", "--no-passphrase", "--key-type", "ecdsa-p256"),
                 EXIT_CONFLICT, "--force")
    assert snapshot_store(home) == before
    assert_ok(run_qemuca(home, "init", "--no-passphrase", "--key-type", "ecdsa-p256", "--force"))
    (stamp,) = os.listdir(Path(home) / "retired")
    retired = Path(home) / "retired" / stamp
    for rel in ("ca/ca-cert.pem", "ca/ca-key.pem"):
        assert (retired / rel).read_bytes() == before["files"][rel][2]
    assert (Path(home) / "ca" / "ca-cert.pem").read_bytes() != before["files"]["ca/ca-cert.pem"][2]
    assert _json(run_qemuca(home, "list", "--json")) == []


# ---------------------------------------------------------------- passphrases

def test_passphrase_errors_change_nothing(tmp_path):
    secret = SECRET.encode()
    home = make_store(tmp_path, passphrase=secret, hosts=["a.qemu.test"])
    wrong = write_secret(tmp_path / "wrong", "not it")
    readable = write_secret(tmp_path / "readable", SECRET, mode=0o604)
    _errors_leave_store(home, [
        (["issue", "b.qemu.test", "--passphrase-file", wrong], EXIT_PASSPHRASE, "wrong passphrase"),
        (["issue", "b.qemu.test", "--passphrase-file", readable], EXIT_PASSPHRASE, "accessible by others"),
        (["issue", "b.qemu.test", "--passphrase-file", str(tmp_path / "nope")], EXIT_PASSPHRASE,
         "does not exist"),
        (["issue", "b.qemu.test"], EXIT_PASSPHRASE, "QEMUCA_PASSPHRASE_FILE"),
        (["revoke", "a.qemu.test", "--passphrase-file", wrong], EXIT_PASSPHRASE, "wrong passphrase"),
        (["crl"], EXIT_PASSPHRASE, "passphrase"),
    ])


def test_every_key_command_takes_the_passphrase_file_from_the_environment(tmp_path):
    secret = write_secret(tmp_path / "pass", SECRET)
    home = make_store(tmp_path, passphrase=SECRET.encode(), hosts=["a.qemu.test"])
    env = {"QEMUCA_PASSPHRASE_FILE": secret}
    csr = _csr(tmp_path, "s", "ec", "-pkeyopt", "ec_paramgen_curve:P-256")
    assert_ok(run_qemuca(home, "issue", "b.qemu.test", env=env))
    assert_ok(run_qemuca(home, "sign", csr, "--json", env=env))
    assert_ok(run_qemuca(home, "revoke", "a.qemu.test", env=env))
    assert_ok(run_qemuca(home, "crl", "--json", env=env))
    assert audit_actions(home) == ["init", "issue", "issue", "sign", "revoke", "crl", "crl"]
    # The host key qemuca made is stored encrypted: export opens it with the passphrase.
    assert_ok(run_qemuca(home, "export", "b.qemu.test", "--dir", tmp_path / "out", env=env))
    refused = run_qemuca(home, "export", "b.qemu.test", "--dir", tmp_path / "out2")
    assert refused.returncode == EXIT_PASSPHRASE and not (tmp_path / "out2").exists(), refused.stderr


def test_host_keys_are_encrypted_at_rest_under_the_ca_passphrase(tmp_path):
    """Stealing the store (index, retired/, backups) is not enough to pose as a host:
    every key qemuca makes is PKCS#8-encrypted under the CA passphrase; what a host
    receives (export, deploy) is the plain key QEMU reads."""
    secret = write_secret(tmp_path / "pass", SECRET)
    home = make_store(tmp_path, passphrase=SECRET.encode(), hosts=["a.qemu.test"])
    env = {"QEMUCA_PASSPHRASE_FILE": secret}
    db = sqlite3.connect(Path(home) / "index.sqlite")
    stored = [row[0] for row in db.execute("SELECT key_pem FROM certificates WHERE key_pem IS NOT NULL")]
    assert stored and all(k.startswith("-----BEGIN ENCRYPTED PRIVATE KEY-----") for k in stored)
    assert_ok(run_qemuca(home, "export", "a.qemu.test", "--dir", tmp_path / "out", env=env))
    exported = serialization.load_pem_private_key((tmp_path / "out" / "server-key.pem").read_bytes(), None)
    cert = x509.load_pem_x509_certificate((tmp_path / "out" / "server-cert.pem").read_bytes())
    assert exported.public_key() == cert.public_key()


# ---------------------------------------------------------------- issue

def test_issue_several_hosts_with_sans(tmp_path):
    home = make_store(tmp_path)
    hosts_file = tmp_path / "hosts"
    hosts_file.write_text("# the cluster\nc.qemu.test\n\n  d.qemu.test  # rack 2\nA.qemu.test\n")
    out = _json(run_qemuca(home, "issue", "a.qemu.test", "b.qemu.test", "--hosts-file", hosts_file,
                           "--san", "10.1.0.9", "--san", "fd00::9", "--san", "mig.qemu.test", "--force",
                           "--json"))
    assert [r["host"] for r in out] == ["a.qemu.test", "b.qemu.test", "c.qemu.test", "d.qemu.test"]
    ca_cert = load_cert(Path(home) / "ca" / "ca-cert.pem")
    serials = set()
    for row in out:
        cert = current_cert(home, row["host"])
        assert cert.subject.rfc4514_string() == f"CN={row['host']}"
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert san.get_values_for_type(x509.DNSName) == [row["host"], "mig.qemu.test"]
        assert [str(i) for i in san.get_values_for_type(x509.IPAddress)] == ["10.1.0.9", "fd00::9"]
        assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
        ku = cert.extensions.get_extension_for_class(x509.KeyUsage)
        assert ku.critical and ku.value.digital_signature and ku.value.key_encipherment  # EC key
        assert set(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == \
            {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
        ski = cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        assert ski == x509.SubjectKeyIdentifier.from_public_key(cert.public_key())
        assert cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value.key_identifier \
            == ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
        assert cert.serial_number.bit_length() >= 64 and format(cert.serial_number, "x") == row["serial"]
        assert dt.timedelta(minutes=2) < _now() - cert.not_valid_before_utc < dt.timedelta(minutes=10)
        lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
        assert lifetime == dt.timedelta(days=730, minutes=5)
        serials.add(row["serial"])
    assert len(serials) == 4
    assert audit_actions(home).count("issue") == 4


def test_issue_never_outlives_the_ca(tmp_path):
    home = make_store(tmp_path, days=30)
    assert_ok(run_qemuca(home, "issue", "a.qemu.test", "--days", "365"))
    cert = current_cert(home, "a.qemu.test")
    assert cert.not_valid_after_utc == load_cert(Path(home) / "ca" / "ca-cert.pem").not_valid_after_utc


def test_issue_conflicts_and_force(tmp_path):
    home = make_store(tmp_path, hosts=["b.qemu.test"])
    _errors_leave_store(home, [
        (["issue", "b.qemu.test"], EXIT_CONFLICT, "b.qemu.test", "--force"),
        # One conflicting host among several: nobody is issued.
        (["issue", "a.qemu.test", "b.qemu.test", "c.qemu.test"], EXIT_CONFLICT, "b.qemu.test"),
    ])
    old = current(home, "b.qemu.test").serial
    new = _json(run_qemuca(home, "issue", "b.qemu.test", "--force", "--json"))[0]
    assert new["replaced"] == new["replaces"] == old
    rows = {r["serial"]: r for r in _json(run_qemuca(home, "list", "--all", "--json"))}
    assert rows[old]["status"] == "superseded"
    assert rows[new["serial"]]["status"] == "valid" and rows[new["serial"]]["replaces"] == old


def test_bad_host_names_are_refused(shared):
    label64 = "a" * 64 + ".qemu.test"
    too_long = ".".join(["b" * 63] * 4)  # 255 characters
    _errors_leave_store(shared, [
        (["issue", ""], EXIT_INVALID_INPUT, "empty"),
        (["issue", ".."], EXIT_INVALID_INPUT, "empty label"),
        (["issue", "a/b"], EXIT_INVALID_INPUT, "path"),
        (["issue", "--", "-a.qemu.test"], EXIT_INVALID_INPUT, "hyphens"),
        (["issue", "*.qemu.test"], EXIT_INVALID_INPUT, "wildcard"),
        (["issue", too_long], EXIT_INVALID_INPUT, "longer than 253"),
        (["issue", label64], EXIT_INVALID_INPUT, "longer than 63"),
        (["issue", "a" * 60 + ".qemu.test"], EXIT_INVALID_INPUT, "longer than 64"),  # CN limit
        (["issue", "a\x1bb.qemu.test"], EXIT_INVALID_INPUT, "control", "\\x1b"),
        (["issue", "10.0.0.1"], EXIT_INVALID_INPUT, "IP address", "--san"),
        (["issue", "☃.qemu.test"], EXIT_INVALID_INPUT, "not allowed"),
        (["issue", "ok.qemu.test", "--san", "*.qemu.test"], EXIT_INVALID_INPUT, "wildcard"),
        (["issue"], EXIT_INVALID_INPUT, "no host"),
        (["issue", "--hosts-file", "/nonexistent/hosts"], EXIT_INVALID_INPUT, "hosts file"),
    ])


def test_an_idn_host_becomes_its_a_label(tmp_path):
    home = make_store(tmp_path)
    out = _json(run_qemuca(home, "issue", "Bücher.qemu.test", "--json"))
    assert out[0]["host"] == "xn--bcher-kva.qemu.test"
    cert = current_cert(home, "xn--bcher-kva.qemu.test")
    assert cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value \
        .get_values_for_type(x509.DNSName) == ["xn--bcher-kva.qemu.test"]


# ---------------------------------------------------------------- sign

def test_sign_csrs_made_by_openssl(tmp_path):
    home = make_store(tmp_path)
    csrs = {"r": _csr(tmp_path, "r", "rsa:2048"),
            "p": _csr(tmp_path, "p", "ec", "-pkeyopt", "ec_paramgen_curve:P-256"),
            "q": _csr(tmp_path, "q", "ec", "-pkeyopt", "ec_paramgen_curve:P-384")}
    out = tmp_path / "q.pem"
    results = run_many(home, [["sign", *args] for args in ([csrs["r"], "--json"], [csrs["p"]],
                                                            [csrs["q"], "--out", out])])
    signed = json.loads(assert_ok(results[0]).stdout)
    assert signed["host"] == "r.qemu.test" and signed["key_source"] == "csr"
    assert signed["key_type"] == "rsa2048"
    assert load_cert(assert_ok(results[1]).stdout).subject.rfc4514_string() == "CN=p.qemu.test"
    assert_ok(results[2])
    assert load_cert(out).public_key().curve.name == "secp384r1"
    for name in "rpq":
        cert = current_cert(home, f"{name}.qemu.test")
        key_pub = subprocess.run(["openssl", "pkey", "-in", str(tmp_path / f"{name}.key"), "-pubout"],
                                 capture_output=True, check=True).stdout
        assert cert.public_key().public_bytes(serialization.Encoding.PEM,
                                              serialization.PublicFormat.SubjectPublicKeyInfo) == key_pub
    # qemuca never saw those keys: exporting says so.
    _errors_leave_store(home, [(["export", "p.qemu.test", "--dir", tmp_path / "out"], EXIT_NOT_FOUND,
                                "CSR")])
    assert not (tmp_path / "out").exists()


def test_sign_ignores_requested_extensions_and_takes_host(tmp_path):
    home = make_store(tmp_path)
    csr = _csr(tmp_path, "x", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
               "-addext", "basicConstraints=critical,CA:TRUE",
               "-addext", "keyUsage=critical,keyCertSign",
               "-addext", "subjectAltName=DNS:evil.example")
    assert_ok(run_qemuca(home, "sign", csr, "--host", "Real.qemu.test", "--san", "10.2.2.2"))
    cert = current_cert(home, "real.qemu.test")
    assert cert.subject.rfc4514_string() == "CN=real.qemu.test"
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert not cert.extensions.get_extension_for_class(x509.KeyUsage).value.key_cert_sign
    assert [str(v.value) for v in cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value] \
        == ["real.qemu.test", "10.2.2.2"]


def test_sign_refuses_weak_tampered_and_wrong_inputs(tmp_path, shared):
    good = _csr(tmp_path, "g", "ec", "-pkeyopt", "ec_paramgen_curve:P-256")
    tampered = tmp_path / "tampered.csr"
    tampered.write_bytes(tamper_signature(good.read_bytes()))
    _errors_leave_store(shared, [
        (["sign", _csr(tmp_path, "w", "rsa:1024")], EXIT_INVALID_INPUT, "1024"),
        (["sign", _csr(tmp_path, "e", "ec", "-pkeyopt", "ec_paramgen_curve:P-521")], EXIT_INVALID_INPUT,
         "secp521r1"),
        (["sign", _csr(tmp_path, "d", "ed25519")], EXIT_INVALID_INPUT, "Ed25519"),
        (["sign", tampered], EXIT_INVALID_INPUT, "signature"),
        (["sign", Path(shared) / "ca" / "ca-cert.pem"], EXIT_INVALID_INPUT, "certificate signing request"),
        (["sign", tmp_path / "missing.csr"], EXIT_INVALID_INPUT, "cannot read"),
        (["sign", good, "--host", "bad/name"], EXIT_INVALID_INPUT, "path"),
        (["sign", good, "--host", "a.qemu.test"], EXIT_CONFLICT, "a.qemu.test"),
    ])


# ---------------------------------------------------------------- export

def test_export_writes_the_layout_once(tmp_path, shared):
    out = tmp_path / "pki"
    info = _json(run_qemuca(shared, "export", "a.qemu.test", "--dir", out, "--json"))
    assert info["result"] == "changed"
    # c is revoked: the set carries the CRL.
    assert set(info["files"]) == LAYOUT | {CRL}
    assert {p.name for p in out.iterdir()} == LAYOUT | {CRL, ".qemuca"}
    for name in LAYOUT | {CRL}:
        assert _mode(out / name) == (0o600 if name.endswith("-key.pem") else 0o644)
    assert (out / "server-cert.pem").read_bytes() == (out / "client-cert.pem").read_bytes()
    assert (out / "server-key.pem").read_bytes() == (out / "client-key.pem").read_bytes()
    assert (out / "ca-cert.pem").read_bytes() == (Path(shared) / "ca" / "ca-cert.pem").read_bytes()
    assert (out / CRL).read_bytes() == (Path(shared) / "crl.pem").read_bytes()
    before = snapshot_dir(out)
    again = _json(run_qemuca(shared, "export", "a.qemu.test", "--dir", out, "--json"))
    assert again["result"] == "unchanged"
    assert snapshot_dir(out) == before


def test_export_gains_a_crl_when_something_is_revoked(tmp_path):
    home = make_store(tmp_path, hosts=["a.qemu.test", "b.qemu.test"])
    out = tmp_path / "pki"
    assert_ok(run_qemuca(home, "export", "a.qemu.test", "--dir", out))
    assert set(os.listdir(out)) == LAYOUT | {".qemuca"}
    b_serial = revoke(home, "b.qemu.test").serial
    assert _json(run_qemuca(home, "export", "a.qemu.test", "--dir", out, "--json"))["result"] == "changed"
    crl = x509.load_pem_x509_crl((out / CRL).read_bytes())
    assert [format(r.serial_number, "x") for r in crl] == [b_serial]


def test_export_keeps_foreign_files_unless_forced(tmp_path, shared):
    out = tmp_path / "pki"
    out.mkdir()
    (out / "ca-cert.pem").write_bytes(b"the old CA\n")
    (out / "server-key.pem").write_bytes(b"the old key\n")
    before = snapshot_dir(out)
    assert_error(run_qemuca(shared, "export", "a.qemu.test", "--dir", out), EXIT_CONFLICT,
                 "ca-cert.pem", "--force")
    assert snapshot_dir(out) == before
    info = _json(run_qemuca(shared, "export", "a.qemu.test", "--dir", out, "--force", "--json"))
    assert sorted(info["adopted"]) == ["ca-cert.pem", "server-key.pem"]
    (adopted,) = [p for p in (out / ".qemuca" / "sets").iterdir() if p.name.startswith("adopted-")]
    assert (adopted / "ca-cert.pem").read_bytes() == b"the old CA\n"
    assert (adopted / "server-key.pem").read_bytes() == b"the old key\n"
    assert os.readlink(out / "ca-cert.pem") == ".qemuca/current/ca-cert.pem"


def test_export_errors(tmp_path, shared):
    _errors_leave_store(shared, [
        (["export", "c.qemu.test", "--dir", tmp_path / "x"], EXIT_NOT_FOUND, "no valid certificate"),
        (["export", "nobody.qemu.test", "--dir", tmp_path / "x"], EXIT_NOT_FOUND, "nobody.qemu.test"),
        (["export", "a/b", "--dir", tmp_path / "x"], EXIT_INVALID_INPUT, "path"),
    ])
    assert not (tmp_path / "x").exists()


# ---------------------------------------------------------------- list, show

def test_list_json(shared):
    rows = _json(run_qemuca(shared, "list", "--json"))
    assert isinstance(rows, list)
    by_host = {}
    for row in rows:
        assert {"host", "serial", "not_after", "status", "fingerprint_sha256"} <= set(row)
        parsed = dt.datetime.fromisoformat(row["not_after"].replace("Z", "+00:00"))
        assert parsed.tzinfo is not None
        assert len(row["fingerprint_sha256"]) == 64
        by_host.setdefault(row["host"], []).append(row["status"])
    assert by_host == {"a.qemu.test": ["valid"], "b.qemu.test": ["valid"], "c.qemu.test": ["revoked"],
                       "d.qemu.test": ["valid"]}
    cert = current_cert(shared, "a.qemu.test")

    a = [r for r in rows if r["host"] == "a.qemu.test"][0]
    assert a["fingerprint_sha256"] == cert.fingerprint(hashes.SHA256()).hex()
    assert a["not_after"] == cert.not_valid_after_utc.strftime("%Y-%m-%dT%H:%M:%SZ")


def test_list_filters(shared):
    soon, everything = run_many(shared, [["list", "--expiring-within", "30", "--json"],
                                         ["list", "--all", "--json"]])
    assert [r["host"] for r in _json(soon)] == ["b.qemu.test"]
    statuses = sorted(r["status"] for r in _json(everything) if r["host"] == "d.qemu.test")
    assert statuses == ["superseded", "valid"]


def test_show_by_host_and_serial(shared):
    pem = assert_ok(run_qemuca(shared, "show", "a.qemu.test", "--pem")).stdout
    assert pem == current(shared, "a.qemu.test").cert_pem
    cert = load_cert(pem)
    serial = format(cert.serial_number, "x")
    openssl_style = cert.serial_number.to_bytes((cert.serial_number.bit_length() + 7) // 8, "big").hex()
    colons = ":".join(openssl_style[i:i + 2] for i in range(0, len(openssl_style), 2)).upper()
    results = run_many(shared, [["show", s, "--json"] for s in
                                ("A.QEMU.TEST", serial.upper(), colons, "00" + openssl_style)])
    for proc in results:
        data = _json(proc)
        assert data["serial"] == serial and data["host"] == "a.qemu.test"
        assert any("subjectAltName" in e for e in data["extensions"])
    human = assert_ok(run_qemuca(shared, "show", "b.qemu.test")).stdout
    assert "10.0.0.2" in human and "mig-b.qemu.test" in human
    _errors_leave_store(shared, [(["show", "nobody.qemu.test"], EXIT_NOT_FOUND, "nobody.qemu.test"),
                                 (["show", "ab:cd"], EXIT_NOT_FOUND, "ab:cd")])


# ---------------------------------------------------------------- inspect

@pytest.fixture(scope="module")
def pem_files(tmp_path_factory, shared):
    """Files to inspect: an exported set, a CSR, a bundle, a foreign cert, broken PEMs."""
    d = tmp_path_factory.mktemp("pems")
    export_set(shared, "a.qemu.test", d / "set")
    openssl = require_tool("openssl")
    subprocess.run([openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
                    "-nodes", "-keyout", str(d / "foreign.key"), "-subj", "/CN=foreign.test", "-days", "30",
                    "-addext", "basicConstraints=critical,CA:FALSE", "-addext", "subjectAltName=DNS:foreign.test",
                    "-out", str(d / "foreign.pem")], check=True, capture_output=True)
    cert = (d / "set" / "server-cert.pem").read_bytes()
    (d / "bundle.pem").write_bytes(cert + (d / "set" / "ca-cert.pem").read_bytes())
    (d / "truncated.pem").write_bytes(cert[: len(cert) // 2])
    lines = cert.split(b"\n")
    (d / "corrupt.pem").write_bytes(b"\n".join([lines[0], b"bm90IGEgY2VydGlmaWNhdGU=", lines[-2]]) + b"\n")
    (d / "wrong-label.pem").write_bytes(cert.replace(b"CERTIFICATE", b"WIDGET"))
    csr_der = _csr(d, "i", "ec", "-pkeyopt", "ec_paramgen_curve:P-256").read_bytes()
    (d / "csr-as-cert.pem").write_bytes(csr_der.replace(b"CERTIFICATE REQUEST", b"CERTIFICATE"))
    (d / "garbage.pem").write_bytes(os.urandom(64))
    return d


def test_inspect_reports_each_kind(pem_files, shared):
    cases = [pem_files / "set" / "server-cert.pem", pem_files / "bundle.pem", pem_files / "i.csr",
             pem_files / "set" / "ca-crl.pem", pem_files / "set" / "server-key.pem"]
    results = run_many(shared, [["inspect", p, "--json"] for p in cases])
    host, bundle, csr, crl, key = (_json(p) for p in results)
    assert [i["kind"] for i in host] == ["certificate"] and host[0]["conforms"] is True
    assert host[0]["role"] == "host" and host[0]["sans"] == ["a.qemu.test"]
    assert [i["role"] for i in bundle] == ["host", "ca"] and all(i["conforms"] for i in bundle)
    assert csr[0]["kind"] == "csr" and csr[0]["signature_valid"] and csr[0]["key_acceptable"]
    assert crl[0]["kind"] == "crl" and len(crl[0]["revoked_serials"]) == 1
    assert key == [{"kind": "private-key", "key": "ECDSA secp256r1"}]


def test_inspect_never_prints_key_material(pem_files, shared):
    key_file = pem_files / "set" / "server-key.pem"
    body = [ln for ln in key_file.read_text().splitlines() if ln and not ln.startswith("-----")]
    for args in (["inspect", key_file], ["inspect", key_file, "--json"]):
        proc = assert_ok(run_qemuca(shared, *args))
        for line in body:
            assert line not in proc.stdout and line not in proc.stderr
            assert line[:16] not in proc.stdout


def test_inspect_fails_a_non_conforming_certificate(pem_files, shared):
    proc = run_qemuca(shared, "inspect", pem_files / "foreign.pem", "--json")
    assert proc.returncode == EXIT_FAILED and "Traceback" not in proc.stderr
    (item,) = json.loads(proc.stdout)
    assert item["conforms"] is False
    assert {c["check"] for c in item["checks"] if c["result"] == "fail"} == {"extendedKeyUsage"}


def test_inspect_refuses_broken_files(pem_files, shared):
    _errors_leave_store(shared, [
        (["inspect", pem_files / "truncated.pem"], EXIT_INVALID_INPUT, "no PEM block"),
        (["inspect", pem_files / "corrupt.pem"], EXIT_INVALID_INPUT, "corrupt"),
        (["inspect", pem_files / "wrong-label.pem"], EXIT_INVALID_INPUT, "WIDGET"),
        (["inspect", pem_files / "csr-as-cert.pem"], EXIT_INVALID_INPUT, "corrupt"),
        (["inspect", pem_files / "garbage.pem"], EXIT_INVALID_INPUT, "no PEM block"),
        (["inspect", pem_files / "missing.pem"], EXIT_INVALID_INPUT, "cannot read"),
    ])


# ---------------------------------------------------------------- revoke, crl

def test_revoke_and_crl(tmp_path):
    home = make_store(tmp_path, hosts=["a.qemu.test", "b.qemu.test"])
    b_serial = current(home, "b.qemu.test").serial
    a = _json(run_qemuca(home, "revoke", "a.qemu.test", "--reason", "key-compromise", "--json"))
    assert a["status"] == "revoked" and a["revocation_reason"] == "key-compromise"
    assert_ok(run_qemuca(home, "revoke", b_serial.upper()))
    crl = x509.load_pem_x509_crl((Path(home) / "crl.pem").read_bytes())
    assert {format(r.serial_number, "x") for r in crl} == {a["serial"], b_serial}
    reason = crl.get_revoked_certificate_by_serial_number(int(a["serial"], 16)).extensions \
        .get_extension_for_class(x509.CRLReason).value.reason
    assert reason == x509.ReasonFlags.key_compromise
    _errors_leave_store(home, [
        (["revoke", "a.qemu.test"], EXIT_CONFLICT, "already revoked"),
        (["revoke", b_serial], EXIT_CONFLICT, "already revoked"),
        (["revoke", "nobody.qemu.test"], EXIT_NOT_FOUND, "nobody.qemu.test"),
    ])
    out = tmp_path / "crl.pem"
    info = _json(run_qemuca(home, "crl", "--days", "7", "--json"))
    assert info["revoked"] == 2
    assert abs(dt.datetime.fromisoformat(info["next_update"]) - (_now() + dt.timedelta(days=7))) \
        < dt.timedelta(minutes=2)
    assert_ok(run_qemuca(home, "crl", "--out", out))
    written = x509.load_pem_x509_crl(out.read_bytes())
    assert out.read_bytes() == (Path(home) / "crl.pem").read_bytes()
    assert written.is_signature_valid(load_cert(Path(home) / "ca" / "ca-cert.pem").public_key())
    assert audit_actions(home) == ["init", "issue", "issue", "revoke", "crl", "revoke", "crl", "crl", "crl"]


# ---------------------------------------------------------------- damaged stores

def test_missing_or_corrupt_ca_files(tmp_path):
    cases = {}
    for name in ("no-cert", "bad-key", "bad-index", "open-key", "bad-cert"):
        cases[name] = make_store(tmp_path, name=name, hosts=["a.qemu.test"])
    os.remove(Path(cases["no-cert"]) / "ca" / "ca-cert.pem")
    (Path(cases["bad-key"]) / "ca" / "ca-key.pem").write_bytes(b"-----BEGIN PRIVATE KEY-----\ngarbage\n")
    (Path(cases["bad-index"]) / "index.sqlite").write_bytes(b"garbage " * 1000)
    os.chmod(Path(cases["open-key"]) / "ca" / "ca-key.pem", 0o644)
    (Path(cases["bad-cert"]) / "ca" / "ca-cert.pem").write_bytes(b"not a certificate\n")
    expectations = [
        ("no-cert", ["list"], EXIT_STORE, "ca-cert.pem is missing"),
        ("no-cert", ["issue", "b.qemu.test"], EXIT_STORE, "ca-cert.pem is missing"),
        ("bad-key", ["issue", "b.qemu.test"], EXIT_STORE, "corrupt"),
        ("bad-index", ["list"], EXIT_STORE, "index"),
        ("bad-index", ["issue", "b.qemu.test"], EXIT_STORE, "index"),
        ("open-key", ["list"], EXIT_STORE, "chmod 600"),
        ("bad-cert", ["issue", "b.qemu.test"], EXIT_STORE, "corrupt"),
        ("bad-cert", ["export", "a.qemu.test", "--dir", tmp_path / "out"], EXIT_STORE, "corrupt"),
    ]
    before = {name: snapshot_store(home) for name, home in cases.items()}
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda e: run_qemuca(cases[e[0]], *e[1]), expectations))
    for (_name, _args, code, needle), proc in zip(expectations, results):
        assert_error(proc, code, needle)
    assert {name: snapshot_store(home) for name, home in cases.items()} == before
    assert not (tmp_path / "out").exists()
    assert_error(run_qemuca(tmp_path / "nothing", "list"), EXIT_NOT_FOUND, "qemuca init")


def test_a_name_another_host_holds_is_refused_without_force(tmp_path):
    """host9 with host1's name (or its migration IP) could pose as host1 and receive its
    guests: issue and sign refuse it (exit 5, nothing recorded) unless --force."""
    home = make_store(tmp_path)
    assert_ok(run_qemuca(home, "issue", "host1.qemu.test", "--san", "10.1.0.1", "--san", "mig1.qemu.test"))
    for san in ("HOST1.qemu.test.", "10.1.0.1", "mig1.qemu.test"):
        proc = run_qemuca(home, "issue", "host9.qemu.test", "--san", san)
        assert proc.returncode == EXIT_CONFLICT, proc.stderr
        assert "could pose as host1.qemu.test" in proc.stderr and len(proc.stderr.splitlines()) == 1
    proc = run_qemuca(home, "issue", "mig1.qemu.test")  # a host named after another's SAN
    assert proc.returncode == EXIT_CONFLICT and "is a name of host1.qemu.test" in proc.stderr
    shared = run_qemuca(home, "issue", "a.qemu.test", "b.qemu.test", "--san", "vip.qemu.test")
    assert shared.returncode == EXIT_CONFLICT and "would share vip.qemu.test" in shared.stderr
    listed = _json(run_qemuca(home, "list", "--json"))
    assert [r["host"] for r in listed] == ["host1.qemu.test"]  # nothing recorded
    assert_ok(run_qemuca(home, "issue", "host9.qemu.test", "--san", "10.1.0.1", "--force"))
