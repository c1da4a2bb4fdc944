"""Every exported credential set passes the real chain checkers: OpenSSL and GnuTLS.

QEMU verifies with GnuTLS; OpenSSL is a second, strict opinion (-x509_strict). Each
host key type is exported under several CA key types; one RSA-4096 CA and one
RSA-4096 host keep the key generation cheap.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from cryptography import x509

from tests.support.pki import export_set, issue, make_store, revoke
from tests.support.tools import require_tool

SERVER_AUTH, CLIENT_AUTH = "1.3.6.1.5.5.7.3.1", "1.3.6.1.5.5.7.3.2"

# CA key type -> host key types issued under it (one host per key type).
MATRIX = {
    "rsa3072": ["rsa2048", "rsa3072", "rsa4096", "ecdsa-p256", "ecdsa-p384"],
    "ecdsa-p384": ["rsa2048", "ecdsa-p256", "ecdsa-p384"],
    "ecdsa-p256": ["ecdsa-p256"],
    "rsa4096": ["ecdsa-p256"],
    "rsa2048": ["ecdsa-p384"],
}
SETS = [(ca_type, host_type) for ca_type, hosts in MATRIX.items() for host_type in hosts]


def _host(host_type: str) -> str:
    return f"{host_type}.qemu.test"


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """{(ca type, host type): exported dir}, plus a 'revoked' set under ecdsa-p256."""
    base = tmp_path_factory.mktemp("chain")
    out = {}
    homes = {}
    for ca_type, host_types in MATRIX.items():
        home = make_store(base, ca_type, name=f"ca-{ca_type}")
        homes[ca_type] = home
        for host_type in host_types:
            issue(home, _host(host_type), key_type=host_type, sans=["10.0.0.1", f"mig.{_host(host_type)}"], force=True)
    p256 = homes["ecdsa-p256"]
    issue(p256, "revoked.qemu.test")
    for (ca_type, host_type) in SETS:
        if ca_type != "ecdsa-p256":
            target = base / f"{ca_type}-{host_type}"
            export_set(homes[ca_type], _host(host_type), target)
            out[(ca_type, host_type)] = target
    export_set(p256, "revoked.qemu.test", base / "revoked")  # exported while still valid
    revoke(p256, "revoked.qemu.test", "key-compromise")
    export_set(p256, _host("ecdsa-p256"), base / "ecdsa-p256-ecdsa-p256")  # carries the CRL
    out[("ecdsa-p256", "ecdsa-p256")] = base / "ecdsa-p256-ecdsa-p256"
    out["revoked"] = base / "revoked"
    return out


def _run(*argv):
    return subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=60)


def openssl_verify(d: Path, which: str, purpose: str, host: str, *extra):
    openssl = require_tool("openssl")
    return _run(openssl, "verify", "-x509_strict", "-purpose", purpose, "-verify_hostname", host,
                "-CAfile", d / "ca-cert.pem", *extra, d / f"{which}-cert.pem")


def certtool_verify(d: Path, which: str, purpose_oid: str, host: str, *extra):
    certtool = require_tool("certtool")
    return _run(certtool, "--verify", "--load-ca-certificate", d / "ca-cert.pem",
                "--infile", d / f"{which}-cert.pem", "--verify-hostname", host,
                "--verify-purpose", purpose_oid, *extra)


def _assert_openssl_ok(proc):
    assert proc.returncode == 0 and proc.stdout.strip().endswith(": OK"), proc.stdout + proc.stderr


def _assert_certtool_ok(proc):
    assert proc.returncode == 0 and "Verified. The certificate is trusted" in proc.stdout, \
        proc.stdout + proc.stderr


@pytest.mark.parametrize("ca_type, host_type", SETS, ids=[f"ca-{c}/host-{h}" for c, h in SETS])
def test_openssl_and_gnutls_accept_the_set(pki, ca_type, host_type):
    d = pki[(ca_type, host_type)]
    host = _host(host_type)
    _assert_openssl_ok(openssl_verify(d, "server", "sslserver", host))
    _assert_openssl_ok(openssl_verify(d, "client", "sslclient", host))
    _assert_openssl_ok(openssl_verify(d, "server", "sslserver", f"mig.{host}"))
    _assert_certtool_ok(certtool_verify(d, "server", SERVER_AUTH, host))
    _assert_certtool_ok(certtool_verify(d, "client", CLIENT_AUTH, host))
    # The key is the certificate's key, and GnuTLS (QEMU's library) can load it.
    openssl = require_tool("openssl")
    cert_pub = _run(openssl, "x509", "-in", d / "server-cert.pem", "-noout", "-pubkey").stdout
    key_pub = _run(openssl, "pkey", "-in", d / "server-key.pem", "-pubout").stdout
    assert cert_pub and cert_pub == key_pub
    key_info = _run(require_tool("certtool"), "--key-info", "--infile", d / "server-key.pem")
    assert key_info.returncode == 0, key_info.stderr
    cert = x509.load_pem_x509_certificate((d / "server-cert.pem").read_bytes())
    expected = {"rsa2048": 2048, "rsa3072": 3072, "rsa4096": 4096, "ecdsa-p256": 256, "ecdsa-p384": 384}
    assert cert.public_key().key_size == expected[host_type]


def test_the_checkers_are_not_fooled(pki):
    """The same tools refuse a wrong name, a wrong purpose and a foreign CA: the checks
    above are real."""
    d = pki[("ecdsa-p384", "ecdsa-p256")]
    other = pki[("rsa3072", "ecdsa-p256")]
    wrong_name = openssl_verify(d, "server", "sslserver", "other.qemu.test")
    assert wrong_name.returncode != 0 and "hostname mismatch" in wrong_name.stdout + wrong_name.stderr
    assert certtool_verify(d, "server", SERVER_AUTH, "other.qemu.test").returncode != 0
    openssl = require_tool("openssl")
    foreign = _run(openssl, "verify", "-CAfile", other / "ca-cert.pem", d / "server-cert.pem")
    assert foreign.returncode != 0
    certtool = require_tool("certtool")
    assert _run(certtool, "--verify", "--load-ca-certificate", other / "ca-cert.pem",
                "--infile", d / "server-cert.pem").returncode != 0
    code_signing = "1.3.6.1.5.5.7.3.3"
    assert certtool_verify(d, "server", code_signing, "ecdsa-p256.qemu.test").returncode != 0


def test_the_crl_revokes_exactly_the_revoked_host(pki):
    d = pki[("ecdsa-p256", "ecdsa-p256")]
    revoked = pki["revoked"]
    crl = d / "ca-crl.pem"
    assert crl.is_symlink()
    openssl = require_tool("openssl")
    certtool = require_tool("certtool")
    _assert_openssl_ok(openssl_verify(d, "server", "sslserver", "ecdsa-p256.qemu.test",
                                      "-crl_check", "-CRLfile", crl))
    bad = _run(openssl, "verify", "-crl_check", "-CRLfile", crl, "-CAfile", d / "ca-cert.pem",
               revoked / "server-cert.pem")
    assert bad.returncode != 0 and "certificate revoked" in bad.stdout + bad.stderr
    # Without the CRL the revoked certificate still chains: the CRL is what cuts it off.
    _assert_openssl_ok(_run(openssl, "verify", "-CAfile", d / "ca-cert.pem", revoked / "server-cert.pem"))
    crl_ok = _run(certtool, "--verify-crl", "--load-ca-certificate", d / "ca-cert.pem", "--infile", crl)
    assert crl_ok.returncode == 0, crl_ok.stdout + crl_ok.stderr
    gnutls_revoked = _run(certtool, "--verify", "--load-ca-certificate", d / "ca-cert.pem",
                          "--load-crl", crl, "--infile", revoked / "server-cert.pem")
    assert gnutls_revoked.returncode != 0 and "revoked" in gnutls_revoked.stdout.lower()
    _assert_certtool_ok(_run(certtool, "--verify", "--load-ca-certificate", d / "ca-cert.pem",
                             "--load-crl", crl, "--infile", d / "server-cert.pem"))
