"""Running commands on this machine with the interface of an SSH connection.

`verify --local` runs the same checks as `verify HOST`: the checks take any runner with
`run(argv)` / `run_command(template)`, and this one keeps the allowlist of remote
commands, so a check cannot run here what it could not run on a host.
"""

from __future__ import annotations

import subprocess
from typing import Optional, Protocol, Sequence

from qemuca.errors import RemoteError
from qemuca.hosts.ssh import RunResult, command, command_line
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
            p = subprocess.run(list(argv), input=stdin or b"", capture_output=True,
                               timeout=timeout or DEFAULT_COMMAND_TIMEOUT)
        except FileNotFoundError:
            return RunResult(127, b"", f"{argv[0]}: command not found\n".encode())
        except subprocess.TimeoutExpired:
            raise RemoteError(f"{self.name}: {argv[0]}: timed out") from None
        result = RunResult(p.returncode, p.stdout, p.stderr)
        if check and not result.ok:
            raise RemoteError(f"{self.name}: {argv[0]} failed (exit {result.rc})")
        return result

    def run_command(self, name: str, stdin: Optional[bytes] = None, timeout: Optional[float] = None,
                    check: bool = False, **args: str) -> RunResult:
        return self.run(command(name, **args), stdin=stdin, timeout=timeout, check=check)
