"""Many qemuca processes on one store at once: SQLite's lock must serialise them so that
no host is issued twice, no serial repeats, no row (certificate or audit) is lost, and
the CRL written last still lists every revocation."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import time
from collections import Counter
from pathlib import Path

from cryptography import x509

from qemuca.errors import EXIT_CONFLICT
from tests.support.pki import assert_error, current, make_store, popen_qemuca, run_qemuca

WAIT_S = 120
ISSUERS, PER_ISSUER = 16, 25
VICTIMS = [f"victim{i}.qemu.test" for i in range(6)]


def _finish(procs):
    """Wait for every process; returns [(returncode, stdout, stderr)]."""
    out = []
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=WAIT_S)
        out.append((proc.returncode, stdout, stderr))
    return out


def _crl_serials(home) -> Counter:
    import re

    data = (Path(home) / "crl.pem").read_bytes()
    blocks = re.findall(rb"-----BEGIN X509 CRL-----.*?-----END X509 CRL-----", data, re.S)
    return Counter(format(e.serial_number, "x") for b in blocks for e in x509.load_pem_x509_crl(b))


def test_sixteen_issuers_with_readers_revokers_and_crl_writers(tmp_path, capsys):
    home = make_store(tmp_path, hosts=VICTIMS)  # passphrase-less CA, ECDSA P-256 keys
    victims = {current(home, v).serial: v for v in VICTIMS}
    batches = [[f"h{w:02d}-{i:02d}.qemu.test" for i in range(PER_ISSUER)] for w in range(ISSUERS)]
    # Interleaved so that readers, revokers and CRL writers run while the issuers do.
    plan = []
    for w, hosts in enumerate(batches):
        plan.append(("issue", "--json", *hosts))
        if w % 3 == 0:
            plan.append(("list", "--json") if w % 2 == 0 else ("list", "--all", "--json"))
        if w < len(VICTIMS):
            plan.append(("revoke", VICTIMS[w], "--json"))
        if w % 5 == 1:
            plan.append(("crl", "--json"))
    start = time.monotonic()
    procs = [popen_qemuca(home, *args) for args in plan]
    results = _finish(procs)
    wall = time.monotonic() - start
    for args, (code, stdout, stderr) in zip(plan, results):
        assert code == 0 and "Traceback" not in stderr, (args, stderr)
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
    duplicates = sum(n - 1 for n in hosts.values()) + (len(rows) - len({r[0] for r in rows}))
    assert set(hosts) == wanted | set(VICTIMS)
    assert all(n == 1 for n in hosts.values())  # every host issued exactly once
    assert len({r[0] for r in rows}) == len(rows) == ISSUERS * PER_ISSUER + len(VICTIMS)  # no serial twice
    assert len({r[3] for r in rows}) == len(rows)
    for serial, _host, _status, _fp, pem in rows:
        assert format(x509.load_pem_x509_certificate(pem.encode()).serial_number, "x") == serial
    assert {r[1] for r in rows if r[2] == "revoked"} == set(VICTIMS)
    # One audit row per change, none lost.
    issued = Counter(json.loads(d)["serial"] for a, _, d in audit if a == "issue")
    assert set(issued) == {r[0] for r in rows} and set(issued.values()) == {1}
    crl_runs = sum(1 for args in plan if args[0] == "crl")
    assert Counter(a for a, _, _ in audit) == Counter(
        {"issue": len(rows), "init": 1, "revoke": len(VICTIMS), "crl": len(VICTIMS) + crl_runs})
    assert {json.loads(d)["serial"] for a, _, d in audit if a == "revoke"} == set(victims)
    # Each revoke re-signed the CRL inside its own transaction: the last one lists them all.
    assert _crl_serials(home) == Counter(set(victims))

    doctor = run_qemuca(home, "doctor", "--strict", "--json")
    assert doctor.returncode == 0, doctor.stdout + doctor.stderr
    report = json.loads(doctor.stdout)
    assert report["result"] == "pass"
    with capsys.disabled():
        print(f"\nconcurrency: {len(plan)} processes ({ISSUERS} issue x {PER_ISSUER} hosts, "
              f"{sum(a[0] == 'list' for a in plan)} list, {len(VICTIMS)} revoke, {crl_runs} crl); "
              f"{len(rows)} certificates, {len(audit)} audit rows, duplicates = {duplicates}; "
              f"doctor {report['result']}; wall time {wall:.1f} s")


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
