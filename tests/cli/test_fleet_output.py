"""Fleet output at scale (issue 16): --json written per host as hosts finish, summaries
with failures first and a counts line, host names whole at 80 columns, Ctrl-C.

Real fake hosts (sshd per host); a frozen host (SIGSTOP: TCP connects, nothing answers)
holds a run open so that what was written before the end can be seen.
"""

from __future__ import annotations

import io
import json
import os
import re
import select
import signal
import time
from typing import NamedTuple

import pytest

from qemuca.cli.output import JsonStream, emit_json
from qemuca.cli.remote import COUNT_ORDER, RESULT_ORDER, counts_line, worst_first
from tests.integration.test_deploy import deployments, ssh_args
from tests.support.pki import make_store, run_qemuca
from tests.support.terminal import longest_line, run_in_terminal, whole_on_a_line

LONG = [f"hv-{i:04d}.rack07.fra1.cloud.example.org" for i in range(1, 6)]
HUNG = ["--connect-timeout", "4", "--timeout", "4"]


# ------------------------------------------------------------------ the pieces, no host


def _streamed(mode, items, key="", summary=None):
    out = io.StringIO()
    stream = JsonStream(mode, key, out=out, summary=summary)
    for item in items:
        stream.write(item)
    stream.close()
    return out.getvalue()


@pytest.mark.parametrize("items", [[], [{"host": "a", "checks": [1, 2]}], [{"host": "a"}, {"host": "b", "x": None}]])
def test_streamed_array_is_the_text_emit_json_prints(items, capsys):
    emit_json(items)
    assert _streamed("array", items) == capsys.readouterr().out


def test_streamed_object_and_lines():
    items = [{"source": "a", "destination": "b"}, {"source": "b", "destination": "a"}]
    text = _streamed("array", items, "pairs", lambda: {"hosts": ["a", "b"], "passed": 2, "failed": 0})
    assert json.loads(text) == {"pairs": items, "hosts": ["a", "b"], "passed": 2, "failed": 0}
    assert json.loads(_streamed("array", [], "pairs", lambda: {"passed": 0})) == {"pairs": [], "passed": 0}
    lines = _streamed("lines", items).splitlines()
    assert [json.loads(line) for line in lines] == items
    assert _streamed("lines", []) == ""


class R:
    def __init__(self, host, result):
        self.host, self.result = host, result


def test_counts_line_and_failures_first():
    reports = [R("a", "changed"), R("b", "failed"), R("c", "unchanged"), R("d", "failed"), R("e", "changed")]
    assert [r.host for r in worst_first(reports, RESULT_ORDER)] == ["b", "d", "a", "e", "c"]
    assert counts_line(reports, COUNT_ORDER) == "5 hosts: 2 changed, 1 unchanged, 2 failed"
    assert counts_line(reports[:1], COUNT_ORDER) == "1 host: 1 changed"
    assert counts_line([R("p", "passed")] * 3, ("passed", "failed"), noun="pair") == "3 pairs: 3 passed"


# ------------------------------------------------------------------ real hosts


def _read_until(proc, count, needle, timeout=30.0):
    """stdout of a running qemuca until `count` lines hold `needle`: (the text read, whether
    the process was still running then)."""
    lines, buf = [], b""
    fd = proc.stdout.fileno()
    deadline = time.monotonic() + timeout
    while sum(needle in line for line in lines) < count:
        ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        assert ready, f"only {lines} after {timeout} s"
        chunk = os.read(fd, 65536)
        assert chunk, f"stdout ended after {lines}"
        buf += chunk
        *done, buf = buf.split(b"\n")
        lines += [d.decode() for d in done]
    return "\n".join(lines) + "\n" + buf.decode(), proc.poll() is None


def _popen(home, *args):
    import subprocess

    from tests.support.pki import QEMUCA, clean_env

    return subprocess.Popen([*QEMUCA, "--home", str(home), *map(str, args)], stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=clean_env())


class _HungRun(NamedTuple):
    fleet: object
    home: object
    text: str  # all of stdout
    running: bool  # whether qemuca was still running when the awaited lines had come
    returncode: int
    err: str


def _deploy_past_a_hung_host(fleet_factory, tmp_path, hung_at, lines, needle, *args, interrupt=False):
    """`deploy --issue` to 4 hosts, the one at `hung_at` frozen, stdout read until `lines`
    lines hold `needle` (then Ctrl-C when `interrupt`)."""
    fleet = fleet_factory(4)
    home = make_store(tmp_path)
    hung = fleet[hung_at]
    hung.freeze()
    try:
        proc = _popen(home, "deploy", *fleet.names, "--issue", *ssh_args(fleet.ssh_config, fleet.known_hosts),
                      *HUNG, *args)
        text, running = _read_until(proc, lines, needle)
        if interrupt:
            proc.send_signal(signal.SIGINT)
        rest, err = proc.communicate(timeout=60)
    finally:
        hung.thaw()
    return _HungRun(fleet, home, text + rest.decode(), running, proc.returncode, err.decode())


@pytest.mark.sshd
def test_json_lines_stream_while_a_hung_host_holds_the_run(fleet_factory, tmp_path):
    run = _deploy_past_a_hung_host(fleet_factory, tmp_path, 1, 3, '"host"', "--json-lines")
    assert run.running, "the three good hosts were written only at the end"
    assert run.returncode == 1, run.err
    objects = [json.loads(line) for line in run.text.splitlines()]
    assert sorted(o["host"] for o in objects) == sorted(run.fleet.names)  # one object per host
    assert objects[-1]["host"] == run.fleet.names[1] and objects[-1]["result"] == "failed"  # completion order
    assert all(o["result"] == "changed" for o in objects[:-1])


@pytest.mark.sshd
def test_json_array_streams_in_input_order_and_parses(fleet_factory, tmp_path):
    run = _deploy_past_a_hung_host(fleet_factory, tmp_path, 3, 3, '"host":', "--json")
    assert run.running, "the hosts before the hung one were written only at the end"
    assert run.returncode == 1, run.err
    data = json.loads(run.text)
    assert [r["host"] for r in data] == run.fleet.names  # one object per host, in the order given
    assert [r["result"] for r in data] == ["changed"] * 3 + ["failed"]


@pytest.mark.sshd
def test_ctrl_c_finishes_the_hosts_in_flight_and_records_them(fleet_factory, tmp_path):
    """--parallel 1: host1 done, host2 hung in flight when Ctrl-C comes; host2 ends (timed
    out), host3/host4 never start. The JSON is a whole array of the two; exit 130."""
    run = _deploy_past_a_hung_host(fleet_factory, tmp_path, 1, 1, '"host":', "--parallel", "1", "--json",
                                   interrupt=True)
    fleet, home = run.fleet, run.home
    assert run.running
    assert run.returncode == 130, run.err
    assert run.err.splitlines() == ["qemuca: error: interrupted: 2 of 4 hosts done, the others not started"]
    data = json.loads(run.text)
    assert [(r["host"], r["result"]) for r in data] == [(fleet.names[0], "changed"), (fleet.names[1], "failed")]
    assert set(deployments(home)) == {fleet.names[0]}  # what finished is in the index
    for host in fleet.names[2:]:
        assert not fleet[host].path("/etc/pki/qemu").exists()  # never started


def _table_rows(text, names):
    """Host names in the order the table's rows show them."""
    hits = []
    for line in text.splitlines():
        for n in names:
            if re.match(rf"\s*{re.escape(n)}\b", line) and n not in hits:
                hits.append(n)
    return hits


@pytest.mark.sshd
def test_summary_at_80_columns_failures_first_with_counts(fleet_factory, tmp_path):
    fleet = fleet_factory(5, names=LONG)
    home = make_store(tmp_path)
    for down in (fleet[1], fleet[3]):
        down.kill()
    text = run_in_terminal(home, "deploy", *fleet.names, "--issue", *ssh_args(fleet.ssh_config, fleet.known_hosts))
    assert whole_on_a_line(text, LONG) == [], text
    assert longest_line(text) <= 80, text
    assert _table_rows(text, LONG) == [LONG[1], LONG[3], LONG[0], LONG[2], LONG[4]], text
    assert text.rstrip().splitlines()[-1] == "5 hosts: 3 changed, 2 failed", text
    assert "deploying" in text  # the progress bar, on a terminal

    piped = run_qemuca(home, "deploy", *fleet.names, *ssh_args(fleet.ssh_config, fleet.known_hosts))
    assert piped.returncode == 1
    assert "deploying" not in piped.stderr  # no progress bar when stderr is no terminal
    assert piped.stdout.rstrip().splitlines()[-1] == "5 hosts: 3 unchanged, 2 failed", piped.stdout

    verify = run_in_terminal(home, "verify", *fleet.names, *ssh_args(fleet.ssh_config, fleet.known_hosts))
    assert whole_on_a_line(verify, LONG) == [] and longest_line(verify) <= 80, verify
    summary = verify[verify.rindex("Verify"):]
    assert _table_rows(summary, LONG) == [LONG[1], LONG[3], LONG[0], LONG[2], LONG[4]], verify
    assert verify.rstrip().splitlines()[-1] in ("5 hosts: 3 pass, 2 fail", "5 hosts: 3 warn, 2 fail"), verify
    assert f"{LONG[0]}: PASS" not in verify  # a passing host is one line of the summary
    assert f"{LONG[1]}: FAIL" in verify  # a failed one has its table


@pytest.mark.sshd
@pytest.mark.qemu
def test_probe_pairs_at_80_columns_and_as_json_lines(fleet_factory, tmp_path):
    from tests.support.qemu_migration import QEMU
    from tests.support.tools import require_tool

    require_tool(QEMU)
    fleet = fleet_factory(3, names=LONG[:3])
    home = make_store(tmp_path)
    ssh = ssh_args(fleet.ssh_config, fleet.known_hosts)
    deployed = run_qemuca(home, "deploy", *fleet.names, "--issue", *ssh, "--json")
    assert deployed.returncode == 0, deployed.stdout + deployed.stderr
    pairs = tmp_path / "pairs"
    pairs.write_text(f"{LONG[0]} {LONG[1]}\n{LONG[2]} {LONG[0]}\n")
    probe = ["probe", "--pairs", pairs, *ssh, "--address", "127.0.0.1", "--ram", "16"]
    text = run_in_terminal(home, *probe)
    assert whole_on_a_line(text, LONG[:3]) == [] and longest_line(text) <= 80, text
    assert text.rstrip().splitlines()[-1] == "2 pairs: 2 passed", text
    lines = run_qemuca(home, *probe, "--json-lines")
    assert lines.returncode == 0, lines.stderr
    objects = [json.loads(line) for line in lines.stdout.splitlines()]
    assert sorted((o["source"], o["destination"]) for o in objects) == sorted(
        [(LONG[0], LONG[1]), (LONG[2], LONG[0])])
    whole = json.loads(run_qemuca(home, *probe, "--json").stdout)
    assert whole["passed"] == 2 and whole["failed"] == 0 and whole["hosts"] == [LONG[0], LONG[1], LONG[2]]
    assert [(p["source"], p["destination"]) for p in whole["pairs"]] == [(LONG[0], LONG[1]), (LONG[2], LONG[0])]
