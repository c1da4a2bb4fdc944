"""The steps of one probe: read what the hosts hold and what libvirt there enforces,
start the throwaway QEMUs, refuse a plain client, migrate over TLS, measure."""

from __future__ import annotations

import ipaddress
import posixpath
import threading
import time
from typing import Callable, List, Optional

from cryptography import x509

from qemuca.errors import InvalidInput, NotFound, QemucaError, RemoteError
from qemuca.findings import FAIL, PASS, SKIP, WARN, Finding
from qemuca.hosts import qemuconf
from qemuca.hosts.certdir import read_certs
from qemuca.hosts.hostinfo import host_name as host_name_of
from qemuca.hosts.layout import CA_BUNDLE, CLIENT_CERT, SERVER_CERT
from qemuca.ops.fleet import failure
from qemuca.ops.probe.diagnose import Diagnosis
from qemuca.ops.probe.qmp import (
    MAX_BANDWIDTH,
    Interrupted,
    ProbeTimeout,
    QemuExited,
    QemuHost,
    QmpError,
    RemoteQemu,
    filled_bytes,
    migration_uri,
    qemu_args,
    stop_all,
    tls_object,
)
from qemuca.ops.probe.report import PORT_RANGE, Migration, ProbeOptions, ProbeReport, Revocations, rate

IDLE_WAIT = 5.0  # seconds a destination that saw nothing is waited for
TERMINAL = ("completed", "failed", "cancelled")


def probe_pair(src: str, dst: str, connect: Callable, opts: ProbeOptions = ProbeOptions(),
               revocations: Optional[Revocations] = None,
               cancel: Optional[threading.Event] = None) -> ProbeReport:
    """Probe one ordered pair; never raises (a host that cannot be reached, a timeout or
    Ctrl-C end up in the report). Everything started is stopped before it returns."""
    report = ProbeReport(src, dst)
    deadline = time.monotonic() + opts.timeout
    hosts: List[QemuHost] = []
    qemus: List[RemoteQemu] = []
    try:
        if src == dst:
            raise InvalidInput(f"source and destination are the same host ({src})")
        for name in (src, dst):
            if cancel is not None and cancel.is_set():
                raise Interrupted("interrupted")
            hosts.append(QemuHost(name, connect(name)))
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
    except Exception as e:  # one pair's surprise must not stop a matrix
        report.error = failure(f"{src} -> {dst}", e)[0]
        report.findings.append(Finding("probe", FAIL, report.error, label="error"))
    finally:
        stop_all(qemus)
        for h in hosts:
            h.conn.close()
    return report


class _Probe(Diagnosis):
    """The steps of one probe, in order; results go into the report as they come."""

    def __init__(self, report: ProbeReport, src: QemuHost, dst: QemuHost, opts: ProbeOptions,
                 revocations: Optional[Revocations], cancel: Optional[threading.Event], deadline: float,
                 qemus: List[RemoteQemu]):
        self.r, self.s, self.d, self.opts = report, src, dst, opts
        self.rev, self.cancel, self.deadline, self.qemus = revocations, cancel, deadline, qemus
        self.src_certs: List[x509.Certificate] = []
        self.dst_certs: List[x509.Certificate] = []
        self.src_bundle: List[x509.Certificate] = []
        self.dst_bundle: List[x509.Certificate] = []
        self.dst_cert_problem: Optional[str] = None

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
        sq = self.qemu(s, "source", qemu_args(opts.ram_mib, False, (s.qemu_path, s.qemu_size)))
        dq.greet(self.deadline)
        pq.greet(self.deadline)
        sq = self.greet_source(sq)
        self.r.qemu = {"source": f"{s.qemu} {sq.version}", "destination": f"{d.qemu} {dq.version}"}
        # 1. The destination: a TLS listener over the deployed server credentials.
        try:
            dq.cmd("object-add", self.deadline, **tls_object(opts.cert_dir, "server"))
            dq.cmd("migrate-set-parameters", self.deadline, **{"tls-creds": "tls0"})
        except QmpError as e:
            self.r.tls = Migration(True, "failed", errors=[("destination", str(e))])
            self.add("plain client refused", SKIP, f"no TLS listener: {d.name}'s QEMU refused its credentials")
            self.migration_finding(self.r.tls, name)
            return
        port = self.listen(dq, address)
        self.r.port = port
        uri = migration_uri(address, port)
        # 2. A plain source against the TLS listener must get nowhere. Judged by the
        # destination: a small stream can fit in the socket buffer, and then the plain
        # source believes it has completed.
        self.r.plain_client = self.migrate(pq, dq, uri, tls=False, expect=False)
        pq.stop()
        self.plain_client_finding(uri)
        sq.cmd("migrate-set-parameters", self.deadline, **{"max-bandwidth": MAX_BANDWIDTH})
        # 3. The real thing: client credentials, tls-hostname = NAME (libvirt's tls.destination).
        try:
            sq.cmd("object-add", self.deadline, **tls_object(opts.cert_dir, "client"))
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
        self.src_certs, _ = read_certs(self.s.fs, posixpath.join(cd, CLIENT_CERT))
        server = posixpath.join(cd, SERVER_CERT)
        self.dst_certs, problem = read_certs(self.d.fs, server)
        self.dst_cert_problem = problem or (None if self.dst_certs else f"{server} does not exist")
        if self.dst_cert_problem:
            self.add("destination certificate", WARN, f"{self.dst_cert_problem}: revocation and names not "
                     "checked", f"qemuca deploy {self.d.name}")
        self.src_bundle, _ = read_certs(self.s.fs, posixpath.join(cd, CA_BUNDLE))
        self.dst_bundle, _ = read_certs(self.d.fs, posixpath.join(cd, CA_BUNDLE))

    def policy(self) -> None:
        """What libvirt on the destination would enforce (the probe itself drives QEMU)."""
        d, path = self.d, self.opts.qemu_conf_path
        try:
            doc = qemuconf.read_document(d.fs, path)
            tls = qemuconf.resolve_migration_tls(doc, lambda p: d.fs.is_dir(p))
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
            fix = (f"qemuca issue --force {host.name} && qemuca deploy {host.name} "
                   f"(or qemuca enroll --replace {host.name})")
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
        found = host_name_of(self.d.conn)
        if found.fully_qualified and found.name:
            return found.name
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
    def qemu(self, host: QemuHost, role: str, args: List[str]) -> RemoteQemu:
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
            self.r.ram_filled_bytes = filled_bytes(self.opts.ram_mib, s.qemu_size)
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
                dq.cmd("migrate-incoming", self.deadline, uri=migration_uri(address, port))
            except QmpError as e:
                last = str(e)
                if "in use" in last.lower() and len(ports) > 1:
                    continue
                raise QemucaError(f"{self.d.name}: cannot listen on {migration_uri(address, port)[4:]}: {last}"
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
        sq = self.qemu(s, "source-plain", qemu_args(self.opts.ram_mib, False, (s.qemu_path, s.qemu_size)
                                                    if self.r.ram_filled_bytes else None))
        dq.greet(self.deadline)
        sq.greet(self.deadline)
        port = self.listen(dq, address)
        sq.cmd("migrate-set-parameters", self.deadline, **{"max-bandwidth": MAX_BANDWIDTH})
        self.r.plain = self.migrate(sq, dq, migration_uri(address, port), tls=False)
        stop_all([sq, dq])
        if not self.r.plain.completed:
            self.add("throughput TLS / plain", WARN, f"the plain migration failed: {self.r.plain.error}")
            return
        ratio = self.r.ratio
        self.add("throughput TLS / plain", PASS,
                 f"TLS {rate(self.r.tls.throughput)}, plain {rate(self.r.plain.throughput)}: "
                 f"ratio {ratio:.2f}" if ratio else "not measurable (no bytes or no time)")
