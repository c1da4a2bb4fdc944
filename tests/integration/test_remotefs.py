"""qemuca.hosts.remotefs.RemoteFS on real fake hosts (OpenSSH sftp-server), checked from the host's side."""

from __future__ import annotations

import os
import stat
import threading

import pytest

from qemuca.errors import RemoteError
from qemuca.hosts.remotefs import RemoteFS
from qemuca.hosts.ssh import connect
from qemuca.hosts.ssh_config import SshOptions
from tests.support.fakehosts import SFTP_SERVER
from tests.support.fixtures import fleet_factory  # noqa: F401  (also works without conftest)

pytestmark = pytest.mark.sshd

DIR = "/etc/pki/qemu"


@pytest.fixture
def host_fs(fleet_factory):
    """(fake host, RemoteFS on it, its libvirt-qemu gid), with /etc/pki/qemu present."""
    fleet = fleet_factory(1)
    host = fleet[0]
    conn = connect(host.name, SshOptions(ssh_config=str(fleet.ssh_config), allow_agent=False))
    fs = RemoteFS(conn)
    fs.makedirs(DIR)
    gid = int(conn.run_command("getent_group", group="libvirt-qemu", check=True).text.split(":")[2])
    yield host, fs, gid
    conn.close()


def leftovers(host, directory: str = DIR) -> list:
    return [n for n in os.listdir(host.path(directory)) if "qemuca-tmp" in n]


def test_write_atomic_creates_the_file_with_final_mode_and_owner(host_fs):
    host, fs, gid = host_fs
    path = f"{DIR}/server-key.pem"
    fs.write_atomic(path, b"secret key\n", 0o640, uid=0, gid=gid)
    st = host.stat(path)
    assert stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o640
    assert host.owner(path) == ("root", "libvirt-qemu")
    assert host.read(path) == b"secret key\n" and fs.read_bytes(path) == b"secret key\n"
    got = fs.stat(path)
    assert (got.perms, got.uid, got.gid, got.size, got.is_file) == (0o640, 0, gid, 11, True)
    assert leftovers(host) == []
    # Replacing: new inode (a rename), new mode, only the group given.
    before = st.st_ino
    fs.write_atomic(path, b"new", 0o600, gid=0)
    st = host.stat(path)
    assert st.st_ino != before and host.read(path) == b"new"
    assert (stat.S_IMODE(st.st_mode), st.st_gid) == (0o600, 0)
    assert leftovers(host) == []


def test_write_atomic_sequence_seen_by_the_sftp_server(host_fs):
    """The real server's log: O_EXCL at 0600, mode and owner set (one request, before any
    byte), data, fsync, rename."""
    host, fs, gid = host_fs
    log = host.root / "sftp.log"
    wrapper = host.root / "sftp-logged.sh"
    wrapper.write_text(f"#!/bin/sh\nexec {SFTP_SERVER} -e -l DEBUG1 2>>{log}\n")
    wrapper.chmod(0o755)
    config = host.root / "sshd_config"
    config.write_text(config.read_text().replace(f"sftp {SFTP_SERVER}", f"sftp {wrapper}"))
    host.restart()
    conn = connect(host.name, SshOptions(ssh_config=str(host.fleet.ssh_config), allow_agent=False))
    with conn:
        RemoteFS(conn).write_atomic(f"{DIR}/ca-cert.pem", b"x" * 100, 0o644, uid=0, gid=gid)
    events = []
    for line in log.read_text().splitlines():
        for word in ("open", "set", "write", "fsync", "close", "posix-rename"):
            if line.startswith(word + " ") or f": {word} " in line:
                events.append(line)
    tmp = events[0].split('"')[1]
    assert os.path.dirname(tmp) == DIR and "qemuca-tmp" in tmp
    assert events[0] == f'open "{tmp}" flags WRITE,CREATE,EXCL mode 0600'
    assert events[1:3] == [f'set "{tmp}" mode 0644', f'set "{tmp}" owner 0 group {gid}']
    assert events[3].startswith("debug1: request ") and f'write "{tmp}"' in events[3]
    assert events[4:6] == [f'fsync "{tmp}"', f'close "{tmp}" bytes read 0 written 100']
    assert events[6] == f'posix-rename old "{tmp}" new "{DIR}/ca-cert.pem"'


def test_failed_write_leaves_no_temp_file(host_fs):
    host, fs, _ = host_fs
    fs.makedirs(f"{DIR}/occupied")
    host.write(f"{DIR}/occupied/file", "x")
    with pytest.raises(OSError, match=f"{host.name}:{DIR}/occupied"):
        fs.write_atomic(f"{DIR}/occupied", b"data", 0o644)  # a directory is in the way
    with pytest.raises(FileNotFoundError) as err:
        fs.write_atomic(f"{DIR}/missing/ca-cert.pem", b"data", 0o644)
    assert err.value.filename == f"{host.name}:{DIR}/missing/ca-cert.pem"
    assert leftovers(host) == [] and leftovers(host, f"{DIR}/occupied") == []


def test_readers_never_see_a_missing_or_partial_file_or_link(host_fs):
    host, fs, _ = host_fs
    path, link = f"{DIR}/server-cert.pem", f"{DIR}/client-cert.pem"
    versions = [bytes([65 + i]) * 20_000 for i in range(10)]
    fs.write_atomic(path, versions[0], 0o644)
    fs.symlink_atomic("server-cert.pem", link)
    seen, stop = [], threading.Event()

    def reader():
        while not stop.is_set():
            try:
                seen.append(host.path(path).read_bytes())
                seen.append(os.readlink(host.path(link)).encode())
            except OSError as e:
                seen.append(e)

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for i, data in enumerate(versions * 2):
            fs.write_atomic(path, data, 0o644)
            fs.symlink_atomic("server-cert.pem" if i % 2 else "other.pem", link)
    finally:
        stop.set()
        thread.join()
    allowed = set(versions) | {b"server-cert.pem", b"other.pem"}
    assert len(seen) > 10 and all(s in allowed for s in seen), [s for s in seen if s not in allowed][:3]
    assert leftovers(host) == []


def test_stat_readlink_listdir(host_fs):
    host, fs, _ = host_fs
    host.write(f"{DIR}/b.pem", "b", 0o600)
    fs.symlink_atomic("b.pem", f"{DIR}/a.pem")
    fs.symlink_atomic("gone.pem", f"{DIR}/dangling.pem")
    assert fs.listdir(DIR) == ["a.pem", "b.pem", "dangling.pem"]
    assert fs.readlink(f"{DIR}/a.pem") == "b.pem"
    assert fs.stat(f"{DIR}/a.pem").is_file and fs.stat(f"{DIR}/a.pem", follow=False).is_link
    assert fs.stat(f"{DIR}/dangling.pem") is None and fs.exists(f"{DIR}/dangling.pem")
    assert fs.stat(f"{DIR}/nothing") is None and not fs.exists(f"{DIR}/nothing")
    assert fs.stat(DIR).is_dir
    with pytest.raises(OSError):
        fs.readlink(f"{DIR}/b.pem")
    with pytest.raises(FileNotFoundError):
        fs.read_bytes(f"{DIR}/nothing")
    fs.remove(f"{DIR}/dangling.pem")
    assert not os.path.lexists(host.path(f"{DIR}/dangling.pem"))


def test_makedirs_gives_every_new_directory_the_mode(host_fs):
    host, fs, _ = host_fs
    old = stat.S_IMODE(host.stat("/etc/pki").st_mode)
    fs.makedirs("/etc/pki/libvirt-migrate/private/deep", 0o750)
    for d in ("libvirt-migrate", "libvirt-migrate/private", "libvirt-migrate/private/deep"):
        d = f"/etc/pki/{d}"
        assert stat.S_IMODE(host.stat(d).st_mode) == 0o750, d
    assert stat.S_IMODE(host.stat("/etc/pki").st_mode) == old  # existing ones untouched
    fs.makedirs("/etc/pki/libvirt-migrate/private", 0o700)  # exists: no change, no error
    assert stat.S_IMODE(host.stat("/etc/pki/libvirt-migrate/private").st_mode) == 0o750
    host.write("/etc/pki/afile", "x")
    with pytest.raises(FileExistsError):
        fs.makedirs("/etc/pki/afile")


def test_rmtree_does_not_follow_links(host_fs):
    host, fs, _ = host_fs
    host.write("/etc/pki/keep/precious", "keep")
    host.write(f"{DIR}/old/a/b/file", "x")
    os.symlink("/etc/pki/keep", host.path(f"{DIR}/old/a/link"))
    fs.rmtree(f"{DIR}/old")
    assert not os.path.lexists(host.path(f"{DIR}/old"))
    assert host.read("/etc/pki/keep/precious") == b"keep"
    with pytest.raises(NotADirectoryError):
        fs.rmtree("/etc/pki/keep/precious")
    with pytest.raises(FileNotFoundError):
        fs.rmtree(f"{DIR}/old")


def test_chown_and_chmod(host_fs):
    host, fs, gid = host_fs
    host.write(f"{DIR}/t.pem", "t", 0o600)
    fs.symlink_atomic("t.pem", f"{DIR}/l.pem")
    fs.chown(f"{DIR}/l.pem", 0, gid)  # the link itself, like lchown
    assert host.stat(f"{DIR}/l.pem").st_gid == gid and host.stat(f"{DIR}/t.pem").st_gid == 0
    fs.chown(f"{DIR}/t.pem", 0, gid)
    fs.chmod(f"{DIR}/t.pem", 0o640)
    assert host.owner(f"{DIR}/t.pem") == ("root", "libvirt-qemu")
    assert stat.S_IMODE(host.stat(f"{DIR}/t.pem").st_mode) == 0o640


def test_lost_connection_is_a_remote_error(host_fs):
    host, fs, _ = host_fs
    host.kill()
    with pytest.raises(RemoteError, match=f"^{host.name}: "):
        fs.read_bytes("/etc/hostname")
