#!/usr/bin/env python3
"""Benchmark qemuca's fleet commands at 50 and 500 hosts: time per host, peak RSS, fds.

Issue 16, part 1. N fake hosts (tests/support/fakehosts.py: a real sshd per host in its
own namespaces, on 127.0.0.1) are started once, for the largest count. Per count, a
fresh store (tests/support/pki.py make_store) gets a certificate for each of the first
N hosts (untimed), then each command runs as a child process, timed from outside:

- `deploy` (every host changes: this store's set is new to it), `verify`,
  `renew --expiring-within 800` (every certificate is within the window: renew works on
  every host), `check` (the store only: it never connects to a host), and `probe
  --pairs` on a few pairs (real QEMU on both ends).

Per command and count: wall seconds, ms per host, peak RSS of the qemuca process
(os.wait4's ru_maxrss), peak open fds and threads (sampled from /proc/PID every 50 ms),
and against the baseline `qemuca --version`: RSS above it and fds above it per
--parallel. Targets: ms per host at the largest count within 1.25x of the smallest
(deploy, verify, renew); peak RSS above the baseline, and fds, no more than a small
constant per in-flight host (RSS_PER_WORKER_MB, FDS_PER_WORKER) and not growing with
the host count (largest within 1.25x of smallest + 8 MB / + 8 fds).

Then a parallelism sweep: deploy to the same --sweep-hosts hosts at each --sweep
value (new certificates before each run, two rounds in alternating order), hosts per
second, to choose the default of --parallel.

    sudo python3 bench/bench_scale.py                    # 50 and 500 hosts, sweep 5 10 20 40 at 100
    python3 bench/bench_scale.py --hosts 20 50 --no-sweep --probe-pairs 2   # a quick run
    python3 bench/bench_scale.py --hosts 50 500 --check

Needs root (namespaces), sshd, qemu-system-x86_64 (probe; --probe-pairs 0 skips it).
Raises the soft open-files limit when it is too low for the fleet (and says so). Every
fake host is stopped at the end, on failure and on Ctrl-C/SIGTERM too. Results: a table
on stdout and JSON in bench/results/ (git-ignored).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from common import ROOT, busy, environment, qemuca_env, write_results

HERE = Path(__file__).resolve().parent
COUNTS = (50, 500)
SWEEP = (5, 10, 20, 40)
SWEEP_HOSTS = 100
PROBE_PAIRS = 3
TARGET_SCALE = 1.25  # ms per host at the largest count / at the smallest, at most
RSS_PER_WORKER_MB = 2.0  # peak RSS per in-flight host (the sweep's slope), at most
FDS_PER_WORKER = 8  # peak fds per in-flight host (above `--version`, and the sweep's slope), at most
GROWTH_SLACK_MB, GROWTH_SLACK_FDS = 8.0, 8
SAMPLE_S = 0.05
RENEW_WINDOW = 800  # days: covers the 730-day certificates issued below
SCALED = ("deploy", "verify", "renew")  # the commands that work on every host


# ---------------------------------------------------------------- one measured child

def _fd_count(pid: int) -> Optional[int]:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None


# ru_maxrss counts the pages a child shared with its parent before exec, so a child of
# this process (holding the fleet, cryptography...) would report at least our RSS. A
# small launcher (python -S, a few MB) starts the command and reports its rusage.
LAUNCHER = """
import os, sys
out = int(sys.argv[1])  # the command's stdout; ours carries its pid and rusage
pid = os.posix_spawn(sys.argv[2], sys.argv[2:], os.environ,
                     file_actions=[(os.POSIX_SPAWN_DUP2, out, 1), (os.POSIX_SPAWN_CLOSE, out)])
print(pid, flush=True)
_, status, usage = os.wait4(pid, 0)
print(os.waitstatus_to_exitcode(status), usage.ru_maxrss, flush=True)
"""


def _proc_status(pid: int, field: str) -> Optional[int]:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def measure(cmd: Sequence[str], env: Dict[str, str], work: Path, ok_codes=(0,)) -> dict:
    """Run cmd as a child (through LAUNCHER); wall time, its ru_maxrss, and the peaks of
    its fds and threads (and VmHWM, the same peak seen from /proc). stdout/stderr go to
    files (nothing waits on a pipe); returns stdout too."""
    out, err = work / "stdout", work / "stderr"
    peaks = {"fds": 0, "threads": 0, "hwm_kb": 0}
    with open(out, "wb") as fo, open(err, "wb") as fe:
        t0 = time.perf_counter()
        launcher = subprocess.Popen([sys.executable, "-S", "-c", LAUNCHER, str(fo.fileno()), *cmd],
                                    stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=fe, env=env,
                                    cwd=str(work), text=True, pass_fds=(fo.fileno(),))
        assert launcher.stdout is not None
        pid = 0
        done = threading.Event()

        def sample() -> None:
            while not done.is_set():
                fds = _fd_count(pid)
                if fds is not None:
                    peaks["fds"] = max(peaks["fds"], fds)
                for key, field in (("threads", "Threads"), ("hwm_kb", "VmHWM")):
                    value = _proc_status(pid, field)
                    if value is not None:
                        peaks[key] = max(peaks[key], value)
                done.wait(SAMPLE_S)

        try:
            pid = int(launcher.stdout.readline())
            sampler = threading.Thread(target=sample, daemon=True)
            sampler.start()
            code, maxrss = map(int, launcher.stdout.readline().split())
            wall = time.perf_counter() - t0
            launcher.wait()
        except BaseException:
            if pid:
                try:
                    os.kill(pid, signal.SIGKILL)  # the command we started, by its pid
                except ProcessLookupError:
                    pass
            launcher.kill()
            launcher.wait()
            raise
        finally:
            done.set()
    text, errors = out.read_text(errors="replace"), err.read_text(errors="replace")
    if code not in ok_codes:
        sys.exit(f"bench: {' '.join(map(str, cmd[2:8]))} ... exit {code}:\n{text[-1500:]}\n{errors[-1500:]}")
    return {"wall_s": wall, "rss_mb": maxrss / 1024, "hwm_mb": peaks["hwm_kb"] / 1024, "fds": peaks["fds"],
            "threads": peaks["threads"], "exit": code, "stdout": text}


def results(stdout: str) -> Dict[str, int]:
    """{result: count} of a fleet command's --json array."""
    counts: Dict[str, int] = {}
    for report in json.loads(stdout):
        counts[report["result"]] = counts.get(report["result"], 0) + 1
    return counts


def expect(name: str, n: int, counts: Dict[str, int], allowed: Sequence[str]) -> None:
    total = sum(counts.values())
    bad = {k: v for k, v in counts.items() if k not in allowed}
    if total != n or bad:
        sys.exit(f"bench: {name}: {total} reports for {n} hosts, results {counts} (expected {allowed})")


# ---------------------------------------------------------------- the fleet and the runs

def raise_fd_limit(hosts: int) -> dict:
    """Each fake host holds a few fds here (its processes' pipes); a qemuca run holds a
    few per in-flight host. Raise the soft limit towards the hard one when short."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = 8 * hosts + 1024
    info = {"soft": soft, "hard": hard, "needed": need, "raised": False}
    if soft != resource.RLIM_INFINITY and soft < need:
        new = need if hard == resource.RLIM_INFINITY else min(need, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
        info.update(soft=new, raised=True, was=soft)
        print(f"raised the soft open-files limit from {soft} to {new} (hard {hard})", flush=True)
    return info


def issue(home: str, names: Sequence[str], days: int = 730) -> None:
    """Untimed: a new certificate (key made here) for each host, the old one superseded."""
    from qemuca.pki import ca
    from qemuca.store.index import Store

    store = Store.open(home)
    try:
        ca.CertificateAuthority(store).issue(list(names), [], days, "ecdsa-p256", True)
    finally:
        store.close()


def run_count(n: int, fleet, base: Path, env: Dict[str, str], parallel: int, probe_pairs: int,
              baseline: dict) -> dict:
    from tests.support.pki import make_store

    names = fleet.names[:n]
    work = base / f"work-{n}"
    work.mkdir()
    home = make_store(base, name=f"home-{n}")
    issue(home, names)
    hosts_file = work / "hosts"
    hosts_file.write_text("\n".join(names) + "\n")
    q = [sys.executable, "-m", "qemuca", "--home", home]
    ssh = ["--ssh-config", str(fleet.ssh_config), "--known-hosts", str(fleet.known_hosts)]
    fleet_args = ["--hosts-file", str(hosts_file), *ssh, "--parallel", str(parallel), "--json"]
    rows = {}

    def row(name: str, m: dict, per: int) -> None:
        m.pop("stdout", None)
        m.update(per=per, ms_per_host=1000 * m["wall_s"] / per,
                 rss_over_base_mb=m["rss_mb"] - baseline["rss_mb"],
                 fds_over_base=m["fds"] - baseline["fds"])
        m["rss_over_base_per_worker_mb"] = m["rss_over_base_mb"] / min(parallel, per)
        m["fds_over_base_per_worker"] = m["fds_over_base"] / min(parallel, per)
        rows[name] = m
        print(f"  {n:>4} hosts  {name:<7} {m['wall_s']:7.1f} s  {m['ms_per_host']:7.1f} ms/host  "
              f"RSS {m['rss_mb']:5.1f} MB (HWM {m['hwm_mb']:5.1f})  fds {m['fds']:4d}  threads {m['threads']:3d}", flush=True)

    m = measure([*q, "deploy", *fleet_args], env, work, ok_codes=(0,))
    expect("deploy", n, results(m["stdout"]), ("changed",))
    row("deploy", m, n)
    m = measure([*q, "verify", *fleet_args], env, work, ok_codes=(0,))
    expect("verify", n, results(m["stdout"]), ("pass", "warn"))
    row("verify", m, n)
    m = measure([*q, "renew", "--expiring-within", str(RENEW_WINDOW), *ssh, "--parallel", str(parallel),
                 "--json"], env, work, ok_codes=(0,))
    expect("renew", n, results(m["stdout"]), ("changed",))
    row("renew", m, n)
    m = measure([*q, "check", "--json"], env, work, ok_codes=(0, 1))
    data = json.loads(m["stdout"])
    certs = sum(1 for c in data["checks"] if c["kind"] == "certificate")
    if certs != n:
        sys.exit(f"bench: check saw {certs} certificates, not {n}")
    row("check", m, n)
    if probe_pairs:
        step = max(1, n // probe_pairs)
        pairs = [(names[(i * step) % n], names[(i * step + 1) % n]) for i in range(probe_pairs)]
        pairs_file = work / "pairs"
        pairs_file.write_text("".join(f"{a} {b}\n" for a, b in pairs))
        m = measure([*q, "probe", "--pairs", str(pairs_file), *ssh, "--address", "127.0.0.1",
                     "--ram", "16", "--parallel", str(parallel), "--json"], env, work, ok_codes=(0,))
        data = json.loads(m["stdout"])
        if data["passed"] != probe_pairs:
            sys.exit(f"bench: probe: {data['passed']}/{probe_pairs} pairs passed")
        row("probe", m, probe_pairs)
    return rows


def run_sweep(fleet, base: Path, env: Dict[str, str], n: int, values: Sequence[int], rounds: int) -> dict:
    from tests.support.pki import make_store

    names = fleet.names[:n]
    work = base / "work-sweep"
    work.mkdir()
    home = make_store(base, name="home-sweep")
    hosts_file = work / "hosts"
    hosts_file.write_text("\n".join(names) + "\n")
    cmd = [sys.executable, "-m", "qemuca", "--home", home, "deploy", "--hosts-file", str(hosts_file),
           "--ssh-config", str(fleet.ssh_config), "--known-hosts", str(fleet.known_hosts), "--json"]
    times: Dict[int, List[float]] = {p: [] for p in values}
    peaks: Dict[int, dict] = {}
    for r in range(rounds):
        for p in (values if r % 2 == 0 else list(reversed(values))):
            issue(home, names)  # every run has a new set to place on every host
            m = measure([*cmd, "--parallel", str(p)], env, work)
            expect(f"deploy --parallel {p}", n, results(m["stdout"]), ("changed",))
            times[p].append(m["wall_s"])
            peaks[p] = {"rss_mb": max(m["rss_mb"], peaks.get(p, {}).get("rss_mb", 0)),
                        "fds": max(m["fds"], peaks.get(p, {}).get("fds", 0))}
            print(f"  sweep {n} hosts --parallel {p:>3}: {m['wall_s']:6.1f} s  "
                  f"{n / m['wall_s']:5.1f} hosts/s  RSS {m['rss_mb']:5.1f} MB  fds {m['fds']}", flush=True)
    rows = []
    for p in values:
        best = min(times[p])
        rows.append({"parallel": p, "runs_s": times[p], "best_s": best, "hosts_per_s": n / best, **peaks[p]})
    top = max(r["hosts_per_s"] for r in rows)
    # The default: the fewest workers within 10% of the best throughput (fewer
    # connections at once are kinder to hosts, jump hosts and sshd's MaxStartups).
    chosen = min(r["parallel"] for r in rows if r["hosts_per_s"] >= 0.9 * top)
    return {"hosts": n, "rows": rows, "best_hosts_per_s": top, "chosen": chosen}


def run(args) -> dict:
    sys.path.insert(0, str(ROOT))
    from qemuca.cli.remote import DEFAULT_PARALLEL
    from tests.support.fakehosts import start_fleet

    parallel = args.parallel or DEFAULT_PARALLEL
    counts = sorted(set(args.hosts))
    total = max(counts + ([args.sweep_hosts] if args.sweep else []))
    limits = raise_fd_limit(total)
    base = Path(tempfile.mkdtemp(prefix="qemuca-scale-"))
    fleet = None
    env = qemuca_env()
    try:
        t0 = time.perf_counter()
        fleet = start_fleet(total, base / "fleet", loglevel="ERROR")
        started = time.perf_counter() - t0
        print(f"{total} fake hosts started in {started:.1f} s", flush=True)
        scratch = base / "baseline"
        scratch.mkdir()
        baseline = measure([sys.executable, "-m", "qemuca", "--version"], env, scratch)
        baseline.pop("stdout")
        baseline["fds"] = baseline["fds"] or 3  # too quick to be sampled: stdin, stdout, stderr
        print(f"  baseline: qemuca --version  RSS {baseline['rss_mb']:.1f} MB  fds {baseline['fds']}", flush=True)
        per_count = {n: run_count(n, fleet, base, env, parallel, args.probe_pairs, baseline) for n in counts}
        sweep = run_sweep(fleet, base, env, args.sweep_hosts, args.sweep, args.sweep_rounds) if args.sweep else None
        return {"counts": counts, "parallel": parallel, "baseline": baseline, "per_count": per_count,
                "sweep": sweep, "fleet_start_s": started, "fd_limit": limits}
    finally:
        if fleet is not None:
            fleet.stop()
        shutil.rmtree(base, ignore_errors=True)


def summarise(raw: dict) -> dict:
    counts, per = raw["counts"], raw["per_count"]
    low, top = min(counts), max(counts)
    targets: Dict[str, object] = {}
    ratios = {}
    for name in per[top]:
        ratios[name] = per[top][name]["ms_per_host"] / per[low][name]["ms_per_host"] if low != top else 1.0
    for name in SCALED:
        targets[f"{name}_per_host_ratio"] = ratios[name]
        targets[f"{name}_flat"] = ratios[name] <= TARGET_SCALE
        rss = max(per[n][name]["rss_over_base_per_worker_mb"] for n in counts)
        fds = max(per[n][name]["fds_over_base_per_worker"] for n in counts)
        targets[f"{name}_rss_over_base_per_worker_max_mb"] = rss  # reported: mostly imports
        targets[f"{name}_fds_per_worker_ok"] = fds <= FDS_PER_WORKER
        targets[f"{name}_rss_not_growing"] = (per[top][name]["rss_over_base_mb"]
                                              <= TARGET_SCALE * per[low][name]["rss_over_base_mb"] + GROWTH_SLACK_MB)
        targets[f"{name}_fds_not_growing"] = per[top][name]["fds"] <= per[low][name]["fds"] + GROWTH_SLACK_FDS
    sweep = raw.get("sweep")
    if sweep and len(sweep["rows"]) > 1:
        # What one more in-flight host costs: the slope of peak RSS and fds over --parallel.
        lo, hi = sweep["rows"][0], sweep["rows"][-1]
        workers = hi["parallel"] - lo["parallel"]
        targets["rss_per_worker_mb"] = (hi["rss_mb"] - lo["rss_mb"]) / workers
        targets["fds_per_worker"] = (hi["fds"] - lo["fds"]) / workers
        targets["rss_per_worker_ok"] = targets["rss_per_worker_mb"] <= RSS_PER_WORKER_MB
        targets["fds_per_worker_ok"] = targets["fds_per_worker"] <= FDS_PER_WORKER
    return {"ratios": ratios, "targets": targets}


def print_report(raw: dict, summary: dict) -> None:
    counts, per = raw["counts"], raw["per_count"]
    head = (f"{'command':<8} {'hosts':>5} {'wall s':>8} {'ms/host':>8} {'RSS MB':>7} {'+base':>6} "
            f"{'MB/wkr':>6} {'fds':>5} {'fds/wkr':>7} {'thr':>4}")
    print(head)
    print("-" * len(head))
    for name in per[counts[0]]:
        for n in counts:
            r = per[n][name]
            print(f"{name:<8} {n:>5} {r['wall_s']:>8.1f} {r['ms_per_host']:>8.1f} {r['rss_mb']:>7.1f} "
                  f"{r['rss_over_base_mb']:>6.1f} {r['rss_over_base_per_worker_mb']:>6.2f} {r['fds']:>5} "
                  f"{r['fds_over_base_per_worker']:>7.2f} {r['threads']:>4}")
        print(f"{'':<8} {'':>5} ms/host {max(counts)}/{min(counts)}: {summary['ratios'][name]:.2f}")
    b = raw["baseline"]
    print(f"\n--parallel {raw['parallel']}; baseline `qemuca --version`: RSS {b['rss_mb']:.1f} MB, "
          f"fds {b['fds']}; probe rows are per pair; each row one whole child process")
    t = summary["targets"]

    def met(ok) -> str:
        return "MET" if ok else "MISSED"

    for name in SCALED:
        print(f"{name}: ms/host {max(counts)} vs {min(counts)} hosts {t[name + '_per_host_ratio']:.2f}x "
              f"(<= {TARGET_SCALE}) {met(t[name + '_flat'])}; fds above --version per worker <= {FDS_PER_WORKER} "
              f"{met(t[name + '_fds_per_worker_ok'])}; not growing: RSS {met(t[name + '_rss_not_growing'])}, "
              f"fds {met(t[name + '_fds_not_growing'])}")
    sweep = raw["sweep"]
    if sweep:
        print(f"\nparallelism sweep: deploy to {sweep['hosts']} hosts (best of {len(sweep['rows'][0]['runs_s'])})")
        for r in sweep["rows"]:
            print(f"  --parallel {r['parallel']:>3}: {r['best_s']:6.1f} s  {r['hosts_per_s']:5.1f} hosts/s  "
                  f"RSS {r['rss_mb']:5.1f} MB  fds {r['fds']}")
        print(f"  fewest workers within 10% of the best: --parallel {sweep['chosen']}")
        if "rss_per_worker_mb" in t:
            print(f"  one more in-flight host costs {t['rss_per_worker_mb']:.2f} MB RSS "
                  f"(<= {RSS_PER_WORKER_MB:g}) {met(t['rss_per_worker_ok'])} and {t['fds_per_worker']:.2f} fds "
                  f"(<= {FDS_PER_WORKER}) {met(t['fds_per_worker_ok'])} (slope from --parallel "
                  f"{sweep['rows'][0]['parallel']} to {sweep['rows'][-1]['parallel']})")


def _interrupted(signum, frame):
    raise KeyboardInterrupt


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hosts", type=int, nargs="+", default=list(COUNTS), help="host counts (default 50 500)")
    ap.add_argument("--parallel", type=int, help="--parallel of the measured runs (default: qemuca's)")
    ap.add_argument("--probe-pairs", type=int, default=PROBE_PAIRS, help="pairs probed per count (0: no probe)")
    ap.add_argument("--sweep", type=int, nargs="*", default=list(SWEEP),
                    help="--parallel values of the sweep (default 5 10 20 40)")
    ap.add_argument("--no-sweep", dest="sweep", action="store_const", const=[], help="skip the sweep")
    ap.add_argument("--sweep-hosts", type=int, default=SWEEP_HOSTS, help="hosts of the sweep (default 100)")
    ap.add_argument("--sweep-rounds", type=int, default=2, help="runs per sweep value (best kept)")
    ap.add_argument("--out", default=str(HERE / "results"), help="directory for the JSON results")
    ap.add_argument("--check", action="store_true", help="exit 1 when a target is missed")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        sys.exit("bench: the fake hosts need root (mount namespaces)")
    # SIGTERM unwinds like Ctrl-C, so the finally clauses stop every fake host.
    signal.signal(signal.SIGTERM, _interrupted)
    load0 = os.getloadavg()
    print(f"load average at start: {' '.join(f'{x:.2f}' for x in load0)} ({os.cpu_count()} CPUs)", flush=True)
    raw = run(args)
    summary = summarise(raw)
    info = environment(load0)
    print()
    print_report(raw, summary)
    print(f"load average: start {' '.join(f'{x:.2f}' for x in load0)}, "
          f"end {' '.join(f'{x:.2f}' for x in info['loadavg_end'])}")
    if busy(info):
        print("WARNING: the machine was busy (load average above the CPU count): wall times include waiting.")
    path = write_results(args.out, "scale", {"environment": info, "raw": raw, "summary": summary})
    print(f"\nresults: {path}")
    missed = [k for k, v in summary["targets"].items() if v is False]
    if missed:
        print("missed: " + ", ".join(missed))
    return 1 if args.check and missed else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit("bench: interrupted (every fake host stopped)")
