#!/usr/bin/env python3
"""Benchmark qemuca's start-up: `qemuca --version` and `--help` against `import click`.

The CLI loads its commands lazily so that these two cost little more than importing
click (targets: --version within 1.5x, --help within 2x of the baseline). Each command
runs as a fresh process, interleaved round-robin with the baseline so that load on the
machine hits all of them alike; medians of wall time are compared.

    python3 bench/bench_startup.py               # 20 runs each
    python3 bench/bench_startup.py --runs 50 --importtime

When a target is missed (or with --importtime), `python -X importtime -m qemuca --help`
shows which imports qemuca adds over the baseline.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

HERE = Path(__file__).resolve().parent
TARGETS = {"version": 1.5, "help": 2.0}  # max ratio to the click baseline


def qemuca_script() -> Optional[List[str]]:
    """The installed console script of this interpreter (not a pyenv/asdf shim, which
    would add a shell and a version lookup to every run)."""
    beside = Path(sys.executable).parent / "qemuca"
    if beside.exists():
        return [str(beside)]
    found = shutil.which("qemuca")
    if found and "shims" not in found:
        return [found]
    return None


def commands(script: Optional[List[str]]) -> Dict[str, List[str]]:
    py = sys.executable
    cmds = {
        "python -c pass": [py, "-c", "pass"],
        "baseline: import click": [py, "-c", "import click"],
        "python -m qemuca --version": [py, "-m", "qemuca", "--version"],
        "python -m qemuca --help": [py, "-m", "qemuca", "--help"],
    }
    if script:
        cmds["qemuca --version"] = script + ["--version"]
        cmds["qemuca --help"] = script + ["--help"]
    return cmds


def run_once(cmd: List[str], env: dict) -> Tuple[float, float]:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        sys.exit(f"bench: {' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.decode()[-1000:]}")
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def measure(cmds: Dict[str, List[str]], runs: int, warmup: int, env: dict) -> Dict[str, dict]:
    walls: Dict[str, List[float]] = {k: [] for k in cmds}
    cpus: Dict[str, List[float]] = {k: [] for k in cmds}
    for i in range(warmup + runs):
        for name, cmd in cmds.items():  # round-robin: drift and load spread over all
            wall, cpu = run_once(cmd, env)
            if i >= warmup:
                walls[name].append(wall)
                cpus[name].append(cpu)
    return {name: {"median_ms": 1000 * statistics.median(walls[name]),
                   "min_ms": 1000 * min(walls[name]),
                   "cpu_median_ms": 1000 * statistics.median(cpus[name]),
                   "runs_ms": [round(1000 * w, 2) for w in walls[name]]} for name in cmds}


def importtime(cmd: List[str], env: dict) -> Dict[str, Tuple[int, int]]:
    """module -> (self us, cumulative us) from -X importtime, the minimum over 3 runs."""
    best: Dict[str, Tuple[int, int]] = {}
    for _ in range(3):
        proc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env,
                              text=True)
        for line in proc.stderr.splitlines():
            if not line.startswith("import time:") or "self [us]" in line:
                continue
            self_us, cum_us, name = line[len("import time:"):].split("|")
            key = name.strip()
            value = (int(self_us), int(cum_us))
            old = best.get(key, value)
            best[key] = (min(old[0], value[0]), min(old[1], value[1]))
    return best


def offenders(env: dict, top: int) -> dict:
    """What `qemuca --help` imports beyond `import click`, by self time."""
    py = sys.executable
    base = importtime([py, "-X", "importtime", "-c", "import click"], env)
    mine = importtime([py, "-X", "importtime", "-m", "qemuca", "--help"], env)
    extra = {k: v for k, v in mine.items() if k not in base}
    by_self = sorted(extra.items(), key=lambda kv: kv[1][0], reverse=True)[:top]
    by_cum = sorted(mine.items(), key=lambda kv: kv[1][1], reverse=True)[:top]
    return {"extra_modules": len(extra),
            "extra_self_ms": sum(v[0] for v in extra.values()) / 1000,
            "extra_by_self_ms": [(k, v[0] / 1000, v[1] / 1000) for k, v in by_self],
            "all_by_cumulative_ms": [(k, v[0] / 1000, v[1] / 1000) for k, v in by_cum]}


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=20, help="measured runs per command (default 20)")
    ap.add_argument("--warmup", type=int, default=2, help="unmeasured runs first (default 2)")
    ap.add_argument("--qemuca", default=None,
                    help="command for qemuca (default: the console script beside this python)")
    ap.add_argument("--importtime", action="store_true", help="always list import offenders")
    ap.add_argument("--top", type=int, default=15, help="offenders to list (default 15)")
    ap.add_argument("--out", default=str(HERE / "results"), help="directory for the JSON results")
    ap.add_argument("--check", action="store_true", help="exit 1 when a target is missed")
    args = ap.parse_args(argv)
    if args.runs < 1:
        ap.error("--runs must be at least 1")

    script = args.qemuca.split() if args.qemuca else qemuca_script()
    env = dict(os.environ)
    env.pop("QEMUCA_HOME", None)
    cmds = commands(script)
    print(f"{sys.executable}, {args.runs} runs each (+{args.warmup} warm-up), interleaved", flush=True)
    res = measure(cmds, args.runs, args.warmup, env)
    base = res["baseline: import click"]["median_ms"]
    base_cpu = res["baseline: import click"]["cpu_median_ms"]

    verdicts = {}
    print(f"\n{'command':<28} {'median ms':>10} {'min ms':>8} {'cpu ms':>8} {'x click':>8} "
          f"{'cpu x':>6}  target")
    for name, r in res.items():
        r["ratio"] = r["median_ms"] / base
        r["cpu_ratio"] = r["cpu_median_ms"] / base_cpu if base_cpu else None
        kind = "version" if name.endswith("--version") else "help" if name.endswith("--help") else None
        verdict = ""
        if kind:
            met = r["ratio"] <= TARGETS[kind]
            r["target"] = TARGETS[kind]
            r["target_met"] = met
            verdicts[name] = met
            verdict = f"{'MET' if met else 'MISSED'} (<= {TARGETS[kind]}x)"
        cpu_ratio = f"{r['cpu_ratio']:.2f}" if r["cpu_ratio"] else "-"
        print(f"{name:<28} {r['median_ms']:>10.1f} {r['min_ms']:>8.1f} {r['cpu_median_ms']:>8.1f} "
              f"{r['ratio']:>8.2f} {cpu_ratio:>6}  {verdict}")

    report = None
    if args.importtime or not all(verdicts.values()):
        report = offenders(env, args.top)
        print(f"\n`-m qemuca --help` imports {report['extra_modules']} modules beyond `import click`"
              f" ({report['extra_self_ms']:.1f} ms self time); the largest:")
        for name, self_ms, cum_ms in report["extra_by_self_ms"]:
            print(f"  {self_ms:7.2f} ms self {cum_ms:8.2f} ms cumulative  {name}")
        print("largest cumulative imports overall:")
        for name, _self_ms, cum_ms in report["all_by_cumulative_ms"]:
            print(f"  {cum_ms:8.2f} ms cumulative  {name}")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    path = out / f"startup-{stamp}.json"
    path.write_text(json.dumps({"benchmark": "startup", "at": stamp, "python": sys.executable,
                                "commands": cmds, "results": res, "importtime": report,
                                "loadavg": os.getloadavg()}, indent=2) + "\n")
    print(f"\nresults: {path}")
    return 1 if args.check and not all(verdicts.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
