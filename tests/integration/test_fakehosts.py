"""Self-tests of the fake host fleet: real sshd, real SSH clients, per-host files."""

from __future__ import annotations

import os
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

import paramiko
import pytest

from tests.support.fakehosts import DEFAULT_QEMU_CONF, FakeHost, Fleet, process_gone
from tests.support.fixtures import fleet_factory  # noqa: F401  (also works without conftest)

pytestmark = pytest.mark.sshd


def connect(fleet: Fleet, host: FakeHost, timeout: float = 5.0) -> paramiko.SSHClient:
    """Paramiko as the tool will use it: fleet identity, host keys from known_hosts only."""
    client = paramiko.SSHClient()
    client.load_host_keys(str(fleet.known_hosts))
    client.set_missing_host_key_policy(paramiko.RejectPolicy())
    client.connect("127.0.0.1", port=host.port, username="root", key_filename=str(fleet.identity),
                   look_for_keys=False, allow_agent=False, timeout=timeout,
                   banner_timeout=timeout, auth_timeout=timeout)
    return client


def sh(client: paramiko.SSHClient, command: str) -> tuple[int, str]:
    _, out, _ = client.exec_command(command, timeout=10)
    text = out.read().decode()
    return out.channel.recv_exit_status(), text


def test_twenty_hosts_start_fast_and_answer_with_their_names(fleet_factory):
    started = time.monotonic()
    fleet = fleet_factory(20)
    elapsed = time.monotonic() - started
    print(f"20 fake hosts started in {elapsed:.2f} s")  # a figure for people; speed lives in bench/
    assert fleet.names == [f"host{i}.qemu.test" for i in range(1, 21)]
    assert len({h.port for h in fleet}) == 20

    def names(host):
        with connect(fleet, host) as client:
            return sh(client, "hostname; hostname -f; cat /etc/hostname")[1].split()

    with ThreadPoolExecutor(8) as pool:
        for host, got in zip(fleet, pool.map(names, fleet)):
            assert got == [host.name] * 3


def test_openssh_client_uses_the_written_ssh_config(fleet_factory, tmp_path):
    fleet = fleet_factory(2)
    host = fleet["host2.qemu.test"]
    out = subprocess.run(["ssh", "-F", str(fleet.ssh_config), host.name, "hostname -f"],
                         capture_output=True, text=True, timeout=20)
    assert (out.returncode, out.stdout) == (0, host.name + "\n"), out.stderr
    assert f"[127.0.0.1]:{host.port} ssh-ed25519 " in fleet.known_hosts.read_text()

    config, known = fleet.write_client_files(tmp_path, by_alias=True)
    assert f"{host.name} ssh-ed25519 " in known.read_text()
    out = subprocess.run(["ssh", "-F", str(config), host.name, "hostname"],
                         capture_output=True, text=True, timeout=20)
    assert (out.returncode, out.stdout) == (0, host.name + "\n"), out.stderr


def test_host_keys_differ_and_unknown_keys_are_rejected(fleet_factory):
    fleet = fleet_factory(2)
    h1, h2 = fleet
    assert h1.host_key_line != h2.host_key_line
    client = paramiko.SSHClient()
    client.set_missing_host_key_policy(paramiko.RejectPolicy())
    with pytest.raises(paramiko.SSHException, match="not found in known_hosts"):
        client.connect("127.0.0.1", port=h1.port, username="root",
                       key_filename=str(fleet.identity), look_for_keys=False, allow_agent=False)
    client.close()
    # host1's key recorded under host2's port: paramiko must refuse host2.
    wrong = paramiko.SSHClient()
    wrong.get_host_keys().add(f"[127.0.0.1]:{h2.port}", "ssh-ed25519",
                              paramiko.Ed25519Key(filename=str(h1.root / "ssh_host_ed25519_key")))
    with pytest.raises(paramiko.BadHostKeyException):
        wrong.connect("127.0.0.1", port=h2.port, username="root",
                      key_filename=str(fleet.identity), look_for_keys=False, allow_agent=False)
    wrong.close()


def test_etc_and_tmp_are_private_per_host_and_sftp_works(fleet_factory):
    fleet = fleet_factory(2)
    h1, h2 = fleet
    with connect(fleet, h1) as client:
        sftp = client.open_sftp()
        sftp.mkdir("/etc/pki")
        sftp.mkdir("/etc/pki/qemu", 0o755)
        with sftp.open("/etc/pki/qemu/server-key.pem", "w") as f:
            f.write("KEY")
        sftp.chmod("/etc/pki/qemu/server-key.pem", 0o640)
        with sftp.open("/tmp/scratch", "w") as f:
            f.write("tmp")
        assert sftp.listdir("/etc/pki/qemu") == ["server-key.pem"]
        assert sh(client, "chown root:libvirt-qemu /etc/pki/qemu/server-key.pem")[0] == 0
    assert h1.read("/etc/pki/qemu/server-key.pem") == b"KEY"
    assert h1.stat("/etc/pki/qemu/server-key.pem").st_mode & 0o777 == 0o640
    assert h1.owner("/etc/pki/qemu/server-key.pem") == ("root", "libvirt-qemu")
    assert not h2.path("/etc/pki/qemu").exists()
    assert not os.path.exists("/etc/pki/qemu/server-key.pem")
    with connect(fleet, h2) as client:
        assert sh(client, "test -e /etc/pki/qemu/server-key.pem || test -e /tmp/scratch")[0] == 1
    assert h1.read("/tmp/scratch") == b"tmp" and not os.path.exists("/tmp/scratch")
    # A test plants files directly, too.
    h2.write("/etc/pki/qemu/ca-cert.pem", "CA")
    assert h2.run(["cat", "/etc/pki/qemu/ca-cert.pem"]).stdout == b"CA"


def test_user_database_and_qemu_conf_per_host(fleet_factory):
    """Each host has its distribution's users and groups, never this machine's."""
    fleet = fleet_factory(1)
    debian = fleet[0]
    rhel = fleet.add_host("rhel.qemu.test", distro="rhel", extra_groups=["somegroup"],
                          qemu_conf='user = "qemu"\n')
    bare = fleet.add_host("bare.qemu.test", distro="bare")

    def getent(host, db, name):
        proc = host.run(["getent", db, name], check=False)
        return proc.stdout.decode().strip() if proc.returncode == 0 else None

    assert getent(debian, "passwd", "libvirt-qemu").startswith("libvirt-qemu:x:64055:64055:")
    assert getent(debian, "group", "kvm") == "kvm:x:104:libvirt-qemu"
    assert getent(debian, "group", "qemu") is None and getent(debian, "passwd", "qemu") is None
    assert getent(rhel, "passwd", "qemu").startswith("qemu:x:107:107:")
    assert getent(rhel, "group", "libvirt-qemu") is None
    assert getent(rhel, "group", "somegroup") == "somegroup:x:999:"
    assert b'ID="rhel"' in rhel.read("/etc/os-release") and b"ID=debian" in debian.read("/etc/os-release")
    for group in ("libvirt-qemu", "qemu", "kvm"):
        assert getent(bare, "group", group) is None
    # This machine's database is not what the hosts see.
    machine_groups = open("/etc/group").read().splitlines()
    assert debian.read("/etc/group").decode().splitlines() != machine_groups
    assert debian.read("/etc/libvirt/qemu.conf") == DEFAULT_QEMU_CONF.encode()
    with connect(fleet, rhel) as client:  # sshd on a RHEL-like user database serves logins
        assert sh(client, "cat /etc/libvirt/qemu.conf") == (0, 'user = "qemu"\n')
        assert sh(client, "id -un") == (0, "root\n")
    assert "rhel.qemu.test" in fleet.ssh_config.read_text()


def test_kill_restart_keeps_the_hosts_files(fleet_factory):
    fleet = fleet_factory(1)
    host = fleet[0]
    host.write("/etc/pki/qemu/ca-cert.pem", "CA")
    with connect(fleet, host) as client:
        old_pid = host.pid
        host.kill()
        assert process_gone(old_pid)
        with pytest.raises((EOFError, OSError, paramiko.SSHException)):
            sh(client, "true")  # the session died with sshd
    with pytest.raises(paramiko.ssh_exception.NoValidConnectionsError):
        connect(fleet, host)
    host.restart()
    assert host.pid != old_pid
    with connect(fleet, host) as client:
        assert sh(client, "hostname -f; cat /etc/pki/qemu/ca-cert.pem") == (0, host.name + "\nCA")


def test_frozen_host_times_out_then_thaws(fleet_factory):
    fleet = fleet_factory(1)
    host = fleet[0]
    host.freeze()
    try:
        with pytest.raises((paramiko.SSHException, OSError)):
            connect(fleet, host, timeout=1.0)
    finally:
        host.thaw()
    with connect(fleet, host) as client:
        assert sh(client, "echo back") == (0, "back\n")


def test_remote_commands_are_captured_sftp_is_not(fleet_factory):
    fleet = fleet_factory(1)
    host = fleet[0]
    script = "cat > /tmp/x <<'EOF'\nline\nEOF\necho done"
    with connect(fleet, host) as client:
        assert sh(client, "echo one") == (0, "one\n")
        assert sh(client, script) == (0, "done\n")
        assert sh(client, "exit 3")[0] == 3
        client.open_sftp().listdir("/")
    assert host.commands() == ["echo one", script, "exit 3"]


def test_stop_kills_exactly_its_processes_and_removes_its_files(fleet_factory):
    fleet = fleet_factory(2)
    with connect(fleet, fleet[0]) as client:
        client.exec_command("sleep 600")  # a session process left running on purpose
        time.sleep(0.2)
        members = fleet[0]._members() + [fleet[0].anchor_pid]
        assert len(members) >= 3  # anchor, sshd, session(s), sleep
        pids = members + [h.pid for h in fleet] + [h.anchor_pid for h in fleet]
        fleet.stop()
    assert all(process_gone(pid) for pid in pids)
    assert not fleet.base.exists()
    fleet.stop()  # idempotent
