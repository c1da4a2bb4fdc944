"""`qemuca probe --libvirt`: the migration an admin runs, by libvirt itself.

The QEMU probe proves the credentials with a throwaway QEMU; this one proves the whole
chain libvirt adds: the daemons' qemu.conf as they read it at their start, the QEMU
user and group libvirt runs QEMU as, the migration address and ports, and
`virsh migrate --live --tls`. A tiny transient guest (TCG, no disk, no NIC) is started
on the source through its daemon, migrated live over TLS to the destination, checked
there, and destroyed on both hosts whatever happens. virsh runs here and reaches the two
daemons over qemuca's own SSH connections (hosts.libvirt_tunnel), so the source's and
destination's daemons are driven the way `virsh migrate` without --p2p drives them.
"""

from __future__ import annotations

import secrets
import shutil
import subprocess
import tempfile
import threading
import time
from typing import Callable, List, Optional

from qemuca.errors import InvalidInput, NotFound
from qemuca.findings import FAIL, PASS, Finding
from qemuca.hosts.libvirt_tunnel import LibvirtTunnel
from qemuca.ops.fleet import connected, failure
from qemuca.ops.probe.qmp import Interrupted
from qemuca.ops.probe.report import ProbeOptions, ProbeReport
from qemuca.text import one_line

GUEST_PREFIX = "qemuca-probe-"
GUEST_MIB = 32
MAX_VIRSH_OUTPUT = 64 << 10

GUEST_XML = """<domain type='qemu'>
  <name>{name}</name>
  <description>qemuca probe --libvirt: a throwaway guest, destroyed when the probe ends</description>
  <memory unit='MiB'>{mib}</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type></os>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>destroy</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <controller type='usb' model='none'/>
    <memballoon model='none'/>
  </devices>
</domain>
"""

# libvirt's (and QEMU's) words for a failed TLS migration -> (label, what to do)
CAUSES = (
    ("hasn't got a known issuer", "other CA",
     "the hosts trust different CAs: deploy both from this store (qemuca deploy SRC DST)"),
    ("does not match the hostname", "name mismatch",
     "migrate with --tls-destination set to a name in the certificate, or add the name: "
     "qemuca issue --force DST --san NAME && qemuca deploy DST"),
    ("Unable to access credentials", "files missing", "deploy the host's set: qemuca deploy HOST"),
    ("Cannot load certificate", "unreadable files",
     "the files are not readable by the group libvirt runs QEMU as: qemuca verify HOST, then deploy it"),
    ("No certificate was found", "no client cert", "deploy the source's set: qemuca deploy SRC"),
    ("allows migration only with VIR_MIGRATE_TLS", "TLS forced", ""),
    ("Cannot write to TLS channel", "TLS refused",
     "the destination refused the source's certificate: qemuca verify --pair SRC DST"),
)


def virsh_path() -> str:
    path = shutil.which("virsh")
    if path is None:
        raise NotFound("virsh is not installed here (Debian package libvirt-clients): "
                       "probe --libvirt drives the hosts' daemons with it")
    return path


def _virsh(uri: str, *args: str, timeout: float) -> subprocess.CompletedProcess:
    """virsh here, in the C locale (libvirt's messages are matched), output bounded."""
    try:
        proc = subprocess.run([virsh_path(), "-q", "-c", uri, *args], capture_output=True,
                              timeout=timeout, env={"LC_ALL": "C", "PATH": "/usr/bin:/bin"})
    except subprocess.TimeoutExpired:
        return subprocess.CompletedProcess(args, 124, "", f"virsh {args[0]}: no answer within {timeout:g} s")
    return subprocess.CompletedProcess(args, proc.returncode, _text(proc.stdout), _text(proc.stderr))


def _text(data: bytes) -> str:
    return data[:MAX_VIRSH_OUTPUT].decode("utf-8", "replace")


def _why(proc: subprocess.CompletedProcess, tunnel: Optional[LibvirtTunnel] = None) -> str:
    text = one_line((proc.stderr or proc.stdout).strip().removeprefix("error: "))[:500]
    if tunnel is not None and tunnel.errors:
        text += f" ({one_line('; '.join(tunnel.errors))[:300]})"
    return text or f"exit {proc.returncode}"


def probe_pair_libvirt(src: str, dst: str, connect: Callable, opts: ProbeOptions,
                       cancel: Optional[threading.Event] = None) -> ProbeReport:
    """`virsh migrate --live --tls` of a throwaway guest SRC -> DST; never raises, and
    removes the guest from both hosts before it returns."""
    report = ProbeReport(src, dst, tls_destination=opts.tls_destination, address=opts.address)
    try:
        if src == dst:
            raise InvalidInput(f"source and destination are the same host ({src})")
        virsh_path()
        with connected(connect, src, dst) as [(conn_a, _), (conn_b, _)]:
            with LibvirtTunnel(conn_a) as a, LibvirtTunnel(conn_b) as b:
                _Run(report, a, b, opts, cancel).run()
    except Exception as e:
        report.error = failure(f"{src} -> {dst}", e)[0]
        label = "interrupted" if isinstance(e, Interrupted) else "error"
        report.findings.append(Finding("probe", FAIL, report.error, label=label))
    return report


class _Run:
    def __init__(self, report: ProbeReport, a: LibvirtTunnel, b: LibvirtTunnel, opts: ProbeOptions,
                 cancel: Optional[threading.Event]):
        self.report, self.a, self.b, self.opts, self.cancel = report, a, b, opts, cancel
        self.guest = GUEST_PREFIX + secrets.token_hex(4)
        self.timeout = opts.timeout

    def add(self, check: str, ok: bool, detail: str, fix: str = "", label: str = "") -> bool:
        self.report.findings.append(Finding(check, PASS if ok else FAIL, detail, "" if ok else fix,
                                            "" if ok else label or check))
        return ok

    def check_cancel(self) -> None:
        if self.cancel is not None and self.cancel.is_set():
            raise Interrupted("interrupted")

    def run(self) -> None:
        r = self.report
        for tunnel, host in ((self.a, r.source), (self.b, r.destination)):
            got = _virsh(tunnel.uri, "version", "--daemon", timeout=self.timeout)
            daemon = next((line.split(":", 1)[1].strip() for line in got.stdout.splitlines()
                           if line.startswith("Running against daemon")), "")
            if not self.add(f"libvirt on {host}", got.returncode == 0,
                            f"daemon {daemon or '?'} (qemu:///system over SSH)" if got.returncode == 0
                            else _why(got, tunnel),
                            "is libvirt's daemon running on the host (virtqemud or libvirtd)?",
                            label="no libvirt"):
                return
        self.check_cancel()
        try:
            self._migrate()
        finally:
            self._clean_up()

    def _migrate(self) -> None:
        r, a, b = self.report, self.a, self.b
        with tempfile.NamedTemporaryFile("w", suffix=".xml", prefix="qemuca-probe-") as xml:
            xml.write(GUEST_XML.format(name=self.guest, mib=GUEST_MIB))
            xml.flush()
            created = _virsh(a.uri, "create", xml.name, timeout=self.timeout)
        if not self.add(f"guest on {r.source}", created.returncode == 0,
                        f"{self.guest} started ({GUEST_MIB} MiB, TCG)" if created.returncode == 0
                        else _why(created, a), "check the source's libvirt (virsh capabilities)",
                        label="guest not started"):
            return
        self.check_cancel()
        args: List[str] = ["migrate", "--live", "--tls"]
        if self.opts.tls_destination:
            args += ["--tls-destination", self.opts.tls_destination]
        if self.opts.address:
            uri = f"tcp://{self.opts.address}" + (f":{self.opts.port}" if self.opts.port else "")
            args += ["--migrateuri", uri]
        started = time.monotonic()
        moved = _virsh(a.uri, *args, self.guest, b.uri, timeout=self.timeout)
        seconds = time.monotonic() - started
        r.tls.status = "completed" if moved.returncode == 0 else "failed"
        r.tls.seconds = round(seconds, 3)
        if moved.returncode != 0:
            why = _why(moved, a)
            r.tls.errors.append(("libvirt", why))
            label, fix = next(((lab, fx) for words, lab, fx in CAUSES if words in why),
                              ("migration failed", "qemuca verify --pair SRC DST says why, before libvirt does"))
            self.add("TLS migration (virsh migrate --live --tls)", False, why, fix, label)
            return
        self.add("TLS migration (virsh migrate --live --tls)", True,
                 f"{' '.join(args)}: completed in {seconds:.2f} s")
        there = _virsh(b.uri, "domstate", self.guest, timeout=self.timeout)
        gone = _virsh(a.uri, "domstate", self.guest, timeout=self.timeout)
        self.add(f"guest on {r.destination}", there.stdout.strip() == "running",
                 f"{self.guest}: {there.stdout.strip() or _why(there, b)}", label="guest not running")
        self.add(f"guest gone from {r.source}", gone.returncode != 0,
                 "the source no longer runs it" if gone.returncode != 0 else
                 f"still there: {gone.stdout.strip()}", label="guest left on source")

    def _clean_up(self) -> None:
        left: List[str] = []
        for tunnel, host in ((self.a, self.report.source), (self.b, self.report.destination)):
            _virsh(tunnel.uri, "destroy", self.guest, timeout=self.timeout)
            names = _virsh(tunnel.uri, "list", "--all", "--name", timeout=self.timeout)
            if self.guest in names.stdout.split():
                left.append(host)
        self.add("clean-up", not left, "the guest is gone from both hosts" if not left else
                 f"{self.guest} is still on {', '.join(left)}", f"virsh destroy {self.guest} on it",
                 label="guest left")
