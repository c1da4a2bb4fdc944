"""Converge one host to what the store says it should run: the desired-state entry point
(the Ansible collection's action plugin calls it once per host).

One decision, then the same core as the commands: a host with no valid certificate in
the index is enrolled (`qemuca enroll`: key and CSR made on the host, signed here,
recorded once in place); one whose certificate ends within `renew_before_days` (or has
ended) is renewed for the key it holds (`qemuca renew`); any other gets its recorded set
deployed (`qemuca deploy`), which changes nothing when it is in place already. A dry run
decides the same way and writes nothing anywhere, the store included.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import List, Optional, Tuple

from qemuca.errors import InvalidInput
from qemuca.hosts import layout
from qemuca.names import san_value
from qemuca.ops.deploy import DeployOptions, HostReport, deploy_from_store, enroll_host, placement, preview_qemu_conf
from qemuca.ops.lifecycle import renew_host
from qemuca.pki import profile
from qemuca.store.index import CertRecord, Store, parse_iso

ENROLL, RENEW, DEPLOY = "enroll", "renew", "deploy"


@dataclass(frozen=True)
class NewCertOptions:
    """What a certificate made by this run gets; a recorded one keeps what it has."""

    key_type: str = profile.DEFAULT_HOST_KEY_TYPE
    sans: Tuple[str, ...] = ()
    days: int = profile.DEFAULT_HOST_DAYS
    renew_before_days: Optional[int] = None  # None: only an ended certificate is renewed

    def validate(self) -> None:
        if self.key_type not in profile.KEY_TYPES:
            raise InvalidInput(f"unknown key type '{self.key_type}' (one of {', '.join(profile.KEY_TYPES)})")
        for value in self.sans:
            san_value(value)
        if self.renew_before_days is not None and self.renew_before_days < 0:
            raise InvalidInput(f"renew_before_days {self.renew_before_days} is negative")


@dataclass
class Converged:
    """The host's report, what was decided for it, and what the admin should know."""

    operation: str
    report: HostReport
    notes: List[str] = field(default_factory=list)


def decide(store: Store, host: str, renew_before_days: Optional[int],
           now: Optional[dt.datetime] = None) -> Tuple[str, Optional[CertRecord]]:
    """(enroll | renew | deploy, the host's valid record or None), from the index alone."""
    record = store.valid_for_host(host)
    if record is None:
        return ENROLL, None
    limit = (now or profile.utcnow()) + dt.timedelta(days=renew_before_days or 0)
    return (RENEW if parse_iso(record.not_after) <= limit else DEPLOY), record


def _notes(record: Optional[CertRecord], new: NewCertOptions) -> List[str]:
    """Settings that differ from the recorded certificate: they apply to the next one."""
    if record is None:
        return []
    notes = []
    wanted = sorted({str(san_value(s)) for s in new.sans})
    held = sorted(s for s in record.sans if s != record.host)
    if new.sans and wanted != held:
        notes.append(f"{record.host}: its certificate (serial {record.serial}) holds SANs {held or 'none'}, "
                     f"not {wanted}: SANs apply to a new certificate ('qemuca rekey {record.host}')")
    if new.key_type != record.key_type:
        notes.append(f"{record.host}: its key is {record.key_type}, not {new.key_type}: the key type applies "
                     f"to a new key ('qemuca rekey --key-type {new.key_type} {record.host}')")
    return notes


def preview(conn, fs, host: str, opts: DeployOptions, operation: str, record: Optional[CertRecord],
            new: NewCertOptions) -> HostReport:
    """What enroll or renew would do on this host, changing nothing (deploy has its own)."""
    where = placement(conn, fs, opts)
    report = HostReport(host, result="would-change", qemu_group=where.group.to_dict(),
                        fingerprint_sha256=record.fingerprint_sha256 if record else None)
    if operation == ENROLL:
        report.actions = [f"make a {new.key_type} key and its CSR on the host (the key stays there)",
                          f"sign the CSR here ({new.days} days) and record the certificate in the index"]
    else:
        assert record is not None
        report.actions = [f"renew: a new certificate ({new.days} days) for the key in use, replacing serial "
                          f"{record.serial} (ends {record.not_after})"]
    names = ", ".join(n for n in layout.ALL_FILES if n != layout.CRL)
    report.actions.append(f"switch a new set into {opts.cert_dir} ({names}; owner root, group {where.group.name})")
    preview_qemu_conf(fs, opts, where, report)
    return report


def converge_host(conn, fs, authority, host: str, opts: DeployOptions, new: NewCertOptions,
                  now: Optional[dt.datetime] = None) -> Converged:
    """Enroll, renew or deploy one connected host (see the module docstring)."""
    operation, record = decide(authority.store, host, new.renew_before_days, now)
    notes = _notes(record, new)
    if operation == DEPLOY:
        report = deploy_from_store(conn, fs, authority, host, opts)
    elif opts.dry_run:
        report = preview(conn, fs, host, opts, operation, record, new)
    elif operation == ENROLL:
        report = enroll_host(conn, fs, authority, host, opts, new.key_type, list(new.sans), new.days, False)
    else:
        report = renew_host(conn, fs, authority, host, opts, new.days)
    return Converged(operation, report, notes)
