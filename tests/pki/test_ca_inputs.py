"""The CA refuses inputs that would quietly do less, or more, than asked: a home owned by
someone else, a PEM with several CSRs; and it creates its directories with exact modes
whatever the umask (through the real CLI)."""

from __future__ import annotations

import os
import stat
import subprocess

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from qemuca.errors import EXIT_INVALID_INPUT
from tests.support.pki import QEMUCA, assert_error, assert_ok, clean_env, issue, make_store, run_qemuca, snapshot_store


def run_with_umask(umask: int, home, *args) -> subprocess.CompletedProcess:
    """qemuca as a user with a careless umask would run it."""
    return subprocess.run(["sh", "-c", f'umask {umask:03o}; exec "$@"', "sh", *QEMUCA, "--home", str(home),
                           *map(str, args)], stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          env=clean_env(), timeout=120)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_directories_have_exact_modes_under_umask_000(tmp_path):
    home = tmp_path / "a" / "b" / "home"
    assert_ok(run_with_umask(0, home, "init", "--no-passphrase", "--key-type", "ecdsa-p256"))
    assert [mode(p) for p in (tmp_path / "a", tmp_path / "a" / "b")] == [0o755, 0o755]
    assert mode(home) == 0o700
    assert_ok(run_with_umask(0, home, "init", "--no-passphrase", "--key-type", "ecdsa-p256", "--force"))
    retired = home / "retired"
    (stamp,) = list(retired.iterdir())
    assert mode(retired) == 0o700 and mode(stamp) == 0o700

    assert_ok(run_with_umask(0, home, "issue", "hv1.example.org"))
    out = tmp_path / "x" / "y" / "set"
    assert_ok(run_with_umask(0, home, "export", "hv1.example.org", "--dir", out))
    assert [mode(p) for p in (tmp_path / "x", tmp_path / "x" / "y", out)] == [0o755] * 3
    assert not any(mode(p) & 0o022 for p in out.rglob("*") if p.is_dir() and not p.is_symlink())


def test_init_refuses_a_home_owned_by_someone_else(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    os.chown(home, 1234, 1234)
    line = assert_error(run_qemuca(home, "init", "--no-passphrase"), EXIT_INVALID_INPUT, "owned by uid 1234")
    assert "--home" in line
    assert os.listdir(home) == []


def _csr(name: str) -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
           .sign(key, hashes.SHA256()))
    return csr.public_bytes(serialization.Encoding.PEM)


def test_sign_refuses_a_pem_with_several_csrs(tmp_path):
    home = make_store(tmp_path)
    issue(home, "hv0.example.org")
    two = tmp_path / "two.csr"
    two.write_bytes(_csr("hv1.example.org") + _csr("hv2.example.org"))
    before = snapshot_store(home)
    assert_error(run_qemuca(home, "sign", two), EXIT_INVALID_INPUT, "2 certificate signing requests")
    assert snapshot_store(home) == before
    one = tmp_path / "one.csr"
    one.write_bytes(_csr("hv1.example.org"))
    assert_ok(run_qemuca(home, "sign", one))
