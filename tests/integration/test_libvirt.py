"""`virsh migrate --live --tls` between two real libvirtds, with what `qemuca` deployed.

Each fake host runs its own libvirtd (tests/support/libvirt.py) reading the qemu.conf
and /etc/pki/qemu that `qemuca deploy --restart` put there over SSH; the restart itself
goes through the host's `systemctl try-restart libvirtd` (a stand-in in the host).
libvirt and QEMU are the judges: the guest must move, run as libvirt-qemu on the
destination, and come back; a destination whose certificate is from another CA, or
that has none, must refuse with libvirt's own error while the guest keeps running.
"""

from __future__ import annotations

import json

import pytest

from tests.support.fakehosts import Fleet
from tests.support.libvirt import QEMU_USER, Libvirtd, migrate, require_libvirt_tools, start_libvirtds
from tests.support.pki import assert_ok, run_qemuca

pytestmark = [pytest.mark.sshd, pytest.mark.qemu]

CERT_DIR = "/etc/pki/qemu"
MONITOR_LOG = "2:qemu.qemu_monitor"  # what libvirt sends QEMU (QEMU_MONITOR_SEND_MSG)


@pytest.fixture
def libvirt_fleet(fleet_factory):
    """fleet(n) -> (Fleet, [Libvirtd]): n fake hosts, each with a started libvirtd
    (no TLS settings yet); the daemons and their QEMUs are killed at teardown."""
    require_libvirt_tools()
    started: list[Libvirtd] = []

    def make(n: int, **kw):
        fleet = fleet_factory(n)
        daemons = start_libvirtds(list(fleet), log_filters=MONITOR_LOG, **kw)
        started.extend(daemons)
        return fleet, daemons

    yield make
    errors = []
    for d in started:
        try:
            d.stop()
        except Exception as e:  # stop the others; the fleet teardown kills what is left
            errors.append(e)
    assert not errors, errors


def deploy(home, fleet: Fleet, *hosts: str):
    """`qemuca deploy HOSTS --issue --restart --json` over the fleet's SSH; host -> report."""
    proc = assert_ok(run_qemuca(home, "deploy", *hosts, "--issue", "--restart", "--json",
                                "--qemu-conf", "/etc/libvirt/qemu.conf",
                                "--ssh-config", fleet.ssh_config, "--known-hosts", fleet.known_hosts))
    return {r["host"]: r for r in json.loads(proc.stdout)}


def new_ca(path):
    assert_ok(run_qemuca(path, "init", "--no-passphrase"))
    return path


def assert_runs_as_qemu_user(d: Libvirtd, domain: str) -> None:
    """The guest's QEMU runs as the host's libvirt-qemu user and group (real,
    effective, saved and fs ids), not as root."""
    with open(f"/proc/{d.domain_pid(domain)}/status") as f:
        status = dict(line.split(":", 1) for line in f.read().splitlines() if ":" in line)
    uid, gid = ids_of(d, "/etc/passwd", QEMU_USER)[2], ids_of(d, "/etc/group", QEMU_USER)[2]
    assert uid != "0" and gid != "0"
    assert set(status["Uid"].split()) == {uid}, (d.name, status["Uid"])
    assert set(status["Gid"].split()) == {gid}, (d.name, status["Gid"])


def ids_of(d: Libvirtd, db: str, name: str) -> list[str]:
    for line in d.host.read(db).decode().splitlines():
        parts = line.split(":")
        if parts[0] == name:
            return parts
    raise AssertionError(f"{d.name}: {name} not in {db}")


def tls_objects(d: Libvirtd) -> list[tuple[str, str]]:
    """(endpoint, dir) of every tls-creds-x509 object libvirt added to a QEMU."""
    found = []
    for line in d.log.read_text(errors="replace").splitlines():
        if "QEMU_MONITOR_SEND_MSG" in line and '"tls-creds-x509"' in line:
            msg = json.loads(line.split("msg=", 1)[1].rsplit(" fd=", 1)[0])
            found.append((msg["arguments"]["endpoint"], msg["arguments"]["dir"]))
    return found


def failed(proc) -> str:
    return f"rc={proc.returncode}\nstdout={proc.stdout}\nstderr={proc.stderr}"


def test_live_tls_migration_there_and_back(tmp_path, libvirt_fleet):
    fleet, (one, two) = libvirt_fleet(2)
    home = new_ca(tmp_path / "ca")
    before = {d.name: d.pid for d in (one, two)}

    reports = deploy(home, fleet, *fleet.names)
    for d in (one, two):
        r = reports[d.name]
        assert (r["result"], r["error"], r["restarted"]) == ("changed", None, "libvirtd"), r
        assert "try-restart libvirtd" in d.systemctl_calls()
        assert d.pid and d.pid != before[d.name], "libvirtd was not restarted"
        assert f'migrate_tls_x509_cert_dir = "{CERT_DIR}"' in d.host.read("/etc/libvirt/qemu.conf").decode()

    created = one.create_guest("guest1")
    assert created.returncode == 0, failed(created) + one.log_text()
    assert one.domains() == {"guest1": "running"}
    assert_runs_as_qemu_user(one, "guest1")

    there = migrate(one, two, "guest1")
    assert there.returncode == 0, failed(there) + one.log_text() + two.log_text()
    assert two.domains() == {"guest1": "running"}
    assert one.domains() == {}
    assert one.qemu_pids() == []
    assert_runs_as_qemu_user(two, "guest1")
    assert tls_objects(one) == [("client", CERT_DIR)]
    assert tls_objects(two) == [("server", CERT_DIR)]

    pid = two.pid
    two.restart()  # a daemon restart keeps the guest, as systemd's KillMode=process does
    assert two.pid != pid and two.domains() == {"guest1": "running"}

    back = migrate(two, one, "guest1")
    assert back.returncode == 0, failed(back) + one.log_text() + two.log_text()
    assert one.domains() == {"guest1": "running"}
    assert two.domains() == {}
    assert_runs_as_qemu_user(one, "guest1")
    assert tls_objects(one) == [("client", CERT_DIR), ("server", CERT_DIR)]


def test_tls_migration_refused_by_destination_of_other_ca_or_without_certs(tmp_path, libvirt_fleet):
    fleet, (one, other, bare) = libvirt_fleet(3)
    deploy(new_ca(tmp_path / "ca"), fleet, one.name)
    deploy(new_ca(tmp_path / "other-ca"), fleet, other.name)
    # `bare` got nothing: no /etc/pki/qemu, qemu.conf without TLS settings.
    assert not bare.host.path(CERT_DIR).exists()

    created = one.create_guest("guest1")
    assert created.returncode == 0, failed(created) + one.log_text()

    refused = migrate(one, other, "guest1")
    assert refused.returncode != 0
    assert "The certificate hasn't got a known issuer" in refused.stderr, failed(refused)

    no_certs = migrate(one, bare, "guest1")
    assert no_certs.returncode != 0
    assert f"Unable to access credentials {CERT_DIR}/ca-cert.pem" in no_certs.stderr, failed(no_certs)

    for d in (other, bare):
        assert d.domains() == {} and d.qemu_pids() == [], d.name
    assert one.domains() == {"guest1": "running"}  # the guest never left


def test_destination_announcing_its_address_needs_tls_destination(tmp_path, libvirt_fleet):
    """migration_host = an IP: the URI is tcp://IP:PORT and QEMU checks the IP against
    the certificate (qemuca issues dNSName SANs only), unless --tls-destination NAME."""
    fleet, (one, two) = libvirt_fleet(2, announce="address")
    deploy(new_ca(tmp_path / "ca"), fleet, *fleet.names)
    created = one.create_guest("guest1")
    assert created.returncode == 0, failed(created) + one.log_text()

    by_address = migrate(one, two, "guest1")
    assert by_address.returncode != 0
    assert f"Certificate does not match the hostname {two.address}" in by_address.stderr, failed(by_address)
    assert one.domains() == {"guest1": "running"}

    named = migrate(one, two, "guest1", "--tls-destination", two.name)
    assert named.returncode == 0, failed(named) + one.log_text() + two.log_text()
    assert two.domains() == {"guest1": "running"} and one.domains() == {}
