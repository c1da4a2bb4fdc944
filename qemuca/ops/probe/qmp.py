"""A throwaway QEMU on a host, driven over QMP on its own SSH exec channel.

Why QMP over the SSH exec channel (`-qmp stdio`): no socket file, no port, nothing on
the host's disk, and the channel is authenticated by SSH. The PID, needed to kill a hung
QEMU, comes from QEMU itself (an iothread's thread id -> /proc/TID/status Tgid), so no
pidfile either: the probe writes nothing on the hosts.

Why QEMU always ends: it runs as
`setpriv --pdeathsig KILL -- timeout -s KILL N setpriv --pdeathsig KILL -- QEMU ...`.
`timeout` bounds it; the parent-death signals chain it to the SSH session, so a lost
connection (sshd's session process exits) kills `timeout` and then QEMU; the normal end
is QMP `quit`, then `kill -KILL PID` (checked against our marker in /proc/PID/cmdline).
"""

from __future__ import annotations

import json
import re
import secrets
import threading
import time
from typing import Dict, List, Optional, Sequence, Tuple

from qemuca.errors import EXIT_INTERRUPTED, NotFound, QemucaError, RemoteError
from qemuca.hosts.remotefs import RemoteFS
from qemuca.hosts.ssh import Connection, ExecChannel
from qemuca.names import host_port

MAX_BANDWIDTH = 2 ** 62  # bytes/s: unlimited, as libvirt sets it
# A QMP message is a few KiB; QEMU's stderr a few lines. More is a broken or hostile host:
# the line is refused, stderr kept up to the cap (the rest is not read into memory).
MAX_QMP_LINE = 1 << 20
MAX_STDERR = 64 << 10
REAP_SECONDS = 10.0  # at most, for a QEMU that never answered
KILL_MARGIN = 10  # seconds `timeout` gives QEMU beyond the probe's own deadline
QEMU_ARCH = {"x86_64": "x86_64", "amd64": "x86_64", "aarch64": "aarch64", "arm64": "aarch64",
             "ppc64le": "ppc64", "ppc64": "ppc64", "s390x": "s390x", "riscv64": "riscv64"}


class Interrupted(QemucaError):
    """Ctrl-C (or SIGTERM): the probe stops and cleans up."""

    exit_code = EXIT_INTERRUPTED


class ProbeTimeout(Exception):
    """A step did not end before the probe's deadline."""


class QmpError(Exception):
    """QEMU refused a QMP command; the message is QEMU's `desc`."""


class QemuExited(Exception):
    """QEMU ended (its stderr is the message)."""


class QemuHost:
    """One end of the probe: its connection, its files (SFTP) and its QEMU."""

    def __init__(self, name: str, conn: Connection):
        self.name, self.conn, self.fs = name, conn, RemoteFS(conn)
        self.qemu: Optional[str] = None
        self.qemu_size = 0
        self.pdeathsig = False

    def find_qemu(self) -> None:
        """The host's own QEMU (qemu-system-ARCH, else RHEL's qemu-kvm) and whether its
        setpriv can tie QEMU's life to the SSH session."""
        arch = self.conn.run(["uname", "-m"], check=True).text.strip()
        system = f"qemu-system-{QEMU_ARCH.get(arch, arch)}"
        candidates = [f"/usr/bin/{system}", f"/usr/local/bin/{system}", "/usr/libexec/qemu-kvm",
                      "/usr/bin/qemu-kvm"]
        for path in candidates:
            st = self.fs.stat(path)
            if st is not None and st.is_file and st.perms & 0o111:
                self.qemu, self.qemu_size = path, st.size
                break
        else:
            raise NotFound(f"{self.name}: no QEMU found (looked for {', '.join(candidates)}): "
                           f"install {system} (or qemu-kvm)")
        helptext = self.conn.run(["setpriv", "--help"], timeout=15)
        self.pdeathsig = helptext.ok and b"--pdeathsig" in helptext.stdout

    @property
    def qemu_path(self) -> str:
        """The QEMU that find_qemu() found; every QEMU of the probe starts after it."""
        assert self.qemu is not None, "find_qemu() first"
        return self.qemu


_PREFIX = re.compile(r"^\S*qemu[^:\s]*:(\s|$)")


class RemoteQemu:
    """A throwaway QEMU on a host, QMP on the stdin/stdout of its own SSH exec channel."""

    def __init__(self, host: QemuHost, role: str, args: Sequence[str], seconds: float,
                 cancel: Optional[threading.Event]):
        self.host, self.role, self.cancel = host, role, cancel
        self.marker = f"qemuca-probe-{secrets.token_hex(6)}-{role}"
        bound = ["timeout", "-s", "KILL", str(int(seconds) + KILL_MARGIN)]
        if host.pdeathsig:  # timeout dies with the session, QEMU dies with timeout
            bound = ["setpriv", "--pdeathsig", "KILL", "--"] + bound + ["setpriv", "--pdeathsig", "KILL", "--"]
        self.argv = bound + [host.qemu_path, "-name", self.marker, *args, "-qmp", "stdio"]
        self.chan: Optional[ExecChannel] = None
        self.stopped = False
        self.pid: Optional[int] = None
        self.version = ""
        self._out, self._err = bytearray(), bytearray()

    # -- life
    def start(self) -> None:
        self.chan = self.host.conn.open_exec(self.argv, f"start QEMU ({self.role})")

    def greet(self, deadline: float) -> None:
        """Read QMP's greeting, enter command mode, learn QEMU's PID."""
        hello = self._message(deadline)
        v = hello.get("QMP", {}).get("version", {}).get("qemu", {})
        self.version = f"{v.get('major')}.{v.get('minor')}.{v.get('micro')}" if v else "?"
        self.cmd("qmp_capabilities", deadline)
        self.pid = self._find_pid(deadline)

    def _find_pid(self, deadline: float) -> Optional[int]:
        try:
            tid = self.cmd("query-iothreads", deadline)[0]["thread-id"]
            status = self.host.fs.read_bytes(f"/proc/{int(tid)}/status").decode("ascii", "replace")
            found = re.search(r"^Tgid:\s*(\d+)", status, re.M)
            if found is None:
                return None
            pid = int(found.group(1))
        except (QmpError, OSError, IndexError, KeyError, AttributeError, ValueError):
            return None
        return pid if self._ours(pid) else None

    def _argv(self, pid: int) -> List[bytes]:
        try:
            return self.host.fs.read_bytes(f"/proc/{pid}/cmdline").split(b"\0")
        except OSError:
            return []

    def _ours(self, pid: int) -> bool:
        """Is PID still this QEMU? (the binary, with our random marker as its -name)"""
        argv = self._argv(pid)
        return bool(argv) and argv[0] == self.host.qemu_path.encode() and self.marker.encode() in argv

    def _scan(self) -> List[int]:
        """Every process carrying our marker: QEMU, the setpriv/timeout around it, or the
        login shell still starting them (the marker then inside its `-c` string). One
        /proc read per process, so only for a QEMU that never told its PID."""
        try:
            entries = self.host.fs.listdir("/proc")
        except OSError:
            return []
        marker = self.marker.encode()
        return [int(e) for e in entries if e.isdigit() and marker in b"\0".join(self._argv(int(e)))]

    def _reap(self, seconds: float) -> None:
        """Kill what carries the marker until the channel reports the command's end: on a
        busy host the session may still be starting (sshd forks late; a setpriv that runs
        after the connection is gone never gets its parent-death signal)."""
        end = time.monotonic() + seconds
        chan = self.chan
        while chan is not None and not chan.exited() and time.monotonic() < end and self.host.conn.alive:
            self._kill(self._scan())
            chan.wait_exit(0.5)

    def ended(self) -> bool:
        return self.chan is None or self.chan.exited()

    def _channel(self) -> ExecChannel:
        """The running program's channel: QMP is spoken only after start()."""
        assert self.chan is not None, "start() first"
        return self.chan

    def stop(self) -> None:
        stop_all([self])

    def _kill(self, pids: Sequence[int]) -> None:
        if pids:
            self.host.conn.run(["kill", "-KILL", *map(str, pids)], timeout=10)

    # -- QMP
    def cmd(self, command: str, deadline: float, **arguments: object):
        request: Dict[str, object] = {"execute": command}
        if arguments:
            request["arguments"] = arguments
        self._send(request)
        reply = self._message(deadline)
        if "error" in reply:
            raise QmpError(f"{command}: {reply['error'].get('desc', reply['error'])}")
        return reply.get("return", {})

    def _send(self, request: dict) -> None:
        try:
            self._channel().send(json.dumps(request).encode() + b"\n")
        except EOFError:
            self._gone()

    def _message(self, deadline: float) -> dict:
        while True:
            nl = self._out.find(b"\n")
            if nl >= 0:
                line = bytes(self._out[:nl]).strip()
                del self._out[:nl + 1]
                if not line:
                    continue
                try:
                    message = json.loads(line)
                except ValueError:
                    continue  # not QMP (QEMU writes nothing else to stdout)
                if "event" not in message:
                    return message
                continue
            self._pump(deadline)

    def _pump(self, deadline: float) -> None:
        """Wait (bounded, interruptible) for more output; stderr is collected on the way."""
        if self.cancel is not None and self.cancel.is_set():
            raise Interrupted("interrupted")
        left = deadline - time.monotonic()
        if left <= 0:
            raise ProbeTimeout(f"QEMU ({self.role}) on {self.host.name} did not answer in time")
        chan = self._channel()
        chan.wait_readable(min(left, 0.2))
        self.drain()
        data = chan.read()
        if data:
            self._out += data
            if len(self._out) > MAX_QMP_LINE and self._out.find(b"\n") < 0:
                raise RemoteError(f"{self.host.name}: QEMU ({self.role}) printed more than {MAX_QMP_LINE} "
                                  "bytes without a QMP message: refused (a broken or hostile host?)")
            return
        if chan.at_eof or not self.host.conn.alive:
            self._gone()

    def _gone(self) -> None:
        """The channel ended: QEMU exited, or the connection is lost."""
        if not self.host.conn.alive:
            raise RemoteError(f"{self.host.name}: connection lost (QEMU {self.role})")
        self._channel().wait_exit(1.0)
        self.drain()
        raise QemuExited("; ".join(self.log_since(0)) or "QEMU exited")

    # -- stderr
    def drain(self) -> None:
        if self.chan is not None:
            data = self.chan.read_stderr()
            self._err += data[:max(0, MAX_STDERR - len(self._err))]

    def mark(self) -> int:
        self.drain()
        return len(self._err)

    def log_since(self, mark: int) -> List[str]:
        """QEMU's stderr lines written after `mark`, without the program-name prefix."""
        text = bytes(self._err[mark:]).decode("utf-8", "replace")
        lines = (_PREFIX.sub("", line).strip() for line in text.splitlines())
        return [line for line in lines if line]

    def wait(self, seconds: float) -> None:
        """Sleep that Ctrl-C interrupts."""
        if self.cancel is not None and self.cancel.wait(seconds):
            raise Interrupted("interrupted")
        if self.cancel is None:
            time.sleep(seconds)


def stop_all(qemus: Sequence[RemoteQemu]) -> None:
    """End every QEMU for sure and never raise. Known PID (checked against the marker in
    /proc/PID/cmdline): kill -KILL at once. Unknown (it never answered, or is still
    starting): a queued QMP quit, then whatever carries its marker is killed until its
    channel reports the end. With the connection gone the parent-death signal has ended
    it already, and `timeout` would in any case."""
    guarded = (QemucaError, QemuExited, OSError, EOFError)
    qemus = [q for q in qemus if not q.stopped]
    live = [q for q in qemus if not q.ended() and q.host.conn.alive]
    unknown: List[RemoteQemu] = []
    for q in live:
        try:
            if q.pid and q._ours(q.pid):
                q._kill([q.pid])
            else:  # queued: a QEMU still starting reads both once it is up
                unknown.append(q)
                q._send({"execute": "qmp_capabilities"})
                q._send({"execute": "quit"})
        except guarded:
            pass
    end = time.monotonic() + 1.0
    for q in live:
        q._channel().wait_exit(max(0.0, end - time.monotonic()))
    for q in unknown:
        try:
            q._reap(REAP_SECONDS)
        except guarded:
            pass
    end = time.monotonic() + 5.0
    for q in qemus:
        if q.chan is not None:
            q.chan.wait_exit(max(0.0, end - time.monotonic()) if q in live else 0)
            q.chan.close()
        q.stopped = True


def qemu_args(ram_mib: int, incoming: bool, fill: Optional[Tuple[str, int]] = None) -> List[str]:
    """The guest: no disk, no NIC, no CPU, RAM only. `fill` = (file, size): copies of that
    file (the host's QEMU binary) are loaded into the RAM, because QEMU sends a zero page
    as a few bytes: an empty guest would say nothing about throughput."""
    args = ["-machine", "none", "-accel", "kvm", "-accel", "tcg", "-m", str(ram_mib),
            "-nodefaults", "-no-user-config", "-display", "none", "-S",
            "-object", "iothread,id=qemuca-pid"]
    if incoming:
        args += ["-incoming", "defer"]
    if fill:
        path, size = fill
        step = (size + 4095) // 4096 * 4096
        for i in range((ram_mib << 20) // step if step else 0):
            args += ["-device", f"loader,file={path.replace(',', ',,')},addr={i * step:#x},force-raw=on"]
    return args


def filled_bytes(ram_mib: int, size: int) -> int:
    step = (size + 4095) // 4096 * 4096
    return ((ram_mib << 20) // step) * size if step else 0


def migration_uri(address: str, port: int) -> str:
    return "tcp:" + host_port(address, port)


def tls_object(cert_dir: str, endpoint: str) -> dict:
    return {"qom-type": "tls-creds-x509", "id": "tls0", "dir": cert_dir, "endpoint": endpoint,
            "verify-peer": True}
