"""Run one per-host operation over many hosts: a bounded pool, results in input order.

One host's failure never stops the others: the operation returns a report for every
host (failures included). Progress goes to a callback the CLI supplies, so the core
never knows about rich.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor, as_completed
from typing import Callable, List, Optional, Sequence, TypeVar

R = TypeVar("R")
MAX_PARALLEL = 256


def run_fleet(hosts: Sequence[str], operation: Callable[[str], R], parallel: int = 10,
              on_done: Optional[Callable[[str, R], None]] = None) -> List[R]:
    if not hosts:
        return []
    workers = max(1, min(parallel, len(hosts), MAX_PARALLEL))
    results = {}
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="qemuca-host") as pool:
        futures = {pool.submit(operation, host): host for host in hosts}
        for future in as_completed(futures):
            host = futures[future]
            results[host] = future.result()
            if on_done is not None:
                on_done(host, results[host])
    return [results[h] for h in hosts]
