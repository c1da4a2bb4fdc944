"""qemuca.ops.monitor: the checks behind `qemuca check` and the metrics behind `qemuca metrics`,
on stores built with the core API (certificates, CAs and CRLs dated in the past or
near future, a rollover in progress, deployments recorded like deploy records them).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from prometheus_client.parser import text_string_to_metric_families

from qemuca.errors import InvalidInput
from qemuca.ops import monitor
from qemuca.pki import ca, profile
from qemuca.pki.ca import CertificateAuthority
from qemuca.store.index import NewCert, Store, parse_iso
from tests.support.pki import make_store, revoke

HOUR = dt.timedelta(hours=1)


# ---------------------------------------------------------------- store builders
# (also used by tests/cli/test_monitor_cmds.py)

def add_cert(home, host: str, days_left: float, issued_days_ago: int = 100):
    """Record a certificate for `host` (replacing its current one) that ends `days_left`
    days from now (negative: expired), plus an hour so day counts are exact."""
    store = Store.open(home)
    try:
        auth = CertificateAuthority(store)
        key = profile.generate_key("ecdsa-p256")
        start = profile.utcnow() - dt.timedelta(days=issued_days_ago)
        cert = profile.build_host_certificate(auth.cert, auth.key, host, [], key.public_key(),
                                              issued_days_ago + days_left + 1 / 24, now=start)
        new = NewCert(auth.record_for(cert, host, "generated", "ecdsa-p256"), ca.key_pem(key))
        return auth.record(new, True, "issue").record
    finally:
        store.close()


def write_crl(home, next_update_days: float, serials=None) -> None:
    """Replace crl.pem with one CRL signed by the CA, next update `next_update_days` away
    (negative: overdue), listing `serials` (default: every revoked serial)."""
    store = Store.open(home)
    try:
        auth = CertificateAuthority(store)
        now = profile.utcnow()
        if serials is None:
            serials = [r.serial for r in store.revoked()]
        builder = (x509.CertificateRevocationListBuilder().issuer_name(auth.cert.subject)
                   .last_update(now - dt.timedelta(days=40))
                   .next_update(now + dt.timedelta(days=next_update_days) + HOUR))
        for serial in serials:
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder().serial_number(int(serial, 16))
                .revocation_date(now - dt.timedelta(days=40)).build())
        crl = builder.sign(auth.key, hashes.SHA256())
        Path(store.crl_path).write_bytes(crl.public_bytes(serialization.Encoding.PEM))
    finally:
        store.close()


def start_rollover(home, tmp_path, previous_days: int, stage: str = "started") -> str:
    """A rollover in progress whose previous CA (HOME/ca-previous) ends in previous_days."""
    other = make_store(tmp_path, name=f"prev-{previous_days}-{stage}", days=previous_days,
                       common_name="QEMU CA previous")
    shutil.copytree(os.path.join(other, "ca"), os.path.join(home, "ca-previous"))
    set_stage(home, stage)
    return other


def set_stage(home, stage) -> None:
    store = Store.open(home)
    try:
        with store.write() as db:
            store.set_rollover(db, None if stage is None else {"stage": stage})
    finally:
        store.close()


def record_deploy(home, host: str, fingerprint: str, result: str = "changed", bundle=None) -> None:
    """A deployment row as deploy records it (bundle: the ca-cert.pem bytes placed)."""
    store = Store.open(home)
    try:
        if bundle is None:
            bundle = CertificateAuthority(store).bundle()
        store.record_deployments([SimpleNamespace(
            host=host, fingerprint_sha256=fingerprint, result=result,
            error=None if result in ("changed", "unchanged") else "boom",
            bundle_sha256=hashlib.sha256(bundle).hexdigest())])
    finally:
        store.close()


def expire_ca(home) -> None:
    """Replace the CA with one that expired 10 days ago."""
    key = profile.generate_key("ecdsa-p256")
    cert = profile.build_ca_certificate(key, profile.ca_name("QEMU CA expired", None), 10,
                                        now=profile.utcnow() - dt.timedelta(days=20))
    Path(home, "ca", "ca-cert.pem").write_text(ca.cert_pem(cert))
    Path(home, "ca", "ca-key.pem").write_text(ca.key_pem(key))


def checks(home, **kw) -> monitor.Report:
    """run_checks a minute from now: whatever was made "N days from now" during the test
    then has exactly N-1 whole days left, whichever second it was made in."""
    store = Store.open(home)
    try:
        return monitor.run_checks(store, now=profile.utcnow() + dt.timedelta(minutes=1), **kw)
    finally:
        store.close()


def states(report, kind) -> dict:
    return {c.subject: c.state for c in report.checks if c.kind == kind}


def only(report, kind):
    found = [c for c in report.checks if c.kind == kind]
    assert len(found) == 1, report.as_dict()
    return found[0]


# ---------------------------------------------------------------- check

def test_healthy_store_is_ok(tmp_path):
    home = make_store(tmp_path, hosts=["a.qemu.test", "b.qemu.test"])
    report = checks(home)
    assert (report.status, report.exit_code, report.problems()) == ("OK", 0, [])
    assert [c.kind for c in report.checks] == ["ca", "certificate", "certificate"]
    assert states(report, "certificate") == {"a.qemu.test": "OK", "b.qemu.test": "OK"}
    line = report.summary()
    assert line.startswith("QEMUCA OK - 2 certificates, CA valid 3649 days | "), line
    perf = dict(p.split("=", 1) for p in line.split(" | ", 1)[1].split())
    assert perf == {"ca_days": "3649;30;7", "cert_min_days": "729;30;7", "certificates": "2;;;0",
                    "not_deployed": "0;;;0", "problems": "0;;;0"}
    data = report.as_dict()
    assert data["status"] == "OK" and data["exit_code"] == 0 and data["checks"][1]["days_left"] == 729


def test_certificate_thresholds(tmp_path):
    home = make_store(tmp_path)
    add_cert(home, "warn.qemu.test", 20)
    add_cert(home, "crit.qemu.test", 3)
    add_cert(home, "expired.qemu.test", -2)
    add_cert(home, "fine.qemu.test", 31)
    add_cert(home, "renewed.qemu.test", -30)
    add_cert(home, "renewed.qemu.test", 400)  # the expired one is superseded: not checked
    revoked = add_cert(home, "gone.qemu.test", -1)
    revoke(home, revoked.serial)  # revoked certificates are not checked either

    report = checks(home)
    assert states(report, "certificate") == {
        "warn.qemu.test": "WARNING", "crit.qemu.test": "CRITICAL", "expired.qemu.test": "CRITICAL",
        "fine.qemu.test": "OK", "renewed.qemu.test": "OK"}
    assert (report.status, report.exit_code) == ("CRITICAL", 2)
    by_host = {c.subject: c for c in report.checks if c.kind == "certificate"}
    assert by_host["warn.qemu.test"].days_left == 20 and "expires in 20 days" in by_host["warn.qemu.test"].detail
    assert by_host["expired.qemu.test"].days_left == -2 and "expired on" in by_host["expired.qemu.test"].detail
    assert [c.state for c in report.problems()] == ["CRITICAL", "CRITICAL", "WARNING"]
    assert report.summary().startswith("QEMUCA CRITICAL - 5 certificates, CA valid 3649 days, "
                                       "crit.qemu.test: expires in 3 days")
    assert "cert_min_days=-2;30;7" in report.summary()

    # Other thresholds move the boundaries; an expired certificate stays CRITICAL.
    assert states(checks(home, warn_days=30, crit_days=0), "certificate")["crit.qemu.test"] == "WARNING"
    loose = checks(home, warn_days=2, crit_days=1)
    assert states(loose, "certificate") == {
        "warn.qemu.test": "OK", "crit.qemu.test": "OK", "expired.qemu.test": "CRITICAL",
        "fine.qemu.test": "OK", "renewed.qemu.test": "OK"}


def test_warning_only_store_exits_1(tmp_path):
    home = make_store(tmp_path)
    add_cert(home, "a.qemu.test", 25)
    report = checks(home)
    assert (report.status, report.exit_code) == ("WARNING", 1)


@pytest.mark.parametrize("warn,crit", [(7, 30), (-1, -1), (30, -1), (40000, 7)])
def test_bad_thresholds_are_invalid_input(tmp_path, warn, crit):
    with pytest.raises(InvalidInput):
        monitor.validate_days(warn, crit)


def test_ca_expiry(tmp_path):
    soon = checks(make_store(tmp_path, name="soon", days=20))
    assert only(soon, "ca").state == "WARNING" and soon.exit_code == 1
    assert "current CA CN=QEMU CA test,OU=qemu" in only(soon, "ca").subject
    very_soon = checks(make_store(tmp_path, name="very-soon", days=5))
    assert only(very_soon, "ca").state == "CRITICAL" and very_soon.exit_code == 2

    home = make_store(tmp_path, name="expired")
    expire_ca(home)
    report = checks(home)
    ca_check = only(report, "ca")
    assert (ca_check.state, ca_check.days_left) == ("CRITICAL", -11)
    assert ca_check.detail.startswith("expired on")
    assert report.summary().startswith("QEMUCA CRITICAL - 0 certificates, CA EXPIRED, ")


def test_certificate_of_an_untrusted_ca_is_critical(tmp_path):
    """After a CA was replaced, a host certificate from the old one no longer chains."""
    home = make_store(tmp_path, hosts=["a.qemu.test"])
    expire_ca(home)  # a different CA now
    cert = only(checks(home), "certificate")
    assert cert.state == "CRITICAL" and "no longer trust" in cert.detail


def test_crl_checks(tmp_path):
    home = make_store(tmp_path, hosts=["a.qemu.test", "b.qemu.test"])
    assert [c for c in checks(home).checks if c.kind == "crl"] == []  # nothing revoked, no CRL: fine
    write_crl(home, -10)
    unused = only(checks(home), "crl")  # hosts get no CRL while nothing is revoked
    assert unused.state == "OK" and "nothing is revoked" in unused.detail

    gone = revoke(home, "b.qemu.test")  # writes a fresh CRL (30 days)
    fresh = checks(home)
    crl = only(fresh, "crl")
    assert (crl.state, crl.subject, crl.days_left) == ("OK", "CRL of CN=QEMU CA test,OU=qemu", 29)
    # CRLs have their own threshold (7 days): a 30-day CRL must not warn all month.
    assert "crl_days=29;7;0" in fresh.summary() and fresh.status == "OK"

    write_crl(home, -10)
    stale = only(checks(home), "crl")
    assert stale.state == "CRITICAL" and stale.detail.startswith("next update was due on")
    write_crl(home, 3)
    soon = checks(home)
    assert only(soon, "crl").state == "WARNING" and soon.exit_code == 1
    assert only(soon, "crl").detail.startswith("next update due in 3 days")
    assert only(checks(home, crl_warn_days=2), "crl").state == "OK"
    write_crl(home, 0.5)  # due within hours: still WARNING, CRITICAL only once overdue
    assert only(checks(home, crl_warn_days=0), "crl").state == "OK"
    assert only(checks(home), "crl").state == "WARNING"
    write_crl(home, 60, serials=[])  # a CRL that misses the revoked certificate
    missing = [c for c in checks(home).checks if c.kind == "crl" and c.state != "OK"]
    assert [(c.subject, c.state) for c in missing] == [("b.qemu.test", "CRITICAL")]
    assert gone.serial in missing[0].detail

    Path(home, "crl.pem").write_text("-----BEGIN X509 CRL-----\nnot base64\n-----END X509 CRL-----\n")
    assert "corrupt" in only(checks(home), "crl").detail
    os.unlink(os.path.join(home, "crl.pem"))
    lost = only(checks(home), "crl")
    assert lost.state == "CRITICAL" and "no CRL exists" in lost.detail


def test_rollover_in_progress(tmp_path):
    home = make_store(tmp_path, hosts=["a.qemu.test"])
    start_rollover(home, tmp_path, 3650)
    report = checks(home)
    roll = only(report, "rollover")
    assert roll.state == "WARNING" and roll.detail.startswith("in progress (stage started)")
    assert [c.subject.split(" CA ")[0] for c in report.checks if c.kind == "ca"] == ["current", "previous"]
    assert report.exit_code == 1

    home = make_store(tmp_path, name="h20")
    start_rollover(home, tmp_path, 20)
    roll = only(checks(home), "rollover")
    assert roll.state == "WARNING" and "finish the rollover" in roll.detail and roll.days_left == 19

    home = make_store(tmp_path, name="h5")
    start_rollover(home, tmp_path, 5)
    report = checks(home)
    assert only(report, "rollover").state == "CRITICAL" and report.exit_code == 2
    # Finishing: hosts no longer trust the previous CA, but some may still hold the
    # two-CA bundle until they get the new one: the previous CA's expiry still counts.
    set_stage(home, "finishing")
    report = checks(home)
    assert only(report, "rollover").state == "CRITICAL"
    assert [c.subject.split(" CA ")[0] for c in report.checks if c.kind == "ca"] == ["current"]
    set_stage(home, None)  # rollover over (previous CA left in place): no rollover check
    assert [c for c in checks(home).checks if c.kind == "rollover"] == []


def test_deployment_drift(tmp_path):
    home = make_store(tmp_path)
    recs = {h: add_cert(home, h, 400) for h in ("same", "old", "never", "failed", "bundle")}
    record_deploy(home, "same", recs["same"].fingerprint_sha256)
    record_deploy(home, "old", recs["old"].fingerprint_sha256)
    record_deploy(home, "failed", recs["failed"].fingerprint_sha256)
    record_deploy(home, "bundle", recs["bundle"].fingerprint_sha256, bundle=b"an older bundle")
    newer = {h: add_cert(home, h, 500) for h in ("old", "failed")}  # renewed, not redeployed
    record_deploy(home, "failed", newer["failed"].fingerprint_sha256, result="failed")
    record_deploy(home, "same", recs["same"].fingerprint_sha256, result="unchanged")

    report = checks(home)
    drift = {c.subject: c for c in report.checks if c.kind == "deployment"}
    assert set(drift) == {"old", "failed", "bundle"}
    assert all(c.state == "WARNING" for c in drift.values())
    assert drift["old"].detail.startswith(f"not deployed: current certificate "
                                          f"{newer['old'].fingerprint_sha256[:16]}, last deployed "
                                          f"{recs['old'].fingerprint_sha256[:16]} at ")
    assert "CA bundle changed" in drift["bundle"].detail
    assert "not_deployed=3;;;0" in report.summary() and report.exit_code == 1


# ---------------------------------------------------------------- metrics

def parse(text: str) -> dict:
    """name -> [(labels, value)] with the Prometheus client's own parser."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out.setdefault(s.name, []).append((s.labels, s.value))
    return out


def test_escape_label():
    assert monitor.escape_label('a\\b"c\nd') == 'a\\\\b\\"c\\nd'


def test_metrics_values(tmp_path):
    name = 'QEMU "CA" \\ test\nsecond line'  # label values must survive escaping
    home = make_store(tmp_path, hosts=["a.qemu.test", "b.qemu.test", "c.qemu.test"], common_name=name)
    b = add_cert(home, "b.qemu.test", 100)  # the first b is superseded
    c = revoke(home, "c.qemu.test")
    a = add_cert(home, "a.qemu.test", 20)
    record_deploy(home, "a.qemu.test", a.fingerprint_sha256)
    record_deploy(home, "b.qemu.test", "0" * 64)
    start_rollover(home, tmp_path, 50)

    store = Store.open(home)
    try:
        now = profile.utcnow()
        text = monitor.metrics_text(store, now)
        auth = CertificateAuthority(store)
    finally:
        store.close()
    for family in ("qemuca_certificate_not_after_seconds", "qemuca_crl_next_update_seconds",
                   "qemuca_certificates", "qemuca_metrics_generated_seconds"):
        assert f"# HELP {family} " in text and f"# TYPE {family} gauge" in text
    m = parse(text)
    ts = lambda iso_text: parse_iso(iso_text).timestamp()  # noqa: E731
    assert sorted(m["qemuca_certificate_not_after_seconds"], key=lambda s: s[0]["host"]) == [
        ({"host": "a.qemu.test"}, ts(a.not_after)), ({"host": "b.qemu.test"}, ts(b.not_after))]
    info = {(lab["host"], lab["status"]): lab for lab, v in m["qemuca_certificate_info"] if v == 1}
    assert set(info) == {("a.qemu.test", "valid"), ("b.qemu.test", "valid"), ("c.qemu.test", "revoked")}
    assert info[("c.qemu.test", "revoked")]["serial"] == c.serial
    assert info[("b.qemu.test", "valid")]["fingerprint_sha256"] == b.fingerprint_sha256
    cas = {lab["role"]: (lab, v) for lab, v in m["qemuca_ca_not_after_seconds"]}
    assert cas["current"][0]["fingerprint"] == auth.current.fingerprint
    assert cas["current"][0]["subject"] == auth.cert.subject.rfc4514_string()
    assert "\n" in cas["current"][0]["subject"] and '"' in cas["current"][0]["subject"]
    assert cas["current"][1] == auth.cert.not_valid_after_utc.timestamp()
    assert cas["previous"][1] == auth.previous.cert.not_valid_after_utc.timestamp()
    (crl_labels, crl_next), = m["qemuca_crl_next_update_seconds"]
    assert crl_labels == {"issuer": auth.cert.subject.rfc4514_string()}
    assert 29 * 86400 < crl_next - now.timestamp() <= 30 * 86400
    assert sorted(m["qemuca_host_deployed_fingerprint_match"], key=lambda s: s[0]["host"]) == [
        ({"host": "a.qemu.test"}, 1.0), ({"host": "b.qemu.test"}, 0.0)]  # c: never deployed
    # The rollover changed the bundle hosts must trust: both deployments predate it.
    assert sorted(v for _, v in m["qemuca_host_deployed_bundle_match"]) == [0.0, 0.0]
    assert len(m["qemuca_host_last_deployed_seconds"]) == 2
    assert m["qemuca_rollover_in_progress"] == [({}, 1.0)]
    assert sorted(m["qemuca_certificates"], key=lambda s: s[0]["status"]) == [
        ({"status": "revoked"}, 1.0), ({"status": "superseded"}, 2.0), ({"status": "valid"}, 2.0)]
    assert m["qemuca_metrics_generated_seconds"] == [({}, now.timestamp())]


def test_metrics_of_an_empty_store(tmp_path):
    home = make_store(tmp_path)
    store = Store.open(home)
    try:
        m = parse(monitor.metrics_text(store))
    finally:
        store.close()
    assert m["qemuca_rollover_in_progress"] == [({}, 0.0)]
    assert "qemuca_crl_next_update_seconds" not in m and "qemuca_certificate_info" not in m
    assert sorted(v for _, v in m["qemuca_certificates"]) == [0.0, 0.0, 0.0]
    assert [lab["role"] for lab, _ in m["qemuca_ca_not_after_seconds"]] == ["current"]
