"""Many qemuca processes on one store at once: SQLite's lock must serialise them so that
no host is issued twice, no serial repeats, and no row (certificate or audit) is lost."""

from __future__ import annotations

import json
import sqlite3
import subprocess
from collections import Counter
from pathlib import Path

from cryptography import x509

from qemuca.errors import EXIT_CONFLICT
from tests.support.pki import assert_error, current, make_store, popen_qemuca

WAIT_S = 120


def _finish(procs):
    """Wait for every process; returns [(returncode, stdout, stderr)]."""
    out = []
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=WAIT_S)
        out.append((proc.returncode, stdout, stderr))
    return out


def test_parallel_issue_list_and_revoke(tmp_path):
    home = make_store(tmp_path, hosts=["victim.qemu.test"])
    victim = current(home, "victim.qemu.test").serial
    batches = [[f"h{w}-{i}.qemu.test" for i in range(10)] for w in range(8)]
    procs = [popen_qemuca(home, "issue", "--json", *hosts) for hosts in batches]
    procs.insert(3, popen_qemuca(home, "list", "--json"))
    procs.insert(6, popen_qemuca(home, "revoke", "victim.qemu.test", "--json"))
    procs.append(popen_qemuca(home, "list", "--all", "--json"))
    results = _finish(procs)
    for code, stdout, stderr in results:
        assert code == 0 and "Traceback" not in stderr, stderr
        json.loads(stdout)  # every reader saw a consistent index

    wanted = {h for hosts in batches for h in hosts}
    db = sqlite3.connect(Path(home) / "index.sqlite")
    try:
        assert db.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        rows = db.execute("SELECT serial, host, status, fingerprint_sha256, cert_pem FROM certificates").fetchall()
        audit = db.execute("SELECT action, subject, detail FROM audit").fetchall()
    finally:
        db.close()
    hosts = Counter(r[1] for r in rows)
    assert set(hosts) == wanted | {"victim.qemu.test"}
    assert all(n == 1 for n in hosts.values())  # every host issued exactly once
    assert len({r[0] for r in rows}) == len(rows) == 81  # no serial twice
    assert len({r[3] for r in rows}) == 81
    for serial, _host, _status, _fp, pem in rows:
        assert format(x509.load_pem_x509_certificate(pem.encode()).serial_number, "x") == serial
    assert {r[1]: r[2] for r in rows}["victim.qemu.test"] == "revoked"
    # One audit row per change, none lost.
    issued = Counter(subject for action, subject, _ in audit if action == "issue")
    assert set(issued) == wanted | {"victim.qemu.test"} and set(issued.values()) == {1}
    assert Counter(a for a, _, _ in audit) == Counter({"issue": 81, "init": 1, "revoke": 1, "crl": 1})
    assert {json.loads(d)["serial"] for a, _, d in audit if a == "issue"} == {r[0] for r in rows}
    crl = x509.load_pem_x509_crl((Path(home) / "crl.pem").read_bytes())
    assert [format(r.serial_number, "x") for r in crl] == [victim]


def test_the_same_host_twice_at_once_has_one_winner(tmp_path):
    home = make_store(tmp_path)
    rounds = ["same1.qemu.test", "same2.qemu.test", "same3.qemu.test"]
    procs = [popen_qemuca(home, "issue", host) for host in rounds for _ in range(2)]
    results = _finish(procs)
    for i, host in enumerate(rounds):
        pair = results[2 * i: 2 * i + 2]
        assert sorted(code for code, _, _ in pair) == [0, EXIT_CONFLICT], pair
        code, stdout, stderr = [p for p in pair if p[0] == EXIT_CONFLICT][0]
        assert_error(subprocess.CompletedProcess([], code, stdout, stderr), EXIT_CONFLICT, host, "--force")
    db = sqlite3.connect(Path(home) / "index.sqlite")
    try:
        counts = dict(db.execute("SELECT host, COUNT(*) FROM certificates GROUP BY host").fetchall())
        audit = db.execute("SELECT COUNT(*) FROM audit WHERE action = 'issue'").fetchone()[0]
    finally:
        db.close()
    assert counts == {host: 1 for host in rounds}
    assert audit == 3
