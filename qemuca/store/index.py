"""The CA home on disk: CA files, the SQLite index of every certificate, the audit log.

Layout of a home (directory 0700):
    ca/ca-cert.pem      the CA certificate
    ca/ca-key.pem       the CA key, 0600, encrypted unless created with --no-passphrase
    index.sqlite        certificates (with the keys qemuca generated), audit, meta
    crl.pem             the current CRL, rewritten by revoke and crl
    retired/<time>/     a CA and index set aside by `init --force`

The index is the source of truth. Writers use `BEGIN IMMEDIATE` with a busy timeout,
so concurrent qemuca processes serialise on SQLite's own lock and never hand out a
serial twice (serial is the primary key) or lose a row. The audit table is
append-only (triggers refuse UPDATE and DELETE).

Files a transaction changes outside SQLite (the CA directories of a rollover, crl.pem)
are journaled first, so a killed process never leaves them out of step with the index:
see qemuca.store.journal.
"""

from __future__ import annotations

import datetime as dt
import getpass
import json
import os
import sqlite3
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterable, Iterator, List, Optional, Sequence

from qemuca.errors import Conflict, NotFound, StoreError
from qemuca.hosts.fs import LocalFS
from qemuca.store import journal

SCHEMA_VERSION = 1
BUSY_TIMEOUT_S = 60.0

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS certificates (
    serial TEXT PRIMARY KEY,
    host TEXT NOT NULL,
    sans TEXT NOT NULL,
    not_before TEXT NOT NULL,
    not_after TEXT NOT NULL,
    fingerprint_sha256 TEXT NOT NULL UNIQUE,
    status TEXT NOT NULL CHECK (status IN ('valid', 'revoked', 'superseded')),
    replaces TEXT REFERENCES certificates(serial),
    issued_at TEXT NOT NULL,
    ca_fingerprint TEXT NOT NULL,
    key_source TEXT NOT NULL CHECK (key_source IN ('generated', 'csr')),
    key_type TEXT NOT NULL,
    cert_pem TEXT NOT NULL,
    key_pem TEXT,
    revoked_at TEXT,
    revocation_reason TEXT
);
CREATE INDEX IF NOT EXISTS certificates_host ON certificates(host, status);
CREATE UNIQUE INDEX IF NOT EXISTS one_valid_per_host ON certificates(host) WHERE status = 'valid';
CREATE TABLE IF NOT EXISTS audit (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    at TEXT NOT NULL,
    action TEXT NOT NULL,
    subject TEXT,
    detail TEXT NOT NULL,
    user TEXT NOT NULL,
    pid INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS deployments (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    host TEXT NOT NULL,
    fingerprint_sha256 TEXT,
    at TEXT NOT NULL,
    result TEXT NOT NULL,
    error TEXT,
    bundle_sha256 TEXT
);
CREATE INDEX IF NOT EXISTS deployments_host ON deployments(host, id);
CREATE TRIGGER IF NOT EXISTS audit_no_update BEFORE UPDATE ON audit
    BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
CREATE TRIGGER IF NOT EXISTS audit_no_delete BEFORE DELETE ON audit
    BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
"""

STATUSES = ("valid", "revoked", "superseded")
CERT_COLUMNS = ("serial, host, sans, not_before, not_after, fingerprint_sha256, status, replaces, "
                "issued_at, ca_fingerprint, key_source, key_type, cert_pem, revoked_at, "
                "revocation_reason")


def iso(t: dt.datetime) -> str:
    return t.astimezone(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_iso(text: str) -> dt.datetime:
    """A time as iso() writes it. fromisoformat, not strptime: strptime cost `qemuca list`
    0.3 s on an index of 10,000 certificates (bench/bench_index.py)."""
    if len(text) != 20 or text[10] != "T" or text[-1] != "Z":
        raise ValueError(f"time data {text!r} does not match format '%Y-%m-%dT%H:%M:%SZ'")
    return dt.datetime.fromisoformat(text[:-1]).replace(tzinfo=dt.timezone.utc)


@dataclass(frozen=True)
class CertRecord:
    """One row of the index (without the private key)."""

    serial: str
    host: str
    sans: List[str]
    not_before: str
    not_after: str
    fingerprint_sha256: str
    status: str
    replaces: Optional[str]
    issued_at: str
    ca_fingerprint: str
    key_source: str
    key_type: str
    cert_pem: str
    revoked_at: Optional[str] = None
    revocation_reason: Optional[str] = None

    @classmethod
    def from_row(cls, row) -> CertRecord:
        values = list(row)
        values[2] = json.loads(values[2])
        return cls(*values)

    def as_dict(self, with_pem: bool = False) -> dict:
        data = {k: getattr(self, k) for k in self.__dataclass_fields__ if k != "cert_pem"}
        if with_pem:
            data["cert_pem"] = self.cert_pem
        return data


@dataclass(frozen=True)
class NewCert:
    """A certificate to be recorded; key_pem is None for CSR-signed ones."""

    record: CertRecord
    key_pem: Optional[str]


class Store:
    def __init__(self, home: str):
        self.home = os.path.abspath(home)
        self.fs = LocalFS()
        self._db: Optional[sqlite3.Connection] = None
        self._lock = threading.RLock()
        self._journal: Optional[str] = None  # this transaction's journal file
        self.recovered: List[str] = []  # what recover() put back (doctor reports it)

    # -- paths
    @property
    def ca_dir(self) -> str:
        return os.path.join(self.home, "ca")

    @property
    def ca_cert_path(self) -> str:
        return os.path.join(self.ca_dir, "ca-cert.pem")

    @property
    def ca_key_path(self) -> str:
        return os.path.join(self.ca_dir, "ca-key.pem")

    @property
    def previous_ca_dir(self) -> str:
        """During a CA rollover: the previous CA, still trusted until `finish`."""
        return os.path.join(self.home, "ca-previous")

    @property
    def previous_ca_cert_path(self) -> str:
        return os.path.join(self.previous_ca_dir, "ca-cert.pem")

    @property
    def previous_ca_key_path(self) -> str:
        return os.path.join(self.previous_ca_dir, "ca-key.pem")

    @property
    def index_path(self) -> str:
        return os.path.join(self.home, "index.sqlite")

    @property
    def crl_path(self) -> str:
        return os.path.join(self.home, "crl.pem")

    # -- opening
    @classmethod
    def open(cls, home: str) -> Store:
        """An existing store; NotFound when no CA was initialised there."""
        store = cls(home)
        cert, index = os.path.exists(store.ca_cert_path), os.path.exists(store.index_path)
        if not cert and not index:
            raise NotFound(f"no QEMU CA in {store.home} (run 'qemuca init', or set --home / QEMUCA_HOME)")
        if index:
            store.recover()  # a killed rollover may have left ca/ missing: put it back first
            cert = os.path.exists(store.ca_cert_path)
        if not cert or not index:
            # Half a store is damage, not absence: 'init' would set the other half aside.
            missing = store.ca_cert_path if not cert else store.index_path
            raise StoreError(f"the CA store {store.home} is damaged: {missing} is missing "
                             "(restore it from a backup)")
        store._check_key_mode()
        return store

    def _check_key_mode(self) -> None:
        st = self.fs.stat(self.ca_key_path)
        if st is None:
            raise StoreError(f"CA key {self.ca_key_path} is missing")
        if st.perms & 0o077:
            raise StoreError(f"CA key {self.ca_key_path} is accessible by others "
                             f"(mode {st.perms:04o}); run: chmod 600 {self.ca_key_path}")

    def exists(self) -> bool:
        return os.path.exists(self.ca_cert_path) or os.path.exists(self.index_path)

    @property
    def db(self) -> sqlite3.Connection:
        if self._db is None:
            try:
                if not os.path.exists(self.index_path):
                    # The index holds host keys: create it 0600 (SQLite gives its -wal and
                    # -shm files the database file's mode).
                    os.close(os.open(self.index_path, os.O_WRONLY | os.O_CREAT, 0o600))
                # Shared by a fleet's worker threads; every use holds self._lock.
                db = sqlite3.connect(self.index_path, timeout=BUSY_TIMEOUT_S, isolation_level=None,
                                     check_same_thread=False)
                db.execute("PRAGMA journal_mode=WAL")
                db.execute("PRAGMA synchronous=FULL")
                db.execute("PRAGMA foreign_keys=ON")
            except sqlite3.DatabaseError as e:
                raise StoreError(f"index {self.index_path} is unusable: {e}") from None
            self._db = db
        return self._db

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    @contextmanager
    def write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction; BEGIN IMMEDIATE takes the write lock up front.

        Files the transaction journaled are put back when it fails."""
        with self._lock:
            db = self.db
            try:
                db.execute("BEGIN IMMEDIATE")
            except sqlite3.OperationalError as e:
                raise StoreError(f"index is locked or unwritable: {e}") from None
            self._journal = None
            try:
                yield db
            except BaseException:
                self._abort(db)
                raise
            try:
                db.execute("COMMIT")
            except sqlite3.DatabaseError as e:
                self._abort(db)
                raise StoreError(f"could not commit to the index: {e}") from None
            journal_path, self._journal = self._journal, None
            if journal_path:
                journal.unlink(journal_path)

    def _abort(self, db: sqlite3.Connection) -> None:
        """Roll back, files included; a journal that could not be applied stays for
        the next Store.open."""
        journal_path, self._journal = self._journal, None
        applied = journal_path is None
        try:
            if journal_path is not None:
                journal.restore(self, journal.read_note(journal_path))
                applied = True
        finally:
            if db.in_transaction:
                db.execute("ROLLBACK")
            if journal_path is not None and applied:
                journal.unlink(journal_path)

    # -- crash safety (qemuca.store.journal)
    def journal(self, db: sqlite3.Connection) -> None:
        """Call inside a write transaction before moving a CA directory or replacing
        crl.pem: notes how they are now (once per transaction)."""
        if self._journal is not None:
            return
        self._resolve_journals(db)  # settle an older journal before the token changes
        self._journal = journal.write(self, db)

    def journal_files(self) -> List[str]:
        return journal.files(self.home)

    def recover(self) -> List[str]:
        """Settle what killed processes left: journals of transactions that never
        committed are undone. Returns (and adds to self.recovered) what was put back."""
        if not self.journal_files():
            return []
        with self.write() as db:  # waits for a transaction still in flight
            return self._resolve_journals(db)

    def _resolve_journals(self, db: sqlite3.Connection) -> List[str]:
        done = journal.settle(self, db, self._journal)
        if done:
            self.audit(db, "recover", None, undone=done)
            self.recovered += done
        return done

    def read(self, sql: str, args: Iterable = ()) -> list:
        with self._lock:
            try:
                return self.db.execute(sql, tuple(args)).fetchall()
            except sqlite3.DatabaseError as e:
                raise StoreError(f"index {self.index_path} is unusable: {e}") from None

    def initialise_index(self) -> None:
        with self.write() as db:
            # executescript() would COMMIT early: run the statements one by one.
            for statement in _statements(SCHEMA):
                db.execute(statement)
            db.execute("INSERT OR REPLACE INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))

    # -- audit
    def audit(self, db: sqlite3.Connection, action: str, subject: Optional[str], **detail) -> None:
        """Record an action inside the caller's transaction (it commits with the change)."""
        try:
            user = getpass.getuser()
        except Exception:
            user = str(os.getuid())
        db.execute("INSERT INTO audit (at, action, subject, detail, user, pid) VALUES (?,?,?,?,?,?)",
                   (iso(dt.datetime.now(dt.timezone.utc)), action, subject,
                    json.dumps(detail, sort_keys=True), user, os.getpid()))

    def audit_log(self) -> List[dict]:
        rows = self.read("SELECT id, at, action, subject, detail, user, pid FROM audit ORDER BY id")
        return [dict(id=r[0], at=r[1], action=r[2], subject=r[3], detail=json.loads(r[4]),
                     user=r[5], pid=r[6]) for r in rows]

    # -- certificates
    def add_certificates(self, new: List[NewCert], force: bool, action: str) -> List[Optional[str]]:
        """Record certificates in one transaction.

        A host with a valid certificate is a Conflict unless `force`, in which case the
        old one becomes superseded and the new row records the serial it replaces.
        Returns, per new certificate, the serial it replaced (or None).
        """
        replaced: List[Optional[str]] = []
        with self.write() as db:
            for item in new:
                rec = item.record
                row = db.execute("SELECT serial FROM certificates WHERE host = ? AND status = 'valid'",
                                 (rec.host,)).fetchone()
                old = row[0] if row else None
                if old and not force:
                    raise Conflict(f"{rec.host} already has a valid certificate (serial {old}); "
                                   "use --force to replace it")
                if old:
                    db.execute("UPDATE certificates SET status = 'superseded' WHERE serial = ?", (old,))
                try:
                    db.execute(
                        f"INSERT INTO certificates ({CERT_COLUMNS}, key_pem) VALUES "
                        "(?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                        (rec.serial, rec.host, json.dumps(rec.sans), rec.not_before, rec.not_after,
                         rec.fingerprint_sha256, "valid", old, rec.issued_at, rec.ca_fingerprint,
                         rec.key_source, rec.key_type, rec.cert_pem, None, None, item.key_pem))
                except sqlite3.IntegrityError as e:
                    raise StoreError(f"could not record {rec.host}: {e}") from None
                self.audit(db, action, rec.host, serial=rec.serial, replaces=old,
                           fingerprint_sha256=rec.fingerprint_sha256, not_after=rec.not_after)
                replaced.append(old)
        return replaced

    def certificates(self, statuses: Optional[Sequence[str]] = None, host: Optional[str] = None,
                     serial: Optional[str] = None, expiring_by: Optional[dt.datetime] = None
                     ) -> List[CertRecord]:
        """Index rows, oldest first per host; each argument narrows the selection
        (expiring_by: not_after at or before that time)."""
        where, args = [], []
        if statuses is not None:
            unknown = set(statuses) - set(STATUSES)
            if unknown:
                raise ValueError(f"unknown certificate status {sorted(unknown)}")
            where.append(f"status IN ({', '.join('?' * len(statuses))})")
            args += list(statuses)
        for column, value in (("host", host), ("serial", serial)):
            if value is not None:
                where.append(f"{column} = ?")
                args.append(value)
        if expiring_by is not None:
            where.append("not_after <= ?")
            args.append(iso(expiring_by))
        rows = self.read(f"SELECT {CERT_COLUMNS} FROM certificates WHERE {' AND '.join(where) or '1=1'} "
                         "ORDER BY host, issued_at, serial", args)
        return [CertRecord.from_row(r) for r in rows]

    def valid(self) -> List[CertRecord]:
        """Every host's current certificate."""
        return self.certificates(("valid",))

    def expiring(self, by: dt.datetime) -> List[CertRecord]:
        """Current certificates that expire at or before `by` (expired ones included)."""
        return self.certificates(("valid",), expiring_by=by)

    def valid_for_host(self, host: str) -> Optional[CertRecord]:
        found = self.certificates(("valid",), host=host)
        return found[0] if found else None

    def by_serial(self, serial: str) -> Optional[CertRecord]:
        found = self.certificates(serial=serial.lower())
        return found[0] if found else None

    def find(self, host_or_serial: str) -> CertRecord:
        """The host's current certificate, else the certificate with that serial."""
        rec = self.valid_for_host(host_or_serial.lower()) or self.by_serial(_serial_key(host_or_serial))
        if rec is None:
            latest = self.certificates(host=host_or_serial.lower())
            if latest:
                return latest[-1]
            raise NotFound(f"no certificate for '{host_or_serial}' in the index")
        return rec

    def key_pem(self, serial: str) -> Optional[str]:
        rows = self.read("SELECT key_pem FROM certificates WHERE serial = ?", (serial,))
        return rows[0][0] if rows else None

    def revoke(self, serial: str, reason: str, at: dt.datetime) -> CertRecord:
        with self.write() as db:
            self.revoke_in(db, serial, reason, at)
        rec = self.by_serial(serial)
        assert rec is not None  # revoke_in found it (or raised); index rows are never deleted
        return rec

    def revoke_in(self, db: sqlite3.Connection, serial: str, reason: str, at: dt.datetime) -> None:
        """Revoke inside the caller's transaction (revoke and its CRL commit together)."""
        row = db.execute("SELECT status, host FROM certificates WHERE serial = ?", (serial,)).fetchone()
        if row is None:
            raise NotFound(f"no certificate with serial {serial}")
        if row[0] == "revoked":
            raise Conflict(f"certificate {serial} of {row[1]} is already revoked")
        db.execute("UPDATE certificates SET status = 'revoked', revoked_at = ?, "
                   "revocation_reason = ? WHERE serial = ?", (iso(at), reason, serial))
        self.audit(db, "revoke", row[1], serial=serial, reason=reason)

    def record_deployments(self, reports) -> None:
        """One row per host and deploy run (reports carry host, result, fingerprint, error)."""
        at = iso(dt.datetime.now(dt.timezone.utc))
        with self.write() as db:
            for r in reports:
                db.execute("INSERT INTO deployments (host, fingerprint_sha256, at, result, error, "
                           "bundle_sha256) VALUES (?,?,?,?,?,?)",
                           (r.host, r.fingerprint_sha256, at, r.result, r.error,
                            getattr(r, "bundle_sha256", None)))
                self.audit(db, "deploy", r.host, result=r.result, fingerprint_sha256=r.fingerprint_sha256)

    def deployed(self) -> dict:
        """host -> (fingerprint, time) of its last successful deployment."""
        return {host: (fp, at) for host, fp, at, _ in self._last_deployments()}

    def deployed_bundles(self) -> dict:
        """host -> sha256 of the ca-cert.pem its last successful deployment placed."""
        return {host: bundle for host, _, _, bundle in self._last_deployments()}

    def _last_deployments(self) -> list:
        return self.read("SELECT host, fingerprint_sha256, at, bundle_sha256 FROM deployments WHERE id IN "
                         "(SELECT MAX(id) FROM deployments WHERE result IN ('changed', 'unchanged') "
                         "GROUP BY host)")

    def rollover(self) -> Optional[dict]:
        """The CA rollover in progress ({"stage": "started"|"finishing", ...}) or None."""
        rows = self.read("SELECT value FROM meta WHERE key = 'rollover'")
        return json.loads(rows[0][0]) if rows else None

    def set_rollover(self, db: sqlite3.Connection, state: Optional[dict]) -> None:
        """Callers move CA directories after this, in the same transaction: journaled."""
        self.journal(db)
        if state is None:
            db.execute("DELETE FROM meta WHERE key = 'rollover'")
        else:
            db.execute("INSERT OR REPLACE INTO meta VALUES ('rollover', ?)", (json.dumps(state),))

    def publish_crl(self, db: sqlite3.Connection, pem: bytes) -> None:
        """Write crl.pem inside the caller's transaction; a copy in meta lets doctor tell
        a CRL qemuca wrote from one put there by hand."""
        self.journal(db)
        db.execute("INSERT OR REPLACE INTO meta VALUES ('crl_pem', ?)", (pem.decode("ascii"),))
        self.fs.write_atomic(self.crl_path, pem, 0o644)

    def revoked(self) -> List[CertRecord]:
        return self.certificates(("revoked",))

    def next_crl_number(self, db: sqlite3.Connection) -> int:
        row = db.execute("SELECT value FROM meta WHERE key = 'crl_number'").fetchone()
        number = int(row[0]) + 1 if row else 1
        db.execute("INSERT OR REPLACE INTO meta VALUES ('crl_number', ?)", (str(number),))
        return number


def _serial_key(text: str) -> str:
    """A serial as the index spells it: lower-case hex without colons or leading zeros
    (openssl prints serials zero-padded to whole bytes, e.g. 0A:B7:...)."""
    digits = text.strip().lower().replace(":", "")
    if digits.startswith("0x"):
        digits = digits[2:]
    try:
        return format(int(digits, 16), "x") if digits else digits
    except ValueError:
        return digits


def _statements(script: str) -> List[str]:
    """Split the schema into statements (triggers contain ';' inside BEGIN ... END)."""
    out, buf = [], []
    for line in script.strip().splitlines():
        buf.append(line)
        text = "\n".join(buf).strip()
        if text.endswith(";") and sqlite3.complete_statement(text):
            out.append(text)
            buf = []
    return out
