"""A host's QEMU credential set: the files QEMU reads from its cert dir, with their bytes.

QEMU's tls-creds-x509 object reads, from one directory: ca-cert.pem (the CA
bundle), server-cert.pem + server-key.pem (as migration destination),
client-cert.pem + client-key.pem (as source) and, optionally, ca-crl.pem. One
certificate serves both roles, so the client files hold the same bytes as the
server ones.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Dict, Optional

CA_BUNDLE = "ca-cert.pem"
SERVER_CERT = "server-cert.pem"
SERVER_KEY = "server-key.pem"
CLIENT_CERT = "client-cert.pem"
CLIENT_KEY = "client-key.pem"
CRL = "ca-crl.pem"
ALL_FILES = (CA_BUNDLE, SERVER_CERT, SERVER_KEY, CLIENT_CERT, CLIENT_KEY, CRL)
KEY_FILES = (SERVER_KEY, CLIENT_KEY)


@dataclass(frozen=True)
class Modes:
    """Owner and modes of a placed set; None owner ids mean "whoever writes"."""

    cert: int = 0o644
    key: int = 0o600
    directory: int = 0o755
    uid: Optional[int] = None
    gid: Optional[int] = None

    def of(self, name: str) -> int:
        return self.key if name in KEY_FILES else self.cert


# export: files for the user running qemuca; deploy: root:<qemu group>, keys 0640.
EXPORT_MODES = Modes()


def host_modes(gid: int) -> Modes:
    return Modes(cert=0o644, key=0o640, directory=0o755, uid=0, gid=gid)


@dataclass(frozen=True)
class CredentialSet:
    host: str
    fingerprint_sha256: str
    files: Dict[str, bytes] = field(repr=False)

    @classmethod
    def build(cls, host: str, fingerprint_sha256: str, ca_bundle: bytes, cert: bytes,
              key: bytes, crl: Optional[bytes] = None) -> "CredentialSet":
        files = {CA_BUNDLE: ca_bundle, SERVER_CERT: cert, SERVER_KEY: key,
                 CLIENT_CERT: cert, CLIENT_KEY: key}
        if crl:
            files[CRL] = crl
        return cls(host, fingerprint_sha256, files)

    def digests(self) -> Dict[str, str]:
        return {name: hashlib.sha256(data).hexdigest() for name, data in sorted(self.files.items())}

    @property
    def set_id(self) -> str:
        """Content address: the same files give the same id, which makes re-placing a no-op."""
        text = json.dumps({"host": self.host, "files": self.digests()}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def manifest(self, created: str) -> bytes:
        return json.dumps({"host": self.host, "fingerprint_sha256": self.fingerprint_sha256,
                           "files": self.digests(), "created": created},
                          indent=2, sort_keys=True).encode() + b"\n"
