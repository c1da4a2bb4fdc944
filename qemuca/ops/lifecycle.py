"""Certificate lifecycle: renew and rekey hosts, roll the CA over without breaking migration.

Renew = a new certificate for the key the host already uses; rekey = a new key too.
Both deploy the new set atomically, check it and only then record it (the old
certificate becomes superseded), like enroll.

A CA rollover moves through stages so that, at every moment, any two hosts can
migrate in both directions:
  start     a new CA signs from now on; every bundle deployed is [new CA, old CA]
  (deploy --bundle-only --all; rekey/renew every host: new-CA certificates)
  finish    refused while a host holds an old-CA certificate or has not received the
            two-CA bundle; then the bundle becomes [new CA] and is pushed; once every
            host has it, the old CA is retired.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import shutil
from typing import List, Optional

from cryptography import x509

from qemuca.errors import Conflict, InvalidInput
from qemuca.findings import FAIL
from qemuca.hosts.layout import CredentialSet
from qemuca.names import SanValue
from qemuca.ops.deploy import DeployOptions, HostReport, enroll_host, placement, staged_key_copy, switch_in
from qemuca.pki import ca as ca_mod
from qemuca.pki import profile
from qemuca.pki.checks import fingerprint
from qemuca.store.index import Store, iso


def _extra_sans(record) -> List[SanValue]:
    """The SANs beyond the host name, kept across renewals."""
    return [ca_mod.san_value(s) for s in record.sans if s != record.host]


def renew_host(conn, fs, authority, host: str, opts: DeployOptions, days: int) -> HostReport:
    """A new certificate for the host's existing key, deployed, then recorded."""
    record = ca_mod.require_host(authority.store, host)
    sans = _extra_sans(record)
    where = placement(conn, fs, opts)
    key = authority.host_key(record.serial)
    if key is not None:
        new = authority.make_cert(record.host, sans, days, key)
        creds = _creds(authority, new, key_bytes=new.key_pem.encode())
        return switch_in(conn, fs, creds, opts, where, then=lambda: authority.record(new, True, "renew"))
    with staged_key_copy(conn, fs, opts.cert_dir, where.modes) as key_path:
        csr = _csr_for(conn, key_path, record.host)
        new = authority.certify(csr, record.host, sans, days)
        return switch_in(conn, fs, _creds(authority, new, key_on_host=key_path), opts, where,
                          then=lambda: authority.record(new, True, "renew"))


def rekey_host(conn, fs, authority, host: str, opts: DeployOptions, days: int,
               key_type: Optional[str]) -> HostReport:
    """A new key (made where the old one was made) and certificate, deployed, then recorded."""
    record = ca_mod.require_host(authority.store, host)
    sans = _extra_sans(record)
    key_type = key_type or record.key_type
    if record.key_source == "csr":
        return enroll_host(conn, fs, authority, record.host, opts, key_type, sans, days, True,
                           action="rekey")
    where = placement(conn, fs, opts)
    new = authority.make_cert(record.host, sans, days, profile.generate_key(key_type))
    creds = _creds(authority, new, key_bytes=new.key_pem.encode())
    return switch_in(conn, fs, creds, opts, where, then=lambda: authority.record(new, True, "rekey"))


def _csr_for(conn, key_path: str, host: str) -> bytes:
    return conn.run(["openssl", "req", "-new", "-key", key_path, "-subj", f"/CN={host}",
                     "-outform", "PEM"], check=True).stdout


def _creds(authority, new, key_bytes=None, key_on_host=None) -> CredentialSet:
    rec = new.record
    return CredentialSet.build(rec.host, rec.fingerprint_sha256, authority.bundle(), rec.cert_pem.encode(),
                               key_bytes, authority.crl_pem(), key_on_host)


def hosts_expiring(store: Store, days: int) -> List[str]:
    """Hosts whose current certificate ends within `days` days (expired ones included)."""
    limit = profile.utcnow() + dt.timedelta(days=days)
    return [r.host for r in store.expiring(limit)]


# ---------------------------------------------------------------- CA rollover

def rollover_start(store: Store, authority, *, key_type: str, days: int, common_name: str,
                   organization: Optional[str], passphrase: Optional[bytes]) -> dict:
    """Make the new signing CA; the old one stays trusted (and its key kept)."""
    if store.rollover() is not None or authority.previous is not None:
        raise Conflict("a CA rollover is already in progress: 'qemuca ca status', then finish it")
    key = profile.generate_key(key_type)
    cert = profile.build_ca_certificate(key, profile.ca_name(common_name, organization), days)
    staging = _stage_ca(store, cert, ca_mod.key_pem(key, passphrase).encode())
    state = _started(cert, authority.bundle(), previous_fingerprint=authority.fingerprint,
                     new_fingerprint=fingerprint(cert))
    with store.write() as db:
        store.set_rollover(db, state)
        store.audit(db, "rollover-start", cert.subject.rfc4514_string(), **state)
        # Inside the transaction: if a rename fails, the stage is not recorded either.
        os.rename(store.ca_dir, store.previous_ca_dir)
        os.rename(staging, store.ca_dir)
    return state


def _stage_ca(store: Store, cert: x509.Certificate, key_pem: Optional[bytes]) -> str:
    """A CA's files in a fresh 0700 directory of the store, to be renamed into place in
    the transaction that records the rollover. Named .ca-new-PID: doctor removes one
    whose process is gone (a start killed half-way)."""
    staging = os.path.join(store.home, f".ca-new-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    os.mkdir(staging, 0o700)
    if key_pem is not None:
        store.fs.write_atomic(os.path.join(staging, "ca-key.pem"), key_pem, 0o600)
    store.fs.write_atomic(os.path.join(staging, "ca-cert.pem"), ca_mod.cert_pem(cert).encode(), 0o644)
    return staging


def _started(new_cert: x509.Certificate, old_bundle: bytes, **fields) -> dict:
    """The state of a rollover just started; the two-CA bundle is [new, old], as
    CertificateAuthority.bundle() gives it during the rollover."""
    bundle = ca_mod.cert_pem(new_cert).encode() + old_bundle
    return {"stage": "started", "started_at": iso(profile.utcnow()), **fields,
            "two_ca_bundle_sha256": hashlib.sha256(bundle).hexdigest()}


def rollover_take_over(store: Store, authority, foreign_pem: bytes) -> dict:
    """A rollover whose old CA is a foreign one (certificate only: its key stays wherever
    it is); this store's CA is the new one and signs as before. Hosts whose certificates
    that CA issued can then be adopted (they get the two-CA bundle) and renewed."""
    if store.rollover() is not None or authority.previous is not None:
        raise Conflict("a CA rollover is already in progress: 'qemuca ca status', then finish it")
    try:
        certs = x509.load_pem_x509_certificates(foreign_pem)
    except ValueError:
        raise InvalidInput("--from-cert: not a PEM certificate") from None
    if len(certs) != 1:
        raise InvalidInput(f"--from-cert: {len(certs)} certificates; give the one CA that issued the hosts' sets")
    foreign = certs[0]
    problems = [f"{f.check}: {f.detail}" for f in profile.check_ca(foreign) if f.result is FAIL]
    if problems:
        raise InvalidInput(f"--from-cert: not a CA QEMU accepts: {problems[0]}")
    if fingerprint(foreign) == authority.fingerprint:
        raise InvalidInput("--from-cert: that is this store's own CA")
    staging = _stage_ca(store, foreign, None)
    state = _started(authority.cert, ca_mod.cert_pem(foreign).encode(), previous_fingerprint=fingerprint(foreign),
                     new_fingerprint=authority.fingerprint, previous_from_cert=True)
    with store.write() as db:
        store.set_rollover(db, state)
        store.audit(db, "rollover-start", foreign.subject.rfc4514_string(), **state)
        os.rename(staging, store.previous_ca_dir)
    return state


def rollover_status(store: Store, authority) -> dict:
    """The stage, both CAs, and per host: which CA issued its certificate, whether it
    has received the two-CA bundle, and whether what is deployed is current."""
    state = store.rollover()
    deployed = store.deployed()
    bundles = store.deployed_bundles()
    hosts = []
    for rec in store.valid():
        issuer = ("new" if state and rec.ca_fingerprint == authority.fingerprint else
                  "old" if authority.previous and rec.ca_fingerprint == authority.previous.fingerprint
                  else "current")
        hosts.append({"host": rec.host, "issued_by": issuer,
                      "two_ca_bundle": state is not None and bundles.get(rec.host) == state.get("two_ca_bundle_sha256"),
                      "deployed_current": deployed.get(rec.host, (None,))[0] == rec.fingerprint_sha256})
    cas = [{"role": "current" if s is authority.current else "previous", "fingerprint_sha256": s.fingerprint,
            "subject": s.cert.subject.rfc4514_string(), "not_after": iso(s.cert.not_valid_after_utc)}
           for s in [authority.current] + ([authority.previous] if authority.previous else [])]
    return {"stage": state["stage"] if state else "none", "rollover": state, "cas": cas, "hosts": hosts}


def finish_problems(store: Store, authority) -> List[str]:
    """Why finishing now would break a migration (empty when it would not)."""
    state = store.rollover()
    if state is None or authority.previous is None:
        return ["no CA rollover is in progress"]
    status = rollover_status(store, authority)
    problems = [f"{h['host']} still holds a certificate from the old CA (renew or rekey it)"
                for h in status["hosts"] if h["issued_by"] == "old"]
    if state["stage"] == "started":
        problems += [f"{h['host']} has not received the two-CA bundle (deploy --bundle-only)"
                     for h in status["hosts"] if not h["two_ca_bundle"] and h["issued_by"] != "new"]
    return problems


def rollover_begin_finish(store: Store) -> None:
    """From now on the bundle deployed is the new CA alone."""
    with store.write() as db:
        state = dict(store.rollover() or {}, stage="finishing")
        store.set_rollover(db, state)
        store.audit(db, "rollover-finishing", None)


def rollover_complete(store: Store) -> str:
    """Retire the old CA (kept under retired/) once every host has the new bundle."""
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")
    target = os.path.join(store.home, "retired", stamp + "-previous-ca")
    os.makedirs(os.path.dirname(target), mode=0o700, exist_ok=True)
    with store.write() as db:
        store.set_rollover(db, None)
        store.audit(db, "rollover-finish", None, retired=target)
        os.rename(store.previous_ca_dir, target)
    return target
