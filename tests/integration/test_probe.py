"""`qemuca probe` between fake hosts over real OpenSSH, with real QEMU on both ends.

The fake hosts share this machine's /usr (so each runs the real qemu-system-x86_64) and
its network namespace (so every probe uses --address 127.0.0.1). What is asserted is
what QEMU said and what is left on the hosts afterwards: no probe process (looked up in
each host's mount namespace) and not one new file in /tmp, /run or the cert dir.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import signal
import socket
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Dict, List, Set, Tuple

import pytest

from qemuca.pki import ca, profile
from tests.support.fakehosts import FakeHost, Fleet, start_fleet
from tests.support.fixtures import require_fleet_tools
from tests.support.pki import assert_ok, authority, export_set, make_store, popen_qemuca, run_many, run_qemuca
from tests.support.qemu_migration import QEMU
from tests.support.tools import require_tool

pytestmark = [pytest.mark.sshd, pytest.mark.qemu]

SMALL = ("--ram", "16")  # smaller than QEMU's binary: no copies loaded, the guest starts at once
MARKER = b"qemuca-probe-"


# --------------------------------------------------------------------- helpers


def ssh(fleet: Fleet) -> List[str]:
    return ["--ssh-config", str(fleet.ssh_config), "--known-hosts", str(fleet.known_hosts)]


def probe(home, fleet: Fleet, *args: str, timeout: float = 90):
    return run_qemuca(home, "probe", *args, *ssh(fleet), "--address", "127.0.0.1", timeout=timeout)


def probe_json(home, fleet: Fleet, *args: str):
    proc = probe(home, fleet, *args, "--json")
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc, json.loads(proc.stdout)


def finding(report: dict, check: str) -> dict:
    found = [f for f in report["findings"] if f["check"] == check]
    assert found, f"no {check!r} in {report['findings']}"
    return found[0]


def probe_processes(host: FakeHost) -> Dict[int, Tuple[int, List[bytes]]]:
    """Live processes inside `host` that a probe started (their argv carries its marker):
    pid -> (ppid, argv)."""
    ns = os.readlink(f"/proc/{host.anchor_pid}/ns/mnt")
    out = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            if os.readlink(f"/proc/{entry}/ns/mnt") != ns:
                continue
            argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")[:-1]
            state, ppid = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[:2]
        except OSError:
            continue  # gone meanwhile
        if state not in ("Z", "X") and any(a.startswith(MARKER) for a in argv):
            out[int(entry)] = (int(ppid), argv)
    return out


def host_files(host: FakeHost, fleet: Fleet) -> Set[str]:
    """Every path under the host's /tmp, /run and cert dir (the fleet's own folder, which
    the host sees under /tmp, left out: sshd logs to it)."""
    paths = set()
    for top in ("/tmp", "/run", "/etc/pki/qemu"):
        root = str(host.path(top))
        for dirpath, dirs, files in os.walk(root):
            here = top + dirpath[len(root):]
            dirs[:] = [d for d in dirs if not f"{here}/{d}".startswith(str(fleet.base))]
            paths.update(f"{here}/{name}" for name in dirs + files)
    return paths


def snapshot(fleet: Fleet, hosts: List[FakeHost]) -> Dict[str, Set[str]]:
    running = {h.name: probe_processes(h) for h in hosts if probe_processes(h)}
    assert not running, f"probe processes before the test: {running}"
    return {h.name: host_files(h, fleet) for h in hosts}


def assert_nothing_left(fleet: Fleet, before: Dict[str, Set[str]], within: float = 3.0) -> None:
    """No probe process on any host (waited for briefly: a killed process is reaped by the
    container's PID 1 in its own time), and no new or missing file."""
    hosts = [fleet[name] for name in before]
    deadline = time.monotonic() + within
    while True:
        left = {h.name: probe_processes(h) for h in hosts if probe_processes(h)}
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert not left, f"processes left behind: {left}"
    for h in hosts:
        assert host_files(h, fleet) == before[h.name], h.name


def wait_for_qemu(host: FakeHost, role: str, timeout: float = 30) -> Tuple[int, int]:
    """(pid, ppid) of the probe's QEMU with that role, once it runs on the host."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for pid, (ppid, argv) in probe_processes(host).items():
            if argv and argv[0].endswith(QEMU.encode()) and any(
                    a.startswith(MARKER) and a.endswith(f"-{role}".encode()) for a in argv):
                return pid, ppid
        time.sleep(0.01)
    raise AssertionError(f"no {role} QEMU appeared on {host.name}")


def deploy(home, fleet: Fleet, *hosts: str) -> None:
    assert_ok(run_qemuca(home, "deploy", *hosts, "--issue", *ssh(fleet), "--json"))


def new_fleet(n: int) -> Fleet:
    require_fleet_tools()
    require_tool(QEMU)
    return start_fleet(n, Path(tempfile.mkdtemp(prefix="qf-")))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """host1..host4 deployed from one CA, host5 from another one. Tests leave them as they
    are, except for host4's qemu.conf (migrate_tls_force), used by one test only; a test
    that needs other files uses a cert dir of its own and removes it."""
    fleet = new_fleet(5)
    try:
        home = make_store(tmp_path_factory.mktemp("probe"))
        other = make_store(tmp_path_factory.mktemp("other"), common_name="Another QEMU CA")
        deploy(home, fleet, *fleet.names[:4])
        deploy(other, fleet, fleet.names[4])
        yield SimpleNamespace(fleet=fleet, home=home, names=fleet.names)
    finally:
        fleet.stop()


# --------------------------------------------------------------------- success


def test_strict_fails_a_probe_that_only_warns(world):
    """--strict means what it means for verify and doctor: a warning fails (here libvirt
    on the destination still accepts unencrypted migrations)."""
    fleet, (h1, h2) = world.fleet, world.names[:2]
    proc, report = probe_json(world.home, fleet, h1, h2, *SMALL)
    assert proc.returncode == 0 and report["result"] == "pass"
    assert finding(report, "destination qemu.conf")["result"] == "warn"
    strict, report = probe_json(world.home, fleet, h1, h2, *SMALL, "--strict")
    assert strict.returncode == 1 and report["result"] == "pass", strict.stderr


def test_probe_pair_completes_refuses_plain_and_measures(world):
    fleet, (h1, h2) = world.fleet, world.names[:2]
    before = snapshot(fleet, [fleet[h1], fleet[h2]])
    proc, report = probe_json(world.home, fleet, h1, h2, "--compare-plain", "--ram", "32")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert report["result"] == "pass" and report["error"] is None
    assert (report["source"], report["destination"], report["tls_destination"]) == (h1, h2, h2)
    assert 49152 <= report["port"] <= 49215  # libvirt's migration range

    tls = report["tls_migration"]
    assert (tls["status"], tls["destination_status"]) == ("completed", "completed")
    # 32 MiB of RAM holds one copy of the QEMU binary: real data crossed, not zero pages.
    assert tls["bytes"] > report["ram_filled_bytes"] // 2 > 1 << 20
    assert tls["seconds"] > 0 and tls["throughput_bytes_per_s"] > 0

    plain = report["plain_client"]
    assert plain["refused"] is True and plain["destination_status"] != "completed"
    assert any(e["side"] == "destination" and "TLS handshake failed" in e["message"] for e in plain["errors"])
    assert finding(report, "plain client refused")["result"] == "pass"

    assert report["plain_migration"]["status"] == "completed"
    assert isinstance(report["throughput_ratio"], float) and report["throughput_ratio"] > 0
    assert "ratio" in finding(report, "throughput TLS / plain")["detail"]

    assert report["destination_revoked"] is False and report["source_revoked"] is False
    # qemu.conf as deployed: verify on, migrate_tls_force not set -> reported, a warning only.
    assert report["qemu_conf"]["force"]["value"] is False and report["qemu_conf"]["verify"]["value"] is True
    conf = finding(report, "destination qemu.conf")
    assert conf["result"] == "warn" and "migrate_tls_force = 0" in conf["detail"] and "--force-tls" in conf["fix"]

    # QEMU ran bounded by timeout and tied to the SSH session, QMP on the channel (no file).
    started = [c for c in fleet[h2].commands() if QEMU in c]
    assert started and all(c.startswith("setpriv --pdeathsig KILL -- timeout -s KILL ") for c in started)
    assert all("-qmp stdio" in c and "-pidfile" not in c for c in started)
    assert_nothing_left(fleet, before)


def test_matrix_of_three_hosts_all_complete(world):
    fleet, hosts = world.fleet, world.names[:3]
    before = snapshot(fleet, [fleet[h] for h in hosts])
    proc, data = probe_json(world.home, fleet, "--matrix", *hosts, *SMALL)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert data["hosts"] == hosts and (data["passed"], data["failed"]) == (6, 0)
    pairs = {(r["source"], r["destination"]): r for r in data["pairs"]}
    assert set(pairs) == {(a, b) for a in hosts for b in hosts if a != b}
    for r in pairs.values():
        assert r["tls_migration"]["status"] == "completed" and r["plain_client"]["refused"] is True
    assert_nothing_left(fleet, before)


def test_destination_policy_is_reported_from_qemu_conf(world):
    """migrate_tls_force = 1 on the destination: libvirt would refuse plain migrations."""
    fleet, h1, h4 = world.fleet, world.names[0], world.names[3]
    assert_ok(run_qemuca(world.home, "deploy", h4, "--force-tls", *ssh(fleet)))
    assert b"migrate_tls_force = 1" in fleet[h4].read("/etc/libvirt/qemu.conf")
    proc, report = probe_json(world.home, fleet, h1, h4, *SMALL)
    assert proc.returncode == 0, proc.stdout
    assert report["qemu_conf"]["force"]["value"] is True and report["qemu_conf"]["path"] == "/etc/libvirt/qemu.conf"
    conf = finding(report, "destination qemu.conf")
    assert conf["result"] == "pass" and "migrate_tls_force = 1 (line" in conf["detail"]
    assert "virsh migrate without --tls must fail" in conf["detail"]


def test_usage_errors_change_nothing(world, tmp_path):
    fleet, (h1, h2) = world.fleet, world.names[:2]
    bad = tmp_path / "pairs"
    bad.write_text(f"{h1} {h1}\n")
    cases = [
        (["--matrix", "--pairs", str(bad)], 2, "exclude each other"),
        ([h1], 2, "give SRC DST"),
        ([h1, h1], 3, "the same host"),
        (["--pairs", str(bad)], 3, "the same host"),
        (["--matrix", h1, h2, "--tls-destination", h2], 2, "one SRC DST pair"),
        (["--matrix", h1, h2, "--port", "49200"], 2, "--parallel 1"),
    ]
    ran = {h: len(fleet[h].commands()) for h in (h1, h2)}
    procs = run_many(world.home, [["probe", *args, *ssh(fleet)] for args, _, _ in cases])
    for (args, code, needle), proc in zip(cases, procs):
        assert proc.returncode == code and needle in proc.stderr and "Traceback" not in proc.stderr, args
    assert {h: len(fleet[h].commands()) for h in (h1, h2)} == ran  # refused before any connection


# --------------------------------------------------------------------- failures, diagnosed


def test_host_from_another_ca_is_named(world, tmp_path):
    fleet, h1, h5 = world.fleet, world.names[0], world.names[4]
    pairs = tmp_path / "pairs"
    pairs.write_text(f"# source destination\n{h1} {h5}\n{h5} {h1}\n")
    before = snapshot(fleet, [fleet[h1], fleet[h5]])
    proc, data = probe_json(world.home, fleet, "--pairs", str(pairs), *SMALL)
    assert proc.returncode == 1
    assert data["failed"] == 2
    for r in data["pairs"]:
        assert r["tls_migration"]["status"] == "failed"
        assert "hasn't got a known issuer" in r["tls_migration"]["error"]  # QEMU's exact words
        f = finding(r, "TLS migration")
        assert f["problem"] == "unknown issuer"
        assert f"{h5}'s certificate was issued by 'CN=Another QEMU CA" in f["detail"]
        assert "not by this CA ('CN=QEMU CA test" in f["detail"]
        assert f"qemuca deploy {h5} --issue" in f["fix"]
        assert r["plain_client"]["refused"] is True  # the listener still refused plain traffic
    assert_nothing_left(fleet, before)


def test_wrong_tls_destination_is_a_name_mismatch(world):
    fleet, (h1, h2) = world.fleet, world.names[:2]
    before = snapshot(fleet, [fleet[h1], fleet[h2]])
    proc = probe(world.home, fleet, h1, h2, "--tls-destination", "wrong.qemu.test", *SMALL)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    out = proc.stdout  # a table: long cells wrap between words
    assert f"{h1} -> {h2} (name wrong.qemu.test, 127.0.0.1:" in out and ": FAIL" in out
    for word in ("migration", "hostname", "wrong.qemu.test", "fix:", "--tls-destination"):
        assert word in out, word

    proc, report = probe_json(world.home, fleet, h1, h2, "--tls-destination", "wrong.qemu.test", *SMALL)
    f = finding(report, "TLS migration")
    assert f["problem"] == "name mismatch"
    assert "source: Certificate does not match the hostname wrong.qemu.test" in f["detail"]  # QEMU's words
    assert f"{h2}'s certificate does not hold the name wrong.qemu.test" in f["detail"]
    assert f"(its names: {h2})" in f["detail"] and "--tls-destination" in f["fix"]
    assert report["tls_destination"] == "wrong.qemu.test"
    assert_nothing_left(fleet, before)


def test_revoked_host_after_crl_rollout(tmp_path):
    fleet = new_fleet(4)
    try:
        home = make_store(tmp_path)
        names = fleet.names
        h3 = names[2]
        deploy(home, fleet, *names)
        assert_ok(run_qemuca(home, "revoke", h3, "--reason", "key-compromise"))
        assert_ok(run_qemuca(home, "deploy", "--all", *ssh(fleet)))  # rolls the CRL out (not to h3)
        before = snapshot(fleet, list(fleet.hosts))

        proc, data = probe_json(home, fleet, "--matrix", *names, *SMALL, "--parallel", "12")
        assert proc.returncode == 1
        assert (data["passed"], data["failed"]) == (6, 6)
        for r in data["pairs"]:
            src, dst = r["source"], r["destination"]
            if src == h3:  # every destination has the CRL now: QEMU refuses h3
                assert r["result"] == "fail" and r["tls_migration"]["status"] == "failed"
                f = finding(r, "TLS migration")
                assert f["problem"] == "revoked" and "The certificate has been revoked" in f["detail"]
                assert f"{dst} refused {h3}'s certificate: it is revoked" in f["detail"]
                assert r["source_revoked"] is True
            elif dst == h3:  # QEMU's source never reads a CRL: it completes, the probe flags it
                assert r["result"] == "fail" and r["tls_migration"]["status"] == "completed"
                assert r["destination_revoked"] is True
                f = finding(r, "destination not revoked")
                assert f["problem"] == "revoked destination" and "REVOKED DESTINATION" in f["detail"]
                assert f"qemuca issue --force {h3}" in f["fix"]
            else:
                assert r["result"] == "pass", r

        pairs = tmp_path / "pairs"
        pairs.write_text(f"{names[0]} {h3}\n{h3} {names[0]}\n")
        proc = probe(home, fleet, "--pairs", str(pairs), *SMALL)  # the same, for people
        assert proc.returncode == 1
        assert "0/2 pairs passed" in proc.stdout and "FAIL: revoked destination" in proc.stdout
        assert "FAIL: revoked source, revoked" in proc.stdout and "REVOKED DESTINATION" in proc.stdout
        assert_nothing_left(fleet, before)
    finally:
        fleet.stop()


def test_expired_certificate_either_side(world, tmp_path):
    """In a cert dir of their own (the deployed one stays as it is): host1 with its valid
    set, host2 with an expired certificate of the same CA."""
    fleet, (h1, h2) = world.fleet, world.names[:2]
    cert_dir = "/etc/pki/qemu-probe-test"
    export_set(world.home, h1, fleet[h1].path(cert_dir))
    auth = authority(world.home)
    key = profile.generate_key("ecdsa-p256")
    past = profile.utcnow() - dt.timedelta(days=400)
    cert = profile.build_host_certificate(auth.cert, auth.key, h2, [], key.public_key(), 30, now=past)
    fleet[h2].write(f"{cert_dir}/ca-cert.pem", auth.bundle())
    auth.store.close()
    for role in ("server", "client"):
        fleet[h2].write(f"{cert_dir}/{role}-cert.pem", ca.cert_pem(cert))
        fleet[h2].write(f"{cert_dir}/{role}-key.pem", ca.key_pem(key), 0o600)
    pairs = tmp_path / "pairs"
    pairs.write_text(f"{h1} {h2}\n{h2} {h1}\n")
    try:
        before = snapshot(fleet, [fleet[h1], fleet[h2]])
        proc, data = probe_json(world.home, fleet, "--pairs", str(pairs), "--cert-dir", cert_dir, *SMALL)
        assert proc.returncode == 1 and data["failed"] == 2
        to_h2, from_h2 = data["pairs"]
        f = finding(to_h2, "TLS migration")  # the destination's QEMU refuses to load it
        assert f["problem"] == "expired" and f"{h2}'s certificate in {cert_dir} has expired" in f["detail"]
        assert f"The server certificate {cert_dir}/server-cert.pem has expired" in f["detail"]
        assert f"qemuca issue --force {h2} && qemuca deploy {h2}" in f["fix"]
        assert finding(to_h2, "plain client refused")["result"] == "skip"
        f = finding(from_h2, "TLS migration")  # the source's QEMU refuses its client certificate
        assert f["problem"] == "expired"
        assert f"The client certificate {cert_dir}/client-cert.pem has expired" in f["detail"]
        assert finding(from_h2, "plain client refused")["result"] == "pass"
        # libvirt's cert dir (qemu.conf) is not the one probed: said so, as a warning.
        assert "libvirt uses /etc/pki/qemu, this probe used" in finding(to_h2, "destination qemu.conf")["detail"]
        assert_nothing_left(fleet, before)
    finally:
        for h in (h1, h2):
            shutil.rmtree(fleet[h].path(cert_dir))


def test_unreachable_host_is_a_failed_probe(world, tmp_path):
    fleet, h1 = world.fleet, world.names[0]
    with socket.socket() as s:  # a loopback port where nothing listens
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = tmp_path / "ssh_config"
    config.write_text(fleet.ssh_config.read_text()
                      + f"\nHost ghost.qemu.test\n    HostName 127.0.0.1\n    Port {port}\n    User root\n")
    proc = run_qemuca(world.home, "probe", h1, "ghost.qemu.test", "--ssh-config", config,
                      "--known-hosts", fleet.known_hosts, "--address", "127.0.0.1", "--json")
    report = json.loads(proc.stdout)
    assert proc.returncode == 1 and report["result"] == "fail"
    assert "ghost.qemu.test" in report["error"] and "connection refused" in report["error"]
    assert finding(report, "connection")["problem"] == "unreachable"
    assert not probe_processes(fleet[h1])


# --------------------------------------------------------------------- nothing left behind


@pytest.mark.parametrize("how", ["lost-connection", "client-killed", "ctrl-c", "hung-qemu"])
def test_nothing_left_when_a_probe_is_cut_short(world, how):
    """Mid-probe (every QEMU is up, the source's still loading its RAM): the destination's
    SSH session dies / the client is SIGKILLed / Ctrl-C / QEMU hangs. (Cut before a QEMU
    even exists, a session that starts after its connection is gone has no parent-death
    signal: `timeout` ends it, later; not what is tested here.)"""
    fleet, (h1, h2) = world.fleet, world.names[:2]
    before = snapshot(fleet, [fleet[h1], fleet[h2]])
    timeout = "4" if how == "hung-qemu" else "60"
    proc = popen_qemuca(world.home, "probe", h1, h2, *ssh(fleet), "--address", "127.0.0.1",
                        "--ram", "128", "--timeout", timeout, "--json")
    try:
        qemu, parent = wait_for_qemu(fleet[h2], "destination")
        if how != "hung-qemu":  # the probe's deadline is short there: freeze at once
            wait_for_qemu(fleet[h1], "plain-client")
            wait_for_qemu(fleet[h1], "source")
        if how == "lost-connection":
            # Only this session's sshd (timeout's parent): the host and its sshd stay up.
            session = int(Path(f"/proc/{parent}/stat").read_text().rsplit(")", 1)[1].split()[1])
            assert b"sshd" in Path(f"/proc/{session}/cmdline").read_bytes()
            os.kill(session, signal.SIGKILL)
        elif how == "client-killed":
            proc.kill()
        elif how == "ctrl-c":
            proc.send_signal(signal.SIGINT)
        else:
            os.kill(qemu, signal.SIGSTOP)  # QMP stops answering
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "Traceback" not in err
    if how == "lost-connection":
        assert proc.returncode == 1
        report = json.loads(out)
        assert report["result"] == "fail" and h2 in report["error"]
    elif how == "client-killed":
        assert proc.returncode == -signal.SIGKILL
    elif how == "ctrl-c":
        assert proc.returncode == 130 and err.startswith("qemuca: error: interrupted")
    else:
        assert proc.returncode == 1
        report = json.loads(out)
        assert "timed out after 4 s" in report["error"]
    # The parent-death signal (lost session, killed client) or the probe's own kill by
    # PID (Ctrl-C, hang) ended every QEMU at once: the `timeout` bound is not waited for.
    assert_nothing_left(fleet, before)
