"""Kill a fake host at an exact step of what a client does to it, without hooks in the tool.

Two pieces, both outside the tool under test:

- `tap_sftp_log(host)` makes the host's sftp-server log every operation it runs (open,
  set, fsync, close, posix-rename, symlink, mkdir, remove, ... with their paths) to a file,
  by swapping the host's `Subsystem sftp` for a wrapper and restarting its sshd.
- `FaultProxy(host)` is a TCP relay in front of the host's sshd. Before it passes any
  byte from the host to the client, it reads the new lines of that log. When an armed
  trigger matches (the Nth line matching a regex), it SIGKILLs the whole host and drops
  the bytes it holds.

Why this is deterministic: sftp-server logs an operation before it runs it, and answers
only after it ran it; the client sends its next request only after that answer. The
answer of operation N has to cross the relay, so when the relay sees N's log line and
kills, operation N has run and operation N+1 never starts. (The only bytes that could
reach the relay in between are SSH window adjusts, which the small requests of a deploy
do not cause.) No sleeps, no timing windows.

`arm_connect()` kills the host on the first bytes its sshd sends on a new connection
(the SSH banner): a host that dies while the client connects.
"""

from __future__ import annotations

import os
import re
import socket
import threading
from pathlib import Path
from typing import Iterable, List, Optional, Sequence

from tests.support.fakehosts import SFTP_SERVER, FakeHost

TAP_SCRIPT = """#!/bin/sh
exec 2>>'{log}'
echo "sftp-server pid $$" >&2
exec {sftp} -e -l VERBOSE
"""


def tap_sftp_log(host: FakeHost) -> Path:
    """Make the host's sftp-server log each operation to ROOT/sftp.log; restarts sshd.
    Side effect: FakeHost.commands() now also lists the wrapper's path for SFTP sessions."""
    log = host.root / "sftp.log"
    wrapper = host.root / "sftp-tap.sh"
    wrapper.write_text(TAP_SCRIPT.format(log=log, sftp=SFTP_SERVER))
    os.chmod(wrapper, 0o755)
    log.touch()
    config = host.root / "sshd_config"
    text = config.read_text()
    line = f"Subsystem sftp {SFTP_SERVER}\n"
    if line in text:
        config.write_text(text.replace(line, f"Subsystem sftp {wrapper}\n"))
        host.restart()
    return log


class FaultProxy:
    """A relay 127.0.0.1:port -> host's sshd that can kill the host at a logged step."""

    def __init__(self, host: FakeHost):
        self.host = host
        self.log = tap_sftp_log(host)
        self._offset = self.log.stat().st_size
        self._partial = b""
        self._lock = threading.Lock()
        self._pattern: Optional[re.Pattern] = None
        self._nth = 0
        self._seen = 0
        self._on_connect = False
        self.label = ""
        self.fired: Optional[str] = None  # the log line (or "connect") that killed the host
        self._closed = False
        self._socks: List[socket.socket] = []
        self._threads: List[threading.Thread] = []
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._spawn(self._accept_loop)

    # -- what a test uses ------------------------------------------------------------
    def arm(self, label: str, pattern: str, nth: int = 1) -> None:
        """Kill the host once the `nth` sftp log line matching `pattern` (re.search)
        has run, before the client hears about it. Lines logged so far do not count."""
        with self._lock:
            self._drain()  # start after what is logged already
            self.label, self._pattern, self._nth, self._seen = label, re.compile(pattern), nth, 0
            self._on_connect, self.fired = False, None

    def arm_connect(self, label: str = "connect") -> None:
        with self._lock:
            self._drain()
            self.label, self._pattern, self._on_connect, self.fired = label, None, True, None

    def disarm(self) -> None:
        with self._lock:
            self._pattern, self._on_connect = None, False

    def log_lines(self) -> List[str]:
        return self.log.read_text(errors="replace").splitlines()

    def close(self) -> None:
        self._closed = True
        _close(self._listener)  # shutdown wakes the blocked accept()
        for s in list(self._socks):
            _close(s)
        for t in self._threads:
            t.join(timeout=10)

    def __enter__(self) -> FaultProxy:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- the relay ---------------------------------------------------------------------
    def _spawn(self, target, *args) -> None:
        t = threading.Thread(target=target, args=args, daemon=True,
                             name=f"fault-proxy-{self.host.name}")
        self._threads.append(t)
        t.start()

    def _accept_loop(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.host.port), timeout=10)
                upstream.settimeout(None)
            except OSError:
                _close(client)  # the host is down: like a refused connection
                continue
            self._socks += [client, upstream]
            self._spawn(self._pump, client, upstream, False)
            self._spawn(self._pump, upstream, client, True)

    def _pump(self, src: socket.socket, dst: socket.socket, from_host: bool) -> None:
        hold = False
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if from_host and self._should_kill():
                    hold = self._fire(src, dst)
                    break
                dst.sendall(data)
        except OSError:
            pass
        finally:
            if not hold:
                _close(src)
                _close(dst)

    def _fire(self, src: socket.socket, dst: socket.socket) -> bool:
        """What the trigger does (here: kill the whole host); True keeps both sockets open."""
        self.host.kill()
        return False

    def _should_kill(self) -> bool:
        with self._lock:
            if self._on_connect:
                self._on_connect, self.fired = False, "connect"
                return True
            for line in self._drain():
                if self._pattern is not None and self._pattern.search(line):
                    self._seen += 1
                    if self._seen == self._nth:
                        self._pattern, self.fired = None, line
                        return True
            return False

    def _drain(self) -> List[str]:
        """The complete log lines written since the last call."""
        with open(self.log, "rb") as f:
            f.seek(self._offset)
            data = f.read()
        self._offset += len(data)
        data = self._partial + data
        *lines, self._partial = data.split(b"\n")
        return [line.decode(errors="replace") for line in lines]


def _close(s: socket.socket) -> None:
    try:
        s.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    s.close()


def write_proxy_client_files(proxies: Sequence[FaultProxy], identity: Path,
                             directory: Path) -> tuple:
    """ssh_config + known_hosts that reach each host (by its name) through its proxy."""
    directory = Path(directory)
    config, known = directory / "ssh_config", directory / "known_hosts"
    blocks, keys = [], []
    for p in proxies:
        blocks.append(f"Host {p.host.name}\n    HostName 127.0.0.1\n    Port {p.port}\n"
                      f"    User root\n    IdentityFile {identity}\n    IdentitiesOnly yes\n")
        keys.append(f"[127.0.0.1]:{p.port} {p.host.host_key_line}")
    config.write_text("\n".join(blocks))
    known.write_text("\n".join(keys) + "\n")
    return config, known


def close_all(proxies: Iterable[FaultProxy]) -> None:
    for p in proxies:
        p.close()
