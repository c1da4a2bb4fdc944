"""Brownfield: a certtool CA (libvirt's TLS guide) taken over, the sets it made on hosts
adopted with their keys left where they are, then renewed — judged by real QEMU
migrations between adopted, renewed and newly enrolled hosts."""

from __future__ import annotations

import itertools
import json
import sqlite3
import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from tests.pki.test_import_ca import certtool_ca
from tests.support.pki import assert_ok, run_qemuca
from tests.support.qemu_migration import Endpoint
from tests.support.tools import require_tool

pytestmark = [pytest.mark.sshd, pytest.mark.qemu]

CERT_DIR = "/etc/pki/qemu"
HOST_TEMPLATE = """cn = {host}
dns_name = {host}
tls_www_server
tls_www_client
encryption_key
signing_key
expiration_days = 700
"""


def certtool_host_set(tmp_path: Path, ca_cert: bytes, ca_key: bytes, host: str) -> dict:
    """A host's files as libvirt's guide makes them with certtool (one cert for both roles)."""
    certtool = require_tool("certtool")
    d = tmp_path / host
    d.mkdir(parents=True)
    (d / "ca.pem").write_bytes(ca_cert)
    (d / "cakey.pem").write_bytes(ca_key)
    (d / "info").write_text(HOST_TEMPLATE.format(host=host))
    subprocess.run([certtool, "--generate-privkey", "--outfile", d / "key.pem"], check=True, capture_output=True)
    subprocess.run([certtool, "--generate-certificate", "--load-privkey", d / "key.pem",
                    "--load-ca-certificate", d / "ca.pem", "--load-ca-privkey", d / "cakey.pem",
                    "--template", d / "info", "--outfile", d / "cert.pem"], check=True, capture_output=True)
    cert, key = (d / "cert.pem").read_bytes(), (d / "key.pem").read_bytes()
    return {"ca-cert.pem": ca_cert, "server-cert.pem": cert, "server-key.pem": key,
            "client-cert.pem": cert, "client-key.pem": key}


def place(host, files: dict) -> None:
    """Plain files, as another tool leaves them: root:libvirt-qemu, keys 0640."""
    for name, data in files.items():
        host.write(f"{CERT_DIR}/{name}", data, 0o640 if name.endswith("key.pem") else 0o644)
        host.run(["chgrp", "libvirt-qemu", f"{CERT_DIR}/{name}"])


def ssh(fleet) -> list:
    return ["--ssh-config", str(fleet.ssh_config), "--known-hosts", str(fleet.known_hosts)]


def test_adopt_certtool_sets_then_renew_and_migrate(tmp_path, fleet_factory, qemu_migrate):
    ca_cert, ca_key = certtool_ca(tmp_path)
    (tmp_path / "ca.pem").write_bytes(ca_cert)
    (tmp_path / "ca-key.pem").write_bytes(ca_key)
    home = tmp_path / "home"
    assert_ok(run_qemuca(home, "init", "--import-cert", tmp_path / "ca.pem", "--import-key",
                         tmp_path / "ca-key.pem", "--no-passphrase"))
    fleet = fleet_factory(4)
    h1, h2, h3, h4 = fleet.names
    originals = {}
    for name in (h1, h2):
        originals[name] = certtool_host_set(tmp_path / "sets", ca_cert, ca_key, name)
        place(fleet[name], originals[name])
    (tmp_path / "other").mkdir()
    other_ca = certtool_ca(tmp_path / "other")
    place(fleet[h4], certtool_host_set(tmp_path / "other-sets", *other_ca, h4))

    proc = run_qemuca(home, "adopt", h1, h2, h4, "--json", *ssh(fleet))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    reports = {r["host"]: r for r in json.loads(proc.stdout)}
    for name in (h1, h2):
        assert reports[name]["result"] == "changed" and reports[name]["error"] is None, reports[name]
        # The key never moved, never changed, and never reached the store.
        assert fleet[name].read(f"{CERT_DIR}/server-key.pem") == originals[name]["server-key.pem"]
        assert fleet[name].read(f"{CERT_DIR}/server-cert.pem") == originals[name]["server-cert.pem"]
    assert "ca rollover start --from-cert" in reports[h4]["error"], reports[h4]
    assert not fleet[h4].path(f"{CERT_DIR}/.qemuca").exists()  # refused: nothing changed there
    db = sqlite3.connect(home / "index.sqlite")
    rows = db.execute("SELECT host, key_pem, key_source, status FROM certificates ORDER BY host").fetchall()
    assert rows == [(h1, None, "csr", "valid"), (h2, None, "csr", "valid")]
    listing = json.loads(assert_ok(run_qemuca(home, "list", "--json")).stdout)
    assert {r["host"]: r["deployed"] for r in listing} == {h1: True, h2: True}
    again = json.loads(assert_ok(run_qemuca(home, "adopt", h2, "--json", *ssh(fleet))).stdout)
    assert again[0]["result"] == "unchanged", again
    verified = run_qemuca(home, "verify", h1, h2, "--json", *ssh(fleet))
    assert verified.returncode == 0, verified.stdout

    assert_ok(run_qemuca(home, "enroll", h3, *ssh(fleet)))
    assert_ok(run_qemuca(home, "renew", h1, *ssh(fleet)))
    renewed = x509.load_pem_x509_certificate(fleet[h1].read(f"{CERT_DIR}/server-cert.pem"))
    old_key = serialization.load_pem_private_key(originals[h1]["server-key.pem"], None)
    assert renewed.public_key() == old_key.public_key()  # a new certificate for the key on the host
    assert fleet[h1].read(f"{CERT_DIR}/server-cert.pem") != originals[h1]["server-cert.pem"]

    for src, dst in itertools.permutations((h1, h2, h3), 2):  # renewed, adopted, enrolled
        result = qemu_migrate(Endpoint(CERT_DIR, prefix=fleet[src].prefix),
                              Endpoint(CERT_DIR, prefix=fleet[dst].prefix), tls_hostname=dst)
        assert result.completed, f"{src} -> {dst}: {result.error}"
    assert_ok(run_qemuca(home, "doctor"))


def test_takeover_from_a_foreign_ca_never_breaks_a_migration(tmp_path, fleet_factory, qemu_migrate):
    """ca rollover start --from-cert: the hosts' certtool CA becomes the old CA (its key
    never given to qemuca), this store's the new one; hosts are adopted one by one, then
    renewed one by one, then the rollover finishes. At every step every pair migrates
    both ways, moved and not-yet-moved hosts alike."""
    foreign_cert, foreign_key = certtool_ca(tmp_path)
    (tmp_path / "foreign.pem").write_bytes(foreign_cert)
    fleet = fleet_factory(3)
    names = fleet.names
    for name in names:
        place(fleet[name], certtool_host_set(tmp_path / "sets", foreign_cert, foreign_key, name))
    home = tmp_path / "home"
    assert_ok(run_qemuca(home, "init", "--no-passphrase", "--cn", "QEMU CA new"))

    def all_pairs_migrate(stage: str) -> None:
        for src, dst in itertools.permutations(names, 2):
            result = qemu_migrate(Endpoint(CERT_DIR, prefix=fleet[src].prefix),
                                  Endpoint(CERT_DIR, prefix=fleet[dst].prefix), tls_hostname=dst)
            assert result.completed, f"{stage}: {src} -> {dst}: {result.error}"

    def issuers() -> list:
        return [x509.load_pem_x509_certificate(fleet[n].read(f"{CERT_DIR}/server-cert.pem"))
                .issuer.rfc4514_string() for n in names]

    all_pairs_migrate("before")
    refused = run_qemuca(home, "adopt", names[0], *ssh(fleet))
    assert refused.returncode == 1 and "--from-cert" in refused.stdout + refused.stderr
    state = json.loads(assert_ok(run_qemuca(home, "ca", "rollover", "start", "--from-cert",
                                            tmp_path / "foreign.pem", "--json")).stdout)
    assert state["stage"] == "started" and state["previous_from_cert"] is True
    all_pairs_migrate("started")
    for i, name in enumerate(names):
        assert_ok(run_qemuca(home, "adopt", name, *ssh(fleet)))
        bundle = x509.load_pem_x509_certificates(fleet[name].read(f"{CERT_DIR}/ca-cert.pem"))
        assert [c.subject.rfc4514_string() for c in bundle][0].startswith("CN=QEMU CA new")
        all_pairs_migrate(f"{i + 1} adopted")
    refused = run_qemuca(home, "ca", "rollover", "finish", *ssh(fleet))
    assert refused.returncode == 5 and "old CA" in refused.stderr, refused.stderr
    for i, name in enumerate(names):
        assert_ok(run_qemuca(home, "renew", name, *ssh(fleet)))
        all_pairs_migrate(f"{i + 1} renewed")
    assert all(i.startswith("CN=QEMU CA new") for i in issuers()), issuers()
    assert_ok(run_qemuca(home, "ca", "rollover", "finish", *ssh(fleet)))
    for name in names:
        bundle = x509.load_pem_x509_certificates(fleet[name].read(f"{CERT_DIR}/ca-cert.pem"))
        assert [c.subject.rfc4514_string() for c in bundle] == [bundle[0].subject.rfc4514_string()]
        assert bundle[0].subject.rfc4514_string().startswith("CN=QEMU CA new")
    all_pairs_migrate("finished")
    assert json.loads(assert_ok(run_qemuca(home, "ca", "status", "--json")).stdout)["stage"] == "none"
    assert_ok(run_qemuca(home, "doctor"))
