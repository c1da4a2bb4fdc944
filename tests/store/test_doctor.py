"""`qemuca doctor` finds each kind of damage, and Store.open undoes what a process killed
inside a transaction left (the journal).

Damage is made the way it happens: by hand (chmod, a file replaced, a row edited with
sqlite outside qemuca) or by a process that really dies with SIGKILL in the middle of
a real core operation (a forked child; os.rename is wrapped to kill it at an exact call).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import sqlite3
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from qemuca.errors import EXIT_FAILED, EXIT_NOT_FOUND, EXIT_PASSPHRASE, NotFound, PassphraseError
from qemuca.ops import lifecycle
from qemuca.pki import ca, profile
from qemuca.store import doctor
from qemuca.store.index import Store
from qemuca.store.journal import ca_dir_fingerprint
from tests.support.pki import audit_actions, issue, make_store, revoke, run_qemuca, snapshot_store, write_secret

SECRET = b"correct horse battery staple"


def results(report) -> dict:
    return {c.check: c.result for c in report.findings}


def detail(report, check) -> str:
    return " | ".join(c.detail for c in report.findings if c.check == check)


def failing(report) -> set:
    return {c.check for c in report.findings if c.result == "fail"}


def raw(home):
    """A plain sqlite connection, as someone editing the index by hand would use."""
    return sqlite3.connect(Path(home) / "index.sqlite", isolation_level=None)


@pytest.fixture
def home(tmp_path):
    home = make_store(tmp_path, hosts=["a.qemu.test", "b.qemu.test", "c.qemu.test"])
    revoke(home, "c.qemu.test")
    issue(home, "a.qemu.test", force=True)  # a superseded row with 'replaces'
    return home


def start_rollover(home) -> None:
    store = Store.open(home)
    try:
        lifecycle.rollover_start(store, ca.CertificateAuthority(store), key_type="ecdsa-p256", days=3650,
                                 common_name="QEMU CA next", organization=None, passphrase=None)
    finally:
        store.close()


# ---------------------------------------------------------------- a healthy store

def test_a_healthy_store_passes_every_check(home):
    report = doctor.diagnose(home)
    assert report.result == "pass" and not report.failed(strict=True), report.as_dict()
    assert set(results(report)) >= {
        "integrity", "foreign-keys", "schema", "modes", "ca-cert", "ca-key-mode", "ca-key", "rollover",
        "certificates", "chain", "host-keys", "replaces", "revocation", "one-valid-per-host", "audit",
        "crl", "leftovers"}
    assert "4 signed by the current CA" in detail(report, "chain")
    assert "1 revoked" in detail(report, "crl")


def test_rollover_and_retired_cas_are_known_and_named(home):
    start_rollover(home)
    issue(home, "a.qemu.test", force=True)  # from the new CA
    report = doctor.diagnose(home)
    assert report.result == "pass", report.as_dict()
    assert "previous-ca-key" in results(report)
    assert "1 signed by the current CA, 4 signed by the previous CA" in detail(report, "chain")
    assert "stage started" in detail(report, "rollover")

    # After `init --force` the old CA and index are in retired/; certificates of the old
    # CA that the new index records chain to it and are named by where it is kept.
    other = make_store(Path(home).parent, name="other", hosts=["z.qemu.test"])
    z = Store.open(other).valid_for_host("z.qemu.test")
    ca.init_ca(other, common_name="QEMU CA again", organization=None, key_type="ecdsa-p256", days=3650,
               passphrase=None, force=True).close()
    with raw(other) as db:
        db.execute("INSERT INTO certificates (serial, host, sans, not_before, not_after, fingerprint_sha256, "
                   "status, replaces, issued_at, ca_fingerprint, key_source, key_type, cert_pem) VALUES "
                   "(?,?,?,?,?,?,?,?,?,?,?,?,?)",
                   (z.serial, z.host, json.dumps(z.sans), z.not_before, z.not_after, z.fingerprint_sha256,
                    "valid", None, z.issued_at, z.ca_fingerprint, "generated", "ecdsa-p256", z.cert_pem))
        db.execute("INSERT INTO audit (at, action, subject, detail, user, pid) VALUES (?,?,?,?,?,?)",
                   ("2024-01-01T00:00:00Z", "issue", z.host, json.dumps({"serial": z.serial}), "t", 1))
    report = doctor.diagnose(other)
    assert results(report)["chain"] == "warn"  # valid, yet its CA is retired: hosts no longer trust it
    assert "signed by a retired CA (retired/" in detail(report, "chain")


# ---------------------------------------------------------------- damage it finds

def test_rows_that_do_not_match_their_certificates(home):
    with raw(home) as db:
        db.execute("UPDATE certificates SET not_after = '2099-01-01T00:00:00Z' WHERE host = 'b.qemu.test'")
        db.execute("UPDATE certificates SET sans = '[\"evil.qemu.test\"]' WHERE host = 'c.qemu.test'")
    report = doctor.diagnose(home)
    assert failing(report) == {"certificates"}
    assert "not_after 2099-01-01T00:00:00Z but the certificate says" in detail(report, "certificates")
    assert "evil.qemu.test" in detail(report, "certificates")


def test_a_certificate_from_a_foreign_ca(home, tmp_path):
    stranger = make_store(tmp_path, name="stranger", hosts=["s.qemu.test"])
    s = Store.open(stranger).valid_for_host("s.qemu.test")
    with raw(home) as db:
        db.execute("UPDATE certificates SET cert_pem = ?, fingerprint_sha256 = ?, serial = ?, not_before = ?, "
                   "not_after = ? WHERE host = 'b.qemu.test'",
                   (s.cert_pem, s.fingerprint_sha256, s.serial, s.not_before, s.not_after))
    report = doctor.diagnose(home)
    assert "chain" in failing(report)
    assert "signed by no CA this store knows" in detail(report, "chain")


def test_keys_replaces_revocation_and_duplicates(home):
    with raw(home) as db:  # foreign_keys are off in a plain connection: damage gets in
        keys = dict(db.execute("SELECT host, key_pem FROM certificates WHERE status = 'valid'"))
        db.execute("UPDATE certificates SET key_pem = ? WHERE host = 'b.qemu.test'", (keys["a.qemu.test"],))
        db.execute("UPDATE certificates SET replaces = 'feedface' WHERE host = 'a.qemu.test' "
                   "AND status = 'valid'")
        db.execute("UPDATE certificates SET revoked_at = NULL WHERE host = 'c.qemu.test'")
        db.execute("DROP INDEX one_valid_per_host")
        db.execute("UPDATE certificates SET status = 'valid' WHERE status = 'superseded'")
    report = doctor.diagnose(home)
    assert failing(report) == {"foreign-keys", "host-keys", "replaces", "revocation", "one-valid-per-host"}
    assert "b.qemu.test" in detail(report, "host-keys") and "does not match" in detail(report, "host-keys")
    assert "replaces feedface" in detail(report, "replaces")
    assert "a.qemu.test has 2 valid certificates" in detail(report, "one-valid-per-host")
    assert "BEGIN" not in json.dumps(report.as_dict())  # no key material in a report


def test_a_certificate_row_without_its_audit_row(home):
    store = Store.open(home)
    new = ca.CertificateAuthority(store).make_cert("d.qemu.test", [], 30, profile.generate_key("ecdsa-p256"))
    store.close()
    rec = new.record
    with raw(home) as db:
        db.execute("INSERT INTO certificates (serial, host, sans, not_before, not_after, fingerprint_sha256, "
                   "status, replaces, issued_at, ca_fingerprint, key_source, key_type, cert_pem, key_pem) "
                   "VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                   (rec.serial, rec.host, json.dumps(rec.sans), rec.not_before, rec.not_after,
                    rec.fingerprint_sha256, "valid", None, rec.issued_at, rec.ca_fingerprint, "generated",
                    "ecdsa-p256", rec.cert_pem, new.key_pem))
    report = doctor.diagnose(home)
    assert failing(report) == {"audit"}
    assert f"d.qemu.test {rec.serial}: no issue/sign/enroll/renew/rekey/adopt audit row" in detail(report, "audit")


def test_modes_and_the_ca_key(home, tmp_path):
    store = Store(home)
    os.chmod(home, 0o755)
    os.chmod(store.index_path, 0o644)
    os.chmod(store.ca_key_path, 0o644)
    report = doctor.diagnose(home)  # Store.open would refuse this store; doctor reports it
    assert failing(report) == {"modes", "ca-key-mode"}
    assert "chmod 700" in detail(report, "modes") and "chmod 600" in detail(report, "modes")
    os.chmod(home, 0o700)
    os.chmod(store.index_path, 0o600)
    os.chmod(store.ca_key_path, 0o600)

    other = make_store(tmp_path, name="other")
    os.replace(os.path.join(other, "ca", "ca-key.pem"), store.ca_key_path)
    report = doctor.diagnose(home)
    assert failing(report) == {"ca-key"}
    assert "does not match the CA certificate" in detail(report, "ca-key")


def test_an_encrypted_ca_key_is_checked_only_with_its_passphrase(tmp_path):
    home = make_store(tmp_path, passphrase=SECRET, hosts=["a.qemu.test"])
    report = doctor.diagnose(home)
    assert results(report)["ca-key"] == "skip" and report.result == "pass"
    assert detail(report, "ca-key").startswith("not checked: encrypted")
    assert results(doctor.diagnose(home, SECRET))["ca-key"] == "pass"
    with pytest.raises(PassphraseError, match="wrong passphrase"):
        doctor.diagnose(home, b"wrong")


def test_the_crl_against_the_index(home, tmp_path):
    store = Store(home)
    good = Path(store.crl_path).read_bytes()
    c = Store.open(home).certificates(host="c.qemu.test")[0].serial
    b = Store.open(home).valid_for_host("b.qemu.test").serial
    auth = ca.CertificateAuthority(Store.open(home))

    def hand_made(serials, signer_key=None, issuer=None, next_update_days=30):
        now = profile.utcnow()
        builder = (x509.CertificateRevocationListBuilder().issuer_name(issuer or auth.cert.subject)
                   .last_update(now - dt.timedelta(days=1)).next_update(now + dt.timedelta(days=next_update_days)))
        for s in serials:
            builder = builder.add_revoked_certificate(x509.RevokedCertificateBuilder().serial_number(
                int(s, 16)).revocation_date(now).build())
        crl = builder.sign(signer_key or auth.key, hashes.SHA256())
        Path(store.crl_path).write_bytes(crl.public_bytes(serialization.Encoding.PEM))

    cases = [
        (lambda: hand_made([]), "fail", f"revoked but not in crl.pem: c.qemu.test {c}"),
        (lambda: hand_made([c, b]), "fail", f"crl.pem revokes certificate(s) the index does not: {b}"),
        (lambda: hand_made([c], next_update_days=-1), "warn", "run 'qemuca crl'"),
        (lambda: hand_made([c]), "warn", "not the CRL qemuca last wrote"),
        (lambda: Path(store.crl_path).write_text("garbage\n"), "fail", "holds no CRL"),
        (lambda: os.unlink(store.crl_path), "fail", "no crl.pem"),
    ]
    stranger = ca.CertificateAuthority(Store.open(make_store(tmp_path, name="stranger")))
    cases.append((lambda: hand_made([c], stranger.key, stranger.cert.subject), "fail",
                  "signed by no trusted CA"))
    for damage, result, text in cases:
        damage()
        report = doctor.diagnose(home)  # Store.open leaves a hand-made crl.pem alone
        assert results(report)["crl"] == result and text in detail(report, "crl"), detail(report, "crl")
        Path(store.crl_path).write_bytes(good)
    assert doctor.diagnose(home).result == "pass"
    # `qemuca crl` is the fix for a CRL that lacks a revocation.
    hand_made([])
    ca.CertificateAuthority(Store.open(home)).write_crl()
    assert results(doctor.diagnose(home))["crl"] == "pass"


def test_a_broken_index_is_a_finding_not_a_crash(home):
    path = Path(home) / "index.sqlite"
    with raw(home) as db:
        db.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    report = doctor.diagnose(home)
    assert failing(report) == {"schema"} and "schema version 99" in detail(report, "schema")
    with raw(home) as db:
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    path.write_bytes(b"not a database at all" * 300)
    report = doctor.diagnose(home)
    assert "integrity" in failing(report) and "certificates" not in results(report)
    os.unlink(path)
    assert results(doctor.diagnose(home))["index"] == "fail"
    with pytest.raises(NotFound):
        doctor.diagnose(str(Path(home).parent / "nothing-here"))


# ---------------------------------------------------------------- leftovers and --repair

def test_repair_removes_leftovers_and_nothing_else(home):
    Path(home, ".ca-new-999999999").mkdir(mode=0o700)  # a pid that cannot be running
    Path(home, ".ca-new-999999999", "ca-key.pem").write_text("half a CA")
    Path(home, ".crl.pem.qemuca-tmp-0123456789ab").write_text("half a CRL")
    Path(home, "ca", ".ca-cert.pem.qemuca-tmp-ba9876543210").write_text("half a cert")
    live = Path(home, f".ca-new-{os.getppid()}")  # a live process: only if it is a qemuca
    live.mkdir()
    report = doctor.diagnose(home)
    assert results(report)["leftovers"] == "warn" and report.failed(strict=True) and not report.failed()
    for name in (".ca-new-999999999", ".crl.pem.qemuca-tmp-0123456789ab", "ca/.ca-cert.pem.qemuca-tmp-"):
        assert name in detail(report, "leftovers")

    before = snapshot_store(home)
    removed = doctor.repair(home)
    assert sorted(removed) == sorted([".ca-new-999999999", ".crl.pem.qemuca-tmp-0123456789ab",
                                      f".ca-new-{os.getppid()}", "ca/.ca-cert.pem.qemuca-tmp-ba9876543210"])
    after = snapshot_store(home)
    gone = {k for k in before["files"] if k not in after["files"]}
    assert gone == {".ca-new-999999999", ".ca-new-999999999/ca-key.pem", ".crl.pem.qemuca-tmp-0123456789ab",
                    "ca/.ca-cert.pem.qemuca-tmp-ba9876543210", f".ca-new-{os.getppid()}"}
    assert {k: v for k, v in before["files"].items() if k not in gone} == after["files"]
    assert before["rows"]["certificates"] == after["rows"]["certificates"]
    assert doctor.diagnose(home).result == "pass"


def test_a_staging_directory_of_a_running_qemuca_is_left_alone(home):
    proc = run_in_background(home)
    try:
        staging = Path(home, f".ca-new-{proc.pid}")
        staging.mkdir()
        items = doctor.find_leftovers(home)
        assert [(i.path, i.owner) for i in items] == [(str(staging), proc.pid)]
        assert doctor.repair(home) == [] and staging.exists()
        assert results(doctor.diagnose(home))["leftovers"] == "pass"
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()


def run_in_background(home, argv=None):
    """A process that runs as `python -m qemuca --home HOME` would (a stand-in package
    named qemuca that just sleeps), or with `argv` (which may merely mention qemuca)."""
    import subprocess
    import sys
    import tempfile

    stand_in = Path(tempfile.mkdtemp(prefix="qemuca-stand-in-"), "qemuca")
    stand_in.mkdir()
    (stand_in / "__init__.py").write_text("")
    (stand_in / "__main__.py").write_text("import sys, time\nprint()\nsys.stdout.flush()\ntime.sleep(60)\n")
    # -m looks in the working directory first: run it where the stand-in is.
    proc = subprocess.Popen(argv or [sys.executable, "-m", "qemuca", "--home", home], stdout=subprocess.PIPE,
                            cwd=stand_in.parent)
    proc.stdout.readline()  # running (its /proc cmdline is set)
    return proc


def test_a_process_that_only_mentions_qemuca_is_not_one(home):
    """A shell in /root/qemuca, or a program given "qemuca" as an argument, holds no
    staging dir: its pid's leftovers are removed (issue: doctor took any such process for
    a live qemuca)."""
    import sys

    proc = run_in_background(home, [sys.executable, "-c", "import sys, time; print(); sys.stdout.flush(); "
                                    "time.sleep(60)", "qemuca", "/root/qemuca"])
    try:
        staging = Path(home, f".ca-new-{proc.pid}")
        staging.mkdir()
        assert [(i.path, i.owner) for i in doctor.find_leftovers(home)] == [(str(staging), None)]
        assert doctor.repair(home) == [staging.name] and not staging.exists()
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()


@pytest.mark.parametrize("argv, expected", [
    ([b"/usr/bin/python3", b"-m", b"qemuca", b"list"], True),
    ([b"/venv/bin/python", b"-X", b"importtime", b"-m", b"qemuca"], True),
    ([b"/venv/bin/python3.11", b"/venv/bin/qemuca", b"deploy"], True),
    ([b"/usr/local/bin/qemuca", b"verify"], True),
    ([b"bash", b"-c", b"cd /root/qemuca && make"], False),
    ([b"/usr/bin/python3", b"-c", b"pass", b"qemuca"], False),
    ([b"/usr/bin/python3", b"-m", b"qemuca_other"], False),
    ([b"vim", b"qemuca/cli.py"], False),
    ([b""], False),
])
def test_is_qemuca_reads_the_command_line(argv, expected):
    assert doctor.is_qemuca(argv) is expected


# ---------------------------------------------------------------- the journal: killed mid-transaction

def die_during(home, operation, kill_at_rename=None) -> None:
    """Run operation(store) in a child process that dies with SIGKILL: on entry to its
    `kill_at_rename`th os.rename, or where the operation arranges it. A real death
    inside the real transaction, never committed."""
    pid = os.fork()
    if pid == 0:  # the child: never returns
        try:
            real, calls = os.rename, [0]

            def rename(src, dst, *a, **kw):
                calls[0] += 1
                if calls[0] == kill_at_rename:
                    os.kill(os.getpid(), signal.SIGKILL)
                return real(src, dst, *a, **kw)

            os.rename = rename
            operation(Store(home))
        finally:
            os._exit(3)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, status


def die_at_commit():
    """In this (child) process, every write transaction dies right before its COMMIT."""
    from contextlib import contextmanager

    real = Store.write

    @contextmanager
    def write_then_die(self):
        with real(self) as db:
            yield db
            os.kill(os.getpid(), signal.SIGKILL)

    Store.write = write_then_die


def die_after_commit():
    """In this (child) process, die after COMMIT, when the journal is about to be removed."""
    from qemuca.store import journal

    real = journal.unlink

    def unlink(path):
        if os.path.basename(path).startswith(".journal-") and path.endswith(".json"):
            os.kill(os.getpid(), signal.SIGKILL)
        real(path)

    journal.unlink = unlink


def rollover(store):
    lifecycle.rollover_start(store, ca.CertificateAuthority(store), key_type="ecdsa-p256", days=3650,
                             common_name="QEMU CA next", organization=None, passphrase=None)


def test_a_rollover_killed_between_its_renames_is_undone(home):
    old = ca_dir_fingerprint(os.path.join(home, "ca"))
    # renames: 2 staging files, the journal, then ca -> ca-previous, staging -> ca
    die_during(home, rollover, kill_at_rename=5)
    assert not os.path.exists(os.path.join(home, "ca")) and os.path.exists(os.path.join(home, "ca-previous"))
    store = Store.open(home)  # any command: the CA is put back before anything else
    assert ca_dir_fingerprint(store.ca_dir) == old and not os.path.exists(store.previous_ca_dir)
    assert store.rollover() is None and store.journal_files() == []
    assert audit_actions(home)[-1] == "recover" and "ca/" in " ".join(store.recovered)
    report = doctor.diagnose(home)
    assert set(c.check for c in report.findings if c.result != "pass") == {"leftovers"}
    doctor.repair(home)
    assert doctor.diagnose(home).result == "pass"
    rollover(Store.open(home))  # and the rollover can simply be started again
    assert Store.open(home).rollover()["stage"] == "started"


def test_a_rollover_killed_after_both_renames_is_undone_and_the_new_ca_kept(home):
    old = ca_dir_fingerprint(os.path.join(home, "ca"))
    die_during(home, lambda store: (die_at_commit(), rollover(store)))
    new = ca_dir_fingerprint(os.path.join(home, "ca"))
    assert new != old and ca_dir_fingerprint(os.path.join(home, "ca-previous")) == old
    store = Store.open(home)
    assert ca_dir_fingerprint(store.ca_dir) == old and not os.path.exists(store.previous_ca_dir)
    kept = [p for p in Path(home, "retired").iterdir() if p.name.endswith("-undone-ca")]
    assert [ca_dir_fingerprint(str(p)) for p in kept] == [new]  # a CA key is never deleted
    report = doctor.diagnose(home)
    assert report.result == "pass", report.as_dict()


def test_a_committed_rollover_keeps_its_renames(home):
    """Killed after COMMIT, before the journal is removed: the rollover stands."""
    die_during(home, lambda store: (die_after_commit(), rollover(store)))
    assert Store(home).journal_files()
    store = Store.open(home)
    assert store.rollover()["stage"] == "started" and os.path.exists(store.previous_ca_dir)
    assert store.journal_files() == [] and store.recovered == []
    assert "recover" not in audit_actions(home)
    assert doctor.diagnose(home).result == "pass"


def test_a_revoke_killed_after_replacing_crl_pem_is_undone(home):
    crl = Path(home, "crl.pem").read_bytes()
    b = Store.open(home).valid_for_host("b.qemu.test").serial

    def revoke_b(store):
        die_at_commit()
        ca.CertificateAuthority(store).revoke("b.qemu.test", "key-compromise")

    die_during(home, revoke_b)
    assert Path(home, "crl.pem").read_bytes() != crl  # the new CRL, never committed
    store = Store.open(home)
    assert Path(home, "crl.pem").read_bytes() == crl
    assert store.by_serial(b).status == "valid" and "crl.pem put back" in " ".join(store.recovered)
    assert doctor.diagnose(home).result == "pass"


def test_a_rollover_finish_killed_after_retiring_the_old_ca_is_undone(tmp_path):
    home = make_store(tmp_path, hosts=["x.qemu.test"])
    revoke(home, "x.qemu.test")
    start_rollover(home)
    lifecycle.rollover_begin_finish(Store.open(home))
    previous = ca_dir_fingerprint(os.path.join(home, "ca-previous"))
    die_during(home, lambda store: (die_at_commit(), lifecycle.rollover_complete(store)))
    assert not os.path.exists(os.path.join(home, "ca-previous"))
    store = Store.open(home)
    assert ca_dir_fingerprint(store.previous_ca_dir) == previous
    assert store.rollover()["stage"] == "finishing"
    assert doctor.diagnose(home).result == "pass"
    lifecycle.rollover_complete(Store.open(home))  # finishing again works
    assert Store.open(home).rollover() is None


def test_a_failed_rename_rolls_the_files_back_at_once(home):
    """Not a kill: an error inside the transaction puts the CA back before ROLLBACK
    (before the journal, a failed second rename left the store without ca/)."""
    old = ca_dir_fingerprint(os.path.join(home, "ca"))
    store = Store.open(home)
    real, failed = os.rename, []

    def rename(src, dst, *a, **kw):  # the staging -> ca rename fails, once
        if os.path.basename(str(dst)) == "ca" and not failed:
            failed.append(dst)
            raise OSError(28, "No space left on device")
        return real(src, dst, *a, **kw)

    os.rename = rename
    try:
        with pytest.raises(OSError, match="No space"):
            rollover(store)
    finally:
        os.rename = real
    assert failed and ca_dir_fingerprint(os.path.join(home, "ca")) == old
    assert not os.path.exists(os.path.join(home, "ca-previous"))
    assert store.rollover() is None and store.journal_files() == []


def test_store_open_leaves_a_hand_made_crl_alone(home):
    Path(home, "crl.pem").write_text("garbage\n")
    Store.open(home)
    assert Path(home, "crl.pem").read_text() == "garbage\n"


# ---------------------------------------------------------------- the command

def test_doctor_command_exit_codes_and_json(home, tmp_path):
    ok = run_qemuca(home, "doctor", "--json")
    assert ok.returncode == 0, ok.stderr
    data = json.loads(ok.stdout)
    assert data["result"] == "pass" and data["removed"] == []
    assert all(set(c) == {"check", "result", "detail"} for c in data["checks"])

    Path(home, ".crl.pem.qemuca-tmp-0123456789ab").write_text("x")
    warned = run_qemuca(home, "doctor")
    assert warned.returncode == 0 and "leftovers" in warned.stdout and "WARN" in warned.stdout
    assert run_qemuca(home, "doctor", "--strict").returncode == EXIT_FAILED
    repaired = run_qemuca(home, "doctor", "--repair", "--strict", "--json")
    assert repaired.returncode == 0 and json.loads(repaired.stdout)["removed"] == [
        ".crl.pem.qemuca-tmp-0123456789ab"]

    with raw(home) as db:
        db.execute("UPDATE certificates SET revoked_at = NULL WHERE status = 'revoked'")
    failed = run_qemuca(home, "doctor", "--json")
    assert failed.returncode == EXIT_FAILED and json.loads(failed.stdout)["result"] == "fail"

    missing = run_qemuca(tmp_path / "nowhere", "doctor")
    assert missing.returncode == EXIT_NOT_FOUND and missing.stderr.startswith("qemuca: error: no QEMU CA")

    enc = make_store(tmp_path, name="enc", passphrase=SECRET)
    assert run_qemuca(enc, "doctor", "--passphrase-file", write_secret(tmp_path / "pw")).returncode == 0
    wrong = run_qemuca(enc, "doctor", "--passphrase-file", write_secret(tmp_path / "bad", "nope"))
    assert wrong.returncode == EXIT_PASSPHRASE and "wrong passphrase" in wrong.stderr


def test_a_journal_left_before_init_force_is_not_applied_to_the_new_ca(home):
    """A crash leaves a journal; `init --force` (which opens no store) sets the old CA and
    index aside: the journal belongs to them, and must not drag the old CA back."""
    die_during(home, rollover, kill_at_rename=5)
    ca.init_ca(home, common_name="QEMU CA fresh", organization=None, key_type="ecdsa-p256", days=3650,
               passphrase=None, force=True).close()
    fresh = ca_dir_fingerprint(os.path.join(home, "ca"))
    store = Store.open(home)
    assert ca_dir_fingerprint(store.ca_dir) == fresh and not os.path.exists(store.crl_path)
    assert store.journal_files() == [] and "of a retired index" in " ".join(store.recovered)
    assert set(c.check for c in doctor.diagnose(home).findings if c.result != "pass") <= {"leftovers"}
