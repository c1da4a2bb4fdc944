"""`qemuca probe`: a real encrypted test migration between two hosts, over SSH.

Checking files says a migration *should* work; only QEMU itself can say that it does.
The probe starts a throwaway guest on each host with the host's own QEMU (no disk, no
network device, `-machine none`, KVM else TCG), loads the deployed credentials the way
libvirt does (tls-creds-x509 added over QMP, so a bad file comes back as QEMU's own
message), and migrates the source's guest to the destination with `tls-hostname` set
as libvirt's `tls.destination` sets it. It also shows that the listener refuses a plain
migration, and can measure TLS against plain throughput.

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

import ipaddress
import json
import posixpath
import re
import secrets
import select
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import paramiko
from cryptography import x509

from qemuca.errors import EXIT_INTERRUPTED, InvalidInput, NotFound, QemucaError, RemoteError
from qemuca.hosts import qemuconf
from qemuca.hosts.layout import CA_BUNDLE, CLIENT_CERT, SERVER_CERT
from qemuca.names import host_port
from qemuca.pki import profile
from qemuca.pki.checks import issued_by

PASS, WARN, FAIL, SKIP = "pass", "warn", "fail", "skip"
DEFAULT_CERT_DIR = "/etc/pki/qemu"
DEFAULT_QEMU_CONF = qemuconf.DEFAULT_PATH
DEFAULT_RAM_MIB = 128
DEFAULT_TIMEOUT = 60.0
# libvirt's default migration_port_min..max: the probe takes the firewall path migrations take.
PORT_RANGE = range(49152, 49216)
MAX_BANDWIDTH = 2 ** 62  # bytes/s: unlimited, as libvirt sets it
REAP_SECONDS = 10.0  # at most, for a QEMU that never answered
IDLE_WAIT = 5.0  # seconds a destination that saw nothing is waited for
KILL_MARGIN = 10  # seconds `timeout` gives QEMU beyond the probe's own deadline
TERMINAL = ("completed", "failed", "cancelled")
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


# ---------------------------------------------------------------- results


@dataclass(frozen=True)
class Finding:
    check: str
    result: str  # pass | warn | fail | skip
    detail: str
    fix: str = ""
    label: str = ""  # a few words for a matrix cell when it fails

    def as_dict(self) -> dict:
        return {"check": self.check, "result": self.result, "detail": self.detail, "fix": self.fix,
                "problem": (self.label or self.check) if self.result == FAIL else ""}


@dataclass
class Migration:
    """One migration attempt as QEMU reported it."""

    tls: bool
    status: str = "not-run"  # completed | failed | cancelled | timeout | not-run
    destination_status: str = "not-run"
    seconds: Optional[float] = None  # QEMU's total-time
    bytes: Optional[int] = None  # RAM bytes QEMU sent
    errors: List[Tuple[str, str]] = field(default_factory=list)  # (source|destination, QEMU's words)

    @property
    def completed(self) -> bool:
        return self.status == "completed"

    @property
    def throughput(self) -> Optional[float]:
        """Bytes per second, from QEMU's own counters."""
        if not self.completed or not self.seconds or self.bytes is None:
            return None
        return self.bytes / self.seconds

    @property
    def error(self) -> Optional[str]:
        return "; ".join(f"{role}: {text}" for role, text in self.errors) or None

    def as_dict(self) -> dict:
        return {"tls": self.tls, "status": self.status, "destination_status": self.destination_status,
                "seconds": self.seconds, "bytes": self.bytes, "throughput_bytes_per_s": self.throughput,
                "error": self.error, "errors": [{"side": r, "message": t} for r, t in self.errors]}


@dataclass
class ProbeReport:
    source: str
    destination: str
    tls_destination: Optional[str] = None
    address: Optional[str] = None
    port: Optional[int] = None
    findings: List[Finding] = field(default_factory=list)
    tls: Migration = field(default_factory=lambda: Migration(True))
    plain_client: Migration = field(default_factory=lambda: Migration(False))
    plain: Optional[Migration] = None
    destination_revoked: Optional[bool] = None
    source_revoked: Optional[bool] = None
    qemu_conf: Optional[dict] = None
    qemu: Dict[str, str] = field(default_factory=dict)
    ram_filled_bytes: Optional[int] = None
    error: Optional[str] = None  # the probe could not run to its end (unreachable, timeout, Ctrl-C)

    @property
    def pair(self) -> Tuple[str, str]:
        return self.source, self.destination

    @property
    def result(self) -> str:
        return FAIL if self.error or any(f.result == FAIL for f in self.findings) else PASS

    @property
    def passed(self) -> bool:
        return self.result == PASS

    @property
    def ratio(self) -> Optional[float]:
        """TLS throughput / plain throughput (--compare-plain)."""
        if self.plain is None or not self.tls.throughput or not self.plain.throughput:
            return None
        return self.tls.throughput / self.plain.throughput

    @property
    def plain_refused(self) -> Optional[bool]:
        """The TLS listener got the plain client's connection and gave it no session."""
        m = self.plain_client
        if m.status == "not-run":
            return None
        return m.destination_status != "completed" and any(side == "destination" for side, _ in m.errors)

    def labels(self) -> List[str]:
        """Why it failed, in a few words each (matrix cells)."""
        out = [f.label or f.check for f in self.findings if f.result == FAIL]
        return list(dict.fromkeys(out)) or ([self.error] if self.error else [])

    def as_dict(self) -> dict:
        return {
            "source": self.source, "destination": self.destination,
            "tls_destination": self.tls_destination, "address": self.address, "port": self.port,
            "result": self.result, "error": self.error,
            "tls_migration": self.tls.as_dict(),
            "plain_client": dict(self.plain_client.as_dict(), refused=self.plain_refused),
            "plain_migration": self.plain.as_dict() if self.plain else None,
            "throughput_ratio": self.ratio,
            "destination_revoked": self.destination_revoked,
            "source_revoked": self.source_revoked,
            "qemu_conf": self.qemu_conf,
            "qemu": self.qemu,
            "ram_filled_bytes": self.ram_filled_bytes,
            "findings": [f.as_dict() for f in self.findings],
        }


@dataclass(frozen=True)
class ProbeOptions:
    tls_destination: Optional[str] = None  # None: the destination's `hostname -f`
    address: Optional[str] = None  # None: the name as the source resolves it
    port: Optional[int] = None  # None: the first free port of PORT_RANGE
    ram_mib: int = DEFAULT_RAM_MIB
    compare_plain: bool = False
    cert_dir: str = DEFAULT_CERT_DIR
    qemu_conf_path: str = DEFAULT_QEMU_CONF
    timeout: float = DEFAULT_TIMEOUT

    def validate(self) -> None:
        if not self.cert_dir.startswith("/"):
            raise InvalidInput(f"--cert-dir {self.cert_dir!r} must be an absolute path")
        if self.tls_destination is not None:
            tls_name(self.tls_destination)
        if self.address is not None and (not self.address or any(c in self.address for c in " /,[]\0")):
            raise InvalidInput(f"--address {self.address!r} is not a host name or IP address")
        if not 8 <= self.ram_mib <= 65536:
            raise InvalidInput("--ram must be between 8 and 65536 MiB")
        if self.timeout <= 0:
            raise InvalidInput("--timeout must be positive")


def tls_name(value: str) -> str:
    """A --tls-destination: a host name (normalised) or an IP address."""
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        from qemuca.names import host_name

        return host_name(value)


# ---------------------------------------------------------------- what the CA says


@dataclass(frozen=True)
class Revocations:
    """The CA's certificate and what it revoked, read once in the calling thread (the
    store's SQLite connection stays there). QEMU's migration source never reads a CRL,
    so this is the only place a revoked destination shows up."""

    ca_cert: x509.Certificate
    revoked: Dict[int, str]  # serial -> "HOST, revoked on DATE (reason)"
    crl: Optional[x509.CertificateRevocationList] = None

    @classmethod
    def from_store(cls, store) -> Revocations:
        from qemuca.errors import StoreError
        from qemuca.pki.ca import CertificateAuthority

        authority = CertificateAuthority(store)
        revoked = {int(r.serial, 16): f"{r.host}, revoked {r.revoked_at[:10]}"
                   + (f" ({r.revocation_reason})" if r.revocation_reason else "")
                   for r in store.revoked()}
        crl = None
        try:
            pem = authority.crl_pem()
            crl = x509.load_pem_x509_crl(pem) if pem else None
        except (StoreError, ValueError):
            pass  # the index alone still says what is revoked
        return cls(authority.cert, revoked, crl)

    def why(self, cert: x509.Certificate) -> Optional[str]:
        """How `cert` is revoked by this CA, or None (also for another CA's certificate)."""
        if not issued_by(cert, self.ca_cert):
            return None
        serial = cert.serial_number
        if serial in self.revoked:
            return f"serial {serial:x} is revoked in the CA's index ({self.revoked[serial]})"
        if self.crl is not None and self.crl.get_revoked_certificate_by_serial_number(serial) is not None:
            return f"serial {serial:x} is listed in the CA's current CRL"
        return None

    def from_this_ca(self, cert: x509.Certificate) -> bool:
        return issued_by(cert, self.ca_cert)


# ---------------------------------------------------------------- one host


class _Host:
    """One end of the probe: its connection, its files (SFTP) and its QEMU."""

    def __init__(self, name: str, conn):
        from qemuca.hosts.remotefs import RemoteFS

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

    def read_cert(self, path: str) -> Tuple[List[x509.Certificate], Optional[str]]:
        try:
            data = self.fs.read_bytes(path)
        except FileNotFoundError:
            return [], f"{self.name}:{path} does not exist"
        except OSError as e:
            return [], f"{self.name}:{path}: {e.strerror or e}"
        try:
            certs = x509.load_pem_x509_certificates(data)
        except ValueError:
            return [], f"{self.name}:{path} holds no PEM certificate"
        return certs, None


# ---------------------------------------------------------------- one QEMU over SSH


_PREFIX = re.compile(r"^\S*qemu[^:\s]*:(\s|$)")


class RemoteQemu:
    """A throwaway QEMU on a host, QMP on the stdin/stdout of its own SSH exec channel."""

    def __init__(self, host: _Host, role: str, args: Sequence[str], seconds: float,
                 cancel: Optional[threading.Event]):
        self.host, self.role, self.cancel = host, role, cancel
        self.marker = f"qemuca-probe-{secrets.token_hex(6)}-{role}"
        bound = ["timeout", "-s", "KILL", str(int(seconds) + KILL_MARGIN)]
        if host.pdeathsig:  # timeout dies with the session, QEMU dies with timeout
            bound = ["setpriv", "--pdeathsig", "KILL", "--"] + bound + ["setpriv", "--pdeathsig", "KILL", "--"]
        self.argv = bound + [host.qemu, "-name", self.marker, *args, "-qmp", "stdio"]
        self.chan: Optional[paramiko.Channel] = None
        self.stopped = False
        self.pid: Optional[int] = None
        self.version = ""
        self._out, self._err = bytearray(), bytearray()

    # -- life
    def start(self) -> None:
        from qemuca.hosts.ssh import command_line

        line = command_line(self.argv)  # the allowlist applies
        try:
            self.chan = self.host.conn.transport.open_session(timeout=self.host.conn.command_timeout)
            self.chan.exec_command(line)
        except (paramiko.SSHException, OSError, EOFError) as e:
            raise self.host.conn.error(e, f"start QEMU ({self.role})") from None

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
            pid = int(re.search(r"^Tgid:\s*(\d+)", status, re.M).group(1))
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
        return bool(argv) and argv[0] == self.host.qemu.encode() and self.marker.encode() in argv

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
        while not self.ended() and time.monotonic() < end and self.host.conn.transport.is_active():
            self._kill(self._scan())
            self.chan.status_event.wait(0.5)

    def ended(self) -> bool:
        return self.chan is None or self.chan.exit_status_ready()

    def stop(self) -> None:
        stop_all([self])

    def _kill(self, pids: Sequence[int]) -> None:
        if pids:
            self.host.conn.run(["kill", "-KILL", *map(str, pids)], timeout=10)

    # -- QMP
    def cmd(self, command: str, deadline: float, **arguments):
        request = {"execute": command}
        if arguments:
            request["arguments"] = arguments
        self._send(request)
        reply = self._message(deadline)
        if "error" in reply:
            raise QmpError(f"{command}: {reply['error'].get('desc', reply['error'])}")
        return reply.get("return", {})

    def _send(self, request: dict) -> None:
        try:
            self.chan.sendall(json.dumps(request).encode() + b"\n")
        except (OSError, paramiko.SSHException, EOFError):
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
        select.select([self.chan], [], [], min(left, 0.2))
        self.drain()
        if self.chan.recv_ready():
            data = self.chan.recv(65536)
            if data:
                self._out += data
                return
        if self.chan.eof_received or self.chan.closed:
            self._gone()
        if not self.host.conn.transport.is_active():
            self._gone()

    def _gone(self) -> None:
        """The channel ended: QEMU exited, or the connection is lost."""
        if not self.host.conn.transport.is_active():
            raise RemoteError(f"{self.host.name}: connection lost (QEMU {self.role})")
        self.chan.status_event.wait(1.0)
        self.drain()
        raise QemuExited("; ".join(self.log_since(0)) or "QEMU exited")

    # -- stderr
    def drain(self) -> None:
        while self.chan is not None and self.chan.recv_stderr_ready():
            self._err += self.chan.recv_stderr(65536)

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
    guarded = (QemucaError, QemuExited, OSError, paramiko.SSHException, EOFError)
    qemus = [q for q in qemus if not q.stopped]
    live = [q for q in qemus if not q.ended() and q.host.conn.transport.is_active()]
    unknown = []
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
        q.chan.status_event.wait(max(0.0, end - time.monotonic()))
    for q in unknown:
        try:
            q._reap(REAP_SECONDS)
        except guarded:
            pass
    end = time.monotonic() + 5.0
    for q in qemus:
        if q.chan is not None:
            q.chan.status_event.wait(max(0.0, end - time.monotonic()) if q in live else 0)
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


def _filled_bytes(ram_mib: int, size: int) -> int:
    step = (size + 4095) // 4096 * 4096
    return ((ram_mib << 20) // step) * size if step else 0


def _is_dir(fs, path: str) -> bool:
    st = fs.stat(path)
    return st is not None and st.is_dir


def _uri(address: str, port: int) -> str:
    return "tcp:" + host_port(address, port)


def _tls_object(cert_dir: str, endpoint: str) -> dict:
    return {"qom-type": "tls-creds-x509", "id": "tls0", "dir": cert_dir, "endpoint": endpoint,
            "verify-peer": True}


# ---------------------------------------------------------------- the probe


def probe_pair(src: str, dst: str, connect: Callable, opts: ProbeOptions = ProbeOptions(),
               revocations: Optional[Revocations] = None,
               cancel: Optional[threading.Event] = None) -> ProbeReport:
    """Probe one ordered pair; never raises (a host that cannot be reached, a timeout or
    Ctrl-C end up in the report). Everything started is stopped before it returns."""
    report = ProbeReport(src, dst)
    deadline = time.monotonic() + opts.timeout
    hosts: List[_Host] = []
    qemus: List[RemoteQemu] = []
    try:
        if src == dst:
            raise InvalidInput(f"source and destination are the same host ({src})")
        for name in (src, dst):
            if cancel is not None and cancel.is_set():
                raise Interrupted("interrupted")
            hosts.append(_Host(name, connect(name)))
        _Probe(report, hosts[0], hosts[1], opts, revocations, cancel, deadline, qemus).run()
    except ProbeTimeout as e:
        report.error = f"timed out after {opts.timeout:g} s: {e}"
        report.findings.append(Finding("timeout", FAIL, report.error,
                                       "check that the hosts reach each other; raise --timeout",
                                       label="timeout"))
    except QemucaError as e:
        report.error = str(e)
        label = "interrupted" if isinstance(e, Interrupted) else "unreachable" if isinstance(
            e, RemoteError) else "error"
        fix = "check that the host is up and reachable over SSH (ssh_config, known_hosts)" if isinstance(
            e, RemoteError) else ""
        report.findings.append(Finding("connection" if isinstance(e, RemoteError) else "probe",
                                       FAIL, str(e), fix, label=label))
    except OSError as e:
        report.error = f"{e.strerror or e}" + (f" ({e.filename})" if e.filename else "")
        report.findings.append(Finding("probe", FAIL, report.error, label="error"))
    except Exception as e:  # one pair's surprise must not stop a matrix
        report.error = f"{type(e).__name__}: {e}"
        report.findings.append(Finding("probe", FAIL, report.error, label="error"))
    finally:
        stop_all(qemus)
        for h in hosts:
            h.conn.close()
    return report


class _Probe:
    """The steps of one probe, in order; results go into the report as they come."""

    def __init__(self, report: ProbeReport, src: _Host, dst: _Host, opts: ProbeOptions,
                 revocations: Optional[Revocations], cancel, deadline: float, qemus: List[RemoteQemu]):
        self.r, self.s, self.d, self.opts = report, src, dst, opts
        self.rev, self.cancel, self.deadline, self.qemus = revocations, cancel, deadline, qemus
        self.src_certs: List[x509.Certificate] = []
        self.dst_certs: List[x509.Certificate] = []
        self.src_bundle: List[x509.Certificate] = []
        self.dst_bundle: List[x509.Certificate] = []
        self.dst_cert_problem: Optional[str] = None

    def add(self, *args, **kw) -> None:
        self.r.findings.append(Finding(*args, **kw))

    def run(self) -> None:
        s, d, opts = self.s, self.d, self.opts
        self.read_certificates()
        self.policy()
        self.revocation()
        name = opts.tls_destination or self.destination_name()
        self.r.tls_destination = name
        address = opts.address or self.resolve(name)
        self.r.address = address
        for h in (s, d):
            h.find_qemu()
        # The destination, a plain client (same guest, empty RAM) and the source start at once.
        dq = self.qemu(d, "destination", qemu_args(opts.ram_mib, incoming=True))
        pq = self.qemu(s, "plain-client", qemu_args(opts.ram_mib, incoming=False))
        sq = self.qemu(s, "source", qemu_args(opts.ram_mib, False, (s.qemu, s.qemu_size)))
        dq.greet(self.deadline)
        pq.greet(self.deadline)
        sq = self.greet_source(sq)
        self.r.qemu = {"source": f"{s.qemu} {sq.version}", "destination": f"{d.qemu} {dq.version}"}
        # 1. The destination: a TLS listener over the deployed server credentials.
        try:
            dq.cmd("object-add", self.deadline, **_tls_object(opts.cert_dir, "server"))
            dq.cmd("migrate-set-parameters", self.deadline, **{"tls-creds": "tls0"})
        except QmpError as e:
            self.r.tls = Migration(True, "failed", errors=[("destination", str(e))])
            self.add("plain client refused", SKIP, f"no TLS listener: {d.name}'s QEMU refused its credentials")
            self.migration_finding(self.r.tls, name)
            return
        port = self.listen(dq, address)
        self.r.port = port
        uri = _uri(address, port)
        # 2. A plain source against the TLS listener must get nowhere. Judged by the
        # destination: a small stream can fit in the socket buffer, and then the plain
        # source believes it has completed.
        self.r.plain_client = self.migrate(pq, dq, uri, tls=False, expect=False)
        pq.stop()
        self.plain_client_finding(uri)
        sq.cmd("migrate-set-parameters", self.deadline, **{"max-bandwidth": MAX_BANDWIDTH})
        # 3. The real thing: client credentials, tls-hostname = NAME (libvirt's tls.destination).
        try:
            sq.cmd("object-add", self.deadline, **_tls_object(opts.cert_dir, "client"))
            sq.cmd("migrate-set-parameters", self.deadline, **{"tls-creds": "tls0", "tls-hostname": name})
        except QmpError as e:
            self.r.tls = Migration(True, "failed", errors=[("source", str(e))])
        else:
            self.r.tls = self.migrate(sq, dq, uri, tls=True)
        self.migration_finding(self.r.tls, name)
        stop_all([sq, dq])
        # 4. The same guest without TLS, for the throughput ratio.
        if opts.compare_plain:
            self.compare_plain(address)

    # -- facts read over SFTP
    def read_certificates(self) -> None:
        cd = self.opts.cert_dir
        self.src_certs, _ = self.s.read_cert(posixpath.join(cd, CLIENT_CERT))
        self.dst_certs, self.dst_cert_problem = self.d.read_cert(posixpath.join(cd, SERVER_CERT))
        if self.dst_cert_problem:
            self.add("destination certificate", WARN, f"{self.dst_cert_problem}: revocation and names not "
                     "checked", f"qemuca deploy {self.d.name}")
        self.src_bundle, _ = self.s.read_cert(posixpath.join(cd, CA_BUNDLE))
        self.dst_bundle, _ = self.d.read_cert(posixpath.join(cd, CA_BUNDLE))

    def policy(self) -> None:
        """What libvirt on the destination would enforce (the probe itself drives QEMU)."""
        d, path = self.d, self.opts.qemu_conf_path
        try:
            doc = qemuconf.read_document(d.fs, path)
            tls = qemuconf.resolve_migration_tls(doc, lambda p: _is_dir(d.fs, p))
        except NotFound:
            self.add("destination qemu.conf", SKIP, f"{d.name}: {path} does not exist (libvirt's QEMU "
                     "driver not installed?): nothing to say about libvirt's policy")
            return
        except InvalidInput as e:
            self.add("destination qemu.conf", WARN, f"{d.name}: {e}", f"qemuca qemu-conf show on {d.name}")
            return
        self.r.qemu_conf = dict(tls.to_dict(), path=path)
        force, verify, cdir = tls.force, tls.verify, tls.cert_dir
        detail = (f"{d.name}: migrate_tls_force = {int(bool(force.value))} ({force.source}), "
                  f"migrate_tls_x509_verify = {int(bool(verify.value))} ({verify.source}), "
                  f"cert dir {cdir.value} ({cdir.source})")
        problems, fixes = [], []
        if not force.value:
            problems.append("libvirt there still accepts a migration without --tls")
            fixes.append(f"qemuca deploy {d.name} --force-tls --restart")
        if not verify.value:
            problems.append("libvirt's QEMU there does not verify the source's certificate")
            fixes.append(f"qemuca deploy {d.name} --restart")
        if cdir.value != self.opts.cert_dir:
            problems.append(f"libvirt uses {cdir.value}, this probe used {self.opts.cert_dir}")
            fixes.append(f"probe with --cert-dir {cdir.value}")
        if problems:
            self.add("destination qemu.conf", WARN, detail + ": " + "; ".join(problems), "; ".join(fixes))
        else:
            self.add("destination qemu.conf", PASS, detail + ": libvirt refuses unencrypted migrations "
                     "(check on the host: virsh migrate without --tls must fail)")

    def revocation(self) -> None:
        """QEMU's source never reads a CRL: a revoked destination is caught here or nowhere."""
        if self.rev is None:
            self.add("destination not revoked", SKIP, "no CA store here: revocation not checked "
                     "(run the probe where the CA is)")
            return
        for role, host, certs in (("destination", self.d, self.dst_certs), ("source", self.s, self.src_certs)):
            if not certs:
                continue
            why = self.rev.why(certs[0])
            setattr(self.r, f"{role}_revoked", why is not None)
            fix = f"qemuca issue --force {host.name} && qemuca deploy {host.name} (or qemuca enroll --replace {host.name})"
            if why is None:
                self.add(f"{role} not revoked", PASS, f"{host.name}'s certificate is not revoked by the CA"
                         if self.rev.from_this_ca(certs[0]) else f"{host.name}'s certificate is not from this CA")
            elif role == "destination":
                self.add("destination not revoked", FAIL, f"REVOKED DESTINATION: {host.name}'s certificate: {why}. "
                         "A QEMU source never reads a CRL, so migrations to it still complete", fix,
                         label="revoked destination")
            else:
                self.add("source not revoked", FAIL, f"{host.name}'s certificate: {why}; a destination refuses it "
                         f"only once its ca-crl.pem lists it", fix + "; roll the CRL out: qemuca deploy --all",
                         label="revoked source")

    def destination_name(self) -> str:
        """libvirt's default: the destination's own host name (`hostname -f`)."""
        result = self.d.conn.run_command("hostname_f")
        name = result.text.strip()
        if result.ok and name:
            return name
        self.add("destination name", WARN, f"hostname -f failed on {self.d.name}; using {self.d.name}",
                 "give --tls-destination")
        return self.d.name

    def resolve(self, name: str) -> str:
        """The destination's address as the source resolves the name (as libvirt would)."""
        try:
            ipaddress.ip_address(name)
            return name
        except ValueError:
            pass
        result = self.s.conn.run(["getent", "ahosts", name])
        fields = result.text.split()
        if not result.ok or not fields:
            raise InvalidInput(f"{self.s.name} cannot resolve {name}: give --address (the destination's "
                               "address on the migration network)")
        return fields[0]

    # -- QEMU
    def qemu(self, host: _Host, role: str, args: List[str]) -> RemoteQemu:
        q = RemoteQemu(host, role, args, self.deadline - time.monotonic(), self.cancel)
        self.qemus.append(q)
        q.start()
        return q

    def greet_source(self, sq: RemoteQemu) -> RemoteQemu:
        """Start the source; without the generic loader device (some builds lack it) the
        guest stays empty, and the throughput says little."""
        s = self.s
        try:
            sq.greet(self.deadline)
            self.r.ram_filled_bytes = _filled_bytes(self.opts.ram_mib, s.qemu_size)
            return sq
        except QemuExited as e:
            if "loader" not in str(e):
                raise QemucaError(f"QEMU on {s.name} did not start: {e}") from None
        sq = self.qemu(s, "source", qemu_args(self.opts.ram_mib, False))
        sq.greet(self.deadline)
        self.r.ram_filled_bytes = 0
        self.add("guest memory", WARN, f"{s.name}'s QEMU has no 'loader' device: the guest's RAM is "
                 "empty (zero pages), so the throughput says little")
        return sq

    def listen(self, dq: RemoteQemu, address: str) -> int:
        ports = [self.opts.port] if self.opts.port else list(PORT_RANGE)
        last = ""
        for port in ports:
            try:
                dq.cmd("migrate-incoming", self.deadline, uri=_uri(address, port))
            except QmpError as e:
                last = str(e)
                if "in use" in last.lower() and len(ports) > 1:
                    continue
                raise QemucaError(f"{self.d.name}: cannot listen on {_uri(address, port)[4:]}: {last}"
                                  + (" (is --address one of the destination's addresses?)"
                                     if "assign" in last.lower() else "")) from None
            info = dq.cmd("query-migrate", self.deadline)
            return int(info["socket-address"][0]["port"])
        raise QemucaError(f"{self.d.name}: no free port in {PORT_RANGE.start}-{PORT_RANGE.stop - 1}: {last}")

    def migrate(self, sq: RemoteQemu, dq: RemoteQemu, uri: str, tls: bool, expect: bool = True) -> Migration:
        """One migration; QEMU's words from both sides are kept. `expect`: the destination
        should complete when the source has."""
        m = Migration(tls)
        smark, dmark = sq.mark(), dq.mark()
        info: dict = {}
        try:
            sq.cmd("migrate", self.deadline, uri=uri)
            info = self.until_terminal(sq)
            m.status = info.get("status", "failed")
        except QmpError as e:
            m.status = "failed"
            m.errors.append(("source", str(e)))
        except QemuExited as e:
            m.status = "failed"
            m.errors.append(("source", f"QEMU exited: {e}"))
        if info.get("error-desc"):
            m.errors.append(("source", info["error-desc"]))
        if m.completed:
            m.seconds = info.get("total-time", 0) / 1000.0
            m.bytes = info.get("ram", {}).get("transferred")
        m.destination_status = self.settle(dq, dmark, expect=expect and m.completed)
        for said in [("source", line) for line in sq.log_since(smark)] + [
                ("destination", line) for line in dq.log_since(dmark)]:
            if said not in m.errors:  # QEMU repeats itself ("Cannot read from TLS channel")
                m.errors.append(said)
        if expect and m.completed and m.destination_status != "completed":
            m.status = "failed"
            m.errors.append(("destination", f"status {m.destination_status} after the source completed"))
        return m

    def until_terminal(self, q: RemoteQemu) -> dict:
        while True:
            info = q.cmd("query-migrate", self.deadline)
            if info.get("status") in TERMINAL:
                return info
            q.wait(0.05)

    def settle(self, dq: RemoteQemu, mark: int, expect: bool) -> str:
        """The destination's status once it has had its say: completed / failed / exited,
        or still listening ("none") after printing why it refused the client. A source
        can believe it completed when its whole stream fit in the socket buffers: the
        destination decides."""
        started = time.monotonic()
        quiet = IDLE_WAIT if expect else min(IDLE_WAIT, 1.5)
        status, spoke = "none", None
        while True:
            try:
                status = dq.cmd("query-migrate", self.deadline).get("status", "none")
            except QemuExited:
                return "exited"
            if status in TERMINAL:
                return status
            now = time.monotonic()
            if status not in ("active", "device") and dq.log_since(mark):
                spoke = spoke or now
                if now - spoke > 0.3:  # it said why, and is not migrating
                    return status
            elif status == "none" and now - started > quiet:
                return status  # it never saw the migration
            dq.wait(0.05)

    def compare_plain(self, address: str) -> None:
        s, d = self.s, self.d
        if not self.r.tls.completed:
            self.add("throughput TLS / plain", SKIP, "not measured: the TLS migration did not complete")
            return
        dq = self.qemu(d, "destination-plain", qemu_args(self.opts.ram_mib, incoming=True))
        sq = self.qemu(s, "source-plain", qemu_args(self.opts.ram_mib, False, (s.qemu, s.qemu_size)
                                                    if self.r.ram_filled_bytes else None))
        dq.greet(self.deadline)
        sq.greet(self.deadline)
        port = self.listen(dq, address)
        sq.cmd("migrate-set-parameters", self.deadline, **{"max-bandwidth": MAX_BANDWIDTH})
        self.r.plain = self.migrate(sq, dq, _uri(address, port), tls=False)
        stop_all([sq, dq])
        if not self.r.plain.completed:
            self.add("throughput TLS / plain", WARN, f"the plain migration failed: {self.r.plain.error}")
            return
        ratio = self.r.ratio
        self.add("throughput TLS / plain", PASS,
                 f"TLS {rate(self.r.tls.throughput)}, plain {rate(self.r.plain.throughput)}: "
                 f"ratio {ratio:.2f}" if ratio else "not measurable (no bytes or no time)")

    # -- findings
    def plain_client_finding(self, uri: str) -> None:
        m, s, d = self.r.plain_client, self.s, self.d
        said = "; ".join(f"{role}: {text}" for role, text in m.errors) or "no message"
        if self.r.plain_refused:
            self.add("plain client refused", PASS, f"a plain QEMU source on {s.name} got no session at "
                     f"{uri[4:]} ({said})")
        elif m.destination_status == "completed":
            self.add("plain client refused", FAIL, f"a plain migration from {s.name} was ACCEPTED by "
                     f"{d.name}'s TLS listener: the traffic is not encrypted", "report this: QEMU ignored tls-creds",
                     label="plain accepted")
        else:
            self.add("plain client refused", FAIL, f"inconclusive: {d.name}'s listener at {uri[4:]} saw no "
                     f"plain client ({said})", f"check that {s.name} reaches {uri[4:]} (firewall, --address)",
                     label="plain check inconclusive")

    def migration_finding(self, m: Migration, name: str) -> None:
        s, d = self.s, self.d
        if m.completed:
            empty = "" if self.r.ram_filled_bytes else (
                f"; the guest's RAM held no data (--ram below the size of {s.name}'s QEMU binary, "
                f"{_size(s.qemu_size)}): the throughput says little")
            self.add("TLS migration", PASS, f"completed {s.name} -> {d.name}, name {name}: "
                     f"{_size(m.bytes)} in {m.seconds:.2f} s ({rate(m.throughput)}){empty}")
            return
        label, why, fix = self.diagnose(m, name)
        self.add("TLS migration", FAIL, f"{why}. QEMU said: {m.error or m.status}", fix, label=label)

    def diagnose(self, m: Migration, name: str) -> Tuple[str, str, str]:
        """QEMU's message -> (a few words, what is wrong, what to do)."""
        s, d, cd = self.s.name, self.d.name, self.opts.cert_dir
        renew = "qemuca issue --force {h} && qemuca deploy {h} (or qemuca enroll --replace {h})"
        for role, text in m.errors:
            host, peer = (s, d) if role == "source" else (d, s)
            low = text.lower()
            if "has been revoked" in low:
                return ("revoked", f"{host} refused {peer}'s certificate: it is revoked (listed in "
                        f"{host}'s ca-crl.pem)", renew.format(h=peer))
            if "does not match the hostname" in low:
                sans = profile.sans_of(self.dst_certs[0]) if self.dst_certs else []
                return ("name mismatch", f"{d}'s certificate does not hold the name {name} the source "
                        f"checked (its names: {', '.join(sans) or 'unknown'})",
                        f"use --tls-destination with one of its names (libvirt: virsh migrate --tls "
                        f"--tls-destination NAME), or add the name: qemuca issue --force {d} --san {name} "
                        f"&& qemuca deploy {d}")
            if "known issuer" in low or "not trusted" in low or "signer" in low:
                return ("unknown issuer",) + self.trust_problem(host, peer)
            if "has expired" in low or "not yet active" in low or "not yet valid" in low:
                what = "is not valid yet (check the host's clock)" if "not yet" in low else "has expired"
                if " ca certificate" in low:
                    return ("expired CA", f"a CA certificate in {host}'s {CA_BUNDLE} {what}",
                            f"renew the CA and redeploy: qemuca deploy {host}")
                return ("expired" if "expired" in what else "not yet valid",
                        f"{host}'s certificate in {cd} {what}", renew.format(h=host))
            if "no certificate was found" in low:
                return ("no client certificate", f"{s} sent no client certificate, and {d} verifies "
                        f"its peers", f"qemuca deploy {s} (client-cert.pem and client-key.pem in {cd})")
            if "unable to access credentials" in low or "no such file" in low or "cannot load" in low:
                return ("missing file", f"{host} lacks a credential file in {cd}", f"qemuca deploy {host}")
            if any(w in low for w in ("connection refused", "no route", "unreachable", "timed out")):
                return ("unreachable", f"{s} cannot connect to {self.r.address}:{self.r.port}",
                        f"open TCP {PORT_RANGE.start}-{PORT_RANGE.stop - 1} from {s} to {d}, or give --address")
        if m.status == "timeout":
            return "timeout", "the migration did not end in time", "raise --timeout"
        return ("failed", "the TLS migration failed", "read QEMU's messages; 'qemuca verify --pair "
                f"{s} {d}' checks the files")

    def trust_problem(self, host: str, peer: str) -> Tuple[str, str]:
        """Which certificate is foreign: name the host, and what to deploy."""
        ours = [(self.s.name, self.src_certs), (self.d.name, self.dst_certs)]
        foreign = [(h, c[0]) for h, c in ours if c and self.rev is not None and not self.rev.from_this_ca(c[0])]
        if foreign:
            h, cert = foreign[0]
            return (f"{host} does not trust {peer}'s certificate; {h}'s certificate was issued by "
                    f"'{cert.issuer.rfc4514_string()}', not by this CA "
                    f"('{self.rev.ca_cert.subject.rfc4514_string()}')",
                    f"deploy both hosts from this CA: qemuca deploy {h} --issue (or qemuca enroll {h})")
        peer_certs = self.src_certs if peer == self.s.name else self.dst_certs
        bundle = self.src_bundle if host == self.s.name else self.dst_bundle
        if peer_certs and bundle and not any(issued_by(peer_certs[0], ca) for ca in bundle):
            return (f"{host} does not trust {peer}'s certificate: no CA in {host}'s {CA_BUNDLE} issued it",
                    f"deploy both hosts from the same CA: qemuca deploy {host} {peer}")
        return (f"{host} does not trust {peer}'s certificate (unknown issuer)",
                f"deploy both hosts from the same CA: qemuca deploy {host} {peer}")


def _size(n: Optional[int]) -> str:
    return "?" if n is None else f"{n / 1048576:.1f} MiB"


def rate(bps: Optional[float]) -> str:
    """Bytes per second for people."""
    return "?" if not bps else f"{bps / 1048576:.1f} MiB/s"


# ---------------------------------------------------------------- many pairs


def all_pairs(hosts: Sequence[str]) -> List[Tuple[str, str]]:
    """Every ordered pair of distinct hosts."""
    return [(a, b) for a in hosts for b in hosts if a != b]


def read_pairs(path: str) -> List[Tuple[str, str]]:
    """A pairs file: `SRC DST` per line, # comments and blank lines ignored."""
    from qemuca.names import host_name

    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except OSError as e:
        raise InvalidInput(f"pairs file {path}: {e.strerror}") from None
    pairs: List[Tuple[str, str]] = []
    for n, line in enumerate(lines, 1):
        fields = line.split("#", 1)[0].split()
        if not fields:
            continue
        if len(fields) != 2:
            raise InvalidInput(f"{path}:{n}: expected 'SOURCE DESTINATION'")
        pair = (host_name(fields[0]), host_name(fields[1]))
        if pair[0] == pair[1]:
            raise InvalidInput(f"{path}:{n}: source and destination are the same host")
        if pair not in pairs:
            pairs.append(pair)
    if not pairs:
        raise InvalidInput(f"pairs file {path} lists no pair")
    return pairs
