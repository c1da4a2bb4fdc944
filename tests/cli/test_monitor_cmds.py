"""`qemuca check` and `qemuca metrics` as a monitoring system runs them: real
`python -m qemuca` processes, exit codes 0/1/2, JSON, the Prometheus text format read
by the Prometheus client's parser, the atomic --out file, and the systemd units.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from qemuca.errors import EXIT_INVALID_INPUT, EXIT_IO, EXIT_STORE, EXIT_USAGE
from tests.ops.test_monitor import add_cert, record_deploy, start_rollover, write_crl
from tests.support.pki import assert_error, clean_env, make_store, revoke, run_qemuca
from tests.support.tools import missing, require_tool

ROOT = Path(__file__).resolve().parents[2]
UNITS = ROOT / "scripts" / "systemd"
STATUS_LINE = re.compile(r"^QEMUCA (OK|WARNING|CRITICAL) - \d+ certificates?, CA valid \d+ days.* \| "
                         r"ca_days=\d+;30;7 ")


def run_all(cases):
    """[(home, args...)] run side by side; results in order."""
    with ThreadPoolExecutor(max_workers=6) as pool:
        return list(pool.map(lambda c: run_qemuca(c[0], *c[1:]), cases))


@pytest.fixture(scope="module")
def homes(tmp_path_factory):
    """ok: healthy; warning: a certificate in its last 30 days, a rollover and an
    undeployed renewal; critical: an expired certificate and an overdue CRL."""
    base = tmp_path_factory.mktemp("monitor")
    ok = make_store(base, name="ok", hosts=["a.qemu.test", "b.qemu.test"])
    warning = make_store(base, name="warning", hosts=["a.qemu.test"])
    add_cert(warning, "soon.qemu.test", 20)
    old = add_cert(warning, "moved.qemu.test", 400)
    record_deploy(warning, "moved.qemu.test", old.fingerprint_sha256)
    add_cert(warning, "moved.qemu.test", 500)
    start_rollover(warning, base, 3650)
    critical = make_store(base, name="critical", hosts=["a.qemu.test", "r.qemu.test"])
    add_cert(critical, "dead.qemu.test", -3)
    revoke(critical, "r.qemu.test")
    write_crl(critical, -2)
    return {"ok": ok, "warning": warning, "critical": critical}


def test_check_exit_codes_and_output(homes):
    names = ["ok", "warning", "critical"]
    human = run_all([(homes[n], "check") for n in names])
    as_json = run_all([(homes[n], "check", "--json") for n in names])
    for code, name, proc, jproc in zip((0, 1, 2), names, human, as_json):
        detail = f"{name}: rc={proc.returncode}\n{proc.stdout}\n{proc.stderr}"
        assert proc.returncode == code and proc.stderr == "", detail
        first, *rest = proc.stdout.splitlines()
        assert STATUS_LINE.match(first) and first.startswith(f"QEMUCA {name.upper()} - "), detail
        data = json.loads(jproc.stdout)
        assert jproc.returncode == code and (data["status"], data["exit_code"]) == (name.upper(), code)
        assert STATUS_LINE.match(data["summary"]) and data["warn_days"] == 30
        assert all({"kind", "subject", "state", "detail"} <= set(c) for c in data["checks"])
        problems = {(c["subject"], c["state"]) for c in data["checks"] if c["state"] != "OK"}
        if name == "ok":
            assert rest == [] and problems == set()
        else:  # the table of problems: every problem's subject is in it
            assert rest and all(subject in proc.stdout for subject, _ in problems), detail
    warn = {(c["kind"], c["subject"]): c["state"] for c in json.loads(as_json[1].stdout)["checks"]}
    assert warn[("certificate", "soon.qemu.test")] == "WARNING"
    assert warn[("rollover", "CA rollover")] == "WARNING"
    assert warn[("deployment", "moved.qemu.test")] == "WARNING"
    crit = {(c["kind"], c["subject"]): c for c in json.loads(as_json[2].stdout)["checks"]}
    assert crit[("certificate", "dead.qemu.test")]["state"] == "CRITICAL"
    assert crit[("certificate", "dead.qemu.test")]["days_left"] in (-4, -3)
    assert crit[("crl", "CRL of CN=QEMU CA test,OU=qemu")]["state"] == "CRITICAL"


def test_check_thresholds_from_the_command_line(homes):
    loose, tight, bad_order, not_int = run_all([
        (homes["critical"], "check", "--warn-days", "0", "--crit-days", "0", "--crl-warn-days", "0"),
        (homes["warning"], "check", "--json", "--warn-days", "10", "--crit-days", "5"),
        (homes["ok"], "check", "--warn-days", "7", "--crit-days", "30"),
        (homes["ok"], "check", "--warn-days", "soon"),
    ])
    assert loose.returncode == 2  # expired and overdue stay CRITICAL whatever the thresholds
    states = {c["subject"]: c["state"] for c in json.loads(tight.stdout)["checks"] if c["kind"] == "certificate"}
    assert states["soon.qemu.test"] == "OK"
    # Bad thresholds are exit 3 (UNKNOWN to a monitoring system), not a false CRITICAL;
    # click's own usage errors (not a number, unknown option) are exit 2.
    assert_error(bad_order, EXIT_INVALID_INPUT, "--crit-days (30) must not be more than --warn-days (7)")
    assert_error(not_int, EXIT_USAGE, "soon")


def _families(text: str) -> dict:
    return {f.name: f for f in text_string_to_metric_families(text)}


def test_metrics_stdout_and_atomic_out(homes, tmp_path):
    out_dir = tmp_path / "textfile"
    out_dir.mkdir()
    target = out_dir / "qemuca.prom"
    target.write_text("old content\n")
    os.chmod(target, 0o600)
    inode = target.stat().st_ino
    old_umask = os.umask(0o077)  # inherited by the child: the file must still be 0644
    try:
        stdout, written, no_dir = run_all([
            (homes["warning"], "metrics"),
            (homes["warning"], "metrics", "--out", target),
            (homes["warning"], "metrics", "--out", tmp_path / "missing" / "qemuca.prom"),
        ])
    finally:
        os.umask(old_umask)
    assert stdout.returncode == 0 and stdout.stderr == "", stdout.stderr
    assert written.returncode == 0 and written.stdout == "" and written.stderr == "", written.stderr
    assert_error(no_dir, EXIT_IO, str(tmp_path / "missing" / "qemuca.prom"))

    st = target.stat()
    assert (st.st_mode & 0o777, st.st_ino != inode) == (0o644, True)  # renamed into place
    assert os.listdir(out_dir) == ["qemuca.prom"]  # no temp file left
    for text in (stdout.stdout, target.read_text()):
        fams = _families(text)
        samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
                   for f in fams.values() for s in f.samples}
        assert samples[("qemuca_rollover_in_progress", ())] == 1
        assert samples[("qemuca_host_deployed_fingerprint_match", (("host", "moved.qemu.test"),))] == 0
        assert samples[("qemuca_certificates", (("status", "valid"),))] == 3
        assert samples[("qemuca_certificates", (("status", "superseded"),))] == 1
        assert {s.labels["role"] for s in fams["qemuca_ca_not_after_seconds"].samples} == {"current", "previous"}
        assert {s.labels["host"] for s in fams["qemuca_certificate_not_after_seconds"].samples} == {
            "a.qemu.test", "soon.qemu.test", "moved.qemu.test"}


def test_metrics_with_a_corrupt_crl_fails_and_keeps_the_old_file(tmp_path):
    home = make_store(tmp_path, hosts=["a.qemu.test"])
    target = tmp_path / "qemuca.prom"
    target.write_text("qemuca_metrics_generated_seconds 1\n")  # an earlier run's
    before = target.read_bytes()
    Path(home, "crl.pem").write_text("garbage\n")
    assert_error(run_qemuca(home, "metrics", "--out", target), EXIT_STORE, "crl.pem")
    assert target.read_bytes() == before
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".qemuca.prom")]


# ---------------------------------------------------------------- systemd units

def _unit(name: str) -> str:
    return (UNITS / name).read_text()


def _values(text: str, key: str):
    return [line.split("=", 1)[1] for line in text.splitlines() if line.startswith(key + "=")]


def test_systemd_units_verify(tmp_path):
    """systemd's own checker accepts both units (ExecStart pointed at this qemuca)."""
    analyze = require_tool("systemd-analyze")
    service, timer = _unit("qemuca-metrics.service"), _unit("qemuca-metrics.timer")
    assert _values(timer, "OnCalendar") == ["daily"] and _values(timer, "Persistent") == ["true"]
    assert _values(timer, "RandomizedDelaySec") and _values(timer, "WantedBy") == ["timers.target"]
    for key in ("ProtectSystem", "NoNewPrivileges", "PrivateTmp"):
        assert _values(service, key) == ["strict" if key == "ProtectSystem" else "true"]
    qemuca = shutil.which("qemuca") or sys.executable
    (tmp_path / "qemuca-metrics.service").write_text(
        service.replace("/usr/local/bin/qemuca", qemuca))
    (tmp_path / "qemuca-metrics.timer").write_text(timer)
    proc = subprocess.run([analyze, "verify", str(tmp_path / "qemuca-metrics.service"),
                           str(tmp_path / "qemuca-metrics.timer")], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0 and "qemuca-metrics" not in proc.stderr, proc.stderr


def test_service_sandbox_lets_metrics_read_the_store(tmp_path):
    """The unit's ReadWritePaths hold the textfile dir and QEMUCA_HOME; under a read-only
    system with just those writable (as ProtectSystem=strict makes it), metrics works,
    and without the store writable it cannot even read the index (SQLite WAL)."""
    if os.geteuid() != 0:
        missing("root (the test mounts in its own mount namespace)")
    unshare = require_tool("unshare")
    service = _unit("qemuca-metrics.service")
    rw = set(" ".join(_values(service, "ReadWritePaths")).split())
    home = _values(service, "Environment")[0].split("QEMUCA_HOME=", 1)[1]
    out = _values(service, "ExecStart")[0].split("--out ", 1)[1]
    assert rw == {home, os.path.dirname(out)}

    home = make_store(tmp_path, hosts=["a.qemu.test"])
    out_dir = tmp_path / "textfile"
    out_dir.mkdir()
    script = ('set -e; mount --bind "$1" "$1"; [ "$4" = 1 ] && mount --bind "$2" "$2"; '
              'mount --bind "$3" "$3"; mount -o remount,bind,ro "$1"; mount -o remount,bind,ro /; '
              'shift 4; exec "$@"')
    results = []
    for writable_home in ("1", "0"):
        results.append(subprocess.run(
            [unshare, "--mount", "--propagation", "private", "sh", "-c", script, "sh", str(tmp_path),
             home, str(out_dir), writable_home, sys.executable, "-m", "qemuca", "--home", home,
             "metrics", "--out", str(out_dir / "qemuca.prom")],
            capture_output=True, text=True, timeout=60, cwd=ROOT, env=clean_env()))
    assert results[0].returncode == 0, results[0].stderr
    assert "qemuca_metrics_generated_seconds" in (out_dir / "qemuca.prom").read_text()
    assert_error(results[1], EXIT_STORE, "unable to open database file")
