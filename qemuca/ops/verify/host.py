"""The checks of one host's QEMU TLS set-up, where it lives (over SSH or --local).

Every check runs over the FS interface plus a command runner, so `verify HOST` (RemoteFS
and an SSH connection) and `verify --local` (LocalFS and LocalRunner) are one code path.
The certificate checks are profile.check_host / check_ca, the same ones issue and
inspect use, so what we issue and what we accept cannot drift apart. Nothing is written.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import posixpath
from typing import Callable, List, Optional, Tuple

from cryptography.hazmat.primitives import serialization

from qemuca.errors import InvalidInput, NotFound, QemucaError
from qemuca.findings import FAIL, PASS, SKIP, WARN, Finding, Result
from qemuca.hosts import qemuconf
from qemuca.hosts.certdir import CertSet, dirs_between, read_certs, read_set, unsafe_dir
from qemuca.hosts.hostinfo import DAEMON_NAMES, host_name, resolve_group
from qemuca.hosts.layout import (
    ALL_FILES,
    CA_BUNDLE,
    CLIENT_CERT,
    CLIENT_KEY,
    CRL,
    KEY_FILES,
    SERVER_CERT,
    SERVER_KEY,
    host_modes,
)
from qemuca.hosts.procfs import proc_start
from qemuca.ops.fleet import connected, failure
from qemuca.ops.verify.report import CRL_WARN_DAYS, HostReport, Reference, VerifyOptions, unreachable
from qemuca.pki import profile
from qemuca.pki.checks import (
    MAX_BUNDLE,
    bundle_problems,
    cn_of,
    crl_signed_by,
    fingerprint,
    issued_by,
    issuer_in,
    revoked_in,
    same_public_key,
)


def _short(fp: Optional[str]) -> str:
    return (fp or "")[:16]


class _Host:
    """The context of one host's checks: collects its findings."""

    def __init__(self, name: str, fs, runner, opts: VerifyOptions, reference: Optional[Reference],
                 now: dt.datetime):
        self.name, self.fs, self.runner, self.opts = name, fs, runner, opts
        self.reference, self.now = reference, now
        self.findings: List[Finding] = []
        self.redeploy = f"qemuca deploy {name}" if reference is not None else "redeploy with 'qemuca deploy'"
        self.reissue = (f"qemuca issue --force {name} && qemuca deploy {name}" if reference is not None
                        else "issue a new certificate with qemuca and deploy it")

    def add(self, check: str, result: Result, detail: str, fix: str = "") -> None:
        self.findings.append(Finding(check, result, detail, fix if result in (WARN, FAIL) else ""))


def host_name_of(runner, override: Optional[str]) -> Tuple[Optional[str], Finding]:
    """The name libvirt announces for the host (`hostname -f`, as virGetHostname)."""
    if override:
        return override, Finding("host name", PASS, f"{override} (given with --hostname)")
    found = host_name(runner)
    if found.fully_qualified:
        return found.name, Finding("host name", PASS, f"{found.name} (hostname -f)")
    if found.name:
        return found.name, Finding("host name", WARN, f"hostname -f failed ({found.problem}); using {found.name}",
                                   "give the host a fully qualified name (/etc/hosts or DNS), or use --hostname")
    return None, Finding("host name", FAIL, f"cannot read the host name: {found.problem}",
                         "fix the host's name resolution, or give --hostname")


def verify_host(host: Optional[str], fs, runner, opts: VerifyOptions = VerifyOptions(),
                reference: Optional[Reference] = None, now: Optional[dt.datetime] = None) -> HostReport:
    """Run every check on one host (any FS + runner); host None (--local) names the report
    after the host name found. Raises RemoteError only when the connection is lost;
    everything else becomes a failed check."""
    opts.validate()
    hostname, row = host_name_of(runner, opts.hostname)
    host = host or hostname or runner.name
    h = _Host(host, fs, runner, opts, reference, now or profile.utcnow())
    h.findings.append(row)

    doc, doc_error = None, None
    try:
        doc = qemuconf.read_document(fs, opts.qemu_conf_path)
    except (NotFound, InvalidInput) as e:
        doc_error = str(e)
    except OSError as e:
        doc_error = f"{opts.qemu_conf_path}: {e.strerror or e}"

    cs = read_set(fs, opts.cert_dir)
    _check_dir(h, cs)
    if cs.exists:
        _check_files(h, cs, doc)
        _check_pem(h, cs)
        _check_bundle(h, cs)
        _check_leaves(h, cs, hostname)
        _check_crl(h, cs)
        if reference is not None:
            _check_store(h, cs, reference)
        _check_separation(h, cs)
    _check_qemu_conf(h, doc, doc_error)
    _check_daemon(h, doc)
    return HostReport(host, h.findings)


def _check_dir(h: _Host, cs: CertSet) -> None:
    d = cs.cert_dir
    if not cs.exists:
        h.add("cert dir", FAIL, f"{d} does not exist or is not a directory",
              f"{h.redeploy} (or give the right --cert-dir)")
        return
    st = h.fs.stat(d)
    problems = unsafe_dir(st)
    if problems:
        h.add("cert dir", FAIL, f"{d}: " + "; ".join(problems),
              f"chown root {d} && chmod 0755 {d}")
    else:
        h.add("cert dir", PASS, f"{d} (mode {st.perms:04o}, root)")


def _check_files(h: _Host, cs: CertSet, doc) -> None:
    group, gid = None, None
    try:
        group = resolve_group(h.runner, h.fs, doc, h.opts.group)
        gid = group.gid
        h.add("QEMU group", PASS, f"{group.name} (gid {gid}): {group.source}")
    except QemucaError as e:
        h.add("QEMU group", FAIL, str(e), "install libvirt's QEMU driver or give --group")
    modes = host_modes(gid if gid is not None else -1)
    for name in ALL_FILES:
        placed = cs.files[name]
        check = f"file {name}"
        if placed.data is None:
            if name == CRL and placed.problem == "missing":
                h.add(check, PASS, "absent (optional: QEMU then checks no revocation)")
                continue
            h.add(check, FAIL, f"{placed.path}: {placed.problem}",
                  h.redeploy if "link" not in (placed.problem or "") else
                  f"make {name} a file (or a link) inside {cs.cert_dir}: {h.redeploy}")
            continue
        st, path = placed.stat, placed.resolved
        assert st is not None and path is not None  # read_placed sets both with the data
        where = path if path == placed.path else f"{placed.path} -> {path}"
        problems, fixes = [], []
        want = modes.of(name)
        if st.uid != 0:
            problems.append(f"owner uid {st.uid}, want root")
            fixes.append(f"chown root {path}")
        if group is not None and st.gid != group.gid:
            problems.append(f"group gid {st.gid}, want {group.gid}: QEMU runs as group {group.name} "
                            f"({group.source}) and could not read it")
            fixes.append(f"chgrp {group.gid} {path}")
        if st.perms != want:
            problems.append(f"mode {st.perms:04o}, want {want:04o}")
            fixes.append(f"chmod {want:04o} {path}")
        if name in KEY_FILES and st.perms & 0o007:
            problems.append("the private key is readable by others")
        for d in dirs_between(cs.cert_dir, path):
            dst = h.fs.stat(d)
            if dst is not None and unsafe_dir(dst):
                problems.append(f"directory {d} is writable by others than root (mode {dst.perms:04o}, uid {dst.uid})")
                fixes.append(f"chown root {d} && chmod 0755 {d}")
        if problems:
            h.add(check, FAIL, f"{where}: " + "; ".join(problems), " && ".join(fixes) + f" (or {h.redeploy})")
        else:
            h.add(check, PASS, f"{where} ({st.perms:04o}, root, gid {st.gid})")


def _check_pem(h: _Host, cs: CertSet) -> None:
    for name in (CA_BUNDLE, SERVER_CERT, SERVER_KEY, CLIENT_CERT, CLIENT_KEY, CRL):
        if not cs.present(name):
            continue
        if name in cs.parse_errors:
            level = WARN if name in cs.certs else FAIL  # extra certificates after the first
            h.add(f"{name} parses", level, cs.parse_errors[name], h.redeploy)
        elif name == CA_BUNDLE:
            h.add(f"{name} parses", PASS, f"{len(cs.bundle)} CA certificate{'s' if len(cs.bundle) != 1 else ''}")
        elif name == CRL:
            h.add(f"{name} parses", PASS, f"{len(cs.crls)} CRL{'s' if len(cs.crls) != 1 else ''}")
        elif name in cs.keys:
            h.add(f"{name} parses", PASS, profile.describe_key(cs.keys[name].public_key()) + " private key")
        else:
            h.add(f"{name} parses", PASS, f"certificate {cn_of(cs.certs[name])}")
    for key_name, cert_name in ((SERVER_KEY, SERVER_CERT), (CLIENT_KEY, CLIENT_CERT)):
        key, cert = cs.keys.get(key_name), cs.certs.get(cert_name)
        if key is None or cert is None:
            continue
        if same_public_key(key.public_key(), cert.public_key()):
            h.add(f"{key_name} matches {cert_name}", PASS, "the key belongs to the certificate")
        else:
            h.add(f"{key_name} matches {cert_name}", FAIL,
                  f"{key_name} is the key of another certificate: QEMU cannot use the pair", h.redeploy)


def _check_bundle(h: _Host, cs: CertSet) -> None:
    if not cs.bundle:
        return
    problems = bundle_problems(cs.bundle, h.now, cs.certs.get(SERVER_CERT))
    if problems:
        h.add("ca-cert.pem bundle", FAIL, "; ".join(problems),
              "remove expired and surplus CAs from the bundle: " + h.redeploy)
    else:
        h.add("ca-cert.pem bundle", PASS, f"{len(cs.bundle)} of at most {MAX_BUNDLE} CAs, none expired")
    for i, ca in enumerate(cs.bundle):
        findings = profile.check_ca(ca, h.now, h.opts.warn_days)
        label = f"CA '{cn_of(ca)}'" + (f" (#{i + 1})" if len(cs.bundle) > 1 else "")
        bad = [f for f in findings if f.result != PASS]
        if not bad:
            validity = findings[0].detail
            h.add(label, PASS, f"CA:TRUE, keyCertSign; {validity}")
            continue
        for f in bad:
            h.add(f"{label} {f.check}", f.result, f.detail,
                  "renew the CA (qemuca init on a new home, then roll it out) or drop it from the bundle"
                  if f.check == "validity" else "use a CA made by 'qemuca init'")


def _leaf_fix(h: _Host, check: str) -> str:
    if check == "subjectAltName":
        return f"issue a certificate with the host's name: {h.reissue} (add names with --san)"
    return h.reissue


def _check_leaves(h: _Host, cs: CertSet, hostname: Optional[str]) -> None:
    names = [SERVER_CERT]
    if CLIENT_CERT in cs.certs and SERVER_CERT in cs.certs and \
            cs.certs[CLIENT_CERT].public_bytes(serialization.Encoding.DER) == \
            cs.certs[SERVER_CERT].public_bytes(serialization.Encoding.DER):
        h.add(f"{CLIENT_CERT} same as {SERVER_CERT}", PASS, "one certificate for both roles")
    else:
        names.append(CLIENT_CERT)
    for name in names:
        cert = cs.certs.get(name)
        if cert is None:
            continue
        issuer = issuer_in(cert, cs.bundle)
        if issuer is not None:
            h.add(f"{name} chain", PASS, f"issued by '{cn_of(issuer)}' in {CA_BUNDLE}")
        elif cs.bundle:
            h.add(f"{name} chain", FAIL, f"issuer '{cert.issuer.rfc4514_string()}' is not a CA of "
                  f"{CA_BUNDLE}: QEMU refuses it, and peers refuse this host", h.redeploy)
        for f in profile.check_host(cert, h.now, h.opts.warn_days, hostname):
            detail = f.detail
            if f.check == "subjectAltName" and hostname and f.result == PASS:
                detail = f"{hostname} is among {detail}"
            h.add(f"{name} {f.check}", f.result, detail, _leaf_fix(h, f.check))
        crls = list(cs.crls)
        why = revoked_in(cert, crls, issuer)
        source = CRL
        if why is None and h.reference is not None and h.reference.crls:
            why = revoked_in(cert, h.reference.crls, issuer)
            source = "the CA's current CRL"
        if why:
            h.add(f"{name} revocation", FAIL, f"{why} in {source}: peers with the CRL refuse this host",
                  h.reissue)
        elif crls or (h.reference is not None and h.reference.crls):
            h.add(f"{name} revocation", PASS, "not revoked")
        else:
            h.add(f"{name} revocation", PASS, "no CRL to check against")


def _check_crl(h: _Host, cs: CertSet) -> None:
    for i, crl in enumerate(cs.crls):
        label = CRL + (f" #{i + 1}" if len(cs.crls) > 1 else "")
        signer = next((ca for ca in cs.bundle if crl_signed_by(crl, ca)), None)
        if signer is None:
            h.add(f"{label} signature", FAIL, f"not signed by a CA of {CA_BUNDLE} "
                  f"(issuer '{crl.issuer.rfc4514_string()}')", f"qemuca crl && {h.redeploy}")
        else:
            h.add(f"{label} signature", PASS, f"signed by '{cn_of(signer)}'")
        nxt = crl.next_update_utc
        if nxt is None:
            h.add(f"{label} next update", WARN, "the CRL has no next update", f"qemuca crl && {h.redeploy}")
        elif nxt < h.now:
            h.add(f"{label} next update", FAIL, f"stale: its next update was {nxt.isoformat()}; QEMU "
                  "still uses it, so any revocation since then is unknown to this host",
                  f"qemuca crl && {h.redeploy}")
        elif nxt - h.now < dt.timedelta(days=CRL_WARN_DAYS):
            h.add(f"{label} next update", WARN, f"next update {nxt.isoformat()}, less than "
                  f"{CRL_WARN_DAYS} days away", f"qemuca crl && {h.redeploy}")
        else:
            h.add(f"{label} next update", PASS, f"{nxt.isoformat()}")


def _check_store(h: _Host, cs: CertSet, ref: Reference) -> None:
    cert = cs.certs.get(SERVER_CERT)
    names = " and ".join(f"'{cn_of(c)}' ({_short(fingerprint(c))})" for c in ref.trusted)
    problems = []
    have = {fingerprint(c) for c in cs.bundle}
    missing = [c for c in ref.trusted if fingerprint(c) not in have]
    if cs.bundle and missing:
        problems.append(f"{CA_BUNDLE} lacks this store's CA '{cn_of(missing[0])}' "
                        f"({_short(fingerprint(missing[0]))}): the host refuses this CA's other hosts")
    if cert is not None and not any(issued_by(cert, ca) for ca in ref.trusted):
        problems.append(f"{SERVER_CERT} was issued by '{cert.issuer.rfc4514_string()}', not by this "
                        f"store's CA {names}")
    if problems:
        h.add("store CA", FAIL, "; ".join(problems), h.redeploy)
    else:
        h.add("store CA", PASS, f"this store's CA {names}")
    bundle = cs.files[CA_BUNDLE].data
    recorded = ref.bundles.get(h.name)
    if bundle is not None and recorded:
        if hashlib.sha256(bundle).hexdigest() == recorded:
            h.add("store bundle", PASS, f"the {CA_BUNDLE} last deployed")
        else:
            h.add("store bundle", FAIL, f"{CA_BUNDLE} is not the bundle last deployed "
                  f"(sha256 {_short(hashlib.sha256(bundle).hexdigest())}, deployed {_short(recorded)})",
                  h.redeploy)
    if cert is None:
        return
    fp = fingerprint(cert)
    deployed = ref.deployed.get(h.name)
    if deployed is not None:
        if deployed[0] == fp:
            h.add("store deployed", PASS, f"the certificate deployed on {deployed[1]} ({_short(fp)})")
        else:
            h.add("store deployed", FAIL, f"{SERVER_CERT} ({_short(fp)}) is not the certificate "
                  f"deployed on {deployed[1]} ({_short(deployed[0])})", h.redeploy)
    else:
        current = ref.current.get(h.name)
        if current == fp:
            h.add("store deployed", WARN, "the host's current certificate, but the index records no "
                  "deployment of it", h.redeploy)
        else:
            h.add("store deployed", FAIL if current else WARN,
                  f"no deployment to {h.name} recorded" + (f"; the index's certificate is {_short(current)}"
                                                           if current else ""), h.redeploy)
    entry = ref.index.get(fp)
    if entry is None:
        h.add("store index", FAIL, f"{SERVER_CERT} ({_short(fp)}) is not in this store's index", h.reissue)
    else:
        owner, status, serial = entry
        level = {"valid": PASS, "superseded": WARN}.get(status, FAIL)
        text = f"serial {serial} of {owner}: {status}"
        if owner != h.name:
            level, text = FAIL, text + f" (issued to {owner}, not {h.name})"
        h.add("store index", level, text, h.redeploy if status == "superseded" else h.reissue)
    if ref.crls:
        store_revoked = {(crl.issuer.public_bytes(), e.serial_number) for crl in ref.crls for e in crl}
        host_revoked = {(crl.issuer.public_bytes(), e.serial_number) for crl in cs.crls for e in crl}
        unrevoked = store_revoked - host_revoked
        if unrevoked:
            h.add("store CRL", FAIL, f"{len(unrevoked)} certificate(s) revoked by the CA are missing from "
                  f"the host's {CRL}: it still accepts migrations from them", h.redeploy)
        else:
            h.add("store CRL", PASS, f"the host's {CRL} holds every revocation of the CA's CRL"
                  if store_revoked else "nothing revoked")


def _check_separation(h: _Host, cs: CertSet) -> None:
    if not cs.bundle:
        return
    ours = {fingerprint(c): c for c in cs.bundle}
    libvirt_cas, problem = read_certs(h.fs, h.opts.libvirt_ca)
    if problem:
        h.add("libvirt CA separate", WARN, f"cannot read libvirt's CA: {problem}")
    elif not libvirt_cas:
        h.add("libvirt CA separate", PASS, f"no libvirt CA at {h.opts.libvirt_ca}")
    else:
        shared = [c for c in libvirt_cas if fingerprint(c) in ours
                  or any(same_public_key(c.public_key(), o.public_key()) for o in cs.bundle)]
        if shared:
            h.add("libvirt CA separate", FAIL, f"{h.opts.libvirt_ca} holds the QEMU CA '{cn_of(shared[0])}': "
                  "a QEMU certificate can then log in to libvirtd, and libvirt's certificates "
                  "are accepted for migrations",
                  "give QEMU a dedicated CA (qemuca init) and deploy it, or give libvirt its own CA")
        else:
            h.add("libvirt CA separate", PASS, f"{h.opts.libvirt_ca} is another CA")
    for path in h.opts.libvirt_certs:
        certs, problem = read_certs(h.fs, path)
        label = f"libvirt {posixpath.basename(path)} separate"
        if problem:
            h.add(label, WARN, f"cannot read it: {problem}")
        elif not certs:
            h.add(label, PASS, f"no {path}")
        else:
            issuer = issuer_in(certs[0], cs.bundle)
            if issuer is not None:
                h.add(label, FAIL, f"{path} was issued by the QEMU CA '{cn_of(issuer)}': libvirt's "
                      "certificates must come from libvirt's own CA",
                      f"reissue {path} from libvirt's CA")
            else:
                h.add(label, PASS, f"{path} is not issued by the QEMU CA")


def _check_qemu_conf(h: _Host, doc, doc_error: Optional[str]) -> None:
    path = h.opts.qemu_conf_path
    fix = f"qemuca qemu-conf apply --cert-dir {h.opts.cert_dir} on the host (or {h.redeploy})"
    if doc is None:
        h.add("qemu.conf", FAIL, doc_error or f"cannot read {path}",
              "install libvirt's QEMU driver, fix the file, or give --qemu-conf")
        return
    try:
        tls = qemuconf.resolve_migration_tls(doc, lambda p: h.fs.stat(p) is not None)
    except InvalidInput as e:
        h.add("qemu.conf", FAIL, str(e), fix)
        return
    want = posixpath.normpath(h.opts.cert_dir)
    got = posixpath.normpath(str(tls.cert_dir.value))
    if got != want:
        h.add("qemu.conf migrate cert dir", FAIL, f"libvirt uses {got} ({tls.cert_dir.source}), not {want}"
              + (" (the first occurrence of a key wins)" if tls.cert_dir.line else ""), fix)
    elif tls.cert_dir.source.startswith("default"):
        h.add("qemu.conf migrate cert dir", WARN, f"{got} by libvirt's default only: "
              f"{qemuconf.CERT_DIR} is not set (creating {qemuconf.LIBVIRT_MIGRATE_DIR} would change it)", fix)
    else:
        h.add("qemu.conf migrate cert dir", PASS, f"{got} ({tls.cert_dir.source})")
    if not tls.verify.value:
        h.add("qemu.conf migrate verify", FAIL, f"0 ({tls.verify.source}): a destination accepts "
              "migrations from any client", fix)
    elif tls.verify.source == "default":
        h.add("qemu.conf migrate verify", WARN, f"{qemuconf.VERIFY} is not set: libvirt before 6.10 "
              "defaults to 0 (no client check)", fix)
    else:
        h.add("qemu.conf migrate verify", PASS, f"1 ({tls.verify.source})")
    for note in tls.warnings:
        if note.code in (qemuconf.VERIFY_OFF, qemuconf.DEFAULT_CERT_DIR_MISSING):
            continue  # reported above (verify) and by the cert dir checks
        missing = note.code == qemuconf.CERT_DIR_MISSING
        h.add("qemu.conf", FAIL if missing else WARN, str(note),
              "create the directory or fix the setting" if missing else fix)


def _iso(t: float) -> str:
    return dt.datetime.fromtimestamp(t, dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _check_daemon(h: _Host, doc) -> None:
    """Whether the running daemon read qemu.conf before its last change (no reload exists)."""
    if doc is None:
        return
    st = h.fs.stat(doc.path)
    running, notes = [], []
    for daemon in DAEMON_NAMES:
        pidfile = posixpath.join(h.opts.run_dir, f"{daemon}.pid")
        try:
            if h.fs.stat(pidfile) is None:
                continue
            pid = int(h.fs.read_bytes(pidfile).split()[0])
        except (OSError, ValueError, IndexError):
            notes.append(f"{pidfile} is unreadable")
            continue
        start = proc_start(h.fs, h.opts.proc, pid, daemon)
        if start is None:
            notes.append(f"{pidfile} names pid {pid}, which is not a running {daemon}")
            continue
        running.append((daemon, pid, start))
    if not running:
        h.add("daemon settings", SKIP, f"no {' or '.join(DAEMON_NAMES)} running (no live pid file in "
              f"{h.opts.run_dir}){': ' + '; '.join(notes) if notes else ''}: it reads qemu.conf when it starts")
        return
    for daemon, pid, start in running:
        if st is not None and st.mtime > start + 1:
            h.add(f"daemon settings ({daemon})", WARN,
                  f"{doc.path} changed at {_iso(st.mtime)}, after {daemon} (pid {pid}) started at "
                  f"{_iso(start)}: it may still use the older settings",
                  f"systemctl try-restart {daemon} (running VMs keep running)")
        else:
            h.add(f"daemon settings ({daemon})", PASS,
                  f"{daemon} (pid {pid}) started at {_iso(start)}, after the last change of {doc.path}")


def verify_remote(host: str, connect: Callable, opts: VerifyOptions = VerifyOptions(),
                  reference: Optional[Reference] = None, now: Optional[dt.datetime] = None) -> HostReport:
    """Connect, verify, close: an unreachable host or a lost connection is a failed report."""
    try:
        with connected(connect, host) as [(conn, fs)]:
            return verify_host(host, fs, conn, opts, reference, now)
    except Exception as e:
        return unreachable(host, *failure(host, e))
