"""qemuca killed with SIGKILL in the middle of a command never leaves the store unusable.

Each command runs as a real process on a fresh copy of a store and is killed:
- at an exact system call: strace delivers SIGKILL on entry to the Nth call of one
  file-changing syscall (rename, fsync, pwrite64 into the WAL, ...), so the windows
  that matter (between the two renames of a rollover, after crl.pem is replaced but
  before COMMIT) are hit every run. Which calls: every rename and the call right after
  it, the last call (after COMMIT), plus a seeded random choice of the rest, taken from
  a traced run of the command;
- at a seeded random time (plain os.kill, no tracer at all).
After each kill `qemuca doctor` must exit 0 with nothing but warnings about what was
undone or left behind (and `doctor --repair` clears those), `qemuca list --json` must
work, and the index must show the command either done or not done.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import sqlite3
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import pytest
from cryptography import x509

from qemuca.ops import lifecycle
from qemuca.pki import ca
from qemuca.store.index import Store
from qemuca.store.journal import ca_dir_fingerprint
from tests.support.pki import QEMUCA, clean_env, make_store, revoke, run_qemuca
from tests.support.tools import require_tool

SEED = 20240607
FILE_SYSCALLS = ("rename", "renameat", "renameat2", "unlink", "unlinkat", "mkdir", "rmdir",
                 "pwrite64", "write", "fsync", "fdatasync", "ftruncate")
RENAMES = ("rename", "renameat", "renameat2")
WORKERS = 3

pytestmark = pytest.mark.slow
NEW_HOSTS = [f"n{i}.qemu.test" for i in range(1, 5)]


# ---------------------------------------------------------------- the stores and commands

@dataclass
class Scenario:
    name: str
    args: Tuple[str, ...]
    template: str  # a store this scenario's runs start from (copied per run)
    outcome: Callable[[str, dict], str]  # asserts done-or-not-done; returns which
    facts: dict  # what the template held (serials, CA fingerprints, crl bytes)
    random_points: int  # kill points drawn at random besides ALWAYS


def _rows(home, sql, args=()) -> list:
    db = sqlite3.connect(f"file:{Path(home) / 'index.sqlite'}?mode=ro", uri=True)
    try:
        return db.execute(sql, args).fetchall()
    finally:
        db.close()


def _audited(home, action) -> Dict[str, int]:
    """serial -> number of audit rows of `action` naming it."""
    out: Dict[str, int] = {}
    for (detail,) in _rows(home, "SELECT detail FROM audit WHERE action = ?", (action,)):
        serial = json.loads(detail).get("serial")
        out[serial] = out.get(serial, 0) + 1
    return out


def _meta(home, key) -> Optional[str]:
    rows = _rows(home, "SELECT value FROM meta WHERE key = ?", (key,))
    return rows[0][0] if rows else None


def _crl_serials(home) -> set:
    data = (Path(home) / "crl.pem").read_bytes()
    blocks = re.findall(rb"-----BEGIN X509 CRL-----.*?-----END X509 CRL-----", data, re.S)
    return {format(e.serial_number, "x") for b in blocks for e in x509.load_pem_x509_crl(b)}


def outcome_issue(home, facts) -> str:
    rows = {h: s for s, h in _rows(home, "SELECT serial, host FROM certificates")}
    audited = _audited(home, "issue")
    new = [h for h in NEW_HOSTS if h in rows]
    assert new in ([], NEW_HOSTS), f"one transaction, yet only {new} were recorded"
    for host in new:
        assert audited.get(rows[host]) == 1, f"{host}: certificate row without its audit row"
    assert sum(audited.values()) == facts["issued"] + len(new), "an audit row without its certificate"
    return "done" if new else "not done"


def outcome_force(home, facts) -> str:
    status = dict(_rows(home, "SELECT serial, status FROM certificates"))
    valid = dict(_rows(home, "SELECT host, serial FROM certificates WHERE status = 'valid'"))
    old = facts["force_serials"]
    replaced = [h for h, s in old.items() if valid[h] != s]
    assert replaced in ([], sorted(old)), f"only {replaced} were replaced"
    for host, serial in old.items():
        if replaced:
            assert status[serial] == "superseded"
            (rep,) = _rows(home, "SELECT replaces FROM certificates WHERE serial = ?", (valid[host],))
            assert rep == (serial,) and _audited(home, "issue").get(valid[host]) == 1
        else:
            assert status[serial] == "valid"
    assert len(status) == facts["rows"] + (len(old) if replaced else 0)
    return "done" if replaced else "not done"


def outcome_revoke(home, facts) -> str:
    serial = facts["victim"]
    (status, revoked_at), = _rows(home, "SELECT status, revoked_at FROM certificates WHERE serial = ?",
                                  (serial,))
    listed = serial in _crl_serials(home)
    revokes = _audited(home, "revoke").get(serial, 0)
    if status == "revoked":
        assert revoked_at and listed and revokes == 1, "revoked, but the CRL or the audit lacks it"
        return "done"
    assert not listed and revokes == 0 and not revoked_at
    assert (Path(home) / "crl.pem").read_bytes() == facts["crl"], "crl.pem changed, the index did not"
    return "not done"


def outcome_rollover_start(home, facts) -> str:
    store_ca = ca_dir_fingerprint(os.path.join(home, "ca"))
    previous = ca_dir_fingerprint(os.path.join(home, "ca-previous"))
    state = _meta(home, "rollover")
    if state is not None:
        state = json.loads(state)
        assert state["stage"] == "started" and state["previous_fingerprint"] == facts["ca"]
        assert previous == facts["ca"] and store_ca == state["new_fingerprint"] != facts["ca"]
        return "done"
    assert store_ca == facts["ca"] and previous is None, "no rollover recorded, yet the CA moved"
    return "not done"


def outcome_rollover_finish(home, facts) -> str:
    state = _meta(home, "rollover")
    previous = ca_dir_fingerprint(os.path.join(home, "ca-previous"))
    assert ca_dir_fingerprint(os.path.join(home, "ca")) == facts["ca"]
    if state is None:
        assert previous is None
        kept = [d for d in (Path(home) / "retired").iterdir() if d.name.endswith("-previous-ca")]
        assert [ca_dir_fingerprint(str(d)) for d in kept] == [facts["previous"]]
        return "done"
    # Finish is three steps (finishing stage, CRL, retire): each one whole.
    assert previous == facts["previous"], "the index records a rollover, ca-previous/ is gone"
    stage = json.loads(state)["stage"]
    assert stage in ("started", "finishing")
    return f"not done ({stage})"


def build_scenarios(base: Path) -> List[Scenario]:
    """Template stores (core API, passphrase-less CA, ECDSA P-256)."""
    main = make_store(base, name="main", hosts=["a.qemu.test", "b.qemu.test", "c.qemu.test",
                                                "d.qemu.test"])
    revoke(main, "d.qemu.test")  # crl.pem exists before the runs
    store = Store.open(main)
    try:
        serials = {r.host: r.serial for r in store.certificates()}
        facts = {"issued": 4, "rows": 4, "victim": serials["c.qemu.test"],
                 "force_serials": {h: serials[h] for h in ("a.qemu.test", "b.qemu.test")},
                 "crl": Path(store.crl_path).read_bytes(), "ca": ca_dir_fingerprint(store.ca_dir)}
    finally:
        store.close()

    finish = make_store(base, name="finish", hosts=["x.qemu.test"])
    revoke(finish, "x.qemu.test")  # no valid old-CA certificate: finish needs no host
    store = Store.open(finish)
    try:
        old = ca_dir_fingerprint(store.ca_dir)
        lifecycle.rollover_start(store, ca.CertificateAuthority(store), key_type="ecdsa-p256", days=3650,
                                 common_name="QEMU CA next", organization=None, passphrase=None)
        finish_facts = {"previous": old, "ca": ca_dir_fingerprint(store.ca_dir)}
    finally:
        store.close()

    return [
        Scenario("issue 4 hosts", ("issue", *NEW_HOSTS), main, outcome_issue, facts, 6),
        Scenario("issue --force (local rekey)", ("issue", "--force", "a.qemu.test", "b.qemu.test"),
                 main, outcome_force, facts, 5),
        Scenario("revoke", ("revoke", "c.qemu.test"), main, outcome_revoke, facts, 3),
        Scenario("ca rollover start", ("ca", "rollover", "start", "--key-type", "ecdsa-p256"),
                 main, outcome_rollover_start, facts, 1),
        Scenario("ca rollover finish", ("ca", "rollover", "finish"), finish, outcome_rollover_finish,
                 finish_facts, 1),
    ]


# ---------------------------------------------------------------- killing and checking

def fresh_copy(template: str, where: Path) -> str:
    home = str(where / "home")
    shutil.copytree(template, home, symlinks=True)
    return home


def strace_cmd(strace: str, home: str, args, trace: Path, syscall: str = "", nth: int = 0) -> list:
    """Trace the file syscalls; with `syscall`, SIGKILL on entry to its `nth` call.
    (Not --seccomp-bpf: strace 6.1 then never fires a counted injection.)"""
    cmd = [strace, "-f", "-e", "signal=none", "-o", str(trace)]
    if syscall:  # openat too, to name the file the fatal call was about
        cmd += ["-e", f"trace=openat,{syscall}", "-e", f"inject={syscall}:signal=SIGKILL:when={nth}"]
    else:
        cmd += ["-e", "trace=" + ",".join(FILE_SYSCALLS)]
    return cmd + [*QEMUCA, "--home", home, *args]


def traced_calls(trace: Path) -> List[str]:
    """The syscall names of a trace, in order."""
    calls = []
    for line in trace.read_text().splitlines():
        m = re.match(r"^(?:\d+\s+)?(\w+)\(", line)
        if m:
            calls.append(m.group(1))
    return calls


def fatal_call(lines: List[str]) -> str:
    """The call a traced run died in, with the file it was about: 'pwrite64 index.sqlite-wal'."""
    fds: Dict[str, str] = {}
    last = ""
    for line in lines:
        line = re.sub(r"^\d+\s+", "", line)
        m = re.match(r'openat\(\w+, "([^"]+)".*\) = (\d+)', line)
        if m:
            fds[m.group(2)] = os.path.basename(m.group(1))
            continue
        m = re.match(r"(\w+)\((\d+)?(.*)", line)
        if m and not line.startswith("openat"):
            name, fd, args = m.groups()
            if fd is not None:  # pwrite64, fsync, ...: name the file the descriptor is
                where = fds.get(fd, "stdout" if fd == "1" else f"fd {fd}")
            else:  # rename, unlink, ...: the paths
                where = " -> ".join(os.path.basename(p) for p in re.findall(r'"([^"]*)"', args))
            last = name + " " + re.sub(r"(qemuca-tmp|journal)-[0-9a-f]+", r"\1-*", where)
    return last


def kill_points(strace: str, scenario: Scenario, work: Path, rng: random.Random) -> List[Tuple[str, int]]:
    """(syscall, n): every rename of one traced run and the call after it, the last call,
    plus random others."""
    home = fresh_copy(scenario.template, work)
    trace = work / "count.trace"
    proc = subprocess.run(strace_cmd(strace, home, scenario.args, trace), stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, env=clean_env(), timeout=120)
    assert proc.returncode == 0, proc.stderr
    seen: Dict[str, int] = {}
    points = []
    for name in traced_calls(trace):
        seen[name] = seen.get(name, 0) + 1
        points.append((name, seen[name]))
    chosen = {points[-1]}  # the last call: after the last COMMIT
    for i, (name, _) in enumerate(points):
        if name in RENAMES:
            chosen.update(points[i:i + 2])  # just before it, and just after it ran
    rest = [p for p in points if p not in chosen]
    chosen.update(rng.sample(rest, min(scenario.random_points, len(rest))))
    return sorted(chosen, key=points.index)


def check_after(home: str) -> dict:
    """doctor (0, only undo/leftover warnings), doctor --repair if needed, list --json."""
    first = run_qemuca(home, "doctor", "--json")
    assert first.returncode == 0, f"doctor failed after the kill:\n{first.stdout}\n{first.stderr}"
    report = json.loads(first.stdout)
    warned = {c["check"]: c["detail"] for c in report["checks"] if c["result"] == "warn"}
    assert not [c for c in report["checks"] if c["result"] == "fail"], report
    assert set(warned) <= {"recovery", "leftovers"}, warned
    removed: List[str] = []
    if "leftovers" in warned:
        second = run_qemuca(home, "doctor", "--repair", "--strict", "--json")
        assert second.returncode == 0, f"--repair did not clear it:\n{second.stdout}\n{second.stderr}"
        removed = json.loads(second.stdout)["removed"]
        assert removed
    listing = run_qemuca(home, "list", "--all", "--json")
    assert listing.returncode == 0, listing.stderr
    json.loads(listing.stdout)
    doctor = "pass" if not warned else "warn: " + "+".join(sorted(warned))
    return {"doctor": doctor, "removed": removed}


def after_finish_rerun(home: str, outcome: str) -> None:
    """A finish cut short is finished by running it again."""
    if outcome.startswith("not done"):
        again = run_qemuca(home, "ca", "rollover", "finish")
        assert again.returncode == 0, again.stderr
        assert run_qemuca(home, "doctor", "--strict").returncode == 0


def one_kill(scenario: Scenario, work: Path, kill: Callable[[str], Tuple[bool, str]]) -> dict:
    home = fresh_copy(scenario.template, work)
    killed, died_at = kill(home)
    checks = check_after(home)
    outcome = scenario.outcome(home, scenario.facts)
    if scenario.name == "ca rollover finish":
        after_finish_rerun(home, outcome)
    shutil.rmtree(work, ignore_errors=True)
    return dict(checks, killed=killed, died_at=died_at, outcome=outcome)


def print_matrix(capsys, title: str, rows: List[dict], seconds: float) -> None:
    with capsys.disabled():
        print(f"\n{title}")
        print(f"  {'command':28} {'kill at':14} {'died in':44} {'outcome':20} {'doctor after':26} repaired")
        for r in rows:
            print(f"  {r['scenario']:28} {r['point']:14} {r['died_at'][:44]:44} {r['outcome']:20} "
                  f"{r['doctor']:26} {len(r['removed'])}")
        killed = sum(1 for r in rows if r["killed"])
        print(f"  kills tried {len(rows)}, processes killed {killed}, stores usable after: "
              f"{len(rows)}/{len(rows)} (doctor exit 0, list --json ok, done or not done); "
              f"{seconds:.1f} s")


# ---------------------------------------------------------------- the tests

def test_sigkill_at_file_syscalls_leaves_the_store_whole(tmp_path, capsys):
    strace = require_tool("strace")
    start = time.monotonic()
    rng = random.Random(SEED)
    scenarios = build_scenarios(tmp_path / "templates")
    jobs = []
    for i, sc in enumerate(scenarios):
        for point in kill_points(strace, sc, tmp_path / f"count{i}", rng):
            jobs.append((sc, point))

    def run(job_index):
        sc, (syscall, nth) = jobs[job_index]
        work = tmp_path / f"run{job_index}"
        trace = tmp_path / f"run{job_index}.trace"

        def kill(home):
            proc = subprocess.run(strace_cmd(strace, home, sc.args, trace, syscall, nth),
                                  stdin=subprocess.DEVNULL, capture_output=True, text=True,
                                  env=clean_env(), timeout=120)
            lines = trace.read_text().splitlines()
            # strace ends itself with its tracee's signal (or exits 128+9).
            killed = (proc.returncode in (-signal.SIGKILL, 128 + signal.SIGKILL)
                      or any("+++ killed by SIGKILL" in line for line in lines))
            assert killed or proc.returncode == 0, proc.stderr
            return killed, fatal_call(lines) if killed else "completed"

        return dict(one_kill(sc, work, kill), scenario=sc.name, point=f"{syscall} #{nth}")

    with ThreadPoolExecutor(max_workers=WORKERS) as pool:
        rows = list(pool.map(run, range(len(jobs))))
    print_matrix(capsys, f"SIGKILL at file syscalls (seed {SEED})", rows, time.monotonic() - start)
    assert len(rows) >= 30
    # Most kills must land (the traced run predicted the calls); on a loaded machine a few
    # runs finish before their syscall comes. Every run, killed or not, is checked below.
    assert sum(r["killed"] for r in rows) >= len(rows) * 3 // 4
    by_scenario = {}
    for r in rows:
        by_scenario.setdefault(r["scenario"], set()).add(r["outcome"].split(" (")[0])
    # Every command was caught both before and after its commit point.
    assert all(seen == {"done", "not done"} for seen in by_scenario.values()), by_scenario
    # The windows that matter were hit: a rollover between its two renames was undone,
    # a CRL replaced before COMMIT was put back.
    assert any("recovery" in r["doctor"] for r in rows if r["scenario"] == "ca rollover start")
    assert any("recovery" in r["doctor"] for r in rows if r["scenario"] == "revoke")


def test_sigkill_at_random_times_leaves_the_store_whole(tmp_path, capsys):
    start = time.monotonic()
    rng = random.Random(SEED + 1)
    scenarios = build_scenarios(tmp_path / "templates")
    durations = {}
    for i, sc in enumerate(scenarios):  # how long each command runs here, unkilled
        home = fresh_copy(sc.template, tmp_path / f"time{i}")
        began = time.monotonic()
        assert run_qemuca(home, *sc.args).returncode == 0
        durations[sc.name] = time.monotonic() - began
    jobs = [(sc, round(rng.uniform(0.5, 1.0) * durations[sc.name], 3)) for sc in scenarios for _ in range(2)]

    def run(job_index):
        sc, delay = jobs[job_index]

        def kill(home):
            proc = subprocess.Popen([*QEMUCA, "--home", home, *sc.args], stdin=subprocess.DEVNULL,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=clean_env())
            timer = threading.Timer(delay, lambda: proc.poll() is None and os.kill(proc.pid, signal.SIGKILL))
            timer.start()
            proc.wait(timeout=120)
            timer.cancel()
            proc.stderr.close()
            killed = proc.returncode == -signal.SIGKILL
            return killed, "SIGKILL" if killed else f"completed (rc {proc.returncode})"

        return dict(one_kill(sc, tmp_path / f"run{job_index}", kill), scenario=sc.name, point=f"t={delay:.3f}s")

    with ThreadPoolExecutor(max_workers=WORKERS) as pool:
        rows = list(pool.map(run, range(len(jobs))))
    print_matrix(capsys, f"SIGKILL at random times (seed {SEED + 1})", rows, time.monotonic() - start)
    assert len(rows) == 2 * len(scenarios)
