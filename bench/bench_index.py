#!/usr/bin/env python3
"""Benchmark `qemuca list` and `qemuca crl` on an index of 10,000 certificates.

Issue 7: a big fleet's index must stay quick to read. A store is made with the core
(`init`, one real certificate issued), then the index is filled directly with N rows
that carry that certificate's PEM (and key) under distinct serials, hosts and
fingerprints, 10% of them revoked, each host with a deployment row. Then, as child
processes interleaved round-robin so that load hits all alike:

- `qemuca --version`: the start-up baseline measured in the same run;
- `qemuca list` (the table, stdout to a pipe) and `qemuca list --json`;
- `qemuca crl` (signs a CRL of every revoked certificate, writes crl.pem, prints it).

Reported: median wall seconds and the ratio to `--version`. Target: each under 1 s.

    python3 bench/bench_index.py                   # 10,000 certificates, 1,000 revoked
    python3 bench/bench_index.py --certs 50000 --revoked 5000 --runs 3

Results: a table on stdout and JSON in bench/results/ (git-ignored).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import secrets
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
TARGET_S = 1.0


def fill_index(home: str, n: int, revoked: int) -> None:
    """N certificate rows reusing one real certificate's PEM and key, distinct serials,
    hosts and fingerprints; the first `revoked` revoked; one deployment row per host."""
    sys.path.insert(0, str(ROOT))
    from qemuca.pki import ca
    from qemuca.store.index import Store, iso

    store = Store.open(home)
    try:
        authority = ca.CertificateAuthority(store)
        (issued,) = authority.issue(["template.bench.example"], [], 730, "ecdsa-p256", False)
        rec = issued.record
        key_pem = store.key_pem(rec.serial)
    finally:
        store.close()
    now = dt.datetime.now(dt.timezone.utc)
    rows, deploys = [], []
    for i in range(n):
        host = f"host-{i:05d}.bench.example"
        serial = format(secrets.randbits(127) | 1 << 126, "x")
        status = "revoked" if i < revoked else "valid"
        rows.append((serial, host, json.dumps([host]), rec.not_before, rec.not_after,
                     secrets.token_hex(32), status, None, iso(now), rec.ca_fingerprint,
                     "generated", rec.key_type, rec.cert_pem, key_pem,
                     iso(now) if status == "revoked" else None,
                     "key-compromise" if status == "revoked" else None))
        deploys.append((host, rows[-1][5], iso(now), "changed", None, None))
    db = sqlite3.connect(os.path.join(home, "index.sqlite"))
    try:
        with db:
            db.executemany(
                "INSERT INTO certificates (serial, host, sans, not_before, not_after, "
                "fingerprint_sha256, status, replaces, issued_at, ca_fingerprint, key_source, "
                "key_type, cert_pem, key_pem, revoked_at, revocation_reason) "
                "VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)", rows)
            db.executemany("INSERT INTO deployments (host, fingerprint_sha256, at, result, error, "
                           "bundle_sha256) VALUES (?,?,?,?,?,?)", deploys)
    finally:
        db.close()


def timed(cmd: List[str], env: dict) -> tuple:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, env=env)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"bench: {' '.join(cmd)} failed ({proc.returncode}):\n"
                 f"{proc.stderr.decode(errors='replace')[-2000:]}")
    return wall, proc.stdout


def check(outputs: Dict[str, bytes], n: int, revoked: int) -> None:
    """Untimed: the commands saw every row."""
    from cryptography import x509

    rows = json.loads(outputs["list --json"])
    if len(rows) != n + 1:  # + the template certificate
        sys.exit(f"bench: list --json gave {len(rows)} rows, expected {n + 1}")
    if outputs["list"].count(b".bench.example") != n + 1:
        sys.exit("bench: the list table does not show every certificate")
    crl = x509.load_pem_x509_crl(outputs["crl"])
    if len(crl) != revoked:
        sys.exit(f"bench: the CRL lists {len(crl)} certificates, expected {revoked}")


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--certs", type=int, default=10_000, help="certificate rows (default 10,000)")
    ap.add_argument("--revoked", type=int, default=1_000, help="how many are revoked (default 1,000)")
    ap.add_argument("--runs", type=int, default=5, help="measured runs per command (medians)")
    ap.add_argument("--qemuca", default=None, help="command running qemuca (default: python -m qemuca)")
    ap.add_argument("--out", default=str(HERE / "results"), help="directory for the JSON results")
    ap.add_argument("--check", action="store_true", help="exit 1 when a target is missed")
    args = ap.parse_args(argv)
    if not 0 <= args.revoked <= args.certs:
        ap.error("--revoked must be between 0 and --certs")
    qemuca = args.qemuca.split() if args.qemuca else [sys.executable, "-m", "qemuca"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("QEMUCA_")}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["COLUMNS"] = "200"
    base = Path(tempfile.mkdtemp(prefix="qemuca-bench-index-"))
    load0 = os.getloadavg()
    try:
        home = str(base / "home")
        sys.path.insert(0, str(ROOT))
        from tests.support.pki import make_store

        make_store(base)
        t0 = time.perf_counter()
        fill_index(home, args.certs, args.revoked)
        print(f"index filled with {args.certs} certificates ({args.revoked} revoked) "
              f"in {time.perf_counter() - t0:.1f} s", flush=True)
        cmds = {
            "--version (baseline)": qemuca + ["--version"],
            "list": qemuca + ["--home", home, "list"],
            "list --json": qemuca + ["--home", home, "list", "--json"],
            "crl": qemuca + ["--home", home, "crl"],
        }
        times: Dict[str, List[float]] = {k: [] for k in cmds}
        outputs: Dict[str, bytes] = {}
        for i in range(args.runs + 1):  # run 0 warms the page cache
            for name, cmd in cmds.items():
                wall, out = timed(cmd, env)
                if i:
                    times[name].append(wall)
                outputs[name] = out
        check(outputs, args.certs, args.revoked)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    base_s = med["--version (baseline)"]
    print(f"\n{'command':<22} {'median s':>9} {'min s':>7} {'x --version':>12}  target")
    for name in cmds:
        target = "" if name.startswith("--version") else (
            f"< {TARGET_S:g} s {'MET' if med[name] < TARGET_S else 'MISSED'}")
        print(f"{name:<22} {med[name]:>9.3f} {min(times[name]):>7.3f} {med[name] / base_s:>12.1f}  {target}")
    info = {"python": sys.version.split()[0], "cpus": os.cpu_count(), "machine": platform.machine(),
            "certs": args.certs, "revoked": args.revoked, "runs": args.runs,
            "loadavg_start": load0, "loadavg_end": os.getloadavg()}
    if max(load0[0], info["loadavg_end"][0]) > (os.cpu_count() or 1):
        print("WARNING: the machine was busy (load average above the CPU count): compare the ratios.")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    path = out / f"index-{stamp}.json"
    results = {k: {"median_s": med[k], "runs_s": times[k], "over_version": med[k] / base_s} for k in cmds}
    path.write_text(json.dumps({"benchmark": "index", "at": stamp, "environment": info,
                                "results": results}, indent=2) + "\n")
    print(f"\nresults: {path}")
    missed = [k for k in cmds if not k.startswith("--version") and med[k] >= TARGET_S]
    return 1 if args.check and missed else 0


if __name__ == "__main__":
    sys.exit(main())
