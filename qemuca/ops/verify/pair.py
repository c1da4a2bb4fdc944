"""Will a migration from one host to another work? The pair checks: each side's files,
trust both ways, revocation as QEMU applies it (only the destination reads a CRL), the
destination's name in its certificate, and optionally a real TLS handshake."""

from __future__ import annotations

import datetime as dt
import ipaddress
from typing import Callable, List, Optional, Sequence

from qemuca.findings import FAIL, PASS, SKIP, WARN, Finding
from qemuca.hosts.certdir import CertSet, read_set
from qemuca.hosts.layout import (
    CA_BUNDLE,
    CLIENT_CERT,
    CLIENT_KEY,
    CRL,
    SERVER_CERT,
    SERVER_KEY,
)
from qemuca.ops.fleet import connected, failure
from qemuca.ops.verify.handshake import handshake
from qemuca.ops.verify.host import host_name_of
from qemuca.ops.verify.report import CONNECTION_FIX, PairOptions, PairReport, Reference, Side
from qemuca.pki import profile
from qemuca.pki.checks import (
    bundle_problems,
    cn_of,
    issuer_in,
    revoked_in,
    same_public_key,
)


def _files_row(rows, label: str, host: str, cs: CertSet, names: Sequence[str], key: str, cert: str) -> None:
    problems = []
    for name in names:
        placed = cs.files[name]
        if placed.data is None and not (name == CRL and placed.problem == "missing"):
            problems.append(f"{name}: {placed.problem}")
        elif name in cs.parse_errors and name not in cs.certs:
            problems.append(cs.parse_errors[name])
    if key in cs.keys and cert in cs.certs and \
            not same_public_key(cs.keys[key].public_key(), cs.certs[cert].public_key()):
        problems.append(f"{key} does not match {cert}")
    if problems:
        rows.append(Finding(label, FAIL, f"{host}: " + "; ".join(problems), f"see 'qemuca verify {host}'"))
    else:
        rows.append(Finding(label, PASS, f"{host}: " + ", ".join(n for n in names if cs.present(n))))


def _trust_check(label: str, cert, issuer, owner: str, truster: str) -> Finding:
    """Whether `truster`'s bundle holds the CA that issued `owner`'s certificate."""
    if issuer is not None:
        return Finding(label, PASS, f"issued by '{cn_of(issuer)}' in {truster}'s bundle")
    return Finding(label, FAIL, f"{owner}'s certificate (issuer '{cert.issuer.rfc4514_string()}') "
                 f"chains to no CA of {truster}'s {CA_BUNDLE}", "deploy both hosts from the same CA")


def verify_pair(src: Side, dst: Side, opts: PairOptions = PairOptions(),
                reference: Optional[Reference] = None, now: Optional[dt.datetime] = None) -> PairReport:
    """Will QEMU on src (client endpoint) migrate to QEMU on dst (server endpoint)?"""
    now = now or profile.utcnow()
    s, d = read_set(src.fs, opts.cert_dir), read_set(dst.fs, opts.cert_dir)
    name = opts.tls_destination
    rows: List[Finding] = []
    if name is None:
        name, row = host_name_of(dst.runner, None)
        rows.append(Finding("destination name", row.result,
                            row.detail.replace("hostname -f", f"hostname -f on {dst.name}"), row.fix))
    report = PairReport(src.name, dst.name, name, rows)
    _files_row(rows, "source files", src.name, s, (CA_BUNDLE, CLIENT_CERT, CLIENT_KEY), CLIENT_KEY, CLIENT_CERT)
    _files_row(rows, "destination files", dst.name, d, (CA_BUNDLE, SERVER_CERT, SERVER_KEY, CRL),
               SERVER_KEY, SERVER_CERT)
    for label, side, cs, own in (("source bundle", src, s, CLIENT_CERT), ("destination bundle", dst, d, SERVER_CERT)):
        if cs.bundle:
            problems = bundle_problems(cs.bundle, now, cs.certs.get(own))
            rows.append(Finding(label, FAIL, f"{side.name}: " + "; ".join(problems),
                              f"fix the bundle: qemuca deploy {side.name}")
                        if problems else Finding(label, PASS, f"{side.name}: {len(cs.bundle)} CA(s), loadable"))
    client, server = s.certs.get(CLIENT_CERT), d.certs.get(SERVER_CERT)
    for label, side, cert, purpose in (("source certificate", src, client, "clientAuth"),
                                       ("destination certificate", dst, server, "serverAuth")):
        if cert is None:
            continue
        bad = [f for f in profile.check_host(cert, now, opts.warn_days) if f.result != PASS]
        if any(f.result == FAIL for f in bad):
            rows.append(Finding(label, FAIL, f"{side.name}: " + "; ".join(
                f"{f.check}: {f.detail}" for f in bad if f.result == FAIL),
                f"qemuca issue --force {side.name} && qemuca deploy {side.name}"))
        elif bad:
            rows.append(Finding(label, WARN, f"{side.name}: " + "; ".join(f"{f.check}: {f.detail}" for f in bad),
                              f"qemuca issue --force {side.name} && qemuca deploy {side.name}"))
        else:
            rows.append(Finding(label, PASS, f"{side.name}: {cn_of(cert)}, valid, {purpose}"))
    if client is not None and d.bundle:
        issuer = issuer_in(client, d.bundle)
        rows.append(_trust_check("destination trusts source", client, issuer, src.name, dst.name))
        why = revoked_in(client, d.crls, issuer)
        stale = [update for c in d.crls if (update := c.next_update_utc) is not None and update < now]
        if why:
            rows.append(Finding("source not revoked (destination's CRL)", FAIL,
                              f"{src.name}'s certificate is {why} in {dst.name}'s {CRL}",
                              f"qemuca issue --force {src.name} && qemuca deploy {src.name}"))
        elif stale:
            rows.append(Finding("source not revoked (destination's CRL)", WARN,
                              f"not revoked, but {dst.name}'s {CRL} is stale (next update "
                              f"{stale[0].isoformat()}): QEMU still uses it; later "
                              "revocations are unknown there", f"qemuca crl && qemuca deploy {dst.name}"))
        else:
            rows.append(Finding("source not revoked (destination's CRL)", PASS,
                              "not revoked" if d.crls else f"{dst.name} has no {CRL}"))
    if server is not None and s.bundle:
        issuer = issuer_in(server, s.bundle)
        rows.append(_trust_check("source trusts destination", server, issuer, dst.name, src.name))
        if reference is not None:
            crls = list(reference.crls)
            source = "the CA's current CRL" if crls else "the CA store (it has no CRL)"
        else:
            crls, source = s.crls + d.crls, "the hosts' CRLs (no CA store here)"
        why = revoked_in(server, crls, issuer)
        rows.append(Finding("destination not revoked (CA's CRL)", FAIL,
                          f"{dst.name}'s certificate is {why} in {source}; QEMU's source never reads a CRL, "
                            "so the migration would go ahead",
                            f"qemuca issue --force {dst.name} && qemuca deploy {dst.name}")
                    if why else Finding("destination not revoked (CA's CRL)", PASS, f"not revoked in {source}"))
    if server is not None and name:
        sans = profile.sans_of(server)
        ok = _name_matches(name, sans)
        rows.append(Finding("destination name in SANs", PASS, f"{name} is among {', '.join(sans)}") if ok else
                    Finding("destination name in SANs", FAIL, f"{name} is not among {', '.join(sans) or 'no SANs'}: "
                          "the source refuses the destination",
                          f"migrate with --tls-destination set to one of them, or add it: "
                          f"qemuca issue --force {dst.name} --san {name}"))
    if opts.handshake:
        if any(c.result == FAIL for c in rows if " files " in f" {c.check} "):
            rows.append(Finding("TLS handshake", SKIP, "not tried: files are missing or unreadable"))
        elif not name:
            rows.append(Finding("TLS handshake", SKIP, "not tried: the destination's name is unknown"))
        else:
            rows.append(handshake(src, dst, name, opts))
    return report


def _name_matches(name: str, sans: Sequence[str]) -> bool:
    """As the source's GnuTLS does: an IP matches an iPAddress SAN, a name a dNSName."""
    try:
        ip = ipaddress.ip_address(name)
        return any(_ip_equal(ip, s) for s in sans)
    except ValueError:
        pass
    name = name.lower().rstrip(".")
    for san in sans:
        san = san.lower()
        if san == name:
            return True
        if san.startswith("*.") and "." in name and name.split(".", 1)[1] == san[2:]:
            return True
    return False


def _ip_equal(ip, text: str) -> bool:
    try:
        return ipaddress.ip_address(text) == ip
    except ValueError:
        return False


def verify_pair_remote(src: str, dst: str, connect: Callable, opts: PairOptions = PairOptions(),
                       reference: Optional[Reference] = None, now: Optional[dt.datetime] = None) -> PairReport:
    """Connect to both hosts (an unreachable one makes the report an error)."""
    try:
        with connected(connect, src, dst) as [(conn_a, fs_a), (conn_b, fs_b)]:
            return verify_pair(Side(src, fs_a, conn_a), Side(dst, fs_b, conn_b), opts, reference, now)
    except Exception as e:
        text, code = failure(f"{src} -> {dst}", e)
        return PairReport(src, dst, opts.tls_destination, [Finding("connection", FAIL, text, CONNECTION_FIX)],
                          error=text, exit_code=code)
