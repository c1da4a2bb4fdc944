"""Fake hypervisors reachable over real OpenSSH, for integration tests.

Each fake host is a real `sshd` on 127.0.0.1 with its own port, running in its own mount
and UTS namespaces, so that the tool under test meets real SSH, real SFTP and real file
modes while every host has its own `/etc` (an overlay: its own /etc/pki, /etc/libvirt, /etc/hosts,
and a user database and os-release of its distribution family, never this machine's),
its own hostname, its own empty /root, a private /run and /tmp.

A "namespace anchor" (`unshare ... sleep infinity`) holds the namespaces, so sshd can be
killed and started again (`nsenter` into the anchor) while the host keeps its files.
Every process of a host shares the anchor's mount namespace: that is how `kill` and
`stop` find exactly the processes a host owns (never by name).

On disk, `Fleet.base/NAME/` holds a host: sshd_config, its host key, sshd.log, the /etc
overlay's upper dir (etc.upper: only what changed), and commands.log, where a ForceCommand
wrapper records every command line a client runs over SSH (tests assert that no secret
ever appears in one) before running it with the user's shell; SFTP keeps working.
"""

from __future__ import annotations

import atexit
import os
import select
import shutil
import signal
import socket
import subprocess
import time
import weakref
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterable, Sequence

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

SSHD = "/usr/sbin/sshd"
SFTP_SERVER = "/usr/lib/openssh/sftp-server"
DEFAULT_QEMU_CONF = "# libvirt qemu.conf of a fake host (qemuca tests)\n"
TIMEOUT = 30.0  # generous: CI machines can be loaded

# Runs inside the new namespaces; $1 = host folder, $2 = host name, $3 = fleet base.
ANCHOR_SCRIPT = r"""
set -e
R=$1 NAME=$2 BASE=$3
mount -t overlay fakehost-etc -o "lowerdir=/etc,upperdir=$R/etc.upper,workdir=$R/etc.work" /etc
mount --bind "$R/home" /root
private() {  # a private tmpfs on $1 that still shows the fleet folder at its usual path
    s=$R/ns$1; mkdir -p "$s"
    mount -t tmpfs -o "mode=$2" fakehost "$s"
    case $BASE/ in "$1"/*) mkdir -p "$s${BASE#$1}"; mount --bind "$BASE" "$s${BASE#$1}";; esac
    mount --rbind "$s" "$1"
}
private /run 755
mkdir -m 755 /run/sshd
private /tmp 1777
hostname "$NAME"
echo ready
exec sleep infinity
"""

# sshd runs ForceCommand with the user's shell; the original exec request is logged
# NUL-terminated (commands may hold newlines), then run as sshd would have run it.
CAPTURE_SCRIPT = """#!/bin/sh
if [ -z "${{SSH_ORIGINAL_COMMAND+x}}" ]; then exec "${{SHELL:-/bin/sh}}" -l; fi
printf '%s\\0' "$SSH_ORIGINAL_COMMAND" >> '{log}'
exec "${{SHELL:-/bin/sh}}" -c "$SSH_ORIGINAL_COMMAND"
"""

SSHD_CONFIG = """\
ListenAddress 127.0.0.1:{port}
HostKey {root}/ssh_host_ed25519_key
PidFile none
UsePAM no
PermitRootLogin prohibit-password
PubkeyAuthentication yes
AuthorizedKeysFile {root}/authorized_keys
PasswordAuthentication no
KbdInteractiveAuthentication no
StrictModes no
UseDNS no
PrintMotd no
PrintLastLog no
MaxStartups 200
MaxSessions 100
LogLevel {loglevel}
Subsystem sftp {sftp}
ForceCommand {root}/capture.sh
"""


def _write(path: Path, data: str | bytes, mode: int = 0o644) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    os.chmod(path, mode)
    return path


def _ed25519() -> tuple[bytes, str]:
    """A new key: (OpenSSH private key file bytes, public key line)."""
    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                           serialization.PublicFormat.OpenSSH)
    return private, public.decode()


def _free_ports(n: int) -> list[int]:
    """n distinct free loopback ports (all sockets held open until all are chosen)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _listening_ports() -> set[int]:
    ports = set()
    with open("/proc/net/tcp") as f:
        for line in f.readlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[1].startswith("0100007F:"):
                ports.add(int(fields[1].split(":")[1], 16))
    return ports


def process_gone(pid: int) -> bool:
    """True once pid has exited (a zombie counts: the container's PID 1 reaps slowly)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except OSError:
        return True


# Each fake host has its own user database, like a real machine of that family, never a
# copy of this machine's: the suite must behave the same whatever groups the test machine
# has (a `qemu` group on a Debian machine once made deploy pick the wrong one).
# (passwd, group, os-release) per distribution family; "bare": no libvirt installed.
_BASE_USERS = ("root:x:0:0:root:/root:/bin/bash\n"
               "daemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin\n"
               "nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n")
_BASE_GROUPS = "root:x:0:\ndaemon:x:1:\nadm:x:4:\nnogroup:x:65534:\n"
DISTROS = {
    "debian": (_BASE_USERS + "sshd:x:100:65534::/run/sshd:/usr/sbin/nologin\n"
               "libvirt-qemu:x:64055:64055:Libvirt Qemu,,,:/var/lib/libvirt:/usr/sbin/nologin\n",
               _BASE_GROUPS + "kvm:x:104:libvirt-qemu\nlibvirt:x:108:\nlibvirt-qemu:x:64055:libvirt-qemu\n",
               'PRETTY_NAME="Debian GNU/Linux 12 (bookworm)"\nID=debian\nVERSION_ID="12"\n'),
    "rhel": (_BASE_USERS + "sshd:x:74:74:Privilege-separated SSH:/usr/share/empty.sshd:/sbin/nologin\n"
             "qemu:x:107:107:qemu user:/:/sbin/nologin\n",
             _BASE_GROUPS + "kvm:x:36:qemu\nsshd:x:74:\nqemu:x:107:\nlibvirt:x:986:\n",
             'NAME="Red Hat Enterprise Linux"\nID="rhel"\nID_LIKE="fedora"\nVERSION_ID="9.4"\n'),
    "bare": (_BASE_USERS + "sshd:x:100:65534::/run/sshd:/usr/sbin/nologin\n", _BASE_GROUPS,
             'NAME="Minimal"\nID=minimal\n'),
}


def _user_db(distro: str, extra_groups: Sequence[str]) -> dict[str, tuple[str, int]]:
    """The host's /etc user files: {name: (text, mode)}, with `extra_groups` added as
    `groupadd -r` would (the next free gid down from 999)."""
    passwd, group, os_release = DISTROS[distro]
    used = {int(line.split(":")[2]) for line in group.splitlines()}
    names = {line.split(":")[0] for line in group.splitlines()}
    gid = 999
    for name in (g for g in extra_groups if g not in names):
        while gid in used:
            gid -= 1
        used.add(gid)
        group += f"{name}:x:{gid}:\n"
    users = [line.split(":")[0] for line in passwd.splitlines()]
    groups = [line.split(":")[0] for line in group.splitlines()]
    return {"passwd": (passwd, 0o644), "group": (group, 0o644), "os-release": (os_release, 0o644),
            "shadow": ("".join(f"{u}:*:19000:0:99999:7:::\n" for u in users), 0o600),
            "gshadow": ("".join(f"{g}:*::\n" for g in groups), 0o600)}


class FakeHost:
    """One fake hypervisor. `pid` is its sshd; `anchor_pid` holds its namespaces."""

    def __init__(self, fleet: Fleet, name: str, port: int, distro: str, extra_groups: Sequence[str],
                 qemu_conf: str | None, loglevel: str):
        if distro not in DISTROS:
            raise ValueError(f"distro {distro!r}: one of {sorted(DISTROS)}")
        self.fleet, self.name, self.port = fleet, name, port
        self.root = fleet.base / name
        self.distro, self.extra_groups = distro, list(extra_groups)
        self.qemu_conf, self.loglevel = qemu_conf, loglevel
        self.host_key_line = ""
        self._anchor: subprocess.Popen | None = None
        self._sshd: subprocess.Popen | None = None
        self._mntns = ""

    # -- what a test uses -------------------------------------------------------------
    @property
    def pid(self) -> int:
        return self._sshd.pid if self._sshd else 0

    @property
    def anchor_pid(self) -> int:
        return self._anchor.pid if self._anchor else 0

    @property
    def prefix(self) -> list[str]:
        """Command prefix that runs a program inside this host (e.g. QEMU)."""
        return ["nsenter", "-t", str(self.anchor_pid), "-m", "-u", "--"]

    def path(self, host_path: str) -> Path:
        """The host's `host_path` as seen from the test (through /proc/ANCHOR/root)."""
        return Path(f"/proc/{self.anchor_pid}/root") / host_path.lstrip("/")

    def read(self, host_path: str) -> bytes:
        return self.path(host_path).read_bytes()

    def write(self, host_path: str, data: str | bytes, mode: int = 0o644) -> None:
        """Write a file on the host (parents created), e.g. to plant existing certs."""
        _write(self.path(host_path), data, mode)

    def stat(self, host_path: str) -> os.stat_result:
        return os.lstat(self.path(host_path))

    def owner(self, host_path: str) -> tuple[str, str]:
        """(user, group) names of a file, resolved with the host's own passwd/group."""
        st = self.stat(host_path)

        def name(db: str, ident: int) -> str:
            for line in self.read(db).decode().splitlines():
                parts = line.split(":")
                if len(parts) > 2 and parts[2] == str(ident):
                    return parts[0]
            return str(ident)
        return name("/etc/passwd", st.st_uid), name("/etc/group", st.st_gid)

    def run(self, argv: Sequence[str], input: bytes | None = None, check: bool = True,
            timeout: float = 30.0) -> subprocess.CompletedProcess:
        """Run argv inside the host (not over SSH: it is not captured)."""
        return subprocess.run(self.prefix + list(argv), input=input, capture_output=True,
                              check=check, timeout=timeout)

    def commands(self) -> list[str]:
        """Command lines clients ran over SSH, in order (SFTP sessions left out)."""
        log = self.root / "commands.log"
        if not log.exists():
            return []
        entries = log.read_bytes().decode(errors="replace").split("\0")[:-1]
        return [c for c in entries if c != SFTP_SERVER]

    def sshd_log(self) -> str:
        return (self.root / "sshd.log").read_text(errors="replace")

    def kill(self) -> None:
        """SIGKILL sshd and every process inside the host (its sessions, a QEMU run with
        `prefix`): a crashed host. Returns once all are really gone."""
        self._kill_members()

    def restart(self) -> None:
        """Start sshd again on the same port, with the host's files as they are."""
        self.kill()
        self._start_sshd()
        self._await_listening()

    def freeze(self) -> None:
        """SIGSTOP every process inside the host: a hung host (TCP connects, then
        nothing answers). thaw() resumes them."""
        self._signal_members(signal.SIGSTOP)

    def thaw(self) -> None:
        self._signal_members(signal.SIGCONT)

    def stop(self) -> None:
        """Kill everything in the host, the anchor too; the namespaces and mounts go."""
        # The members first, while the anchor still holds the namespace: once it is freed,
        # the kernel may give its number to a new namespace (another fleet's host), and
        # matching by that number would then kill a stranger. The anchor is our child,
        # killed through its handle.
        if self._mntns:
            self._kill_members()
        for proc in (self._sshd, self._anchor):
            if proc and proc.poll() is None:
                proc.kill()
            if proc:
                proc.wait(timeout=TIMEOUT)

    # -- start ------------------------------------------------------------------------
    def _prepare(self) -> None:
        """Write the host's folder: keys, sshd config, and its /etc overlay upper dir."""
        r, up = self.root, self.root / "etc.upper"
        (r / "etc.work").mkdir(parents=True)
        (r / "home").mkdir(mode=0o700)  # root's own home: not this machine's dotfiles
        private, self.host_key_line = _ed25519()
        _write(r / "ssh_host_ed25519_key", private, 0o600)
        _write(r / "ssh_host_ed25519_key.pub", self.host_key_line + "\n")
        _write(r / "authorized_keys", self.fleet.public_key + "\n", 0o600)
        _write(r / "capture.sh", CAPTURE_SCRIPT.format(log=r / "commands.log"), 0o755)
        _write(r / "sshd_config", SSHD_CONFIG.format(port=self.port, root=r, sftp=SFTP_SERVER,
                                                     loglevel=self.loglevel))
        short = self.name.split(".")[0]
        _write(up / "hostname", self.name + "\n")
        # Its own /etc/hosts, not the machine's (a minimal root may have none).
        _write(up / "hosts", f"127.0.0.1\tlocalhost\n127.0.1.1\t{self.name} {short}\n"
                             "::1\tlocalhost ip6-localhost ip6-loopback\n")
        for file, (text, mode) in _user_db(self.distro, self.extra_groups).items():
            _write(up / file, text, mode)
        if self.qemu_conf is not None:
            (up / "libvirt").mkdir(mode=0o755)
            _write(up / "libvirt" / "qemu.conf", self.qemu_conf, 0o600)

    def _start_anchor(self) -> None:
        with open(self.root / "anchor.log", "wb") as log:
            self._anchor = subprocess.Popen(
                ["unshare", "--mount", "--uts", "--propagation", "private", "--", "sh", "-c",
                 ANCHOR_SCRIPT, "anchor", str(self.root), self.name, str(self.fleet.base)],
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=log)

    def _await_anchor(self) -> None:
        with self._anchor.stdout as out:  # "ready", or EOF when the setup failed
            line = out.readline() if select.select([out], [], [], TIMEOUT)[0] else b""
        if not line and self._anchor.poll() is None:
            self._anchor.kill()
        if line.strip() != b"ready":
            rc = self._anchor.wait(timeout=TIMEOUT)
            how = f"killed by signal {-rc}" if rc < 0 else f"exit status {rc}"
            log = (self.root / "anchor.log").read_text(errors="replace").strip() or "no output"
            raise RuntimeError(f"{self.name}: namespace setup failed ({how}): {log}")
        self._mntns = os.readlink(f"/proc/{self.anchor_pid}/ns/mnt")
        if self._mntns == os.readlink("/proc/self/ns/mnt"):
            raise RuntimeError(f"{self.name}: no private mount namespace")

    def _start_sshd(self) -> None:
        with open(self.root / "sshd.log", "ab") as log:
            self._sshd = subprocess.Popen(
                self.prefix + [SSHD, "-D", "-e", "-f", str(self.root / "sshd_config")],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log)

    def _await_listening(self, deadline: float | None = None) -> None:
        deadline = deadline or time.monotonic() + TIMEOUT
        while self.port not in _listening_ports():
            if self._sshd.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{self.name}: sshd did not start:\n{self.sshd_log()}")
            time.sleep(0.01)

    # -- the host's processes ---------------------------------------------------------
    def _members(self) -> list[int]:
        """Every process in the host's mount namespace but the anchor."""
        pids = []
        for entry in os.listdir("/proc"):
            if entry.isdigit() and int(entry) != self.anchor_pid:
                try:
                    if os.readlink(f"/proc/{entry}/ns/mnt") == self._mntns:
                        pids.append(int(entry))
                except OSError:
                    pass  # exited, or a zombie
        return pids

    def _signal_members(self, sig: int) -> list[int]:
        pids = self._members()
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        return pids

    def _kill_members(self) -> None:
        deadline = time.monotonic() + TIMEOUT
        killed: set[int] = set()
        while True:  # again and again: a process may fork while we enumerate
            pids = self._signal_members(signal.SIGKILL)
            killed.update(pids)
            if not pids:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name}: processes survive SIGKILL: {pids}")
            time.sleep(0.005)
        if self._sshd and self._sshd.pid in killed:
            self._sshd.wait(timeout=TIMEOUT)  # our child: reap it
        while not all(process_gone(pid) for pid in killed):
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name}: processes not gone: {sorted(killed)}")
            time.sleep(0.005)


class Fleet:
    """Fake hosts sharing one client key, one ssh_config and one known_hosts.

    `base` belongs to the fleet: it is created (must not exist or be empty) and removed
    by `stop()`. Keep it short (unix socket paths) and outside /etc, /run."""

    def __init__(self, base: Path, loglevel: str = "VERBOSE"):
        self.base = Path(base).absolute()
        self.base.mkdir(parents=True, exist_ok=True)
        if any(self.base.iterdir()):
            raise ValueError(f"fleet base {self.base} is not empty")
        self.loglevel = loglevel
        self.hosts: list[FakeHost] = []
        self.identity = self.base / "id_ed25519"
        self.ssh_config = self.base / "ssh_config"
        self.known_hosts = self.base / "known_hosts"
        private, self.public_key = _ed25519()
        _write(self.identity, private, 0o600)
        _write(self.identity.with_suffix(".pub"), self.public_key + "\n")
        self._stopped = False
        _live.add(self)

    def __getitem__(self, key: str | int) -> FakeHost:
        if isinstance(key, int):
            return self.hosts[key]
        for host in self.hosts:
            if host.name == key:
                return host
        raise KeyError(key)

    def __iter__(self):
        return iter(self.hosts)

    def __len__(self) -> int:
        return len(self.hosts)

    def __enter__(self) -> Fleet:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def names(self) -> list[str]:
        return [h.name for h in self.hosts]

    def add_host(self, name: str, distro: str = "debian", extra_groups: Sequence[str] = (),
                 qemu_conf: str | None = DEFAULT_QEMU_CONF) -> FakeHost:
        """Start one more host. distro: its user database and os-release ("debian":
        libvirt-qemu, "rhel": qemu, "bare": no libvirt); extra_groups: more groups in its
        /etc/group; qemu_conf: text of /etc/libvirt/qemu.conf (None: the machine's own)."""
        return self.add_hosts([name], distro=distro, extra_groups=extra_groups, qemu_conf=qemu_conf)[0]

    def add_hosts(self, names: Iterable[str], distro: str = "debian", extra_groups: Sequence[str] = (),
                  qemu_conf: str | None = DEFAULT_QEMU_CONF) -> list[FakeHost]:
        """Start several hosts concurrently (each phase launches all, then waits all)."""
        names = list(names)
        clash = set(names) & set(self.names)
        if clash or len(set(names)) != len(names):
            raise ValueError(f"duplicate host names: {sorted(clash) or names}")
        new = [FakeHost(self, n, p, distro, extra_groups, qemu_conf, self.loglevel)
               for n, p in zip(names, _free_ports(len(names)))]
        self.hosts.extend(new)
        with ThreadPoolExecutor(8) as pool:  # file creation is the slow part here
            list(pool.map(FakeHost._prepare, new))
        for h in new:
            h._start_anchor()
        for h in new:
            h._await_anchor()
        for h in new:
            h._start_sshd()
        deadline = time.monotonic() + TIMEOUT
        for h in new:
            h._await_listening(deadline)
        self._write_client_files(self.ssh_config, self.known_hosts, by_alias=False)
        return new

    def write_client_files(self, directory: Path, by_alias: bool = False) -> tuple[Path, Path]:
        """Another (ssh_config, known_hosts) pair in `directory`. by_alias=True names the
        hosts in known_hosts by their alias (`host1.qemu.test KEY`) and sets HostKeyAlias
        in ssh_config, for a client that looks host keys up by name."""
        directory = Path(directory)
        paths = directory / "ssh_config", directory / "known_hosts"
        self._write_client_files(*paths, by_alias=by_alias)
        return paths

    def _write_client_files(self, config: Path, known: Path, by_alias: bool) -> None:
        blocks, keys = [], []
        for h in self.hosts:
            blocks.append(f"Host {h.name}\n    HostName 127.0.0.1\n    Port {h.port}\n"
                          f"    User root\n    IdentityFile {self.identity}\n"
                          f"    IdentitiesOnly yes\n    UserKnownHostsFile {known}\n"
                          f"    GlobalKnownHostsFile /dev/null\n"
                          f"    StrictHostKeyChecking yes\n    BatchMode yes\n"
                          + (f"    HostKeyAlias {h.name}\n" if by_alias else ""))
            keys.append(f"{h.name if by_alias else f'[127.0.0.1]:{h.port}'} {h.host_key_line}")
        _write(config, "\n".join(blocks))
        _write(known, "\n".join(keys) + "\n")

    def stop(self) -> None:
        """Kill exactly the processes of the fleet's hosts, then remove `base`."""
        if self._stopped:
            return
        self._stopped = True
        errors = []
        for h in self.hosts:
            try:
                h.stop()
            except Exception as e:  # keep stopping the others
                errors.append(e)
        _live.discard(self)
        if not errors:
            shutil.rmtree(self.base, ignore_errors=True)
        if errors:
            raise RuntimeError(f"fleet stop: {errors}")


def host_names(n: int) -> list[str]:
    return [f"host{i}.qemu.test" for i in range(1, n + 1)]


def start_fleet(n: int, base: Path, names: Sequence[str] | None = None, distro: str = "debian",
                extra_groups: Sequence[str] = (), qemu_conf: str | None = DEFAULT_QEMU_CONF,
                loglevel: str = "VERBOSE") -> Fleet:
    """Start n fake hosts (default names host1.qemu.test ... hostN.qemu.test)."""
    names = list(names) if names is not None else host_names(n)
    if len(names) != n:
        raise ValueError(f"{n} hosts but {len(names)} names")
    fleet = Fleet(base, loglevel=loglevel)
    try:
        fleet.add_hosts(names, distro=distro, extra_groups=extra_groups, qemu_conf=qemu_conf)
    except BaseException:
        fleet.stop()
        raise
    return fleet


_live: weakref.WeakSet[Fleet] = weakref.WeakSet()


@atexit.register
def _stop_live_fleets() -> None:
    """Last resort when a test run ends without its teardown (e.g. Ctrl-C)."""
    for fleet in list(_live):
        try:
            fleet.stop()
        except Exception:
            pass
