"""qemuca enroll on fake hosts over real SSH: the key is made on the host and stays there."""

from __future__ import annotations

import json
import os
import sqlite3
import stat

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from tests.support.pki import assert_ok, make_store, run_qemuca
from tests.support.qemu_migration import Endpoint

pytestmark = pytest.mark.sshd


def _ssh(fleet):
    return ["--ssh-config", str(fleet.ssh_config), "--known-hosts", str(fleet.known_hosts)]


def _enroll(home, fleet, *hosts, extra=()):
    return run_qemuca(home, "enroll", *hosts, *_ssh(fleet), "--json", *extra)


def test_enroll_keeps_the_key_on_the_host_and_migrates(tmp_path, fleet_factory, qemu_migrate):
    fleet = fleet_factory(2)
    home = make_store(tmp_path)
    proc = assert_ok(_enroll(home, fleet, *fleet.names))
    reports = json.loads(proc.stdout)
    assert [r["result"] for r in reports] == ["changed", "changed"]

    for host in fleet.hosts:
        key_path = host.path("/etc/pki/qemu/server-key.pem")
        key_pem = key_path.read_bytes()
        cert = x509.load_pem_x509_certificate(host.read("/etc/pki/qemu/server-cert.pem"))
        key = serialization.load_pem_private_key(key_pem, None)
        assert key.public_key().public_numbers() == cert.public_key().public_numbers()
        st = os.stat(key_path)
        assert stat.S_IMODE(st.st_mode) == 0o640 and st.st_uid == 0
        assert host.owner("/etc/pki/qemu/.qemuca/current/server-key.pem") == ("root", "libvirt-qemu")
        assert os.readlink(host.path("/etc/pki/qemu/.qemuca/current/client-key.pem")) == "server-key.pem"
        # The key is nowhere in the store, on no command line, and no staging is left.
        body = b"".join(key_pem.splitlines()[1:-1])
        for root, _dirs, files in os.walk(home):
            for name in files:
                assert body not in open(os.path.join(root, name), "rb").read()
        assert not any(body.decode() in c for c in host.commands())
        assert not [n for n in os.listdir(host.path("/etc/pki/qemu/.qemuca/sets")) if n.startswith("staging-")]

    rows = sqlite3.connect(os.path.join(home, "index.sqlite")).execute(
        "SELECT host, key_source, key_pem, status FROM certificates ORDER BY host").fetchall()
    assert rows == [(n, "csr", None, "valid") for n in fleet.names]

    h1, h2 = fleet.hosts
    result = qemu_migrate(Endpoint("/etc/pki/qemu", prefix=h1.prefix), Endpoint("/etc/pki/qemu", prefix=h2.prefix),
                          tls_hostname=h2.name)
    assert result.completed, result.error


def test_enroll_again_needs_replace_and_supersedes(tmp_path, fleet_factory):
    fleet = fleet_factory(1)
    home = make_store(tmp_path)
    host = fleet.hosts[0]
    assert_ok(_enroll(home, fleet, host.name))
    first = host.read("/etc/pki/qemu/server-cert.pem")

    again = _enroll(home, fleet, host.name)
    assert again.returncode == 1
    assert "--replace" in json.loads(again.stdout)[0]["error"]
    assert host.read("/etc/pki/qemu/server-cert.pem") == first

    assert_ok(_enroll(home, fleet, host.name, extra=("--replace",)))
    assert host.read("/etc/pki/qemu/server-cert.pem") != first
    listing = json.loads(assert_ok(run_qemuca(home, "list", "--all", "--json")).stdout)
    assert sorted(r["status"] for r in listing) == ["superseded", "valid"]
    new = [r for r in listing if r["status"] == "valid"][0]
    assert new["replaces"] == [r for r in listing if r["status"] == "superseded"][0]["serial"]


def test_enroll_without_openssl_on_the_host_fails_cleanly(tmp_path, fleet_factory):
    fleet = fleet_factory(1)
    home = make_store(tmp_path)
    host = fleet.hosts[0]
    host.run(["mount", "--bind", "/dev/null", "/usr/bin/openssl"])
    proc = _enroll(home, fleet, host.name)
    assert proc.returncode == 1
    report = json.loads(proc.stdout)[0]
    assert report["result"] == "failed" and "openssl is not installed" in report["error"]
    assert json.loads(assert_ok(run_qemuca(home, "list", "--json")).stdout) == []
    assert not [n for n in os.listdir(host.path("/etc/pki/qemu/.qemuca/sets")) if n.startswith("staging-")]
