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
import subprocess
import threading
import time

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes

from tests.integration.test_adopt import certtool_host_set, place
from tests.pki.test_import_ca import certtool_ca
from tests.support.capture import QEMU_MAGIC, TLS_APPDATA, capture
from tests.support.fakehosts import DEFAULT_QEMU_CONF, Fleet
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

    def make(n: int = 2, fleet: Fleet | None = None, **kw):
        fleet = fleet or fleet_factory(n)
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


def ssh(fleet: Fleet) -> list:
    return ["--ssh-config", fleet.ssh_config, "--known-hosts", fleet.known_hosts]


def deploy(home, fleet: Fleet, *hosts: str, extra=("--issue",)):
    """`qemuca deploy HOSTS --issue --restart --json` over the fleet's SSH; host -> report."""
    proc = assert_ok(run_qemuca(home, "deploy", *hosts, *extra, "--restart", "--json",
                                "--qemu-conf", "/etc/libvirt/qemu.conf", *ssh(fleet)))
    return {r["host"]: r for r in json.loads(proc.stdout)}


def qemuca(home, fleet: Fleet, *args: str):
    """A qemuca command over the fleet's SSH that must succeed."""
    return assert_ok(run_qemuca(home, *args, *ssh(fleet)))


def pair_prediction(home, fleet: Fleet, src: Libvirtd, dst: Libvirtd, *extra: str) -> dict:
    """`qemuca verify --pair SRC DST --json`: {"result": ..., "failed": {check: detail}}."""
    proc = run_qemuca(home, "verify", "--pair", src.name, dst.name, *extra, "--json", *ssh(fleet))
    assert "Traceback" not in proc.stderr, proc.stderr
    report = json.loads(proc.stdout)
    report = report[0] if isinstance(report, list) else report
    return {"result": report["result"],
            "failed": {c["check"]: c["detail"] for c in report["checks"] if c["result"] == "fail"}}


def new_ca(path):
    assert_ok(run_qemuca(path, "init", "--no-passphrase"))
    return path


def assert_runs_as_qemu_user(d: Libvirtd, domain: str) -> None:
    assert_runs_as(d, domain, QEMU_USER)


def assert_runs_as(d: Libvirtd, domain: str, user: str) -> None:
    """The guest's QEMU runs as the host's `user` and that user's group (real,
    effective, saved and fs ids), not as root."""
    with open(f"/proc/{d.domain_pid(domain)}/status") as f:
        status = dict(line.split(":", 1) for line in f.read().splitlines() if ":" in line)
    uid, gid = ids_of(d, "/etc/passwd", user)[2], ids_of(d, "/etc/passwd", user)[3]
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


# ------------------------------------------------------------- the catalog of libvirt's QE
# (autotest/tp-libvirt migration_network_data_transport_tls*, tls_migrate_tls_x509_verify*)

MARKER = b"qemuca-marker-in-guest-memory-" + bytes(range(0x41, 0x5b)) * 2
MARKER_PATH = "/tmp/qemuca-ram-marker.bin"


def plant_ram_marker(*daemons: Libvirtd) -> str:
    """The file QEMU loads into the guest's RAM (on every host: the destination's QEMU
    is started with the same arguments)."""
    for d in daemons:
        d.host.write(MARKER_PATH, MARKER * (4096 // len(MARKER) + 1), 0o644)
    return MARKER_PATH


@pytest.mark.parametrize("p2p", [False, True], ids=["virsh-drives-both", "p2p"])
def test_stream_is_tls_only_and_a_plain_migration_is_not(tmp_path, libvirt_fleet, p2p):
    """On the wire: TLS records, no QEMU stream magic, no byte of the guest's RAM marker;
    the same guest migrated back without --tls shows both (the capture would see them)."""
    fleet, (one, two) = libvirt_fleet(2)
    deploy(new_ca(tmp_path / "ca"), fleet, *fleet.names)
    created = one.create_guest("guest1", ram_marker=plant_ram_marker(one, two))
    assert created.returncode == 0, failed(created) + one.log_text()
    extra = ("--p2p",) if p2p else ()

    with capture(tmp_path / "tls.pcap", two.address) as tls:
        there = migrate(one, two, "guest1", *extra)
    assert there.returncode == 0, failed(there) + one.log_text() + two.log_text()
    assert two.domains() == {"guest1": "running"} and one.domains() == {}
    assert len(tls.data) > 100_000, len(tls.data)  # the guest's RAM went through here
    assert TLS_APPDATA in tls.data
    assert QEMU_MAGIC not in tls.data and MARKER[:24] not in tls.data

    with capture(tmp_path / "plain.pcap", one.address) as plain:
        back = migrate(two, one, "guest1", *extra, tls=False)
    assert back.returncode == 0, failed(back) + one.log_text() + two.log_text()
    assert QEMU_MAGIC in plain.data and MARKER[:24] in plain.data  # the control: capture works


def test_copy_storage_all_sends_the_disk_over_tls(tmp_path, libvirt_fleet):
    """--copy-storage-all --tls: the disk goes over NBD with STARTTLS; its content never
    crosses the wire in clear."""
    fleet, (one, two) = libvirt_fleet(2)
    deploy(new_ca(tmp_path / "ca"), fleet, *fleet.names)
    disk = "/var/lib/libvirt/images/disk1.img"
    block = MARKER * (65536 // len(MARKER))
    for d in (one, two):  # the destination's image must exist, of the same size
        d.host.run(["mkdir", "-p", "/var/lib/libvirt/images"])
        d.host.write(disk, block * 16 if d is one else b"\0" * len(block) * 16, 0o666)
    created = one.create_guest("guest1", disk=disk)
    assert created.returncode == 0, failed(created) + one.log_text()
    with capture(tmp_path / "nbd.pcap", two.address) as wire:
        moved = migrate(one, two, "guest1", "--copy-storage-all")
    assert moved.returncode == 0, failed(moved) + one.log_text() + two.log_text()
    assert two.domains() == {"guest1": "running"}
    assert MARKER[:24] in two.host.read(disk)  # the disk arrived...
    assert MARKER[:24] not in wire.data and QEMU_MAGIC not in wire.data  # ...never in clear
    assert TLS_APPDATA in wire.data


@pytest.mark.parametrize("how", ["announced-address", "migrateuri"])
def test_an_ip_migration_uri_needs_tls_destination(tmp_path, libvirt_fleet, how):
    """A migration network by IP (announced by the destination, or --migrateuri): QEMU
    checks the IP against the certificate (dNSName SANs only) and refuses, unless
    --tls-destination NAME; `verify --pair --tls-destination IP` says the same first."""
    fleet, (one, two) = libvirt_fleet(2, **({"announce": "address"} if how == "announced-address" else {}))
    home = new_ca(tmp_path / "ca")
    deploy(home, fleet, *fleet.names)
    created = one.create_guest("guest1")
    assert created.returncode == 0, failed(created) + one.log_text()
    uri = () if how == "announced-address" else ("--migrateuri", f"tcp://{two.address}")

    by_address = migrate(one, two, "guest1", *uri)
    assert by_address.returncode != 0
    assert f"Certificate does not match the hostname {two.address}" in by_address.stderr, failed(by_address)
    assert one.domains() == {"guest1": "running"}
    predicted = pair_prediction(home, fleet, one, two, "--tls-destination", two.address)
    assert predicted["result"] == "fail"
    assert f"{two.address} is not among" in predicted["failed"]["destination name in SANs"], predicted

    assert pair_prediction(home, fleet, one, two, "--tls-destination", two.name)["result"] == "pass"
    named = migrate(one, two, "guest1", *uri, "--tls-destination", two.name)
    assert named.returncode == 0, failed(named) + one.log_text() + two.log_text()
    assert two.domains() == {"guest1": "running"} and one.domains() == {}


def test_hosts_of_another_ca_are_refused_both_ways(tmp_path, libvirt_fleet):
    fleet, (one, stranger) = libvirt_fleet(2)
    home = new_ca(tmp_path / "ca")
    deploy(home, fleet, one.name)
    deploy(new_ca(tmp_path / "other-ca"), fleet, stranger.name)
    for src, dst in ((one, stranger), (stranger, one)):
        guest = f"from-{src.name.split('.')[0]}"
        created = src.create_guest(guest)
        assert created.returncode == 0, failed(created) + src.log_text()
        refused = migrate(src, dst, guest)
        assert refused.returncode != 0, failed(refused)
        assert "The certificate hasn't got a known issuer" in refused.stderr, failed(refused)
        assert guest not in dst.domains() and src.domains()[guest] == "running"
    predicted = pair_prediction(home, fleet, one, stranger)
    assert predicted["result"] == "fail" and "source trusts destination" in predicted["failed"], predicted


def _break(case: str, src: Libvirtd, dst: Libvirtd) -> None:
    if case == "no-client-cert-on-source":
        for name in ("client-cert.pem", "client-key.pem"):
            src.host.run(["rm", f"{CERT_DIR}/{name}"])
    elif case == "no-server-cert-on-destination":
        for name in ("server-cert.pem", "server-key.pem"):
            dst.host.run(["rm", f"{CERT_DIR}/{name}"])
    elif case == "wrong-hostname-in-cert":
        # The destination was renamed after its certificate was issued: it announces the
        # new name (migration_host, hostname -f), which its certificate does not carry.
        new = "renamed.qemu.test"
        for d in (src, dst):
            d.write_hosts([(dst.address, new)])
        dst.host.run(["hostname", new])
        conf = dst.host.read("/etc/libvirt/qemu.conf").decode()
        dst.host.write("/etc/libvirt/qemu.conf",
                       conf.replace(f'migration_host = "{dst.name}"', f'migration_host = "{new}"'), 0o600)
        dst.restart()


# case: (what libvirt says, what the destination's QEMU log says, the failing
#        verify --pair check and a word of its detail)
BROKEN = {
    "no-client-cert-on-source": ("Cannot write to TLS channel", "Verify failed: No certificate was found",
                                 "source files", "client-cert.pem"),
    "no-server-cert-on-destination": (f"Unable to access credentials {CERT_DIR}/server-cert.pem", "",
                                      "destination files", "server-cert.pem"),
    "wrong-hostname-in-cert": ("Certificate does not match the hostname renamed.qemu.test", "",
                               "destination name in SANs", "renamed.qemu.test is not among"),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_each_broken_set_fails_in_libvirt_as_verify_pair_predicts(tmp_path, libvirt_fleet, case):
    fleet, (one, two) = libvirt_fleet(2)
    home = new_ca(tmp_path / "ca")
    deploy(home, fleet, *fleet.names)
    assert pair_prediction(home, fleet, one, two)["result"] == "pass"
    created = one.create_guest("guest1")
    assert created.returncode == 0, failed(created) + one.log_text()
    _break(case, one, two)
    said, said_there, check, detail = BROKEN[case]

    predicted = pair_prediction(home, fleet, one, two)
    assert predicted["result"] == "fail", predicted
    assert detail in predicted["failed"].get(check, ""), predicted
    result = migrate(one, two, "guest1")
    assert result.returncode != 0, failed(result)
    # Both QEMUs fail; which one libvirt reports first is a race: the source's or the
    # destination's words may come back, each side's log holds its own.
    assert said in result.stderr + one.qemu_log("guest1"), failed(result) + one.qemu_log("guest1")
    assert said_there in two.qemu_log("guest1"), two.qemu_log("guest1")
    assert one.domains() == {"guest1": "running"} and two.domains() == {}


@pytest.mark.parametrize("verify", [1, 0])
def test_destination_verify_setting_decides_on_a_source_without_client_cert(tmp_path, libvirt_fleet, verify):
    """migrate_tls_x509_verify = 1 (qemuca's value): the destination refuses a source
    that presents no certificate; = 0 (an admin's earlier line): it lets it in."""
    fleet, (one, two) = libvirt_fleet(2)
    deploy(new_ca(tmp_path / "ca"), fleet, *fleet.names)
    for name in ("client-cert.pem", "client-key.pem"):
        one.host.run(["rm", f"{CERT_DIR}/{name}"])
    if verify == 0:
        conf = two.host.read("/etc/libvirt/qemu.conf").decode()
        two.host.write("/etc/libvirt/qemu.conf", "migrate_tls_x509_verify = 0\n" + conf, 0o600)
        two.restart()
    created = one.create_guest("guest1")
    assert created.returncode == 0, failed(created) + one.log_text()
    result = migrate(one, two, "guest1")
    if verify:
        assert result.returncode != 0, failed(result)
        assert "Verify failed: No certificate was found" in two.qemu_log("guest1")
        assert one.domains() == {"guest1": "running"}
    else:
        assert result.returncode == 0, failed(result) + two.log_text()
        assert two.domains() == {"guest1": "running"}


def test_force_tls_refuses_plain_migrations_both_ways(tmp_path, libvirt_fleet):
    """deploy --force-tls (migrate_tls_force = 1): without --tls libvirt refuses as source
    and as destination; with --tls the guest moves."""
    fleet, (one, two, plain) = libvirt_fleet(3)
    home = new_ca(tmp_path / "ca")
    deploy(home, fleet, one.name, two.name, extra=("--issue", "--force-tls"))
    deploy(home, fleet, plain.name)
    for d in (one, two):
        assert "migrate_tls_force = 1" in d.host.read("/etc/libvirt/qemu.conf").decode()
    created = one.create_guest("guest1")
    assert created.returncode == 0, failed(created) + one.log_text()
    as_source = migrate(one, plain, "guest1", tls=False)
    assert as_source.returncode != 0 and "allows migration only with VIR_MIGRATE_TLS" in as_source.stderr, \
        failed(as_source)
    other = plain.create_guest("guest2")
    assert other.returncode == 0, failed(other) + plain.log_text()
    as_destination = migrate(plain, one, "guest2", tls=False)
    assert as_destination.returncode != 0, failed(as_destination)
    assert "allows migration only with VIR_MIGRATE_TLS" in as_destination.stderr, failed(as_destination)
    ok = migrate(one, two, "guest1")
    assert ok.returncode == 0, failed(ok) + two.log_text()
    assert two.domains() == {"guest1": "running"}
    # A later renew (no --force-tls given) keeps the setting: plain is still refused.
    qemuca(home, fleet, "renew", one.name, two.name, "--restart")
    assert "migrate_tls_force = 1" in two.host.read("/etc/libvirt/qemu.conf").decode()
    still = migrate(two, one, "guest1", tls=False)
    assert still.returncode != 0 and "allows migration only with VIR_MIGRATE_TLS" in still.stderr, failed(still)


class PingPong:
    """A guest migrated back and forth between two daemons, over and over, in a thread,
    while the test rotates credentials; every migration's result is kept."""

    def __init__(self, a: Libvirtd, b: Libvirtd, guest: str):
        self.hosts, self.guest = (a, b), guest
        self.results: list[tuple[str, str, subprocess.CompletedProcess]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        src, dst = self.hosts
        while not self._stop.is_set():
            proc = migrate(src, dst, self.guest)
            self.results.append((src.name, dst.name, proc))
            if proc.returncode == 0:
                src, dst = dst, src
            else:
                self._stop.wait(0.5)

    def __enter__(self) -> PingPong:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=300)

    def after(self, step: str, more: int = 2) -> None:
        """Wait until `more` further migrations have run since this step."""
        start = len(self.results)
        deadline = time.monotonic() + 300
        while len(self.results) < start + more:
            assert self._thread.is_alive() and time.monotonic() < deadline, f"no migration after {step}"
            time.sleep(0.1)

    def failures(self) -> list[str]:
        return [f"{s} -> {d}: {p.stderr.strip()}" for s, d, p in self.results if p.returncode != 0]


def test_rotation_while_a_guest_migrates_back_and_forth(tmp_path, libvirt_fleet):
    """renew, rekey, then a whole CA rollover (start, two-CA bundle, rekey host by host,
    finish), all during live TLS migrations: not one of them fails."""
    fleet, (one, two) = libvirt_fleet(2)
    home = new_ca(tmp_path / "ca")
    deploy(home, fleet, *fleet.names)
    first_ca = x509.load_pem_x509_certificate(one.host.read(f"{CERT_DIR}/ca-cert.pem"))
    created = one.create_guest("guest1")
    assert created.returncode == 0, failed(created) + one.log_text()
    steps = [("renew", one.name, two.name), ("rekey", one.name, two.name), ("ca", "rollover", "start"),
             ("deploy", "--bundle-only", "--all"), ("rekey", one.name), ("rekey", two.name),
             ("ca", "rollover", "finish")]
    with PingPong(one, two, "guest1") as moves:
        moves.after("start")
        for step in steps:
            remote = step[0] != "ca" or step[2] == "finish"
            (qemuca(home, fleet, *step) if remote else assert_ok(run_qemuca(home, *step)))
            moves.after(" ".join(step))
    assert moves.failures() == [], moves.failures()
    assert len(moves.results) >= 2 * (len(steps) + 1)
    for d in (one, two):  # the rollover went all the way: one CA, not the first one
        bundle = x509.load_pem_x509_certificates(d.host.read(f"{CERT_DIR}/ca-cert.pem"))
        assert [c.fingerprint(hashes.SHA256()) for c in bundle] != [first_ca.fingerprint(hashes.SHA256())]
        assert len(bundle) == 1
    assert json.loads(assert_ok(run_qemuca(home, "ca", "status", "--json")).stdout)["stage"] == "none"


def test_qemu_group_follows_libvirt_not_the_group_names_a_host_has(tmp_path, fleet_factory, libvirt_fleet):
    """A Debian host that also has a `qemu` group keeps root:libvirt-qemu (libvirt's QEMU is
    not in `qemu`: a set owned by it fails every migration); a RHEL-like host whose libvirt
    runs QEMU as qemu:qemu gets root:qemu. Guests migrate both ways as each host's user."""
    fleet = fleet_factory(0)
    fleet.add_host("debian.qemu.test", extra_groups=["qemu"])
    fleet.add_host("rhel.qemu.test", distro="rhel",
                   qemu_conf=DEFAULT_QEMU_CONF + 'user = "qemu"\ngroup = "qemu"\n')
    fleet, (debian, rhel) = libvirt_fleet(fleet=fleet)
    reports = deploy(new_ca(tmp_path / "ca"), fleet, *fleet.names)
    assert reports[debian.name]["qemu_group"]["name"] == "libvirt-qemu", reports[debian.name]
    assert reports[rhel.name]["qemu_group"] == {"name": "qemu", "gid": 107, "source": "qemu.conf group (line 3)"}
    for d, group in ((debian, "libvirt-qemu"), (rhel, "qemu")):
        owner = d.host.run(["stat", "-L", "-c", "%U:%G", f"{CERT_DIR}/server-key.pem"]).stdout.decode().strip()
        assert owner == f"root:{group}", (d.name, owner)
    created = debian.create_guest("guest1")
    assert created.returncode == 0, failed(created) + debian.log_text()
    for src, dst, user in ((debian, rhel, "qemu"), (rhel, debian, QEMU_USER)):
        moved = migrate(src, dst, "guest1")
        assert moved.returncode == 0, failed(moved) + dst.log_text()
        assert_runs_as(dst, "guest1", user)
    # What deploy once did on such a host: the key readable by the `qemu` group only.
    # libvirt's QEMU cannot load it, and verify says so first, naming the group it wants.
    home = tmp_path / "ca"
    debian.host.run(["chgrp", "qemu", f"{CERT_DIR}/server-key.pem"])
    proc = run_qemuca(home, "verify", debian.name, "--json", *ssh(fleet))
    checks = {c["check"]: c for c in json.loads(proc.stdout)[0]["checks"]}
    assert checks["file server-key.pem"]["result"] == "fail", checks["file server-key.pem"]
    assert "QEMU runs as group libvirt-qemu" in checks["file server-key.pem"]["detail"]
    refused = migrate(debian, rhel, "guest1")  # the guest is on debian: its QEMU is the client
    assert refused.returncode != 0, failed(refused)
    assert "Cannot load certificate" in refused.stderr and "Error while reading file" in refused.stderr, \
        failed(refused)
    assert debian.domains() == {"guest1": "running"}


def test_probe_libvirt_moves_a_throwaway_guest_and_leaves_nothing(tmp_path, libvirt_fleet):
    """`qemuca probe --libvirt`: virsh here drives both daemons over qemuca's SSH
    connections; the guest moves, and is gone from both hosts afterwards, pass or fail."""
    fleet, (one, two, stranger) = libvirt_fleet(3)
    home = new_ca(tmp_path / "ca")
    deploy(home, fleet, one.name, two.name)
    deploy(new_ca(tmp_path / "other-ca"), fleet, stranger.name)

    proc = run_qemuca(home, "probe", "--libvirt", one.name, two.name, "--json", *ssh(fleet))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(proc.stdout)
    checks = {f["check"]: f for f in report["findings"]}
    assert report["result"] == "pass" and report["tls_migration"]["status"] == "completed", report
    assert checks["TLS migration (virsh migrate --live --tls)"]["result"] == "pass"
    assert checks[f"guest on {two.name}"]["result"] == "pass", checks
    assert tls_objects(one)[-1] == ("client", CERT_DIR) and tls_objects(two)[-1] == ("server", CERT_DIR)

    refused = run_qemuca(home, "probe", "--libvirt", one.name, stranger.name, "--json", *ssh(fleet))
    assert refused.returncode == 1, refused.stdout + refused.stderr
    failed_checks = [f for f in json.loads(refused.stdout)["findings"] if f["result"] == "fail"]
    assert [f["problem"] for f in failed_checks] == ["other CA"], failed_checks
    assert "known issuer" in failed_checks[0]["detail"]

    table = run_qemuca(home, "probe", "--libvirt", two.name, one.name, *ssh(fleet), env={"COLUMNS": "100"})
    assert table.returncode == 0 and "TLS migration" in table.stdout, table.stdout + table.stderr
    for d in (one, two, stranger):
        assert d.domains() == {} and d.qemu_pids() == [], d.name


def test_takeover_from_a_foreign_ca_while_libvirt_migrates(tmp_path, libvirt_fleet):
    """Brownfield with libvirt: the hosts hold certtool sets of a foreign CA; the store
    takes it over (ca rollover start --from-cert), adopts and renews the hosts and
    finishes, while a guest migrates back and forth: no migration fails."""
    fleet, (one, two) = libvirt_fleet(2)
    foreign_cert, foreign_key = certtool_ca(tmp_path)
    (tmp_path / "foreign.pem").write_bytes(foreign_cert)
    for d in (one, two):
        place(d.host, certtool_host_set(tmp_path / "sets", foreign_cert, foreign_key, d.name))
    home = new_ca(tmp_path / "ca")
    for d in (one, two):  # libvirt reads the certtool sets as they are
        conf = d.host.read("/etc/libvirt/qemu.conf").decode()
        d.host.write("/etc/libvirt/qemu.conf", f'migrate_tls_x509_cert_dir = "{CERT_DIR}"\n' + conf, 0o600)
        d.restart()
    created = one.create_guest("guest1")
    assert created.returncode == 0, failed(created) + one.log_text()
    steps = [("ca", "rollover", "start", "--from-cert", str(tmp_path / "foreign.pem")),
             ("adopt", one.name), ("adopt", two.name), ("renew", one.name), ("renew", two.name),
             ("ca", "rollover", "finish")]
    with PingPong(one, two, "guest1") as moves:
        moves.after("start")
        for step in steps:
            local = step[:3] == ("ca", "rollover", "start")
            assert_ok(run_qemuca(home, *step)) if local else qemuca(home, fleet, *step)
            moves.after(" ".join(step[:2]))
    assert moves.failures() == [], moves.failures()
    for d in (one, two):
        bundle = x509.load_pem_x509_certificates(d.host.read(f"{CERT_DIR}/ca-cert.pem"))
        assert len(bundle) == 1 and bundle[0].fingerprint(hashes.SHA256()) != \
            x509.load_pem_x509_certificate(foreign_cert).fingerprint(hashes.SHA256())
