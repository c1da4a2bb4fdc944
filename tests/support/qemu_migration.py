"""A real QEMU live migration, with or without TLS, to prove a credential set works.

Two tiny guests (`qemu-system-x86_64 -machine pc,accel=tcg -m 32`, no disk, no NIC) are
migrated over 127.0.0.1. The TLS object is added over QMP right before the migration, as
libvirt does, so QEMU reads the certificate files at that moment and a bad file comes
back as QEMU's own error message (not an exit, not a hang). QMP runs over a socketpair
inherited by QEMU: no socket path, so it works unchanged when QEMU runs inside a fake
host's namespaces (`Endpoint.prefix`, e.g. `FakeHost.prefix`).
"""

from __future__ import annotations

import json
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

QEMU = "qemu-system-x86_64"
# -S: the guest stays paused (nothing to boot); its 32 MiB of RAM still migrate.
QEMU_ARGS = ["-machine", "pc,accel=tcg", "-m", "32", "-nodefaults", "-display", "none",
             "-S", "-no-user-config"]
TERMINAL = ("completed", "failed", "cancelled")


class QMPError(Exception):
    """A QMP command failed, QEMU exited, or QEMU did not answer in time."""


@dataclass
class Endpoint:
    """One side of a migration: its certificate dir (as its QEMU sees it) and a command
    prefix to run QEMU somewhere else (e.g. ["nsenter", "-t", PID, "-m", "-u", "--"])."""
    cert_dir: str = ""
    prefix: Sequence[str] = ()
    verify_peer: bool = True  # destination only: libvirt's migrate_tls_x509_verify


@dataclass
class MigrationResult:
    completed: bool
    error: str | None
    seconds: float            # from `migrate` to the end (startup not counted)
    transferred_bytes: int
    src_status: str           # query-migrate status, or "exited" / "not-started"
    dst_status: str
    src_log: str = field(default="", repr=False)  # QEMU's stderr
    dst_log: str = field(default="", repr=False)


class Qemu:
    """One QEMU process with a QMP client; a context manager that always kills it."""

    def __init__(self, name: str, prefix: Sequence[str] = (), incoming: bool = False,
                 timeout: float = 30.0, log: Path | None = None):
        self.name, self.timeout = name, timeout
        ours, theirs = socket.socketpair()
        self._stderr = open(log, "w+b") if log else tempfile.TemporaryFile()
        argv = list(prefix) + [QEMU] + QEMU_ARGS + [
            "-chardev", f"socket,id=qmp,fd={theirs.fileno()}", "-mon", "chardev=qmp,mode=control"]
        if incoming:
            argv += ["-incoming", "defer"]
        self._sock, self._file = ours, ours.makefile("rb")
        ours.settimeout(timeout)
        try:
            self.proc = subprocess.Popen(argv, pass_fds=[theirs.fileno()],
                                         stdin=subprocess.DEVNULL, stdout=self._stderr,
                                         stderr=self._stderr)
        except OSError:
            for f in (self._file, ours, self._stderr):
                f.close()
            raise
        finally:
            theirs.close()
        try:
            self._read()  # the greeting
            self.cmd("qmp_capabilities")
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> Qemu:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=self.timeout)
        self._file.close()
        self._sock.close()
        self._stderr.close()

    def log(self) -> str:
        """What QEMU printed (its error messages)."""
        self._stderr.flush()
        self._stderr.seek(0)
        return self._stderr.read().decode(errors="replace").strip()

    def alive(self) -> bool:
        return self.proc.poll() is None

    def _exited(self) -> None:
        """QMP is gone because QEMU is exiting: wait for it, raise with its message."""
        self.proc.wait(timeout=self.timeout)
        raise QMPError(f"{self.name}: QEMU exited ({self.proc.returncode}): {self.log()}")

    def _read(self) -> dict:
        while True:
            try:
                line = self._file.readline()
            except socket.timeout:
                raise QMPError(f"{self.name}: no answer from QEMU in {self.timeout} s") from None
            except OSError:
                line = b""  # connection reset: QEMU is exiting
            if not line:
                self._exited()
            message = json.loads(line)
            if "event" not in message:  # events are not needed here
                return message

    def cmd(self, command: str, **arguments) -> dict:
        """Run a QMP command; its `return` value, or QMPError with QEMU's `desc`."""
        request = {"execute": command}
        if arguments:
            request["arguments"] = arguments
        try:
            self._sock.sendall(json.dumps(request).encode() + b"\n")
        except OSError:
            self._exited()
        reply = self._read()
        if "error" in reply:
            raise QMPError(f"{self.name}: {command}: {reply['error'].get('desc')}")
        return reply.get("return", {})

    def add_tls_creds(self, cert_dir: str, endpoint: str, verify_peer: bool = True) -> None:
        self.cmd("object-add", **{"qom-type": "tls-creds-x509", "id": "tls0", "dir": cert_dir,
                                  "endpoint": endpoint, "verify-peer": verify_peer})

    def status(self) -> str:
        """query-migrate's status ("none": an incoming side still waiting), or "exited"."""
        if not self.alive():
            return "exited"
        try:
            return self.cmd("query-migrate").get("status", "none")
        except QMPError:
            return "exited" if not self.alive() else "unknown"


def migrate(src: Endpoint, dst: Endpoint, tls_hostname: str | None = None, *, tls: bool = True,
            timeout: float = 30.0, workdir: Path | None = None) -> MigrationResult:
    """Start a destination and a source QEMU, migrate the source to the destination over
    127.0.0.1 (TLS: destination = server endpoint, source = client endpoint with
    `tls-hostname`), wait for the end on both sides; QEMUs are always killed and reaped."""
    deadline = time.monotonic() + timeout
    logs = {n: (Path(workdir) / f"{n}.log" if workdir else None) for n in ("src", "dst")}
    d = s = None
    error, started = None, None
    try:
        d = Qemu("destination", dst.prefix, incoming=True, timeout=timeout, log=logs["dst"])
        if tls:
            d.add_tls_creds(dst.cert_dir, "server", dst.verify_peer)
            d.cmd("migrate-set-parameters", **{"tls-creds": "tls0"})
        d.cmd("migrate-incoming", uri="tcp:127.0.0.1:0")
        port = d.cmd("query-migrate")["socket-address"][0]["port"]
        s = Qemu("source", src.prefix, timeout=timeout, log=logs["src"])
        if tls:
            s.add_tls_creds(src.cert_dir, "client")
            params = {"tls-creds": "tls0"}
            if tls_hostname is not None:
                params["tls-hostname"] = tls_hostname
            s.cmd("migrate-set-parameters", **params)
        started = time.monotonic()
        s.cmd("migrate", uri=f"tcp:127.0.0.1:{port}")
        info = _wait(s, deadline)
        if info.get("status") not in TERMINAL + ("exited",):
            error = f"source: no end after {timeout} s (status {info.get('status')})"
        elif info.get("status") != "completed":
            error = f"source: {info.get('error-desc') or info.get('status')}"
        # A failed source may leave the destination waiting: give it a moment to notice.
        _wait(d, deadline if error is None else min(deadline, time.monotonic() + 0.25))
        return _result(s, d, error, started, info)
    except QMPError as e:
        return _result(s, d, str(e), started, {})
    finally:
        for q in (s, d):
            if q:
                q.close()


def _wait(q: Qemu, deadline: float) -> dict:
    """Poll query-migrate until a terminal status, QEMU's exit, or the deadline."""
    while True:
        try:
            info = q.cmd("query-migrate")
        except QMPError:
            if q.alive():
                raise
            return {"status": "exited"}
        if info.get("status") in TERMINAL or time.monotonic() > deadline:
            return info
        time.sleep(0.01)


def _result(s: Qemu | None, d: Qemu | None, error: str | None, started: float | None,
            info: dict) -> MigrationResult:
    src_status = s.status() if s else "not-started"
    dst_status = d.status() if d else "not-started"
    completed = error is None and src_status == dst_status == "completed"
    if not completed:
        extra = [f"{n} stderr: {q.log()}" for n, q in (("source", s), ("destination", d))
                 if q and q.log()]
        error = "; ".join([error or f"destination status {dst_status}"] + extra)
    return MigrationResult(
        completed=completed, error=None if completed else error,
        seconds=time.monotonic() - started if started else 0.0,
        transferred_bytes=info.get("ram", {}).get("transferred", 0),
        src_status=src_status, dst_status=dst_status,
        src_log=s.log() if s else "", dst_log=d.log() if d else "")
