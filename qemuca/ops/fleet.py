"""Run one per-host operation over many hosts: a bounded pool, results in input order.

One host's failure never stops the others: the operation returns a report for every
host (failures included). Each result goes to a callback the CLI supplies as its host
finishes (progress, streamed --json), so the core never knows about rich. Ctrl-C
starts no further host, lets those in flight finish (each ends with its old set or its
new one), reports them, and raises FleetInterrupted with what finished. `connected` and
`failure` are the one way every command connects to its hosts and turns what went wrong
there into its report's line.
"""

from __future__ import annotations

import signal
import threading
from concurrent.futures import ThreadPoolExecutor, as_completed
from contextlib import contextmanager
from typing import Callable, Iterator, List, Optional, Sequence, Tuple, TypeVar

from qemuca.errors import EXIT_INTERRUPTED, QemucaError
from qemuca.hosts.remotefs import RemoteFS
from qemuca.hosts.ssh import Connection

R = TypeVar("R")
MAX_PARALLEL = 256


class FleetInterrupted(QemucaError):
    """Ctrl-C during a fleet run: `results` holds the hosts that finished (input order)."""

    exit_code = EXIT_INTERRUPTED

    def __init__(self, results: list, total: int):
        super().__init__(f"interrupted: {len(results)} of {total} hosts done, the others not started")
        self.results = results


def run_fleet(hosts: Sequence[str], operation: Callable[[str], R], parallel: int = 10,
              on_done: Optional[Callable[[str, R], None]] = None) -> List[R]:
    if not hosts:
        return []
    workers = max(1, min(parallel, len(hosts), MAX_PARALLEL))
    results = {}

    def finished(future, host) -> None:
        results[host] = future.result()
        if on_done is not None:
            with interrupts.held():
                on_done(host, results[host])

    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="qemuca-host")
    futures = {pool.submit(operation, host): host for host in hosts}
    interrupts = _HeldInterrupt()
    try:
        with interrupts:
            for future in as_completed(futures):
                finished(future, futures[future])
    except KeyboardInterrupt:
        for future in futures:
            future.cancel()  # the hosts not started yet never start
        pool.shutdown(wait=True)  # those in flight end as they would (a second Ctrl-C stops waiting)
        for future, host in futures.items():
            if host not in results and future.done() and not future.cancelled():
                finished(future, host)
        raise FleetInterrupted([results[h] for h in hosts if h in results], len(hosts)) from None
    finally:
        pool.shutdown(wait=True)
    return [results[h] for h in hosts]


class _HeldInterrupt:
    """Ctrl-C as usual (KeyboardInterrupt), except while a result is handed on: then it
    waits until that is done, so streamed output never ends mid-object. Only where
    SIGINT has Python's default handler, in the main thread (probe installs its own)."""

    def __init__(self):
        self.holding = self.pending = False
        self.installed = (threading.current_thread() is threading.main_thread()
                          and signal.getsignal(signal.SIGINT) is signal.default_int_handler)

    def __enter__(self):
        if self.installed:
            signal.signal(signal.SIGINT, self._handler)
        return self

    def __exit__(self, *exc):
        if self.installed:
            signal.signal(signal.SIGINT, signal.default_int_handler)

    def _handler(self, signum, frame):
        if self.holding:
            self.pending = True
        else:
            raise KeyboardInterrupt

    @contextmanager
    def held(self) -> Iterator[None]:
        self.holding = True
        try:
            yield
        finally:
            self.holding = False
        if self.pending:
            self.pending = False
            raise KeyboardInterrupt


@contextmanager
def connected(connect: Callable[[str], Connection], *hosts: str) -> Iterator[List[Tuple[Connection, RemoteFS]]]:
    """(connection, file system) for each host, in order; all closed afterwards."""
    conns = []
    try:
        for host in hosts:
            conns.append(connect(host))
        yield [(conn, RemoteFS(conn)) for conn in conns]
    finally:
        for conn in conns:
            conn.close()


def failure(host: str, error: BaseException) -> Tuple[str, Optional[int]]:
    """(one line, exit code or None) for what went wrong on a host, the same in every
    report: qemuca's errors as they are, a file error with its path, anything else
    (e.g. paramiko.SFTPError) by its type, so one host's surprise never stops a fleet."""
    if isinstance(error, QemucaError):
        return str(error), error.exit_code
    if isinstance(error, EOFError):  # a read that met the end of the SSH stream
        return f"{host}: connection closed by the remote side", None
    if isinstance(error, OSError):
        where = f" ({error.filename})" if error.filename else ""
        return f"{host}: {error.strerror or error}{where}", None
    if isinstance(error, ValueError):
        return f"{host}: {error}", None
    return f"{host}: {type(error).__name__}: {error}", None
