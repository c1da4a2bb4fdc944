"""Monitoring: one health report over the CA store, and Prometheus metrics of the same facts.

`check` answers "will migrations keep working?" for a monitoring system (the
monitoring-plugin convention: OK / WARNING / CRITICAL); `metrics` exports the raw
dates so that Prometheus can alert on its own thresholds. Both only read the store:
no passphrase is needed and nothing is written to it.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

from cryptography import x509

from qemuca.errors import InvalidInput, QemucaError, StoreError
from qemuca.findings import FAIL, PASS, WARN, Result, worst
from qemuca.pki.ca import CertificateAuthority, Signer
from qemuca.pki.certinfo import read_pem_blocks
from qemuca.pki.profile import utcnow
from qemuca.store.index import STATUSES, CertRecord, Store, iso, parse_iso

# The monitoring-plugin states are the results of qemuca's findings under their plugin
# names; their order, and so the overall state, is worst()'s.
OK, WARNING, CRITICAL = PASS, WARN, FAIL
STATE_NAMES = {PASS: "OK", WARN: "WARNING", FAIL: "CRITICAL"}
EXIT_CODES = {PASS: 0, WARN: 1, FAIL: 2}
DEFAULT_WARN_DAYS = 30
DEFAULT_CRIT_DAYS = 7
# qemuca re-signs the CRL for 30 days by default: warning within --warn-days (30) would
# warn all the time. A CRL warns in its last week and is CRITICAL once overdue.
DEFAULT_CRL_WARN_DAYS = 7
MAX_DAYS = 36500


@dataclass(frozen=True)
class Status:
    """The state of one monitored thing: kind is ca, certificate, crl, rollover or
    deployment; dated things carry their date and days left (perfdata, metrics)."""

    kind: str
    subject: str
    result: Result
    detail: str
    not_after: Optional[str] = None  # ISO 8601 UTC, for dated things
    days_left: Optional[int] = None

    @property
    def state(self) -> str:
        """OK, WARNING or CRITICAL."""
        return STATE_NAMES[self.result]

    def as_dict(self) -> dict:
        data: Dict[str, object] = {"kind": self.kind, "subject": self.subject, "state": self.state,
                                   "detail": self.detail}
        if self.not_after is not None:
            data.update(not_after=self.not_after, days_left=self.days_left)
        return data


@dataclass
class Report:
    checks: List[Status]
    warn_days: int
    crit_days: int
    crl_warn_days: int = DEFAULT_CRL_WARN_DAYS
    certificates: int = 0  # current (valid) host certificates checked
    perf: Dict[str, int] = field(default_factory=dict)

    @property
    def result(self) -> Result:
        return worst(c.result for c in self.checks)

    @property
    def status(self) -> str:
        return STATE_NAMES[self.result]

    @property
    def exit_code(self) -> int:
        return EXIT_CODES[self.result]

    def problems(self) -> List[Status]:
        """Non-OK checks, worst first."""
        return sorted((c for c in self.checks if c.result is not OK), key=lambda c: -c.result.rank)

    def summary(self) -> str:
        """The monitoring-plugin status line: `QEMUCA STATE - text | perfdata`."""
        ca_days = self.perf.get("ca_days")
        text = f"{self.certificates} certificate{'' if self.certificates == 1 else 's'}"
        if ca_days is not None:
            text += f", CA valid {ca_days} days" if ca_days >= 0 else ", CA EXPIRED"
        problems = self.problems()
        if problems:
            first = problems[0]
            more = f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""
            text += f", {first.subject}: {first.detail}{more}"
        return f"QEMUCA {self.status} - {text} | {self.perfdata()}"

    def perfdata(self) -> str:
        """label=value;warn;crit per the plugin guidelines (thresholds on day counts only)."""
        parts = []
        for label, value in self.perf.items():
            if label == "crl_days":
                parts.append(f"{label}={value};{self.crl_warn_days};0")
            elif label.endswith("_days"):
                parts.append(f"{label}={value};{self.warn_days};{self.crit_days}")
            else:
                parts.append(f"{label}={value};;;0")
        return " ".join(parts)

    def as_dict(self) -> dict:
        return {"status": self.status, "exit_code": self.exit_code, "summary": self.summary(),
                "warn_days": self.warn_days, "crit_days": self.crit_days,
                "crl_warn_days": self.crl_warn_days,
                "checks": [c.as_dict() for c in self.checks]}


def validate_days(warn_days: int, crit_days: int, crl_warn_days: int = DEFAULT_CRL_WARN_DAYS) -> None:
    for name, value in (("--warn-days", warn_days), ("--crit-days", crit_days),
                        ("--crl-warn-days", crl_warn_days)):
        if not 0 <= value <= MAX_DAYS:
            raise InvalidInput(f"{name} must be between 0 and {MAX_DAYS}")
    if crit_days > warn_days:
        raise InvalidInput(f"--crit-days ({crit_days}) must not be more than --warn-days ({warn_days})")


def days_left(not_after: dt.datetime, now: dt.datetime) -> int:
    """Whole days left, floored: -1 as soon as the date has passed."""
    return (not_after - now) // dt.timedelta(days=1)


def _expiry_state(not_after: dt.datetime, now: dt.datetime, warn_days: int, crit_days: int) -> Result:
    left = not_after - now
    if left <= dt.timedelta(0) or left < dt.timedelta(days=crit_days):
        return CRITICAL
    if left < dt.timedelta(days=warn_days):
        return WARNING
    return OK


def _expiry_text(not_after: dt.datetime, now: dt.datetime, verb: str = "expires") -> str:
    if not_after <= now:
        return f"{'expired' if verb == 'expires' else 'was due'} on {iso(not_after)}"
    return f"{verb} in {days_left(not_after, now)} days ({iso(not_after)})"


def _dated(kind: str, subject: str, not_after: dt.datetime, now: dt.datetime, warn_days: int,
           crit_days: int, prefix: str = "", verb: str = "expires") -> Status:
    state = _expiry_state(not_after, now, warn_days, crit_days)
    return Status(kind, subject, state, prefix + _expiry_text(not_after, now, verb), iso(not_after),
                 days_left(not_after, now))


# ---------------------------------------------------------------- reading the store

@dataclass(frozen=True)
class CrlInfo:
    issuer: str
    next_update: Optional[dt.datetime]
    serials: frozenset  # revoked serials, lower-case hex as the index spells them


def read_crls(store: Store) -> Optional[List[CrlInfo]]:
    """The CRLs in crl.pem (one per trusted CA), or None when there is no crl.pem."""
    try:
        data = store.fs.read_bytes(store.crl_path)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise StoreError(f"the CRL {store.crl_path} is unreadable: {e.strerror}") from None
    out = []
    try:
        for label, block in read_pem_blocks(data, store.crl_path):
            if label != "X509 CRL":
                continue
            crl = x509.load_pem_x509_crl(block)
            out.append(CrlInfo(crl.issuer.rfc4514_string(), crl.next_update_utc,
                               frozenset(format(r.serial_number, "x") for r in crl)))
    except (ValueError, InvalidInput):
        raise StoreError(f"the CRL {store.crl_path} is corrupt: run 'qemuca crl'") from None
    if not out:
        raise StoreError(f"the CRL {store.crl_path} holds no CRL: run 'qemuca crl'")
    return out


def _ca_role(authority: CertificateAuthority, signer: Signer) -> str:
    return "current" if signer is authority.current else "previous"


def _ca_subject(signer: Signer, role: str) -> str:
    return f"{role} CA {signer.cert.subject.rfc4514_string()} ({signer.fingerprint[:16]})"


# ---------------------------------------------------------------- check

def run_checks(store: Store, warn_days: int = DEFAULT_WARN_DAYS, crit_days: int = DEFAULT_CRIT_DAYS,
               crl_warn_days: int = DEFAULT_CRL_WARN_DAYS, now: Optional[dt.datetime] = None) -> Report:
    """Every check over the store; the report's status is the worst state found."""
    validate_days(warn_days, crit_days, crl_warn_days)
    now = now or utcnow()
    authority = CertificateAuthority(store)
    trusted = authority.trusted()
    trusted_fps = {s.fingerprint for s in trusted}
    checks: List[Status] = []
    perf: Dict[str, int] = {}

    # The CAs hosts trust: one expired CA in the bundle breaks QEMU before 10.2.
    for signer in trusted:
        role = _ca_role(authority, signer)
        cert = signer.cert
        if now < cert.not_valid_before_utc:
            checks.append(Status("ca", _ca_subject(signer, role), CRITICAL,
                                f"not valid before {iso(cert.not_valid_before_utc)}"))
        else:
            checks.append(_dated("ca", _ca_subject(signer, role), cert.not_valid_after_utc, now,
                                 warn_days, crit_days))
    perf["ca_days"] = min(days_left(s.cert.not_valid_after_utc, now) for s in trusted)

    rollover = store.rollover()
    if rollover:
        checks.append(_rollover_check(authority, rollover, now, warn_days, crit_days))

    current = store.valid()
    for rec in current:
        checks.append(_certificate_check(rec, trusted_fps, now, warn_days, crit_days))
    if current:
        perf["cert_min_days"] = min(days_left(parse_iso(r.not_after), now) for r in current)

    crl_checks, crl_days = _crl_checks(store, trusted, now, crl_warn_days)
    checks += crl_checks
    if crl_days is not None:
        perf["crl_days"] = crl_days

    drift = _deployment_checks(store, authority, current)
    checks += drift
    perf["certificates"] = len(current)
    perf["not_deployed"] = len(drift)
    report = Report(checks, warn_days, crit_days, crl_warn_days, len(current), perf)
    perf["problems"] = len(report.problems())
    return report


def _rollover_check(authority: CertificateAuthority, rollover: dict, now: dt.datetime,
                    warn_days: int, crit_days: int) -> Status:
    """A rollover in progress is at least WARNING: hosts carry two CAs until it ends, and
    QEMU before 10.2 rejects the whole bundle once the previous CA expires."""
    stage = rollover.get("stage", "unknown")
    previous = authority.previous
    if previous is None:
        return Status("rollover", "CA rollover", WARNING, f"in progress (stage {stage}); "
                     "no previous CA in the store")
    not_after = previous.cert.not_valid_after_utc
    check = _dated("rollover", "CA rollover", not_after, now, warn_days, crit_days,
                   prefix=f"in progress (stage {stage}); previous CA ", verb="expires")
    if check.result is OK:
        return dataclasses.replace(check, result=WARNING)
    return dataclasses.replace(check, detail=check.detail + ": finish the rollover (QEMU before "
                               "10.2 rejects a bundle holding an expired CA)")


def _certificate_check(rec: CertRecord, trusted_fps, now: dt.datetime, warn_days: int,
                       crit_days: int) -> Status:
    if rec.ca_fingerprint not in trusted_fps:
        return Status("certificate", rec.host, CRITICAL,
                     f"issued by a CA hosts no longer trust ({rec.ca_fingerprint[:16]}): reissue it",
                     rec.not_after, days_left(parse_iso(rec.not_after), now))
    if now < parse_iso(rec.not_before):
        return Status("certificate", rec.host, CRITICAL, f"not valid before {rec.not_before}",
                     rec.not_after, days_left(parse_iso(rec.not_after), now))
    return _dated("certificate", rec.host, parse_iso(rec.not_after), now, warn_days, crit_days)


def _crl_checks(store: Store, trusted: Sequence[Signer], now: dt.datetime,
                warn_days: int) -> Tuple[List[Status], Optional[int]]:
    """The CRLs hosts get (ca-crl.pem), needed once anything is revoked. A CRL past its
    next update is CRITICAL: it is no longer authoritative and OpenSSL refuses it ("CRL
    has expired"), although QEMU 7.2 with GnuTLS 3.7 was seen to keep using it."""
    revoked = store.revoked()
    try:
        crls = read_crls(store)
    except QemucaError as e:
        return [Status("crl", store.crl_path, CRITICAL, str(e))], None
    if crls is None:
        if revoked:
            return [Status("crl", store.crl_path, CRITICAL,
                          "certificates are revoked but no CRL exists: run 'qemuca crl'")], None
        return [], None
    checks: List[Status] = []
    for crl in crls:
        subject = f"CRL of {crl.issuer}"
        if crl.next_update is None:
            checks.append(Status("crl", subject, WARNING, "no next update date"))
        elif not revoked:
            # Hosts get no ca-crl.pem while nothing is revoked: an old one harms nothing.
            checks.append(Status("crl", subject, OK, "not deployed (nothing is revoked); next update "
                                + _expiry_text(crl.next_update, now, "due"),
                                iso(crl.next_update), days_left(crl.next_update, now)))
        else:
            checks.append(_dated("crl", subject, crl.next_update, now, warn_days, 0,
                                 prefix="next update ", verb="due"))
    # A revoked certificate of a trusted CA missing from every CRL is still accepted.
    listed = frozenset().union(*(c.serials for c in crls))
    trusted_fps = {s.fingerprint for s in trusted}
    for rec in revoked:
        if (rec.ca_fingerprint in trusted_fps and rec.serial not in listed
                and parse_iso(rec.not_after) > now):
            checks.append(Status("crl", rec.host, CRITICAL,
                                f"revoked serial {rec.serial} is in no CRL: run 'qemuca crl' and deploy"))
    dated = [c.next_update for c in crls if c.next_update is not None]
    return checks, (min(days_left(d, now) for d in dated) if dated and revoked else None)


def _deployment_checks(store: Store, authority: CertificateAuthority,
                       current: Sequence[CertRecord]) -> List[Status]:
    """Hosts whose last successful deployment is not their current certificate, or not
    the CA bundle hosts must trust now (it changes with a rollover's stages)."""
    deployed = store.deployed()
    bundles = store.deployed_bundles()
    bundle_now = hashlib.sha256(authority.bundle()).hexdigest()
    checks = []
    for rec in current:
        if rec.host not in deployed:
            continue  # never deployed by qemuca (e.g. exported by hand): nothing to compare
        fp, at = deployed[rec.host]
        if fp != rec.fingerprint_sha256:
            checks.append(Status("deployment", rec.host, WARNING,
                                f"not deployed: current certificate {rec.fingerprint_sha256[:16]}, "
                                f"last deployed {(fp or 'none')[:16]} at {at}"))
        elif bundles.get(rec.host) not in (None, bundle_now):
            # None: a deployment recorded before qemuca tracked bundles.
            checks.append(Status("deployment", rec.host, WARNING,
                                f"not deployed: the CA bundle changed since the last deployment at {at} "
                                "(deploy --bundle-only)"))
    return checks


# ---------------------------------------------------------------- metrics

def escape_label(value: str) -> str:
    """A label value per the text exposition format: backslash, double quote, newline."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


class _Exposition:
    """Families in the order added; each gets one HELP and one TYPE line."""

    def __init__(self) -> None:
        self.lines: List[str] = []

    def family(self, name: str, kind: str, help_text: str,
               samples: Sequence[Tuple[Dict[str, str], float]]) -> None:
        self.lines.append(f"# HELP {name} {_escape_help(help_text)}")
        self.lines.append(f"# TYPE {name} {kind}")
        for labels, value in samples:
            text = ",".join(f'{k}="{escape_label(str(v))}"' for k, v in labels.items())
            self.lines.append(f"{name}{{{text}}} {_number(value)}" if text else f"{name} {_number(value)}")

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def _ts(t: dt.datetime) -> int:
    return int(t.timestamp())


def metrics_text(store: Store, now: Optional[dt.datetime] = None) -> str:
    """The store's state in the Prometheus text format (for node_exporter's textfile
    collector: no sample timestamps, which that collector refuses)."""
    now = now or utcnow()
    authority = CertificateAuthority(store)
    records = store.certificates()
    current = [r for r in records if r.status == "valid"]
    # Revoked certificates stay listed until they expire (they still matter for the CRL);
    # superseded ones are left out so the series do not grow without end.
    listed = [r for r in records if r.status == "valid"
              or (r.status == "revoked" and parse_iso(r.not_after) > now)]
    out = _Exposition()
    out.family("qemuca_certificate_not_after_seconds", "gauge",
               "End of validity of each host's current certificate (unix time).",
               [({"host": r.host}, _ts(parse_iso(r.not_after))) for r in current])
    out.family("qemuca_certificate_info", "gauge",
               "Current and unexpired revoked host certificates (always 1).",
               [({"host": r.host, "serial": r.serial, "fingerprint_sha256": r.fingerprint_sha256,
                  "status": r.status}, 1) for r in listed])
    signers = [(authority.current, "current")]
    if authority.previous is not None:
        signers.append((authority.previous, "previous"))
    out.family("qemuca_ca_not_after_seconds", "gauge",
               "End of validity of the CA certificates (unix time); previous during a rollover.",
               [({"fingerprint": s.fingerprint, "role": role, "subject": s.cert.subject.rfc4514_string()},
                 _ts(s.cert.not_valid_after_utc)) for s, role in signers])
    crls = read_crls(store) or []
    out.family("qemuca_crl_next_update_seconds", "gauge",
               "Next update of each CRL in crl.pem (unix time); absent when there is no CRL.",
               [({"issuer": c.issuer}, _ts(c.next_update)) for c in crls if c.next_update is not None])
    deployed = store.deployed()
    out.family("qemuca_host_deployed_fingerprint_match", "gauge",
               "1 when a host's last successful deployment is its current certificate, else 0; "
               "absent for hosts never deployed.",
               [({"host": r.host}, int(deployed[r.host][0] == r.fingerprint_sha256))
                for r in current if r.host in deployed])
    out.family("qemuca_host_last_deployed_seconds", "gauge",
               "Time of each host's last successful deployment (unix time).",
               [({"host": r.host}, _ts(parse_iso(deployed[r.host][1]))) for r in current if r.host in deployed])
    bundles = store.deployed_bundles()
    bundle_now = hashlib.sha256(authority.bundle()).hexdigest()
    out.family("qemuca_host_deployed_bundle_match", "gauge",
               "1 when a host's last successful deployment placed the CA bundle hosts must trust "
               "now, else 0; absent for hosts never deployed (or deployed before bundles were tracked).",
               [({"host": r.host}, int(bundles[r.host] == bundle_now))
                for r in current if bundles.get(r.host) is not None])
    out.family("qemuca_rollover_in_progress", "gauge", "1 while a CA rollover is in progress.",
               [({}, int(store.rollover() is not None))])
    counts = {s: 0 for s in STATUSES}
    for r in records:
        counts[r.status] = counts.get(r.status, 0) + 1
    out.family("qemuca_certificates", "gauge", "Host certificates in the index by status.",
               [({"status": s}, n) for s, n in counts.items()])
    out.family("qemuca_metrics_generated_seconds", "gauge",
               "When these metrics were written (unix time): alert when it gets old.",
               [({}, _ts(now))])
    return out.text()


def write_metrics(store: Store, path: str, now: Optional[dt.datetime] = None) -> str:
    """Write the metrics atomically, mode 0644: the textfile collector must never read a
    half-written file (the temp file is hidden and does not end in .prom)."""
    text = metrics_text(store, now)
    path = os.path.abspath(path)
    store.fs.write_atomic(path, text.encode("utf-8"), 0o644)
    return text
