"""What crosses the loopback wire, captured with a real tcpdump.

Used to prove a migration stream encrypted: its bytes must hold neither QEMU's stream
magic nor a marker planted in the guest's RAM or disk, while a plain migration shows both.
"""

from __future__ import annotations

import select
import signal
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from tests.support.tools import require_tool

QEMU_MAGIC = b"QEVM"  # the first bytes of every QEMU migration stream
TLS_APPDATA = bytes([0x17, 0x03, 0x03])  # a TLS 1.2/1.3 application-data record header


class Capture:
    def __init__(self, path: Path):
        self.path = path
        self.data = b""


@contextmanager
def capture(path: Path, address: str, timeout: float = 30.0) -> Iterator[Capture]:
    """tcpdump on lo of every TCP segment to or from `address`; `.data` holds the raw
    pcap bytes (payloads included, whole packets) once the block is left."""
    tcpdump = require_tool("tcpdump")
    proc = subprocess.Popen([tcpdump, "-i", "lo", "-U", "-n", "-s", "0", "-w", str(path),
                             "tcp and host " + address],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    result = Capture(path)
    try:
        assert proc.stderr is not None
        deadline, seen = time.monotonic() + timeout, b""
        while b"listening on" not in seen:  # tcpdump says so once the filter is in place
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"tcpdump did not start: {seen.decode(errors='replace')}")
            if select.select([proc.stderr], [], [], 0.1)[0]:
                seen += proc.stderr.read1(4096)
        yield result
    finally:
        time.sleep(0.2)  # the last segments are written (-U: per packet)
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    result.data = path.read_bytes() if path.exists() else b""
