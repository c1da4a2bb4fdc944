"""What a probe reports, the options it takes, and what the CA store tells it."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

from cryptography import x509

from qemuca.errors import InvalidInput, StoreError
from qemuca.findings import FAIL, PASS, WARN, Finding, Outcome, Result
from qemuca.hosts import qemuconf
from qemuca.hosts.fs import read_user_file
from qemuca.hosts.layout import DEFAULT_CERT_DIR
from qemuca.names import host_name
from qemuca.pki.ca import CertificateAuthority
from qemuca.pki.checks import issued_by

DEFAULT_RAM_MIB = 128
DEFAULT_TIMEOUT = 60.0
# libvirt's default migration_port_min..max: the probe takes the firewall path migrations take.
PORT_RANGE = range(49152, 49216)


@dataclass
class Migration:
    """One migration attempt as QEMU reported it."""

    tls: bool
    status: str = "not-run"  # completed | failed | cancelled | timeout | not-run
    destination_status: str = "not-run"
    seconds: Optional[float] = None  # QEMU's total-time
    bytes: Optional[int] = None  # RAM bytes QEMU sent
    errors: List[Tuple[str, str]] = field(default_factory=list)  # (source|destination, QEMU's words)

    @property
    def completed(self) -> bool:
        return self.status == "completed"

    @property
    def throughput(self) -> Optional[float]:
        """Bytes per second, from QEMU's own counters."""
        if not self.completed or not self.seconds or self.bytes is None:
            return None
        return self.bytes / self.seconds

    @property
    def error(self) -> Optional[str]:
        return "; ".join(f"{role}: {text}" for role, text in self.errors) or None

    def as_dict(self) -> dict:
        return {"tls": self.tls, "status": self.status, "destination_status": self.destination_status,
                "seconds": self.seconds, "bytes": self.bytes, "throughput_bytes_per_s": self.throughput,
                "error": self.error, "errors": [{"side": r, "message": t} for r, t in self.errors]}


@dataclass
class ProbeReport(Outcome):
    source: str
    destination: str
    tls_destination: Optional[str] = None
    address: Optional[str] = None
    port: Optional[int] = None
    findings: List[Finding] = field(default_factory=list)
    tls: Migration = field(default_factory=lambda: Migration(True))
    plain_client: Migration = field(default_factory=lambda: Migration(False))
    plain: Optional[Migration] = None
    destination_revoked: Optional[bool] = None
    source_revoked: Optional[bool] = None
    qemu_conf: Optional[dict] = None
    qemu: Dict[str, str] = field(default_factory=dict)
    ram_filled_bytes: Optional[int] = None
    error: Optional[str] = None  # the probe could not run to its end (unreachable, timeout, Ctrl-C)

    @property
    def pair(self) -> Tuple[str, str]:
        return self.source, self.destination

    @property
    def result(self) -> Result:
        """pass or fail: whether the migration works. Warnings stay in the findings (and
        fail the command with --strict)."""
        found = Outcome.result.fget(self)  # type: ignore[attr-defined]
        return PASS if found is WARN else found

    def failed(self, strict: bool = False) -> bool:
        return self.result is FAIL or (strict and any(f.result is WARN for f in self.findings))

    @property
    def passed(self) -> bool:
        return not self.failed()

    @property
    def ratio(self) -> Optional[float]:
        """TLS throughput / plain throughput (--compare-plain)."""
        if self.plain is None or not self.tls.throughput or not self.plain.throughput:
            return None
        return self.tls.throughput / self.plain.throughput

    @property
    def plain_refused(self) -> Optional[bool]:
        """The TLS listener got the plain client's connection and gave it no session."""
        m = self.plain_client
        if m.status == "not-run":
            return None
        return m.destination_status != "completed" and any(side == "destination" for side, _ in m.errors)

    def labels(self) -> List[str]:
        """Why it failed, in a few words each (matrix cells)."""
        out = [f.label or f.check for f in self.findings if f.result == FAIL]
        return list(dict.fromkeys(out)) or ([self.error] if self.error else [])

    def as_dict(self) -> dict:
        return {
            "source": self.source, "destination": self.destination,
            "tls_destination": self.tls_destination, "address": self.address, "port": self.port,
            "result": self.result.value, "error": self.error,
            "tls_migration": self.tls.as_dict(),
            "plain_client": dict(self.plain_client.as_dict(), refused=self.plain_refused),
            "plain_migration": self.plain.as_dict() if self.plain else None,
            "throughput_ratio": self.ratio,
            "destination_revoked": self.destination_revoked,
            "source_revoked": self.source_revoked,
            "qemu_conf": self.qemu_conf,
            "qemu": self.qemu,
            "ram_filled_bytes": self.ram_filled_bytes,
            "findings": [dict(f.as_dict(), problem=(f.label or f.check) if f.result is FAIL else "")
                         for f in self.findings],
        }


@dataclass(frozen=True)
class ProbeOptions:
    tls_destination: Optional[str] = None  # None: the destination's `hostname -f`
    address: Optional[str] = None  # None: the name as the source resolves it
    port: Optional[int] = None  # None: the first free port of PORT_RANGE
    ram_mib: int = DEFAULT_RAM_MIB
    compare_plain: bool = False
    cert_dir: str = DEFAULT_CERT_DIR
    qemu_conf_path: str = qemuconf.DEFAULT_PATH
    timeout: float = DEFAULT_TIMEOUT

    def validate(self) -> None:
        if not self.cert_dir.startswith("/"):
            raise InvalidInput(f"--cert-dir {self.cert_dir!r} must be an absolute path")
        if self.tls_destination is not None:
            tls_name(self.tls_destination)
        if self.address is not None and (not self.address or any(c in self.address for c in " /,[]\0")):
            raise InvalidInput(f"--address {self.address!r} is not a host name or IP address")
        if not 8 <= self.ram_mib <= 65536:
            raise InvalidInput("--ram must be between 8 and 65536 MiB")
        if self.timeout <= 0:
            raise InvalidInput("--timeout must be positive")


def tls_name(value: str) -> str:
    """A --tls-destination: a host name (normalised) or an IP address."""
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        return host_name(value)


@dataclass(frozen=True)
class Revocations:
    """The CA's certificate and what it revoked, read once in the calling thread (the
    store's SQLite connection stays there). QEMU's migration source never reads a CRL,
    so this is the only place a revoked destination shows up."""

    ca_cert: x509.Certificate
    revoked: Dict[int, str]  # serial -> "HOST, revoked on DATE (reason)"
    crl: Optional[x509.CertificateRevocationList] = None

    @classmethod
    def from_store(cls, store) -> Revocations:
        authority = CertificateAuthority(store)
        revoked = {int(r.serial, 16): f"{r.host}, revoked {r.revoked_at[:10]}"
                   + (f" ({r.revocation_reason})" if r.revocation_reason else "")
                   for r in store.revoked()}
        crl = None
        try:
            pem = authority.crl_pem()
            crl = x509.load_pem_x509_crl(pem) if pem else None
        except (StoreError, ValueError):
            pass  # the index alone still says what is revoked
        return cls(authority.cert, revoked, crl)

    def why(self, cert: x509.Certificate) -> Optional[str]:
        """How `cert` is revoked by this CA, or None (also for another CA's certificate)."""
        if not issued_by(cert, self.ca_cert):
            return None
        serial = cert.serial_number
        if serial in self.revoked:
            return f"serial {serial:x} is revoked in the CA's index ({self.revoked[serial]})"
        if self.crl is not None and self.crl.get_revoked_certificate_by_serial_number(serial) is not None:
            return f"serial {serial:x} is listed in the CA's current CRL"
        return None

    def from_this_ca(self, cert: x509.Certificate) -> bool:
        return issued_by(cert, self.ca_cert)


def size(n: Optional[int]) -> str:
    return "?" if n is None else f"{n / 1048576:.1f} MiB"


def rate(bps: Optional[float]) -> str:
    """Bytes per second for people."""
    return "?" if not bps else f"{bps / 1048576:.1f} MiB/s"


# ---------------------------------------------------------------- many pairs


def all_pairs(hosts: Sequence[str]) -> List[Tuple[str, str]]:
    """Every ordered pair of distinct hosts."""
    return [(a, b) for a in hosts for b in hosts if a != b]


def read_pairs(path: str) -> List[Tuple[str, str]]:
    """A pairs file: `SRC DST` per line, # comments and blank lines ignored."""
    lines = read_user_file(path, "pairs file").decode("utf-8", "replace").splitlines()
    pairs: List[Tuple[str, str]] = []
    for n, line in enumerate(lines, 1):
        fields = line.split("#", 1)[0].split()
        if not fields:
            continue
        if len(fields) != 2:
            raise InvalidInput(f"{path}:{n}: expected 'SOURCE DESTINATION'")
        pair = (host_name(fields[0]), host_name(fields[1]))
        if pair[0] == pair[1]:
            raise InvalidInput(f"{path}:{n}: source and destination are the same host")
        if pair not in pairs:
            pairs.append(pair)
    if not pairs:
        raise InvalidInput(f"pairs file {path} lists no pair")
    return pairs
