"""A real libvirtd (Debian 12: libvirt 9.0, monolithic) inside each fake host.

`Libvirtd(host, ...)` runs `/usr/sbin/libvirtd` in a started FakeHost's mount and UTS
namespaces (`host.prefix`), so the daemon reads the host's own /etc (qemu.conf as
`qemuca deploy` left it, /etc/pki/qemu, /etc/passwd, /etc/hosts) and announces the
host's name. Per host, all in `host.root/libvirt/`:

- private /var/lib/libvirt, /var/cache/libvirt, /var/log/libvirt and /run/libvirt:
  per-host folders bind-mounted inside the host's mount namespace (where the machine
  has no such directory, the parent gets a per-host overlay to hold the mount point:
  nothing is ever created on the machine itself);
- libvirtd.conf: its own host_uuid (libvirt refuses a migration between two daemons
  with the same one), unix socket only (no TCP), no auth on the socket (root only);
- a harness block appended to the host's /etc/libvirt/qemu.conf (keys libvirt reads
  first-wins: a host whose qemu.conf sets them earlier keeps its own value): no
  security driver, cgroups, namespaces or virtlogd; the host's own migration address
  (127.0.2.N: libvirt refuses 127.0.0.1) and port range; `migration_host` = the host's
  name, which every host of the set resolves to that address (/etc/hosts), so the URI
  the destination announces is tcp://NAME:PORT and QEMU's TLS name check is against
  the certificate's dNSName;
- QEMU runs as libvirt-qemu, Debian's build default, from the fake host's own user
  database (a RHEL-like host's qemu.conf names `user`/`group` "qemu" instead);
- a `systemctl` stand-in bind-mounted over /usr/bin/systemctl in the host, so that
  `qemuca deploy --restart` (`systemctl try-restart libvirtd` over SSH) restarts this
  daemon; `restart()` here does the same.

Only the QEMU driver is loaded (LIBVIRT_DRIVER_DIR): the network and nwfilter drivers
would touch the machine's firewall (the network namespace is the machine's). Guests
are TCG (`<domain type='qemu'>`); /dev/kvm, where the machine has one, is hidden in the
host behind an empty mode-0 file: with a /dev/kvm that QEMU could open but libvirt found
inaccessible to libvirt-qemu, libvirt 9.0 re-probed QEMU at every lookup ("KVM was
enabled when probing ..., but it is not available now"), ~4 s each, 36 s per guest start.
The QEMU capabilities the first daemon of a test run probes (`virsh domcapabilities`
right after its start) are copied into every later host's /var/cache/libvirt before its
start, so that no other daemon probes (libvirt still validates the entries itself).
"""

from __future__ import annotations

import atexit
import glob
import itertools
import os
import re
import shlex
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Iterable, Sequence

from tests.support.fakehosts import FakeHost, process_gone
from tests.support.tools import missing, require_tool

LIBVIRTD = "/usr/sbin/libvirtd"
VIRSH = "virsh"
QEMU_BINARY = "/usr/bin/qemu-system-x86_64"
QEMU_DRIVER = "libvirt_driver_qemu.so"  # in /usr/lib/<multiarch>/libvirt/connection-driver
QEMU_USER = "libvirt-qemu"  # Debian's build default (qemu.conf `user`/`group` unset)
TIMEOUT = 60.0  # generous: a loaded 2-core CI machine
PORTS_PER_HOST = 16
HARNESS_MARK = "# --- qemuca tests/support/libvirt.py harness settings ---"

# Per-host private directories: (folder under host.root/libvirt, path in the host)
PRIVATE_DIRS = (("lib", "/var/lib/libvirt"), ("cache", "/var/cache/libvirt"),
                ("log", "/var/log/libvirt"), ("run", "/run/libvirt"))

# Runs in the host once: $1 = host.root/libvirt; then pairs FOLDER TARGET.
MOUNT_SCRIPT = r"""
set -e
L=$1; shift
while [ $# -gt 0 ]; do
    src=$1 dst=$2; shift 2
    mkdir -p "$src"
    if [ ! -d "$dst" ]; then
        # The machine lacks $dst: overlay the nearest existing ancestor (per host), so
        # the mount point is made in the host's upper dir, never on the machine.
        top=$(dirname "$dst")
        while [ ! -d "$top" ]; do top=$(dirname "$top"); done
        ov=$L/overlay$(printf %s "$top" | tr / _)
        mkdir -p "$ov.upper" "$ov.work"
        mount -t overlay qemuca-libvirt -o "lowerdir=$top,upperdir=$ov.upper,workdir=$ov.work" "$top"
        mkdir -p "$dst"
    fi
    mount --bind "$src" "$dst"
done
mount --bind "$L/systemctl" /usr/bin/systemctl
if [ -e /dev/kvm ]; then
    # Guests here are TCG. A /dev/kvm that QEMU can open while libvirt finds it not
    # accessible for libvirt-qemu makes libvirt re-probe QEMU at every lookup (~4 s each).
    : > "$L/no-kvm"; chmod 0 "$L/no-kvm"
    mount --bind "$L/no-kvm" /dev/kvm
fi
"""

# The daemon's control script, used by Libvirtd.start()/restart() and by the systemctl
# stand-in alike. The daemon gets a clean environment whoever starts it (the test, or an
# SSH session of `qemuca deploy --restart`).
CTL_SCRIPT = r"""#!/bin/sh
# libvirtd of fake host {name}: ctl start|stop|restart|try-restart|is-active
PIDFILE=/run/libvirtd.pid
running() {{  # $1 has not exited (a zombie has: the container's PID 1 reaps slowly)
    [ -r "/proc/$1/stat" ] || return 1
    state=$(sed 's/.*) //' "/proc/$1/stat" 2>/dev/null | cut -d' ' -f1)
    [ -n "$state" ] && [ "$state" != Z ] && [ "$state" != X ]
}}
alive() {{  # sets $pid: the daemon of the pid file, if it runs
    pid=$(cat "$PIDFILE" 2>/dev/null) && [ -n "$pid" ] &&
        [ "$(readlink "/proc/$pid/exe" 2>/dev/null)" = {libvirtd} ] && running "$pid"
}}
start() {{
    alive && return 0
    rm -f "$PIDFILE"
    env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin LIBVIRT_DRIVER_DIR={drivers} \
        {libvirtd} --daemon --config {conf} --pid-file "$PIDFILE" </dev/null >>{stderr} 2>&1
}}
stop() {{  # SIGTERM, SIGKILL after 15 s; waits for exactly that PID
    alive || return 0
    kill -TERM "$pid"
    i=0
    while running "$pid"; do
        i=$((i + 1))
        if [ $i -eq 300 ]; then kill -KILL "$pid"; fi
        if [ $i -gt 1200 ]; then echo "libvirtd $pid does not exit" >&2; return 1; fi
        sleep 0.05
    done
}}
case $1 in
    start) start ;;
    stop) stop ;;
    restart) stop && start ;;
    try-restart|condrestart) if alive; then stop && start; fi ;;
    is-active) if alive; then echo active; else echo inactive; exit 3; fi ;;
    *) echo "usage: $0 start|stop|restart|try-restart|is-active" >&2; exit 2 ;;
esac
"""

# Enough of systemctl for qemuca (try-restart, is-active) on unit libvirtd; the calls
# are logged to host.root/libvirt/systemctl.log.
SYSTEMCTL_SCRIPT = r"""#!/bin/sh
# systemctl stand-in of fake host {name} (tests/support/libvirt.py)
printf '%s\n' "$*" >> {log}
while [ $# -gt 0 ]; do
    case $1 in -*) shift ;; *) break ;; esac
done
verb=$1; unit=${{2%.service}}
case $unit in
    libvirtd) exec {ctl} "$verb" ;;
    virtqemud) echo "Unit virtqemud.service could not be found." >&2; exit 4 ;;
    *) echo "systemctl stand-in: unit '$unit' not handled" >&2; exit 1 ;;
esac
"""

LIBVIRTD_CONF = """\
# libvirtd of fake host {name} (tests/support/libvirt.py)
host_uuid = "{host_uuid}"
listen_tls = 0
listen_tcp = 0
unix_sock_group = "root"
unix_sock_ro_perms = "0700"
unix_sock_rw_perms = "0700"
auth_unix_ro = "none"
auth_unix_rw = "none"
log_level = {log_level}
log_outputs = "1:file:{log}"
{log_filters}"""

QEMU_CONF_BLOCK = """
{mark}
security_driver = "none"
cgroup_controllers = [ ]
stdio_handler = "file"
namespaces = [ ]
migration_address = "{address}"
migration_host = "{migration_host}"
migration_port_min = {port_min}
migration_port_max = {port_max}
"""

GUEST_XML = """\
<domain type='qemu' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>
  <name>{name}</name>
  <memory unit='MiB'>{memory_mib}</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type></os>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>restart</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>{emulator}</emulator>
    <controller type='usb' model='none'/>
    <memballoon model='none'/>{disk}
  </devices>{extra}
</domain>
"""
DISK_XML = """
    <disk type='file' device='disk'>
      <driver name='qemu' type='raw'/>
      <source file='{path}'/>
      <target dev='vda' bus='virtio'/>
    </disk>"""
# A file QEMU loads into guest RAM at 16 MiB (its loader device), to find on the wire.
RAM_MARKER_XML = """
  <qemu:commandline>
    <qemu:arg value='-device'/>
    <qemu:arg value='loader,file={path},addr=0x1000000,force-raw=on'/>
  </qemu:commandline>"""

_addresses = itertools.count(1)
_caps_lock = threading.Lock()
_caps_cache: Path | None = None


def qemu_driver() -> str:
    """libvirt's QEMU driver module ('' when libvirt-daemon-driver-qemu is missing)."""
    found = sorted(glob.glob(f"/usr/lib/*/libvirt/connection-driver/{QEMU_DRIVER}"))
    return found[0] if found else ""


def require_libvirt_tools() -> None:
    """libvirtd, its QEMU driver, virsh and QEMU (fail under CI=true, else skip)."""
    require_tool("libvirtd", LIBVIRTD)
    if not qemu_driver():
        missing(f"{QEMU_DRIVER} (Debian package libvirt-daemon-driver-qemu)")
    require_tool(VIRSH)
    require_tool("qemu-system-x86_64", QEMU_BINARY)


def _next_address() -> tuple[str, int]:
    """A loopback address other than 127.0.0.1 (127.0.2.1, 127.0.2.2, ...) and the
    first port of a migration port range, distinct within this test run."""
    n = next(_addresses) - 1
    address = f"127.0.{2 + (n // 250) % 250}.{1 + n % 250}"
    return address, 49152 + (n % 900) * PORTS_PER_HOST


def _caps_dir() -> Path:
    """The QEMU capabilities cache shared by the run's daemons (libvirt validates an
    entry itself: QEMU's and libvirtd's ctime, the kernel, the microcode)."""
    global _caps_cache
    if _caps_cache is None:
        _caps_cache = Path(tempfile.mkdtemp(prefix="qemuca-libvirt-caps-"))
        atexit.register(shutil.rmtree, _caps_cache, True)
    return _caps_cache


class Libvirtd:
    """The libvirtd of one fake host. `setup()` once (start() calls it), then
    start() / restart() / stop(); `uri` is for virsh on the test machine."""

    def __init__(self, host: FakeHost, address: str | None = None, port_min: int | None = None,
                 announce: str = "name", log_level: int = 3, log_filters: str = ""):
        """announce: qemu.conf migration_host, the host part of the URI the daemon gives
        as a destination (and so QEMU's TLS name check without --tls-destination):
        "name" (the host's name, resolved by every host to `address`), "address", or
        any string. log_level: libvirt's (1 debug .. 4 error) for messages no filter in
        `log_filters` (libvirtd.conf syntax, e.g. "2:qemu.qemu_monitor") matches."""
        if address is None or port_min is None:
            auto_address, auto_port = _next_address()
            address = address or auto_address
            port_min = port_min or auto_port
        self.host, self.address, self.port_min = host, address, port_min
        self.port_max = port_min + PORTS_PER_HOST - 1
        self.migration_host = {"name": host.name, "address": address}.get(announce, announce)
        self.host_uuid = str(uuid.uuid4())
        self.log_level, self.log_filters = log_level, log_filters
        self.dir = host.root / "libvirt"
        self.log = host.root / "libvirtd.log"
        self._ready = False

    # -- what a test uses -------------------------------------------------------------
    @property
    def name(self) -> str:
        return self.host.name

    @property
    def socket(self) -> Path:
        """The daemon's read-write socket as the test machine sees it."""
        return self.dir / "run" / "libvirt-sock"

    @property
    def uri(self) -> str:
        return f"qemu+unix:///system?socket={self.socket}"

    @property
    def pid(self) -> int:
        """The running daemon's PID (its pid file), 0 when not running."""
        try:
            pid = int(self.host.path("/run/libvirtd.pid").read_text().strip())
        except (OSError, ValueError):
            return 0
        return 0 if process_gone(pid) or not self._is_ours(pid, LIBVIRTD) else pid

    def virsh(self, *args: str, check: bool = False, timeout: float = TIMEOUT,
              input: str | None = None) -> subprocess.CompletedProcess:
        """`virsh -c URI ARGS` on the test machine (text output)."""
        return subprocess.run([VIRSH, "-q", "-c", self.uri, *args], capture_output=True, text=True,
                              check=check, timeout=timeout, input=input,
                              env={**os.environ, "LC_ALL": "C"})

    def log_text(self) -> str:
        parts = [p.read_text(errors="replace") for p in (self.log, self.dir / "libvirtd.stderr")
                 if p.exists()]
        return "\n".join(parts)

    def qemu_log(self, domain: str) -> str:
        p = self.dir / "log" / "qemu" / f"{domain}.log"
        return p.read_text(errors="replace") if p.exists() else ""

    def systemctl_calls(self) -> list[str]:
        p = self.dir / "systemctl.log"
        return p.read_text().splitlines() if p.exists() else []

    # -- set up -----------------------------------------------------------------------
    def setup(self, hosts_entries: Sequence[tuple[str, str]] = ()) -> None:
        """Private dirs, configuration, the libvirt-qemu user, the systemctl stand-in,
        and /etc/hosts lines (address, name) for this host and `hosts_entries`."""
        if self._ready:
            if hosts_entries:
                self.write_hosts(hosts_entries)
            return
        d = self.dir
        d.mkdir(exist_ok=True)
        ctl = d / "ctl"
        (d / "drivers").mkdir(exist_ok=True)
        os.symlink(qemu_driver(), d / "drivers" / QEMU_DRIVER)
        (d / "libvirtd.conf").write_text(LIBVIRTD_CONF.format(
            name=self.name, host_uuid=self.host_uuid, log=self.log, log_level=self.log_level,
            log_filters=f'log_filters = "{self.log_filters}"\n' if self.log_filters else ""))
        ctl.write_text(CTL_SCRIPT.format(
            name=self.name, libvirtd=LIBVIRTD, drivers=shlex.quote(str(d / "drivers")),
            conf=shlex.quote(str(d / "libvirtd.conf")), stderr=shlex.quote(str(d / "libvirtd.stderr"))))
        (d / "systemctl").write_text(SYSTEMCTL_SCRIPT.format(
            name=self.name, ctl=shlex.quote(str(ctl)), log=shlex.quote(str(d / "systemctl.log"))))
        os.chmod(ctl, 0o755)
        os.chmod(d / "systemctl", 0o755)
        args = [str(d)]
        for folder, target in PRIVATE_DIRS:
            args += [str(d / folder), target]
        self.host.run(["sh", "-c", MOUNT_SCRIPT, "mount-libvirt", *args], timeout=TIMEOUT)
        self._add_build_default_user()
        self._append_qemu_conf()
        self.write_hosts(hosts_entries)
        self._ready = True

    def write_hosts(self, entries: Iterable[tuple[str, str]]) -> None:
        """/etc/hosts with `address name short` for this host and `entries`; earlier
        lines naming any of them (the fake host's 127.0.1.1 line) are dropped, so a name
        resolves to exactly its migration address."""
        entries = dict([(self.name, self.address)] + [(n, a) for a, n in entries])
        names = set(entries) | {n.split(".")[0] for n in entries}
        kept = [line for line in self.host.read("/etc/hosts").decode().splitlines()
                if not names & set(line.split("#")[0].split()[1:])]
        lines = [f"{a}\t{n} {n.split('.')[0]}" for n, a in entries.items()]
        self.host.write("/etc/hosts", "\n".join(kept + lines) + "\n")

    def _add_build_default_user(self) -> None:
        """Debian's libvirtd looks up its build default user (libvirt-qemu) at start even
        when qemu.conf names another: a RHEL-like fake host (whose own libvirt would be
        built with qemu:qemu) gets that user too, and names user/group in qemu.conf."""
        passwd = self.host.read("/etc/passwd").decode()
        if any(line.split(":")[0] == QEMU_USER for line in passwd.splitlines()):
            return
        group = self.host.read("/etc/group").decode()
        self.host.write("/etc/passwd", passwd + f"{QEMU_USER}:x:64055:64055::/var/lib/libvirt:/sbin/nologin\n")
        self.host.write("/etc/group", group + f"{QEMU_USER}:x:64055:\n")

    def _append_qemu_conf(self) -> None:
        path = "/etc/libvirt/qemu.conf"
        p = self.host.path(path)
        text = p.read_text() if p.exists() else ""
        if HARNESS_MARK in text:
            return
        block = QEMU_CONF_BLOCK.format(mark=HARNESS_MARK, address=self.address,
                                       migration_host=self.migration_host,
                                       port_min=self.port_min, port_max=self.port_max)
        if p.exists():
            with open(p, "a") as f:
                f.write(("" if text.endswith("\n") or not text else "\n") + block)
        else:
            self.host.write(path, block, mode=0o600)

    # -- start / stop -----------------------------------------------------------------
    def start(self, timeout: float = TIMEOUT) -> None:
        """Start the daemon (setup first if needed); returns once it answers virsh."""
        self.setup()
        self._seed_caps()
        self._ctl("start", timeout)
        self.wait_ready(timeout)
        if not any(_caps_dir().iterdir()):  # make libvirt probe QEMU now, for the cache
            self.virsh("domcapabilities", "--virttype", "qemu", "--emulatorbin", QEMU_BINARY,
                       "--arch", "x86_64", "--machine", "pc", check=True, timeout=timeout)
            self._save_caps()

    def restart(self, timeout: float = TIMEOUT) -> None:
        """Stop the daemon (its guests keep running, as with systemd's KillMode=process)
        and start it again, re-reading qemu.conf: what `systemctl restart` does."""
        self._ctl("restart", timeout)
        self.wait_ready(timeout)

    def wait_ready(self, timeout: float = TIMEOUT) -> None:
        start = time.monotonic()
        deadline = start + timeout
        while True:
            if self.pid and self.socket.exists():
                r = self.virsh("uri", timeout=timeout)
                if r.returncode == 0:
                    return
            if (not self.pid and time.monotonic() - start > 10) or time.monotonic() > deadline:
                raise RuntimeError(f"{self.name}: libvirtd not ready (pid {self.pid or 'gone'})\n{self.log_text()}")
            time.sleep(0.05)

    def stop(self) -> None:
        """Kill exactly this host's daemon and the QEMU processes in the host."""
        pid = self.pid
        victims = [pid] if pid else []
        if pid:
            os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + 10
            while not process_gone(pid) and time.monotonic() < deadline:
                time.sleep(0.02)
        victims += self.qemu_pids()
        for p in victims:
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + TIMEOUT
        while not all(process_gone(p) for p in victims):
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name}: not gone: {victims}")
            time.sleep(0.02)

    def _ctl(self, verb: str, timeout: float) -> None:
        r = self.host.run([str(self.dir / "ctl"), verb], check=False, timeout=timeout)
        if r.returncode != 0:
            raise RuntimeError(f"{self.name}: libvirtd {verb} failed ({r.returncode}): "
                               f"{r.stderr.decode(errors='replace')}\n{self.log_text()}")

    # -- the host's processes ---------------------------------------------------------
    def _is_ours(self, pid: int, exe: str, cmdline_has: bytes = b"") -> bool:
        """pid runs `exe` inside this host (its mount namespace)."""
        try:
            if os.readlink(f"/proc/{pid}/exe") != exe or \
                    os.readlink(f"/proc/{pid}/ns/mnt") != os.readlink(f"/proc/{self.host.anchor_pid}/ns/mnt"):
                return False
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                return cmdline_has in f.read()
        except OSError:
            return False

    def qemu_pids(self) -> list[int]:
        """QEMU processes libvirt runs in this host (guests, capability probes: their
        command lines name /var/lib/libvirt/qemu/; a QEMU of qemu_migration.py does not)."""
        return sorted(int(e) for e in os.listdir("/proc")
                      if e.isdigit() and not process_gone(int(e))
                      and self._is_ours(int(e), QEMU_BINARY, b"/var/lib/libvirt/qemu/"))

    def domain_pid(self, domain: str) -> int:
        """The PID of a running guest's QEMU (libvirt's pid file)."""
        pidfile = self.dir / "run" / "qemu" / f"{domain}.pid"
        return int(pidfile.read_text().strip())

    # -- capabilities cache -----------------------------------------------------------
    def _seed_caps(self) -> None:
        with _caps_lock:
            src = _caps_dir()
            dst = self.dir / "cache" / "qemu" / "capabilities"
            if any(src.iterdir()) and not (dst.exists() and any(dst.iterdir())):
                dst.mkdir(parents=True, exist_ok=True)
                for f in src.iterdir():
                    shutil.copy2(f, dst / f.name)

    def _save_caps(self) -> None:
        with _caps_lock:
            src = self.dir / "cache" / "qemu" / "capabilities"
            if src.is_dir() and not any(_caps_dir().iterdir()):
                for f in src.iterdir():
                    shutil.copy2(f, _caps_dir() / f.name)

    # -- guests -----------------------------------------------------------------------
    def create_guest(self, name: str = "guest1", memory_mib: int = 32, disk: str | None = None,
                     ram_marker: str | None = None) -> subprocess.CompletedProcess:
        """Start a transient guest (TCG, no NIC, no display) with `virsh create`; `disk`: a
        raw image path in the host; `ram_marker`: a file (in every host the guest goes to)
        that QEMU loads into the guest's RAM."""
        xml = self.dir / f"{name}.xml"
        xml.write_text(GUEST_XML.format(
            name=name, memory_mib=memory_mib, emulator=QEMU_BINARY,
            disk=DISK_XML.format(path=disk) if disk else "",
            extra=RAM_MARKER_XML.format(path=ram_marker) if ram_marker else ""))
        return self.virsh("create", str(xml))

    def domains(self) -> dict[str, str]:
        """name -> state of every domain (`virsh list --all`)."""
        r = self.virsh("list", "--all", check=True)
        out = {}
        for line in r.stdout.splitlines():
            m = re.match(r"\s*(\S+)\s+(\S+)\s+(.+?)\s*$", line)
            if m:
                out[m.group(2)] = m.group(3)
        return out


def start_libvirtds(hosts: Sequence[FakeHost], **kw) -> list[Libvirtd]:
    """One started Libvirtd per host; every host's /etc/hosts names all of them."""
    daemons = [Libvirtd(h, **kw) for h in hosts]
    entries = [(d.address, d.name) for d in daemons]
    for d in daemons:
        d.setup(entries)
    # The first start fills the shared capabilities cache; the others then reuse it.
    if daemons:
        daemons[0].start()
    for d in daemons[1:]:
        d._seed_caps()
        d._ctl("start", TIMEOUT)
    for d in daemons[1:]:
        d.wait_ready()
    return daemons


def migrate(src: Libvirtd, dst: Libvirtd, domain: str, *extra: str, tls: bool = True,
            timeout: float = 120.0) -> subprocess.CompletedProcess:
    """`virsh -c SRC migrate --live [--tls] DOMAIN DST_URI` (non-p2p: virsh drives both
    daemons; the destination announces tcp://its-name:port)."""
    args = ["migrate", "--live", *(["--tls"] if tls else []), *extra, domain, dst.uri]
    return src.virsh(*args, timeout=timeout)
