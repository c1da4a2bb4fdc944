"""What verify reports, the options it takes, and what the CA store tells it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

from cryptography import x509

from qemuca.errors import InvalidInput
from qemuca.findings import FAIL, Finding, Outcome
from qemuca.hosts import qemuconf
from qemuca.hosts.fs import FS
from qemuca.hosts.layout import (
    DEFAULT_CERT_DIR,
)
from qemuca.hosts.runner import Runner
from qemuca.pki.ca import CertificateAuthority
from qemuca.pki.certinfo import read_pem_blocks

DEFAULT_WARN_DAYS = 30
CRL_WARN_DAYS = 7  # a CRL is re-signed every 30 days by default: warn in its last week
LIBVIRT_CA = "/etc/pki/CA/cacert.pem"
LIBVIRT_CERTS = ("/etc/pki/libvirt/servercert.pem", "/etc/pki/libvirt/clientcert.pem")
DEFAULT_PORT = 49152  # first port of libvirt's migration range: same firewall path
HANDSHAKE_TIMEOUT = 15.0


@dataclass
class HostReport(Outcome):
    """Every check on one host; `error` when the host could not be reached."""

    host: str
    findings: List[Finding] = field(default_factory=list)
    error: Optional[str] = None
    exit_code: Optional[int] = None  # the error's exit code (unreachable host)

    def as_dict(self) -> dict:
        return {"host": self.host, "result": self.result.value, "error": self.error,
                "checks": [f.as_dict() for f in self.findings]}


@dataclass
class PairReport(Outcome):
    source: str
    destination: str
    tls_destination: Optional[str] = None
    findings: List[Finding] = field(default_factory=list)
    error: Optional[str] = None
    exit_code: Optional[int] = None

    @property
    def host(self) -> str:
        return f"{self.source} -> {self.destination}"

    def as_dict(self) -> dict:
        return {"source": self.source, "destination": self.destination,
                "tls_destination": self.tls_destination, "result": self.result.value,
                "error": self.error, "checks": [f.as_dict() for f in self.findings]}


CONNECTION_FIX = "check the host, ssh_config and known_hosts"


def unreachable(host: str, text: str, code: Optional[int]) -> HostReport:
    """The report of a host that could not be reached or was lost on the way
    (text and code from ops.fleet.failure)."""
    return HostReport(host, [Finding("connection", FAIL, text, CONNECTION_FIX)], error=text, exit_code=code)


@dataclass(frozen=True)
class VerifyOptions:
    cert_dir: str = DEFAULT_CERT_DIR
    qemu_conf_path: str = qemuconf.DEFAULT_PATH
    group: Optional[str] = None  # None: as deploy resolves it (qemu.conf, qemu, libvirt-qemu)
    hostname: Optional[str] = None  # None: `hostname -f` on the host
    warn_days: int = DEFAULT_WARN_DAYS
    # Host paths, overridable so that tests can point them into a temporary dir.
    libvirt_ca: str = LIBVIRT_CA
    libvirt_certs: Tuple[str, ...] = LIBVIRT_CERTS
    run_dir: str = "/run"
    proc: str = "/proc"

    def validate(self) -> None:
        if not self.cert_dir.startswith("/"):
            raise InvalidInput(f"--cert-dir {self.cert_dir!r} must be an absolute path")
        if self.warn_days < 0:
            raise InvalidInput("--warn-days must not be negative")


@dataclass(frozen=True)
class Reference:
    """What the CA store knows, read once in the calling thread (SQLite stays there)."""

    trusted: Tuple[x509.Certificate, ...]  # the CAs hosts must trust (two during a rollover)
    crls: Tuple[x509.CertificateRevocationList, ...]  # the store's crl.pem (one CRL per CA)
    deployed: Dict[str, Tuple[str, str]]  # host -> (fingerprint, time) of the last deploy
    bundles: Dict[str, Optional[str]]  # host -> sha256 of the ca-cert.pem last deployed
    index: Dict[str, Tuple[str, str, str]]  # fingerprint -> (host, status, serial)
    current: Dict[str, str]  # host -> fingerprint of its valid certificate

    @property
    def ca_cert(self) -> x509.Certificate:
        return self.trusted[0]

    @classmethod
    def from_store(cls, store) -> Reference:
        authority = CertificateAuthority(store)
        crls: List[x509.CertificateRevocationList] = []
        try:
            data = store.fs.read_bytes(store.crl_path)
            crls = [x509.load_pem_x509_crl(b) for label, b in read_pem_blocks(data, store.crl_path)
                    if label == "X509 CRL"]
        except FileNotFoundError:
            pass
        except (ValueError, InvalidInput):
            raise InvalidInput(f"the store's CRL {store.crl_path} is corrupt: run 'qemuca crl'") from None
        records = store.certificates()
        bundles = store.deployed_bundles() if hasattr(store, "deployed_bundles") else {}
        return cls(tuple(s.cert for s in authority.trusted()), tuple(crls), store.deployed(), bundles,
                   {r.fingerprint_sha256: (r.host, r.status, r.serial) for r in records},
                   {r.host: r.fingerprint_sha256 for r in records if r.status == "valid"})


@dataclass
class Side:
    """One host of a pair: its name (as qemuca calls it), FS and command runner."""

    name: str
    fs: FS
    runner: Runner


@dataclass(frozen=True)
class PairOptions:
    cert_dir: str = DEFAULT_CERT_DIR
    tls_destination: Optional[str] = None  # None: the destination's `hostname -f`
    warn_days: int = DEFAULT_WARN_DAYS
    handshake: bool = False
    address: Optional[str] = None  # where the source connects (None: the TLS name)
    port: int = DEFAULT_PORT
    timeout: float = HANDSHAKE_TIMEOUT
