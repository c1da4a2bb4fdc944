"""Running commands on this machine with the interface of an SSH connection.

`verify --local` runs the same checks as `verify HOST`: the checks take any runner with
`run(argv)` / `run_command(template)`, and this one keeps the allowlist of remote
commands, so a check cannot run here what it could not run on a host.
"""

from __future__ import annotations

import os
import selectors
import subprocess
import time
from typing import Optional, Protocol, Sequence

from qemuca.errors import RemoteError
from qemuca.hosts.ssh import RunResult, checked, command, command_line, within_caps
from qemuca.hosts.ssh_config import DEFAULT_COMMAND_TIMEOUT


class Runner(Protocol):
    """What runs commands on a place: an SSH Connection, or a LocalRunner."""

    @property
    def name(self) -> str: ...

    def run(self, argv: Sequence[str], stdin: Optional[bytes] = None, timeout: Optional[float] = None,
            check: bool = False) -> RunResult: ...

    def run_command(self, name: str, stdin: Optional[bytes] = None, timeout: Optional[float] = None,
                    check: bool = False, **args: str) -> RunResult: ...


class LocalRunner:
    """Runs the same allowlisted argv as transport.Connection.run, on this machine."""

    name = "localhost"

    def run(self, argv: Sequence[str], stdin: Optional[bytes] = None, timeout: Optional[float] = None,
            check: bool = False) -> RunResult:
        command_line(argv)  # the allowlist applies here too
        try:
            p = subprocess.Popen(list(argv), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE)
        except FileNotFoundError:
            return RunResult(127, b"", f"{argv[0]}: command not found\n".encode())
        try:
            out, err = self._collect(p, argv[0], stdin or b"", timeout or DEFAULT_COMMAND_TIMEOUT)
        finally:
            if p.poll() is None:
                p.kill()
            p.wait()
            for stream in (p.stdin, p.stdout, p.stderr):
                if stream is not None:
                    stream.close()
        result = RunResult(p.returncode, bytes(out), bytes(err))
        if check:
            checked(self.name, argv[0], result)
        return result

    def _collect(self, p: subprocess.Popen, program: str, stdin: bytes, timeout: float):
        """Its output, as bounded as over SSH (the same caps), within `timeout`; stdin is
        fed as it is read, so a large input cannot deadlock against a full output pipe."""
        assert p.stdin is not None and p.stdout is not None and p.stderr is not None
        out, err = bytearray(), bytearray()
        deadline = time.monotonic() + timeout
        with selectors.DefaultSelector() as sel:
            sel.register(p.stdout, selectors.EVENT_READ, out)
            sel.register(p.stderr, selectors.EVENT_READ, err)
            if stdin:
                sel.register(p.stdin, selectors.EVENT_WRITE)
            else:
                p.stdin.close()
            sent = 0
            while sel.get_map():
                left = deadline - time.monotonic()
                ready = sel.select(left) if left > 0 else []
                if not ready:
                    raise RemoteError(f"{self.name}: {program}: timed out")
                for key, _ in ready:
                    if key.fileobj is p.stdin:
                        try:
                            sent += os.write(key.fd, stdin[sent:sent + 65536])
                        except BrokenPipeError:
                            sent = len(stdin)
                        if sent >= len(stdin):
                            sel.unregister(p.stdin)
                            p.stdin.close()
                        continue
                    chunk = os.read(key.fd, 65536)
                    if not chunk:
                        sel.unregister(key.fileobj)
                    key.data.extend(chunk)
                within_caps(self.name, program, out, err)
        try:
            p.wait(max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            raise RemoteError(f"{self.name}: {program}: timed out") from None
        return out, err

    def run_command(self, name: str, stdin: Optional[bytes] = None, timeout: Optional[float] = None,
                    check: bool = False, **args: str) -> RunResult:
        return self.run(command(name, **args), stdin=stdin, timeout=timeout, check=check)
