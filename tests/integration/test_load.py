"""Load (issue 7.6): `qemuca deploy` to 50 fake hosts with --parallel 25, run in this
very process several times, so that a leak of file descriptors, threads (paramiko
starts one per connection) or memory would add up round after round and show.

The command runs through qemuca.cli.main with an argv, as the console script runs it;
only the process is shared (its exit is caught).
"""

from __future__ import annotations

import gc
import json
import os
import threading
import time
from typing import Dict, List, Tuple

import pytest

from qemuca.cli import main
from tests.integration.test_deploy import host_set, ssh_args, store_fp
from tests.support.pki import make_store

pytestmark = [pytest.mark.sshd, pytest.mark.slow]

HOSTS, PARALLEL, ROUNDS = 50, 25, 5
RSS_GROWTH_MB = 16  # rounds 2..N; a leak of one connection's worth per host would pass 50 MB


def in_process(capsys, *argv: str) -> Tuple[int, list]:
    """Run the CLI in this process; its exit status and --json output."""
    capsys.readouterr()
    try:
        main([str(a) for a in argv])
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    out, err = capsys.readouterr()
    assert "Traceback" not in err, err
    return code, json.loads(out)


def fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def settled(baseline_threads: int, timeout: float = 10.0) -> Dict[str, float]:
    """fds, threads and RSS once the run's threads have ended (paramiko's transport
    threads exit just after their connection closes)."""
    deadline = time.monotonic() + timeout
    while threading.active_count() > baseline_threads and time.monotonic() < deadline:
        time.sleep(0.05)
    gc.collect()
    return {"fds": fds(), "threads": threading.active_count(), "rss_mb": rss_mb()}


def test_fifty_hosts_converge_without_leaks(fleet_factory, tmp_path, capsys):
    t0 = time.monotonic()
    fleet = fleet_factory(HOSTS)
    started = time.monotonic() - t0
    home = make_store(tmp_path)
    argv = ["--home", home, "deploy", *fleet.names, *ssh_args(fleet.ssh_config, fleet.known_hosts),
            "--parallel", PARALLEL, "--json"]
    gc.collect()
    before = {"fds": fds(), "threads": threading.active_count(), "rss_mb": rss_mb()}

    rounds: List[dict] = []
    for n in range(1, ROUNDS + 1):
        t = time.monotonic()
        code, reports = in_process(capsys, *argv, *(["--issue"] if n == 1 else []))
        took = time.monotonic() - t
        assert code == 0, [r for r in reports if r["result"] == "failed"][:3]
        results = {r["result"] for r in reports}
        assert len(reports) == HOSTS and results == {"changed" if n == 1 else "unchanged"}, results
        rounds.append(dict(settled(before["threads"]), seconds=took))

    for host in fleet:  # what QEMU would load on every host is the set in the index
        assert host_set(host) == store_fp(home, host.name)

    with capsys.disabled():
        print(f"\n{HOSTS} fake hosts started in {started:.1f} s; deploy --parallel {PARALLEL}, "
              f"in-process rounds:")
        print(f"  before: fds {before['fds']}, threads {before['threads']}, RSS {before['rss_mb']:.1f} MB")
        for n, r in enumerate(rounds, 1):
            print(f"  round {n} ({'changed' if n == 1 else 'unchanged'}): {r['seconds']:.1f} s, "
                  f"fds {r['fds']}, threads {r['threads']}, RSS {r['rss_mb']:.1f} MB")
    for n, r in enumerate(rounds, 1):
        assert r["threads"] == before["threads"], f"round {n} left threads: {threading.enumerate()}"
        assert r["fds"] == before["fds"], (n, r, os.listdir("/proc/self/fd"))
    growth = rounds[-1]["rss_mb"] - rounds[1]["rss_mb"]
    assert growth < RSS_GROWTH_MB, f"RSS grew {growth:.1f} MB over rounds 2..{ROUNDS}"
