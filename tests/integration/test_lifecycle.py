"""Renewal, revocation rollout and CA rollover on fake hosts, judged by real QEMU migrations."""

from __future__ import annotations

import itertools
import json

import pytest
from cryptography import x509

from tests.support.pki import assert_ok, make_store, run_qemuca
from tests.support.qemu_migration import Endpoint

pytestmark = [pytest.mark.sshd, pytest.mark.qemu]


class Cluster:
    """A CA store plus fake hosts, with qemuca and migrations one call away."""

    def __init__(self, home, fleet, migrate):
        self.home, self.fleet, self._migrate = home, fleet, migrate
        self.ssh = ["--ssh-config", str(fleet.ssh_config), "--known-hosts", str(fleet.known_hosts)]

    def q(self, *args, ok=True):
        proc = run_qemuca(self.home, *args)
        return assert_ok(proc) if ok else proc

    def remote(self, *args, ok=True):
        return self.q(*args, *self.ssh, ok=ok)

    def migrate(self, src, dst):
        s, d = self.fleet[src], self.fleet[dst]
        return self._migrate(Endpoint("/etc/pki/qemu", prefix=s.prefix),
                             Endpoint("/etc/pki/qemu", prefix=d.prefix), tls_hostname=d.name)

    def assert_all_pairs_migrate(self, names):
        for src, dst in itertools.permutations(names, 2):
            result = self.migrate(src, dst)
            assert result.completed, f"{src} -> {dst}: {result.error}"

    def issuer(self, host):
        cert = x509.load_pem_x509_certificate(self.fleet[host].read("/etc/pki/qemu/server-cert.pem"))
        return cert.issuer.rfc4514_string()


@pytest.fixture
def cluster(tmp_path, fleet_factory, qemu_migrate):
    fleet = fleet_factory(4)
    home = make_store(tmp_path, common_name="QEMU CA old")
    c = Cluster(home, fleet, qemu_migrate)
    names = fleet.names
    c.remote("deploy", *names[:2], "--issue")
    c.remote("enroll", *names[2:])
    return c


def test_renew_and_rekey_keep_or_change_the_key(cluster):
    h1, _, h3, _ = cluster.fleet.names
    for host in (h1, h3):
        before = cluster.fleet[host].read("/etc/pki/qemu/server-key.pem")
        cert_before = cluster.fleet[host].read("/etc/pki/qemu/server-cert.pem")
        cluster.remote("renew", host)
        assert cluster.fleet[host].read("/etc/pki/qemu/server-key.pem") == before
        assert cluster.fleet[host].read("/etc/pki/qemu/server-cert.pem") != cert_before
        cluster.remote("rekey", host)
        assert cluster.fleet[host].read("/etc/pki/qemu/server-key.pem") != before
    listing = json.loads(cluster.q("list", "--all", "--json").stdout)
    superseded = [r for r in listing if r["status"] == "superseded"]
    assert sorted(r["host"] for r in superseded) == sorted([h1, h1, h3, h3])
    assert all(r["replaces"] for r in listing if r["host"] in (h1, h3) and r["status"] == "valid")
    cluster.assert_all_pairs_migrate([h1, h3])


def test_renew_expiring_within_selects_from_the_index(cluster):
    proc = cluster.remote("renew", "--expiring-within", "10", "--json")
    assert json.loads(proc.stdout) == []  # every certificate has two years left
    proc = cluster.remote("renew", "--expiring-within", "1000", "--json")
    assert sorted(r["host"] for r in json.loads(proc.stdout)) == sorted(cluster.fleet.names)


def test_ca_rollover_never_breaks_migration(cluster):
    names = cluster.fleet.names
    h1, h2, h3, h4 = names
    cluster.q("ca", "rollover", "start", "--cn", "QEMU CA new")
    # Stage: started. Nothing deployed yet: the old certificates and bundles still work.
    cluster.assert_all_pairs_migrate([h1, h3])
    refused = cluster.remote("ca", "rollover", "finish", ok=False)
    assert refused.returncode == 5 and "old CA" in refused.stderr

    cluster.remote("deploy", "--bundle-only", "--all")
    cluster.remote("rekey", h1, h3)  # half the hosts: one issued here, one enrolled
    assert cluster.issuer(h1) == cluster.issuer(h3) == "CN=QEMU CA new,OU=qemu"
    assert cluster.issuer(h2) == cluster.issuer(h4) == "CN=QEMU CA old,OU=qemu"
    for old, new in ((h2, h1), (h4, h3)):  # old-CA host <-> new-CA host, both ways
        assert cluster.migrate(old, new).completed
        assert cluster.migrate(new, old).completed
    status = json.loads(cluster.q("ca", "status", "--json").stdout)
    assert status["stage"] == "started"
    assert {h["host"]: h["issued_by"] for h in status["hosts"]} == {h1: "new", h2: "old", h3: "new", h4: "old"}
    assert cluster.remote("ca", "rollover", "finish", ok=False).returncode == 5

    cluster.remote("rekey", "--all")
    cluster.assert_all_pairs_migrate([h1, h2, h4])
    cluster.remote("ca", "rollover", "finish")
    for host in names:
        bundle = x509.load_pem_x509_certificates(cluster.fleet[host].read("/etc/pki/qemu/ca-cert.pem"))
        assert [c.subject.rfc4514_string() for c in bundle] == ["CN=QEMU CA new,OU=qemu"]
    assert json.loads(cluster.q("ca", "status", "--json").stdout)["stage"] == "none"
    cluster.assert_all_pairs_migrate(names)
    check = json.loads(cluster.q("check", "--json").stdout)
    assert check["status"] == "OK", check


def test_revocation_rollout_cuts_the_revoked_source(cluster):
    h1, h2, _, h4 = cluster.fleet.names
    cluster.q("revoke", h4, "--reason", "key-compromise")
    cluster.remote("deploy", "--crl-only", "--all")
    for host in (h1, h2, cluster.fleet.names[2]):  # --all: hosts with a valid certificate
        assert cluster.fleet[host].path("/etc/pki/qemu/ca-crl.pem").exists()
    refused = cluster.migrate(h4, h1)
    assert not refused.completed and "revoked" in refused.error.lower()
    assert cluster.migrate(h2, h1).completed
    # QEMU's source side never reads a CRL: the revoked host can still receive.
    assert cluster.migrate(h1, h4).completed


def test_rollover_without_the_revoked_host_cuts_it_off_both_ways(cluster):
    h1, h2, h3, h4 = cluster.fleet.names
    cluster.q("revoke", h4, "--reason", "key-compromise")
    cluster.remote("deploy", "--crl-only", "--all")
    assert cluster.migrate(h1, h4).completed  # a source never reads a CRL: h4 still receives
    cluster.q("ca", "rollover", "start")
    cluster.remote("deploy", "--bundle-only", "--all")
    proc = cluster.remote("rekey", "--all", "--json")
    assert sorted(r["host"] for r in json.loads(proc.stdout)) == sorted([h1, h2, h3])  # not h4
    cluster.remote("ca", "rollover", "finish")
    for src, dst in ((h1, h4), (h4, h1), (h3, h4)):
        result = cluster.migrate(src, dst)
        assert not result.completed, f"{src} -> {dst} must fail once the old CA is gone"
    cluster.assert_all_pairs_migrate([h1, h2, h3])
