"""`qemuca doctor`: is the store whole? The index, the certificates it records, the CA
files, the CRL and what interrupted commands left behind, each checked against the others.

Other commands trust the store; doctor is the one that does not. It reads everything
(a corrupt index or an unreadable file is a finding, not an error), never changes
anything but what `repair` is allowed to remove: leftovers of interrupted operations
(.ca-new-* staging directories of processes that are gone, .*.qemuca-tmp-* temp files).
Interrupted transactions themselves are undone by Store.open, for every command; doctor
reports what that put back.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import shutil
import stat
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from qemuca.errors import NotFound, PassphraseError, StoreError
from qemuca.findings import FAIL, PASS, SKIP, WARN, Finding, Outcome, Result, worst
from qemuca.hosts.fs import TEMP_MARK
from qemuca.pki import profile
from qemuca.pki.checks import crl_signed_by, fingerprint, is_encrypted_pem, issued_by, key_matches
from qemuca.store.index import SCHEMA_VERSION, Store, iso

CERT_ACTIONS = ("issue", "sign", "enroll", "renew", "rekey", "adopt")  # actions that record a certificate
TABLES = ("meta", "certificates", "audit", "deployments")
TRIGGERS = ("audit_no_update", "audit_no_delete")
STAGING = re.compile(r"^\.ca-new-(\d+)$")
SHOWN = 5  # problems named per check; the rest are counted


@dataclass
class Report(Outcome):
    home: str
    findings: List[Finding] = field(default_factory=list)
    removed: List[str] = field(default_factory=list)  # what --repair removed

    def as_dict(self) -> dict:
        return {"home": self.home, "result": self.result.value, "removed": self.removed,
                "checks": [{"check": f.check, "result": f.result.value, "detail": f.detail}
                           for f in self.findings]}


@dataclass(frozen=True)
class Leftover:
    path: str
    kind: str  # "staging" (a .ca-new-* directory) or "temp" (a .*.qemuca-tmp-* file)
    owner: Optional[int] = None  # pid of a live qemuca still using it

    @property
    def in_use(self) -> bool:
        return self.owner is not None


@dataclass(frozen=True)
class KnownCA:
    role: str  # current | previous | retired
    where: str  # path relative to the home
    cert: x509.Certificate
    fingerprint: str


# ---------------------------------------------------------------- leftovers

def find_leftovers(home: str) -> List[Leftover]:
    """Staging directories and temp files that interrupted operations leave."""
    home = os.path.abspath(home)
    found: List[Leftover] = []
    for root, dirs, files in os.walk(home):
        for name in sorted(dirs):
            m = STAGING.match(name) if root == home else None
            if m:
                found.append(Leftover(os.path.join(root, name), "staging", _live_qemuca(int(m.group(1)))))
        dirs[:] = [d for d in dirs if not (root == home and STAGING.match(d))]
        found += [Leftover(os.path.join(root, n), "temp") for n in sorted(files)
                  if n.startswith(".") and TEMP_MARK in n]
    return found


def _live_qemuca(pid: int) -> Optional[int]:
    """pid when that process is alive and is a qemuca (a reused pid is not)."""
    if pid == os.getpid():
        return None
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
    except OSError:
        return None
    return pid if is_qemuca(argv) else None


_VALUED = (b"-X", b"-W", b"-Q")  # interpreter options that take a value


def is_qemuca(argv: List[bytes]) -> bool:
    """Whether a command line runs qemuca: its script (`qemuca ...`, or `python .../qemuca`
    as its shebang runs it) or `python -m qemuca ...`. A shell whose working directory
    or arguments merely mention "qemuca" is not one."""
    if not argv or not argv[0]:
        return False
    if os.path.basename(argv[0]) == b"qemuca":
        return True
    if not os.path.basename(argv[0]).startswith(b"python"):
        return False
    i = 1
    while i < len(argv) and argv[i].startswith(b"-") and argv[i] != b"-m":
        i += 2 if argv[i] in _VALUED else 1
    if i + 1 < len(argv) and argv[i] == b"-m":
        return argv[i + 1] == b"qemuca"
    return i < len(argv) and os.path.basename(argv[i]) == b"qemuca"


def repair(home: str) -> List[str]:
    """Remove the leftovers of interrupted operations, and nothing else. Returns the
    paths removed (relative to the home).

    Holds the index's write lock meanwhile: the temp files of a transaction in flight
    (crl.pem, journals) belong to the lock holder, and it cannot be us and them."""
    store = Store(home)
    if not os.path.exists(store.index_path):
        if not os.path.exists(store.ca_cert_path):
            raise NotFound(f"no QEMU CA in {store.home}")
        return _sweep(store.home)
    try:
        with store.write():
            return _sweep(store.home)
    finally:
        store.close()


def _sweep(home: str) -> List[str]:
    removed = []
    for item in find_leftovers(home):
        if item.in_use:
            continue
        if item.kind == "staging":
            shutil.rmtree(item.path, ignore_errors=True)
        else:
            try:
                os.unlink(item.path)
            except FileNotFoundError:
                pass
        removed.append(os.path.relpath(item.path, home))
    return removed


# ---------------------------------------------------------------- diagnosis

def diagnose(home: str, passphrase: Optional[bytes] = None, now: Optional[dt.datetime] = None) -> Report:
    """Every check; raises only when there is no store at all (NotFound) or the
    passphrase given does not open the CA key (PassphraseError)."""
    store = Store(home)
    if not any(os.path.exists(p) for p in (store.ca_dir, store.index_path, store.previous_ca_dir)):
        raise NotFound(f"no QEMU CA in {store.home} (run 'qemuca init', or set --home / QEMUCA_HOME)")
    doc = _Doctor(store, passphrase, now or profile.utcnow())
    try:
        doc.run()
    finally:
        store.close()
    return Report(store.home, doc.findings)


class _Doctor:
    def __init__(self, store: Store, passphrase: Optional[bytes], now: dt.datetime):
        self.store, self.passphrase, self.now = store, passphrase, now
        self.findings: List[Finding] = []
        self.cas: Dict[str, KnownCA] = {}
        self.rollover: Optional[dict] = None

    def add(self, check: str, result: Result, detail: str) -> None:
        self.findings.append(Finding(check, result, detail))

    def problems(self, check: str, problems: List[str], ok: str, result: Result = FAIL) -> None:
        if not problems:
            self.add(check, PASS, ok)
            return
        more = f" (and {len(problems) - SHOWN} more)" if len(problems) > SHOWN else ""
        self.add(check, result, "; ".join(problems[:SHOWN]) + more)

    def run(self) -> None:
        index_ok = self.check_index()
        self.check_modes()
        self.check_cas(index_ok)
        if index_ok:
            self.check_certificates()
            self.check_crl()
        self.check_leftovers()

    # -- the index
    def check_index(self) -> bool:
        store = self.store
        if not os.path.exists(store.index_path):
            self.add("index", FAIL, f"{store.index_path} is missing (restore it from a backup)")
            return False
        try:
            recovered = store.recover()
        except Exception as e:  # a broken index is reported below
            recovered = []
            self.add("recovery", FAIL, f"could not settle the journal of an interrupted command: {e}")
        if recovered:
            self.add("recovery", WARN, "an interrupted command was undone: " + "; ".join(recovered))
        try:
            rows = store.read("PRAGMA integrity_check")
        except StoreError as e:
            self.add("integrity", FAIL, str(e))
            return False
        result = [r[0] for r in rows]
        if result != ["ok"]:
            self.problems("integrity", result, "")
            return False
        self.add("integrity", PASS, "PRAGMA integrity_check: ok")
        broken = store.read("PRAGMA foreign_key_check")
        self.problems("foreign-keys", [f"{r[0]} row {r[1]} refers to a missing {r[2]} row" for r in broken],
                      "PRAGMA foreign_key_check: no dangling reference")
        names = {(r[0], r[1]) for r in store.read("SELECT type, name FROM sqlite_master")}
        missing = [f"table {t}" for t in TABLES if ("table", t) not in names]
        missing += [f"trigger {t}" for t in TRIGGERS if ("trigger", t) not in names]
        if missing:
            self.add("schema", FAIL, "missing " + ", ".join(missing))
            return False
        version = store.read("SELECT value FROM meta WHERE key = 'schema_version'")
        if not version or version[0][0] != str(SCHEMA_VERSION):
            found = version[0][0] if version else "none"
            self.add("schema", FAIL, f"schema version {found}, this qemuca knows {SCHEMA_VERSION}")
            return False
        self.add("schema", PASS, f"schema version {SCHEMA_VERSION}; audit log append-only (triggers present)")
        self.rollover = store.rollover()
        return True

    def check_modes(self) -> None:
        store = self.store
        problems = []
        for path, want, what in [(store.home, 0o700, "store directory"),
                                 (store.index_path, 0o600, "index"),
                                 (store.index_path + "-wal", 0o600, "index WAL"),
                                 (store.index_path + "-shm", 0o600, "index shared memory")]:
            try:
                mode = stat.S_IMODE(os.stat(path).st_mode)
            except FileNotFoundError:
                continue
            if mode & 0o077:
                problems.append(f"{what} {path} is mode {mode:04o}, not {want:04o} "
                                f"(it holds host keys): chmod {want:o} {path}")
        self.problems("modes", problems, "store directory 0700, index 0600")

    # -- the CAs
    def check_cas(self, index_ok: bool) -> None:
        store = self.store
        current = self.check_ca("ca", store.ca_dir, "current")
        previous = None
        if os.path.lexists(store.previous_ca_dir):
            previous = self.check_ca("previous-ca", store.previous_ca_dir, "previous")
        for where, cert in _retired_cas(store.home):
            fp = fingerprint(cert)
            self.cas.setdefault(fp, KnownCA("retired", where, cert, fp))
        if index_ok:
            self.check_rollover(current, previous)

    def check_ca(self, name: str, directory: str, role: str) -> Optional[KnownCA]:
        cert_path, key_path = os.path.join(directory, "ca-cert.pem"), os.path.join(directory, "ca-key.pem")
        try:
            with open(cert_path, "rb") as f:
                cert = x509.load_pem_x509_certificate(f.read())
        except FileNotFoundError:
            self.add(f"{name}-cert", FAIL, f"{cert_path} is missing")
            return None
        except (OSError, ValueError) as e:
            self.add(f"{name}-cert", FAIL, f"{cert_path} is unreadable or corrupt: {e}")
            return None
        fp = fingerprint(cert)
        known = KnownCA(role, os.path.relpath(directory, self.store.home), cert, fp)
        self.cas[fp] = known
        findings = [f for f in profile.check_ca(cert, self.now) if f.result is not PASS]
        result = worst(f.result for f in findings)
        detail = f"{cert.subject.rfc4514_string()}, SHA-256 {fp[:16]}, until {iso(cert.not_valid_after_utc)}"
        if findings:
            detail += ": " + "; ".join(f"{f.check}: {f.detail}" for f in findings)
        self.add(f"{name}-cert", result, detail)
        if role == "previous" and not os.path.lexists(key_path) and (
                self.store.rollover() or {}).get("previous_from_cert"):
            self.add(f"{name}-key", PASS, "none: a foreign CA taken over with --from-cert (its key stays "
                                          "with its owner)")
        else:
            self.check_ca_key(name, key_path, cert)
        return known

    def ca_key_encrypted(self) -> bool:
        try:
            with open(self.store.ca_key_path, "rb") as f:
                return is_encrypted_pem(f.read(4096))
        except OSError:
            return False

    def check_ca_key(self, name: str, path: str, cert: x509.Certificate) -> None:
        try:
            mode = stat.S_IMODE(os.stat(path).st_mode)
            with open(path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            self.add(f"{name}-key", FAIL, f"{path} is missing")
            return
        except OSError as e:
            self.add(f"{name}-key", FAIL, f"{path} is unreadable: {e.strerror}")
            return
        if mode & 0o077:
            self.add(f"{name}-key-mode", FAIL, f"{path} is mode {mode:04o}: chmod 600 {path}")
        else:
            self.add(f"{name}-key-mode", PASS, f"{path} is mode {mode:04o}")
        encrypted = is_encrypted_pem(data)
        if encrypted and self.passphrase is None:
            self.add(f"{name}-key", SKIP, "not checked: encrypted (give --passphrase-file to check it)")
            return
        try:
            key = serialization.load_pem_private_key(data, password=self.passphrase if encrypted else None)
        except (ValueError, TypeError):
            if encrypted:
                raise PassphraseError(f"wrong passphrase for {path}") from None
            self.add(f"{name}-key", FAIL, f"{path} is corrupt")
            return
        if not key_matches(key, cert):
            self.add(f"{name}-key", FAIL, f"{path} does not match the CA certificate")
            return
        self.add(f"{name}-key", PASS, "matches the CA certificate" + (" (encrypted)" if encrypted else ""))

    def check_rollover(self, current: Optional[KnownCA], previous: Optional[KnownCA]) -> None:
        state = self.rollover
        has_previous = os.path.lexists(self.store.previous_ca_dir)
        if state is None:
            if has_previous:
                self.add("rollover", FAIL, "ca-previous/ exists but the index records no CA rollover "
                                           "(restore the store from a backup)")
            else:
                self.add("rollover", PASS, "no CA rollover in progress")
            return
        problems = []
        if not has_previous:
            problems.append(f"the index records a rollover ({state.get('stage')}) but ca-previous/ is missing")
        for key, known in (("new_fingerprint", current), ("previous_fingerprint", previous)):
            if state.get(key) and known is not None and state[key] != known.fingerprint:
                problems.append(f"{key} {state[key][:16]} is not the CA in {known.where}/ ({known.fingerprint[:16]})")
        self.problems("rollover", problems, f"rollover in progress, stage {state.get('stage')}")

    def issuer_of(self, cert: x509.Certificate, hint: str) -> Optional[KnownCA]:
        first = [self.cas[hint]] if hint in self.cas else []
        for known in first + [k for k in self.cas.values() if k.fingerprint != hint]:
            if issued_by(cert, known.cert):
                return known
        return None

    # -- the certificates
    def check_certificates(self) -> None:
        rows = self.store.read(
            "SELECT serial, host, sans, not_before, not_after, fingerprint_sha256, status, replaces, "
            "ca_fingerprint, cert_pem, key_pem, revoked_at FROM certificates ORDER BY host, serial")
        serials = {r[0] for r in rows}
        fields, chain, keys, replaces, revocation = [], [], [], [], []
        plain_keys, unchecked_keys = [], 0
        by_role: Dict[str, int] = {}
        stale_valid: List[str] = []
        for (serial, host, sans, not_before, not_after, fp, status, replaced, ca_fp, pem, key_pem,
             revoked_at) in rows:
            name = f"{host} {serial}"
            try:
                cert = x509.load_pem_x509_certificate(pem.encode())
            except ValueError:
                fields.append(f"{name}: cert_pem does not parse")
                continue
            fields += [f"{name}: {what}" for what in _field_mismatches(cert, serial, host, sans, not_before,
                                                                         not_after, fp)]
            issuer = self.issuer_of(cert, ca_fp)
            if issuer is None:
                chain.append(f"{name}: signed by no CA this store knows ({cert.issuer.rfc4514_string()})")
            else:
                label = f"the {issuer.role} CA" if issuer.role != "retired" else f"a retired CA ({issuer.where})"
                by_role[label] = by_role.get(label, 0) + 1
                if issuer.fingerprint != ca_fp:
                    chain.append(f"{name}: ca_fingerprint {ca_fp[:16]} but signed by {issuer.fingerprint[:16]}")
                if status == "valid" and issuer.role == "retired":
                    stale_valid.append(f"{name}: valid but signed by a retired CA ({issuer.where})")
            if key_pem is not None:
                key_encrypted = is_encrypted_pem(key_pem.encode())
                if not key_encrypted:
                    plain_keys.append(name)
                if key_encrypted and self.passphrase is None:
                    unchecked_keys += 1
                else:
                    problem = _key_problem(key_pem, cert, self.passphrase)
                    if problem:
                        keys.append(f"{name}: {problem}")
            if replaced is not None and replaced not in serials:
                replaces.append(f"{name}: replaces {replaced}, which is not in the index")
            if status == "revoked" and not revoked_at:
                revocation.append(f"{name}: revoked without revoked_at")
            if status != "revoked" and revoked_at:
                revocation.append(f"{name}: {status} but has revoked_at {revoked_at}")
        self.problems("certificates", fields,
                      f"{len(rows)} row(s): each certificate parses and matches its row "
                      "(serial, fingerprint, validity, host, SANs)")
        roles = ", ".join(f"{n} signed by {label}" for label, n in sorted(by_role.items())) or "no certificate"
        self.problems("chain", chain, roles)
        if not chain and stale_valid:
            self.problems("chain", stale_valid, "", WARN)
        with_keys = sum(1 for r in rows if r[10] is not None)
        self.problems("host-keys", keys, f"{with_keys - unchecked_keys} key(s) held here match their certificates"
                      + (f"; {unchecked_keys} encrypted, not checked (give --passphrase-file)"
                         if unchecked_keys else ""))
        if plain_keys and self.ca_key_encrypted():
            self.add("host-keys-at-rest", WARN,
                     f"{len(plain_keys)} host key(s) stored unencrypted in an encrypted store (made by an "
                     f"older qemuca), e.g. {plain_keys[0]}: whoever reads the store can pose as those "
                     "hosts; 'qemuca rekey HOST' (or enroll) replaces them")
        self.problems("replaces", replaces, "every 'replaces' names a certificate in the index")
        self.problems("revocation", revocation, "revoked rows have revoked_at, others none")
        dupes = self.store.read("SELECT host, COUNT(*) FROM certificates WHERE status = 'valid' "
                                "GROUP BY host HAVING COUNT(*) > 1")
        self.problems("one-valid-per-host", [f"{h} has {n} valid certificates" for h, n in dupes],
                      "at most one valid certificate per host")
        self.check_audit(rows)

    def check_audit(self, rows) -> None:
        marks = "(" + ",".join("?" * len(CERT_ACTIONS)) + ")"
        audited = set()
        for (detail,) in self.store.read(f"SELECT detail FROM audit WHERE action IN {marks}", CERT_ACTIONS):
            try:
                audited.add(json.loads(detail).get("serial"))
            except (ValueError, AttributeError):
                continue
        missing = [f"{host} {serial}: no {'/'.join(CERT_ACTIONS)} audit row" for serial, host, *_ in rows
                   if serial not in audited]
        self.problems("audit", missing, f"every certificate row has its audit row ({len(rows)})")

    # -- the CRL
    def check_crl(self) -> None:
        store = self.store
        revoked = store.read("SELECT serial, host, ca_fingerprint FROM certificates WHERE status = 'revoked'")
        try:
            with open(store.crl_path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            if revoked:
                self.add("crl", FAIL, f"{len(revoked)} certificate(s) revoked but there is no crl.pem: "
                                      "run 'qemuca crl'")
            else:
                self.add("crl", PASS, "no crl.pem yet (nothing revoked)")
            return
        crls, problems, warnings = [], [], []
        blocks = re.findall(rb"-----BEGIN X509 CRL-----.*?-----END X509 CRL-----", data, re.S)
        if not blocks:
            self.add("crl", FAIL, "crl.pem holds no CRL: run 'qemuca crl'")
            return
        for block in blocks:
            try:
                crls.append(x509.load_pem_x509_crl(block))
            except ValueError:
                problems.append("crl.pem holds a corrupt CRL")
        trusted = [k for k in self.cas.values() if k.role in ("current", "previous")]
        signed: Dict[str, set] = {}
        for crl in crls:
            signer = next((k for k in trusted if crl_signed_by(crl, k.cert)), None)
            if signer is None:
                problems.append(f"a CRL ({crl.issuer.rfc4514_string()}) is signed by no trusted CA")
                continue
            signed.setdefault(signer.fingerprint, set()).update(format(e.serial_number, "x") for e in crl)
            next_update = crl.next_update_utc
            if next_update is not None and next_update < self.now:
                warnings.append(f"the {signer.role} CA's CRL was due on {iso(next_update)}: run 'qemuca crl'")
        finishing = (self.rollover or {}).get("stage") == "finishing"
        must = {k.fingerprint for k in trusted if k.role == "current" or not finishing}
        missing = [f"{host} {serial}" for serial, host, ca_fp in revoked
                   if ca_fp in must and serial not in signed.get(ca_fp, set())]
        if missing:
            problems.append("revoked but not in crl.pem: " + ", ".join(missing[:SHOWN])
                            + (f" (and {len(missing) - SHOWN} more)" if len(missing) > SHOWN else "")
                            + ": run 'qemuca crl'")
        status = dict((r[0], r[1]) for r in store.read("SELECT serial, status FROM certificates"))
        listed = set().union(*signed.values()) if signed else set()
        wrongly = sorted(s for s in listed if status.get(s) not in (None, "revoked"))
        if wrongly:
            problems.append("crl.pem revokes certificate(s) the index does not: " + ", ".join(wrongly[:SHOWN])
                            + ": run 'qemuca crl'")
        written = store.read("SELECT value FROM meta WHERE key = 'crl_pem'")
        if written and written[0][0].encode() != data:
            warnings.append("crl.pem is not the CRL qemuca last wrote (changed by hand?)")
        if problems:
            self.add("crl", FAIL, "; ".join(problems + warnings))
        elif warnings:
            self.add("crl", WARN, "; ".join(warnings))
        else:
            self.add("crl", PASS, f"{len(crls)} CRL(s), signed by trusted CAs, listing all "
                                  f"{len(revoked)} revoked certificate(s)")

    # -- leftovers
    def check_leftovers(self) -> None:
        items = find_leftovers(self.store.home)
        home = self.store.home
        stale = [os.path.relpath(i.path, home) for i in items if not i.in_use]
        busy = [f"{os.path.relpath(i.path, home)} (pid {i.owner})" for i in items if i.in_use]
        note = f"; in use by running qemuca: {', '.join(busy)}" if busy else ""
        if stale:
            self.add("leftovers", WARN, "left by interrupted commands (qemuca doctor --repair removes them): "
                     + ", ".join(stale) + note)
        else:
            self.add("leftovers", PASS, "no leftovers of interrupted commands" + note)


# ---------------------------------------------------------------- helpers

def _retired_cas(home: str) -> List[Tuple[str, x509.Certificate]]:
    """CAs kept in retired/ (init --force: retired/<time>/ca/, rollover: retired/<time>-previous-ca/)."""
    out: List[Tuple[str, x509.Certificate]] = []
    retired = os.path.join(home, "retired")
    if not os.path.isdir(retired):
        return out
    for name in sorted(os.listdir(retired)):
        for rel in (os.path.join("retired", name), os.path.join("retired", name, "ca")):
            try:
                with open(os.path.join(home, rel, "ca-cert.pem"), "rb") as f:
                    out.append((rel, x509.load_pem_x509_certificate(f.read())))
            except (OSError, ValueError):
                continue
    return out


def _key_problem(key_pem: str, cert: x509.Certificate, passphrase: Optional[bytes]) -> Optional[str]:
    """Why the key held for a host does not serve its certificate (the key is never shown)."""
    data = key_pem.encode()
    try:
        key = serialization.load_pem_private_key(data, password=passphrase if is_encrypted_pem(data) else None)
    except (ValueError, TypeError):
        return "key_pem does not load"
    if not key_matches(key, cert):
        return "key_pem does not match the certificate"
    return None


def _field_mismatches(cert, serial, host, sans_json, not_before, not_after, fp) -> List[str]:
    out = []
    if format(cert.serial_number, "x") != serial:
        out.append(f"serial differs from the certificate's {format(cert.serial_number, 'x')}")
    if fingerprint(cert) != fp:
        out.append("fingerprint differs from the certificate's")
    if iso(cert.not_valid_before_utc) != not_before:
        out.append(f"not_before {not_before} but the certificate says {iso(cert.not_valid_before_utc)}")
    if iso(cert.not_valid_after_utc) != not_after:
        out.append(f"not_after {not_after} but the certificate says {iso(cert.not_valid_after_utc)}")
    cns = [str(a.value) for a in cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)]
    if cns != [host]:
        out.append(f"host {host} but the certificate's CN is {', '.join(cns) or 'missing'}")
    try:
        sans = json.loads(sans_json)
    except ValueError:
        sans = None
    if sans != profile.sans_of(cert):
        out.append(f"sans {sans_json} but the certificate has {profile.sans_of(cert)}")
    return out
