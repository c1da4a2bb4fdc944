"""How a probe's outcome is explained: QEMU's own messages -> what is wrong, in a few
words, and what to do about it."""

from __future__ import annotations

from typing import List, Optional, Tuple

from cryptography import x509

from qemuca.findings import FAIL, PASS, Finding
from qemuca.hosts.layout import CA_BUNDLE
from qemuca.ops.probe.qmp import QemuHost
from qemuca.ops.probe.report import PORT_RANGE, Migration, ProbeOptions, ProbeReport, Revocations, rate, size
from qemuca.pki import profile
from qemuca.pki.checks import issued_by


class Diagnosis:
    """The findings a probe's steps end with (mixed into the probe, whose state they read)."""

    r: ProbeReport
    s: QemuHost
    d: QemuHost
    opts: ProbeOptions
    rev: Optional[Revocations]
    src_certs: List[x509.Certificate]
    dst_certs: List[x509.Certificate]
    src_bundle: List[x509.Certificate]
    dst_bundle: List[x509.Certificate]

    def add(self, *args, **kw) -> None:
        self.r.findings.append(Finding(*args, **kw))

    def plain_client_finding(self, uri: str) -> None:
        m, s, d = self.r.plain_client, self.s, self.d
        said = "; ".join(f"{role}: {text}" for role, text in m.errors) or "no message"
        if self.r.plain_refused:
            self.add("plain client refused", PASS, f"a plain QEMU source on {s.name} got no session at "
                     f"{uri[4:]} ({said})")
        elif m.destination_status == "completed":
            self.add("plain client refused", FAIL, f"a plain migration from {s.name} was ACCEPTED by "
                     f"{d.name}'s TLS listener: the traffic is not encrypted", "report this: QEMU ignored tls-creds",
                     label="plain accepted")
        else:
            self.add("plain client refused", FAIL, f"inconclusive: {d.name}'s listener at {uri[4:]} saw no "
                     f"plain client ({said})", f"check that {s.name} reaches {uri[4:]} (firewall, --address)",
                     label="plain check inconclusive")

    def migration_finding(self, m: Migration, name: str) -> None:
        s, d = self.s, self.d
        if m.completed:
            empty = "" if self.r.ram_filled_bytes else (
                f"; the guest's RAM held no data (--ram below the size of {s.name}'s QEMU binary, "
                f"{size(s.qemu_size)}): the throughput says little")
            self.add("TLS migration", PASS, f"completed {s.name} -> {d.name}, name {name}: "
                     f"{size(m.bytes)} in {m.seconds:.2f} s ({rate(m.throughput)}){empty}")
            return
        label, why, fix = self.diagnose(m, name)
        self.add("TLS migration", FAIL, f"{why}. QEMU said: {m.error or m.status}", fix, label=label)

    def diagnose(self, m: Migration, name: str) -> Tuple[str, str, str]:
        """QEMU's message -> (a few words, what is wrong, what to do)."""
        s, d, cd = self.s.name, self.d.name, self.opts.cert_dir
        renew = "qemuca issue --force {h} && qemuca deploy {h} (or qemuca enroll --replace {h})"
        for role, text in m.errors:
            host, peer = (s, d) if role == "source" else (d, s)
            low = text.lower()
            if "has been revoked" in low:
                return ("revoked", f"{host} refused {peer}'s certificate: it is revoked (listed in "
                        f"{host}'s ca-crl.pem)", renew.format(h=peer))
            if "does not match the hostname" in low:
                sans = profile.sans_of(self.dst_certs[0]) if self.dst_certs else []
                return ("name mismatch", f"{d}'s certificate does not hold the name {name} the source "
                        f"checked (its names: {', '.join(sans) or 'unknown'})",
                        f"use --tls-destination with one of its names (libvirt: virsh migrate --tls "
                        f"--tls-destination NAME), or add the name: qemuca issue --force {d} --san {name} "
                        f"&& qemuca deploy {d}")
            if "known issuer" in low or "not trusted" in low or "signer" in low:
                return ("unknown issuer",) + self.trust_problem(host, peer)
            if "has expired" in low or "not yet active" in low or "not yet valid" in low:
                what = "is not valid yet (check the host's clock)" if "not yet" in low else "has expired"
                if " ca certificate" in low:
                    return ("expired CA", f"a CA certificate in {host}'s {CA_BUNDLE} {what}",
                            f"renew the CA and redeploy: qemuca deploy {host}")
                return ("expired" if "expired" in what else "not yet valid",
                        f"{host}'s certificate in {cd} {what}", renew.format(h=host))
            if "no certificate was found" in low:
                return ("no client certificate", f"{s} sent no client certificate, and {d} verifies "
                        f"its peers", f"qemuca deploy {s} (client-cert.pem and client-key.pem in {cd})")
            if "unable to access credentials" in low or "no such file" in low or "cannot load" in low:
                return ("missing file", f"{host} lacks a credential file in {cd}", f"qemuca deploy {host}")
            if any(w in low for w in ("connection refused", "no route", "unreachable", "timed out")):
                return ("unreachable", f"{s} cannot connect to {self.r.address}:{self.r.port}",
                        f"open TCP {PORT_RANGE.start}-{PORT_RANGE.stop - 1} from {s} to {d}, or give --address")
        if m.status == "timeout":
            return "timeout", "the migration did not end in time", "raise --timeout"
        return ("failed", "the TLS migration failed", "read QEMU's messages; 'qemuca verify --pair "
                f"{s} {d}' checks the files")

    def trust_problem(self, host: str, peer: str) -> Tuple[str, str]:
        """Which certificate is foreign: name the host, and what to deploy."""
        ours = [(self.s.name, self.src_certs), (self.d.name, self.dst_certs)]
        rev = self.rev
        foreign = [(h, c[0]) for h, c in ours if c and rev is not None and not rev.from_this_ca(c[0])]
        if foreign and rev is not None:
            h, cert = foreign[0]
            return (f"{host} does not trust {peer}'s certificate; {h}'s certificate was issued by "
                    f"'{cert.issuer.rfc4514_string()}', not by this CA "
                    f"('{rev.ca_cert.subject.rfc4514_string()}')",
                    f"deploy both hosts from this CA: qemuca deploy {h} --issue (or qemuca enroll {h})")
        peer_certs = self.src_certs if peer == self.s.name else self.dst_certs
        bundle = self.src_bundle if host == self.s.name else self.dst_bundle
        if peer_certs and bundle and not any(issued_by(peer_certs[0], ca) for ca in bundle):
            return (f"{host} does not trust {peer}'s certificate: no CA in {host}'s {CA_BUNDLE} issued it",
                    f"deploy both hosts from the same CA: qemuca deploy {host} {peer}")
        return (f"{host} does not trust {peer}'s certificate (unknown issuer)",
                f"deploy both hosts from the same CA: qemuca deploy {host} {peer}")
