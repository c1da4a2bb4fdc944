"""Running qemuca in a pseudo-terminal of a given size, as a person at a terminal sees it."""

from __future__ import annotations

import fcntl
import os
import re
import select
import struct
import subprocess
import termios
import time
from typing import List, Sequence

from tests.support.pki import QEMUCA, clean_env

_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07")


def run_in_terminal(home, *args: str, columns: int = 80, lines: int = 50, timeout: float = 120) -> str:
    """`qemuca --home HOME ARGS` with stdout and stderr on a pty of columns x lines;
    returns what it printed, escape sequences removed and line ends normalised."""
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", lines, columns, 0, 0))
    env = clean_env()
    env.pop("COLUMNS", None)
    env.pop("LINES", None)
    env["TERM"] = "xterm-256color"
    proc = subprocess.Popen([*QEMUCA, "--home", str(home), *map(str, args)], stdin=subprocess.DEVNULL,
                            stdout=slave, stderr=slave, env=env, close_fds=True)
    os.close(slave)
    chunks: List[bytes] = []
    deadline = time.monotonic() + timeout
    try:
        while True:
            ready, _, _ = select.select([master], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                raise TimeoutError(f"qemuca {' '.join(args)} did not finish in {timeout} s")
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not data:
                break
            chunks.append(data)
    finally:
        os.close(master)
        proc.wait(timeout=10)
    return _ANSI.sub("", b"".join(chunks).decode("utf-8", "replace")).replace("\r\n", "\n")


def longest_line(text: str) -> int:
    return max((len(line.rstrip()) for line in text.splitlines()), default=0)


def whole_on_a_line(text: str, names: Sequence[str]) -> List[str]:
    """The names that do not stand whole on some line of the output."""
    return [n for n in names if not any(n in line for line in text.splitlines())]
