"""`qemuca init --import-cert/--import-key` through the real CLI: a taken-over CA issues,
and every bad import is one line with its exit code and leaves no store behind."""

from __future__ import annotations

import json
import os

from qemuca.errors import EXIT_INVALID_INPUT, EXIT_PASSPHRASE
from tests.pki.test_import_ca import certtool_ca, made_ca, ovirt_style_ca
from tests.support.pki import assert_error, assert_ok, run_qemuca, write_secret


def _files(tmp_path, cert_pem, key_pem, tag="x"):
    cert, key = tmp_path / f"{tag}-ca.pem", tmp_path / f"{tag}-ca.key"
    cert.write_bytes(cert_pem)
    key.write_bytes(key_pem)
    os.chmod(key, 0o600)
    return cert, key


def test_import_a_certtool_ca_and_issue(tmp_path):
    cert, key = _files(tmp_path, *certtool_ca(tmp_path))
    home = tmp_path / "home"
    secret = write_secret(tmp_path / "store-pass")
    out = assert_ok(run_qemuca(home, "init", "--import-cert", cert, "--import-key", key,
                               "--passphrase-file", secret, "--json"))
    info = json.loads(out.stdout)
    assert info["imported"] is True and info["key_encrypted"] is True
    assert "Example Org QEMU CA" in info["subject"]
    assert_ok(run_qemuca(home, "issue", "hv1.example.org", "--passphrase-file", secret))
    (row,) = json.loads(run_qemuca(home, "list", "--json").stdout)
    assert row["host"] == "hv1.example.org"


def test_import_an_encrypted_ovirt_style_key(tmp_path):
    cert, key = _files(tmp_path, *ovirt_style_ca(tmp_path, b"engine secret"))
    home = tmp_path / "home"
    engine = write_secret(tmp_path / "engine-pass", "engine secret")
    assert_error(run_qemuca(home, "init", "--import-cert", cert, "--import-key", key, "--no-passphrase"),
                 EXIT_PASSPHRASE, "encrypted", "--import-passphrase-file")
    assert not os.path.exists(home / "ca")
    assert_ok(run_qemuca(home, "init", "--import-cert", cert, "--import-key", key, "--no-passphrase",
                         "--import-passphrase-file", engine))
    assert_ok(run_qemuca(home, "issue", "hv1.example.org"))


def test_bad_imports_are_refused_and_leave_no_store(tmp_path):
    good_cert, good_key = made_ca()
    cases = {
        "leaf": (made_ca(ca_flag=False), "not a CA certificate"),
        "no-sign": (made_ca(cert_sign=False), "keyCertSign"),
        "expired": (made_ca(days=(-30, -1)), "expired"),
        "mismatch": ((good_cert, made_ca()[1]), "does not match"),
    }
    for tag, ((cert_pem, key_pem), needle) in cases.items():
        cert, key = _files(tmp_path, cert_pem, key_pem, tag)
        home = tmp_path / f"home-{tag}"
        assert_error(run_qemuca(home, "init", "--import-cert", cert, "--import-key", key, "--no-passphrase"),
                     EXIT_INVALID_INPUT, needle)
        assert not home.exists() or os.listdir(home) == [], tag
    cert, key = _files(tmp_path, good_cert, good_key, "good")
    home = tmp_path / "home-opts"
    assert_error(run_qemuca(home, "init", "--import-cert", cert, "--import-key", key, "--no-passphrase",
                            "--cn", "other"), EXIT_INVALID_INPUT, "--cn describe a new CA")
    assert_error(run_qemuca(home, "init", "--import-cert", cert, "--no-passphrase"), EXIT_INVALID_INPUT,
                 "go together")
    assert not home.exists()
