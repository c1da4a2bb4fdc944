"""qemuca.hosts.ssh against real OpenSSH sshd fake hosts: config, host keys, jumps, timeouts, run()."""

from __future__ import annotations

import os
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from qemuca.errors import EXIT_HOST_KEY, EXIT_REMOTE, HostKeyError, InvalidInput, RemoteError
from qemuca.hosts.known_hosts import fingerprint
from qemuca.hosts.remotefs import RemoteFS
from qemuca.hosts.ssh import command_line, connect
from qemuca.hosts.ssh_config import SshOptions
from tests.support.fixtures import fleet3, fleet_factory  # noqa: F401  (also works without conftest)
from tests.support.tools import require_tool

pytestmark = pytest.mark.sshd

HOSTILE = ["a b", "it's", 'say "hi"', "$(touch /tmp/pwned)", "`touch /tmp/pwned`", "; touch /tmp/pwned",
           "x\ny", "*", "-n", "", "\\", "$HOME", "a|b&c>d", "é"]


def opts(fleet, **kw) -> SshOptions:
    return SshOptions(ssh_config=str(fleet.ssh_config), allow_agent=False, **kw)


def host_fingerprint(host) -> str:
    """The host key's fingerprint as ssh-keygen prints it."""
    out = subprocess.run([require_tool("ssh-keygen"), "-l", "-E", "sha256", "-f",
                          str(host.root / "ssh_host_ed25519_key.pub")],
                         capture_output=True, text=True, check=True).stdout
    return out.split()[1]


def one_line_error(err, host_name: str, exit_code: int = EXIT_REMOTE) -> str:
    msg = str(err.value)
    assert msg.startswith(f"{host_name}: ") and "\n" not in msg and "Traceback" not in msg
    assert err.value.exit_code == exit_code
    return msg


# ---------------------------------------------------------------- connect


def test_connect_with_ssh_config_alias(fleet3):
    host = fleet3["host2.qemu.test"]
    with connect(host.name, opts(fleet3)) as conn:
        t = conn.target
        assert (t.hostname, t.port, t.user) == ("127.0.0.1", host.port, "root")
        assert t.identity_files[0] == str(fleet3.identity)
        assert conn.run(["hostname"]).stdout == host.name.encode() + b"\n"
        assert conn.sftp() is conn.sftp()
    assert not conn.transport.is_active()


def test_host_key_alias_is_the_known_hosts_name(fleet3, tmp_path):
    config, known = fleet3.write_client_files(tmp_path, by_alias=True)
    host = fleet3[0]
    with connect(host.name, SshOptions(ssh_config=str(config), allow_agent=False)) as conn:
        assert conn.target.known_hosts_name == host.name
        assert conn.run_command("hostname_f").text.strip() == host.name


def test_unknown_host_key_is_refused(fleet3, tmp_path):
    host, empty = fleet3[0], tmp_path / "known_hosts"
    empty.write_text("")
    with pytest.raises(HostKeyError) as err:
        connect(host.name, opts(fleet3, known_hosts=str(empty)))
    msg = one_line_error(err, host.name, EXIT_HOST_KEY)
    assert host_fingerprint(host) in msg
    assert f"[127.0.0.1]:{host.port} {host.host_key_line}" in msg
    assert empty.read_text() == ""


def test_changed_host_key_is_refused_even_with_accept_new(fleet3, tmp_path):
    host, impostor = fleet3[0], fleet3[1]
    known = tmp_path / "known_hosts"
    known.write_text(f"[127.0.0.1]:{host.port} {impostor.host_key_line}\n")
    for accept in (False, True):
        with pytest.raises(HostKeyError, match="CHANGED") as err:
            connect(host.name, opts(fleet3, known_hosts=str(known), accept_new_host_key=accept))
        msg = one_line_error(err, host.name, EXIT_HOST_KEY)
        assert host_fingerprint(host) in msg and host_fingerprint(impostor) in msg
    assert known.read_text() == f"[127.0.0.1]:{host.port} {impostor.host_key_line}\n"


def test_accept_new_adds_the_key_then_strict_connect_works(fleet3, tmp_path):
    host, known = fleet3[2], tmp_path / "ssh" / "known_hosts"
    with connect(host.name, opts(fleet3, known_hosts=str(known), accept_new_host_key=True)):
        pass
    assert known.read_text() == f"[127.0.0.1]:{host.port} {host.host_key_line}\n"
    assert oct(os.stat(known).st_mode & 0o777) == "0o600"
    with connect(host.name, opts(fleet3, known_hosts=str(known))) as conn:
        assert conn.run(["true"]).ok


def test_parallel_accept_new_records_every_host(fleet3, tmp_path):
    known = tmp_path / "known_hosts"

    def hello(name):
        with connect(name, opts(fleet3, known_hosts=str(known), accept_new_host_key=True)) as conn:
            return conn.run(["hostname"]).text.strip()

    with ThreadPoolExecutor(6) as pool:
        assert list(pool.map(hello, fleet3.names * 2)) == fleet3.names * 2
    assert sorted(known.read_text().splitlines()) == sorted(
        f"[127.0.0.1]:{h.port} {h.host_key_line}" for h in fleet3)


def test_authentication_failure_is_one_line(fleet3, tmp_path):
    keygen = require_tool("ssh-keygen")
    for name, passphrase in (("stranger", ""), ("locked", "secret")):
        subprocess.run([keygen, "-q", "-t", "ed25519", "-N", passphrase, "-f", str(tmp_path / name)], check=True)
    host = fleet3[0]
    config = tmp_path / "ssh_config"
    config.write_text(f"Host box\n HostName 127.0.0.1\n Port {host.port}\n User root\n"
                      f" IdentityFile {tmp_path}/stranger\n IdentityFile {tmp_path}/locked\n"
                      f" UserKnownHostsFile {fleet3.known_hosts}\n")
    with pytest.raises(RemoteError) as err:
        connect("box", SshOptions(ssh_config=str(config), allow_agent=False))
    msg = one_line_error(err, "box")
    assert "authentication failed as root" in msg and "locked is encrypted" in msg
    # The same host with an explicit identity (like ssh -i) gets in.
    with connect("box", SshOptions(ssh_config=str(config), allow_agent=False,
                                   identity_file=str(fleet3.identity))) as conn:
        assert conn.run(["id", "-u"]).stdout == b"0\n"
    with pytest.raises(InvalidInput, match="no such file"):
        connect("box", SshOptions(ssh_config=str(config), identity_file=str(tmp_path / "nope")))


# ---------------------------------------------------------------- ProxyJump


def hide_behind(jump, name: str) -> None:
    """Make `name` resolve to 127.0.0.1 on `jump` only: reachable only through it."""
    jump.write("/etc/hosts", f"127.0.0.1\t{name}\n" + jump.read("/etc/hosts").decode())


def test_proxyjump_through_one_host_and_a_chain(fleet_factory, tmp_path):
    fleet = fleet_factory(3)
    h1, h2, h3 = fleet
    hide_behind(h1, "hidden2.test")
    hide_behind(h2, "hidden3.test")
    known = tmp_path / "known_hosts"
    known.write_text(fleet.known_hosts.read_text() + f"[hidden2.test]:{h2.port} {h2.host_key_line}\n"
                     f"[hidden3.test]:{h3.port} {h3.host_key_line}\n")
    common = f" User root\n IdentityFile {fleet.identity}\n UserKnownHostsFile {known}\n"
    config = tmp_path / "ssh_config"
    config.write_text(
        f"Host behind\n HostName hidden2.test\n Port {h2.port}\n ProxyJump {h1.name}\n"
        f"Host deep\n HostName hidden3.test\n Port {h3.port}\n ProxyJump behind\n"
        f"Host deepchain\n HostName hidden3.test\n Port {h3.port}\n ProxyJump {h1.name},behind\n"
        f"Host bare\n HostName hidden3.test\n Port {h3.port}\n"
        f" ProxyJump root@127.0.0.1:{h1.port},root@hidden2.test:{h2.port}\n"
        f"Include {fleet.ssh_config}\nHost *\n{common}")
    o = SshOptions(ssh_config=str(config), allow_agent=False)
    for alias, expected in (("behind", h2), ("deep", h3), ("deepchain", h3), ("bare", h3)):
        with connect(alias, o) as conn:
            assert conn.run(["hostname"]).text.strip() == expected.name, alias
            jumps = [conn.via.transport] + ([conn.via.via.transport] if alias != "behind" else [])
        assert not any(t.is_active() for t in jumps)  # closing a connection closes its jumps
    # Without its jump host, "behind" is gone; the same sshd is still there directly.
    h1.kill()
    with pytest.raises(RemoteError) as err:
        connect("behind", o)
    assert one_line_error(err, "behind") == f"behind: via {h1.name}: connection refused"
    with connect(h2.name, o) as conn:
        assert conn.run(["hostname"]).text.strip() == h2.name


def test_proxycommand_from_config(fleet_factory, tmp_path):
    ssh = require_tool("ssh")
    fleet = fleet_factory(2)
    h1, h2 = fleet
    config = tmp_path / "ssh_config"
    config.write_text(f"Host via-cmd\n HostName 127.0.0.1\n Port {h2.port}\n"
                      f" ProxyCommand {ssh} -F {fleet.ssh_config} -W %h:%p {h1.name}\n"
                      f" User root\n IdentityFile {fleet.identity}\n"
                      f" UserKnownHostsFile {fleet.known_hosts}\n")
    logins = h1.sshd_log().count("Accepted publickey")
    with connect("via-cmd", SshOptions(ssh_config=str(config), allow_agent=False)) as conn:
        assert conn.run(["hostname"]).text.strip() == h2.name
    assert h1.sshd_log().count("Accepted publickey") == logins + 1  # the ssh -W went through h1


def test_jump_host_key_is_checked_too(fleet_factory, tmp_path):
    fleet = fleet_factory(2)
    h1, h2 = fleet
    known = tmp_path / "known_hosts"
    known.write_text(f"[127.0.0.1]:{h2.port} {h2.host_key_line}\n")  # h1's key missing
    config = tmp_path / "ssh_config"
    config.write_text(f"Host target\n HostName 127.0.0.1\n Port {h2.port}\n ProxyJump jump\n"
                      f"Host jump\n HostName 127.0.0.1\n Port {h1.port}\n"
                      f"Host *\n User root\n IdentityFile {fleet.identity}\n UserKnownHostsFile {known}\n")
    with pytest.raises(HostKeyError) as err:
        connect("target", SshOptions(ssh_config=str(config), allow_agent=False))
    assert str(err.value).startswith("jump: ") and host_fingerprint(h1) in str(err.value)
    assert f"[127.0.0.1]:{h1.port}" not in known.read_text()


def test_jump_that_cannot_reach_the_target(fleet_factory, tmp_path):
    fleet = fleet_factory(2)
    h1, h2 = fleet
    h2.kill()
    config = tmp_path / "ssh_config"
    config.write_text(f"Host target\n HostName 127.0.0.1\n Port {h2.port}\n ProxyJump {h1.name}\n"
                      f"Include {fleet.ssh_config}\n")
    with pytest.raises(RemoteError) as err:
        connect("target", SshOptions(ssh_config=str(config), allow_agent=False))
    assert f"cannot forward to 127.0.0.1:{h2.port}" in one_line_error(err, h1.name)


# ---------------------------------------------------------------- failures and timeouts


def test_connection_refused(fleet_factory):
    fleet = fleet_factory(1)
    host = fleet[0]
    host.kill()
    with pytest.raises(RemoteError) as err:
        connect(host.name, opts(fleet))
    assert one_line_error(err, host.name) == f"{host.name}: connection refused"


def test_frozen_host_times_out_at_the_connect_timeout(fleet_factory, tmp_path):
    fleet = fleet_factory(1)
    host = fleet[0]
    config = tmp_path / "ssh_config"
    config.write_text(f"Host {host.name}\n ConnectTimeout 1\nInclude {fleet.ssh_config}\n")
    host.freeze()
    try:
        for o in (opts(fleet, connect_timeout=0.5), SshOptions(ssh_config=str(config), allow_agent=False)):
            started = time.monotonic()
            with pytest.raises(RemoteError) as err:
                connect(host.name, o)
            elapsed = time.monotonic() - started
            limit = o.connect_timeout or 1
            assert one_line_error(err, host.name) == f"{host.name}: timed out after {limit:g}s"
            assert limit <= elapsed, elapsed  # waited the connect timeout, and said which
    finally:
        host.thaw()


def test_host_freezing_mid_session_times_out_run_and_sftp(fleet_factory):
    fleet = fleet_factory(1)
    host = fleet[0]
    with connect(host.name, opts(fleet, command_timeout=1)) as conn:
        fs = RemoteFS(conn)
        assert fs.exists("/etc/hostname")
        host.freeze()
        try:
            with pytest.raises(RemoteError) as err:
                conn.run(["true"])
            assert one_line_error(err, host.name).endswith("true: timed out after 1s")
            with pytest.raises(RemoteError) as err:
                fs.stat("/etc/hostname")
            assert "timed out after 1s" in one_line_error(err, host.name)
        finally:
            host.thaw()


def test_host_killed_mid_session_is_a_remote_error(fleet_factory):
    fleet = fleet_factory(1)
    host = fleet[0]
    with connect(host.name, opts(fleet)) as conn:
        host.kill()
        with pytest.raises(RemoteError) as err:
            conn.run(["true"])
        one_line_error(err, host.name)


# ---------------------------------------------------------------- run()


def test_run_returns_rc_stdout_stderr(fleet3):
    host = fleet3[0]
    with connect(host.name, opts(fleet3)) as conn:
        r = conn.run(["cat", "/nonexistent"])
        assert r.rc == 1 and r.stdout == b"" and b"No such file" in r.stderr
        assert conn.run(["id", "-u"]).stdout == b"0\n"
        with pytest.raises(RemoteError) as err:
            conn.run(["cat", "/nonexistent"], check=True)
        assert one_line_error(err, host.name) == \
            f"{host.name}: cat failed (exit 1): cat: /nonexistent: No such file or directory"
        group = conn.run_command("getent_group", group="libvirt-qemu", check=True).text
        assert group.startswith("libvirt-qemu:x:")


def test_stdin_is_passed_byte_for_byte(fleet3):
    data = os.urandom(1 << 20)
    with connect(fleet3[1].name, opts(fleet3)) as conn:
        assert conn.run(["cat"], stdin=data).stdout == data
        assert conn.run(["cat"], stdin=b"").stdout == b""


def test_hostile_arguments_arrive_as_one_literal_argument_each(fleet3):
    host = fleet3[0]
    argv = ["printf", "%s\\0", *HOSTILE]
    with connect(host.name, opts(fleet3)) as conn:
        out = conn.run(argv, check=True).stdout
    assert out.decode().split("\0")[:-1] == HOSTILE
    assert host.commands()[-1] == command_line(argv)  # what went over the wire
    assert not host.path("/tmp/pwned").exists()


def test_programs_outside_the_allowlist_never_leave_the_process(fleet3):
    host = fleet3[0]
    with connect(host.name, opts(fleet3)) as conn:
        before = host.commands()
        for argv in (["sh", "-c", "touch /tmp/pwned"], "touch /tmp/pwned", ["/usr/bin/touch", "/tmp/pwned"]):
            with pytest.raises(InvalidInput):
                conn.run(argv)
        assert host.commands() == before


def test_fingerprint_helper_agrees_with_server_key(fleet3):
    host = fleet3[0]
    with connect(host.name, opts(fleet3)) as conn:
        assert fingerprint(conn.transport.get_remote_server_key().asbytes()) == host_fingerprint(host)
