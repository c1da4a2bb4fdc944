"""A real TLS handshake between two hosts with their QEMU credentials (verify --pair
--handshake): openssl s_server on the destination, s_client on the source, both
peers authenticated as in a migration, both killed by PID whatever happens."""

from __future__ import annotations

import ipaddress
import posixpath
import threading
import time
from typing import List, Optional, Sequence, Union

from qemuca.errors import QemucaError
from qemuca.findings import FAIL, PASS, SKIP, Finding
from qemuca.hosts.layout import (
    CA_BUNDLE,
    CLIENT_CERT,
    CLIENT_KEY,
    CRL,
    SERVER_CERT,
    SERVER_KEY,
)
from qemuca.hosts.procfs import argv_of, find_pids, listening
from qemuca.hosts.runner import Runner
from qemuca.hosts.ssh import RunResult
from qemuca.names import host_port
from qemuca.ops.verify.report import PairOptions, Side


def _reasons(stderr: bytes) -> List[str]:
    """The lines of openssl's output that say why (verify errors, alerts, connect errors)."""
    out = []
    for line in stderr.decode("utf-8", "replace").splitlines():
        line = line.strip()
        if line.startswith("verify error:"):
            out.append(line)
        elif ":error:" in line and "routines:" in line:
            parts = line.split(":")
            if len(parts) > 5:
                out.append(parts[5])
        elif "errno=" in line or "connect:" in line or "bind" in line.lower() or "Address already" in line:
            out.append(line)
    return list(dict.fromkeys(out))


def _kill(runner: Runner, pid: int) -> None:
    try:
        runner.run(["kill", "-KILL", str(pid)], timeout=10)
    except QemucaError:
        pass


def _has(runner: Runner, argv: Sequence[str]) -> bool:
    try:
        return runner.run(list(argv), timeout=10).ok
    except QemucaError:
        return False


def handshake(src: Side, dst: Side, name: str, opts: PairOptions) -> Finding:
    """openssl s_server with dst's server set, s_client on src with its client set and
    -verify_hostname name: both peers authenticated, as in a migration. Each runs under
    `timeout` where the host has it, and whatever still runs at the end is killed by PID."""
    for side in (src, dst):
        if not _has(side.runner, ["openssl", "version"]):
            return Finding("TLS handshake", SKIP, f"{side.name} has no openssl: handshake not tried",
                         "install openssl on the host to run --handshake")
    d = posixpath.normpath(opts.cert_dir)
    address = opts.address or name
    try:
        ipaddress.ip_address(address)
        accept = host_port(address, opts.port)
    except ValueError:
        accept = str(opts.port)  # a name: listen on every address of the destination
    seconds = str(max(1, int(opts.timeout)))
    server = ["openssl", "s_server", "-accept", accept, "-naccept", "1", "-www",
              "-cert", f"{d}/{SERVER_CERT}", "-key", f"{d}/{SERVER_KEY}", "-CAfile", f"{d}/{CA_BUNDLE}",
              "-Verify", "1", "-verify_return_error"]
    if dst.fs.stat(f"{d}/{CRL}") is not None:
        server += ["-CRL", f"{d}/{CRL}", "-crl_check"]
    client = ["openssl", "s_client", "-connect", host_port(address, opts.port), "-ign_eof",
              "-cert", f"{d}/{CLIENT_CERT}", "-key", f"{d}/{CLIENT_KEY}", "-CAfile", f"{d}/{CA_BUNDLE}",
              "-verify_return_error", "-verify_hostname", name]
    bound = {side.name: (["timeout", "-s", "KILL", seconds] if _has(side.runner, ["timeout", "--version"]) else [])
             for side in (src, dst)}
    if listening(dst.fs, opts.port):
        return Finding("TLS handshake", FAIL, f"port {opts.port} is already in use on {dst.name}",
                     "choose a free port with --port")
    done: List[Union[RunResult, QemucaError]] = []

    def serve() -> None:
        try:
            done.append(dst.runner.run(bound[dst.name] + server, timeout=opts.timeout + 5))
        except QemucaError as e:
            done.append(e)

    thread = threading.Thread(target=serve, name="qemuca-s_server", daemon=True)
    deadline = time.monotonic() + opts.timeout
    thread.start()
    server_pid: Optional[int] = None
    client_result: Union[RunResult, QemucaError, None] = None
    client_started = False
    try:
        while time.monotonic() < deadline and thread.is_alive():
            if listening(dst.fs, opts.port):
                pids = find_pids(dst.fs, server, first=True)
                if pids:
                    server_pid = pids[0]
                    break
            time.sleep(0.05)
        if server_pid is None:
            thread.join(max(0.0, deadline - time.monotonic()))
            out = done[0] if done else None
            why = str(out or "") if out is None or isinstance(out, Exception) else "; ".join(_reasons(out.stderr))
            return Finding("TLS handshake", FAIL, f"openssl s_server did not start on {dst.name} at {accept}"
                         + (f": {why}" if why else ""), "choose a free port with --port")
        client_started = True
        try:
            client_result = src.runner.run(bound[src.name] + client, stdin=b"GET / HTTP/1.0\r\n\r\n",
                                           timeout=opts.timeout + 5)
        except QemucaError as e:
            client_result = e
        thread.join(max(0.5, deadline - time.monotonic()))
    finally:
        if server_pid is not None and argv_of(dst.fs, "/proc", str(server_pid)) == server:
            _kill(dst.runner, server_pid)
        if client_started and (client_result is None or isinstance(client_result, Exception)):
            for pid in find_pids(src.fs, client):
                _kill(src.runner, pid)
        thread.join(5)
    where = f"{src.name} -> {dst.name} at {host_port(address, opts.port)}, name {name}"
    if isinstance(client_result, Exception):
        return Finding("TLS handshake", FAIL, f"{where}: {client_result}", "check the address and firewall")
    assert client_result is not None  # s_server started, so s_client ran (or raised: above)
    ok = client_result.ok and b"HTTP/1.0 200" in client_result.stdout
    if ok:
        return Finding("TLS handshake", PASS, f"{where}: both certificates verified by openssl")
    server_out = done[0] if done else None
    if isinstance(server_out, Exception):
        server_out = None
    parts = []
    reasons = _reasons(client_result.stderr)
    if reasons:
        parts.append(f"{src.name} (client): " + "; ".join(reasons))
    if server_out is not None and _reasons(server_out.stderr):
        parts.append(f"{dst.name} (server): " + "; ".join(_reasons(server_out.stderr)))
    reason = " / ".join(parts) or f"openssl s_client exit {client_result.rc}"
    return Finding("TLS handshake", FAIL, f"{where}: {reason}",
                   "fix what the checks above report (or --address / --port)")
