"""Real QEMU TLS migrations between credential sets that `qemuca export` wrote.

QEMU (GnuTLS) is the judge of whether our certificates are right: every key type must
migrate, and the failure cases must fail for the reason QEMU gives.
"""

from __future__ import annotations

import os

import pytest

from tests.support.pki import assert_ok, run_qemuca
from tests.support.qemu_migration import Endpoint

pytestmark = pytest.mark.qemu

SRC, DST = "src.qemu.test", "dst.qemu.test"


def make_pair(tmp_path, key_type="ecdsa-p256", ca_key_type="rsa3072", extra=(), env=None,
              init_args=("--no-passphrase",)):
    home = tmp_path / f"home-{key_type}"
    assert_ok(run_qemuca(home, "init", "--key-type", ca_key_type, *init_args, env=env))
    assert_ok(run_qemuca(home, "issue", SRC, "--key-type", key_type, env=env))
    assert_ok(run_qemuca(home, "issue", DST, "--key-type", key_type, "--san", "127.0.0.1", *extra, env=env))
    dirs = {}
    for host in (SRC, DST):
        dirs[host] = tmp_path / f"{host}-{key_type}"
        assert_ok(run_qemuca(home, "export", host, "--dir", dirs[host], env=env))
    return home, dirs


@pytest.mark.parametrize("key_type,ca_key_type", [
    ("ecdsa-p256", "rsa3072"),
    ("ecdsa-p384", "ecdsa-p384"),
    ("rsa2048", "rsa2048"),
    ("rsa3072", "ecdsa-p256"),
    ("rsa4096", "rsa3072"),
])
def test_migration_completes_for_every_key_type(tmp_path, qemu_migrate, key_type, ca_key_type):
    _, dirs = make_pair(tmp_path, key_type, ca_key_type)
    result = qemu_migrate(Endpoint(str(dirs[SRC])), Endpoint(str(dirs[DST])), tls_hostname=DST)
    assert result.completed, result.error
    assert result.transferred_bytes > 0


def test_migration_with_passphrase_protected_ca(tmp_path, qemu_migrate):
    """The acceptance run, with the CA key encrypted by a passphrase file."""
    passphrase = tmp_path / "pass"
    passphrase.write_text("correct horse battery staple\n")
    os.chmod(passphrase, 0o600)
    env = {"QEMUCA_PASSPHRASE_FILE": str(passphrase)}
    home, dirs = make_pair(tmp_path, env=env, init_args=())
    assert b"ENCRYPTED" in (home / "ca" / "ca-key.pem").read_bytes()
    result = qemu_migrate(Endpoint(str(dirs[SRC])), Endpoint(str(dirs[DST])), tls_hostname=DST)
    assert result.completed, result.error


def test_migration_refused_for_destination_of_another_ca(tmp_path, qemu_migrate):
    _, dirs = make_pair(tmp_path)
    _, other = make_pair(tmp_path / "other")
    result = qemu_migrate(Endpoint(str(dirs[SRC])), Endpoint(str(other[DST])), tls_hostname=DST)
    assert not result.completed
    assert "issuer" in result.error.lower()


def test_migration_refused_for_wrong_tls_hostname(tmp_path, qemu_migrate):
    _, dirs = make_pair(tmp_path)
    result = qemu_migrate(Endpoint(str(dirs[SRC])), Endpoint(str(dirs[DST])), tls_hostname="other.qemu.test")
    assert not result.completed
    assert "does not match the hostname other.qemu.test" in result.error


def test_ip_san_matches_an_address_uri(tmp_path, qemu_migrate):
    """Without tls-hostname QEMU checks the URI's host (127.0.0.1): the iPAddress SAN."""
    _, dirs = make_pair(tmp_path)
    result = qemu_migrate(Endpoint(str(dirs[SRC])), Endpoint(str(dirs[DST])), tls_hostname=None)
    assert result.completed, result.error
    # src has no IP SAN: the reverse direction by address must fail on the name.
    back = qemu_migrate(Endpoint(str(dirs[DST])), Endpoint(str(dirs[SRC])), tls_hostname=None)
    assert not back.completed


def test_revoked_source_refused_once_destination_holds_crl(tmp_path, qemu_migrate):
    home, dirs = make_pair(tmp_path)
    assert_ok(run_qemuca(home, "revoke", SRC, "--reason", "key-compromise"))
    before = qemu_migrate(Endpoint(str(dirs[SRC])), Endpoint(str(dirs[DST])), tls_hostname=DST)
    assert before.completed, "the destination has no CRL yet: QEMU cannot know"
    assert_ok(run_qemuca(home, "export", DST, "--dir", dirs[DST]))
    assert (dirs[DST] / "ca-crl.pem").exists()
    after = qemu_migrate(Endpoint(str(dirs[SRC])), Endpoint(str(dirs[DST])), tls_hostname=DST)
    assert not after.completed
    assert "revoked" in after.error.lower(), after.error
    # QEMU's source side never reads a CRL: the revoked host can still receive.
    reverse = qemu_migrate(Endpoint(str(dirs[DST])), Endpoint(str(dirs[SRC])), tls_hostname=SRC)
    assert reverse.completed, reverse.error
