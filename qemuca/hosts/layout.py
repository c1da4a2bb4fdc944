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

DEFAULT_CERT_DIR = "/etc/pki/qemu"  # where libvirt (default_tls_x509_cert_dir) and qemuca look

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


# Inside a set directory the client files are links to the server ones: one
# certificate and one key serve both roles, and a key made on the host is moved in
# once, never copied.
CLIENT_LINKS = {CLIENT_CERT: SERVER_CERT, CLIENT_KEY: SERVER_KEY}


@dataclass(frozen=True)
class CredentialSet:
    """The bytes of each layout name as QEMU reads them (client files = server files).

    `key_on_host` names a key file already staged on the target (enroll: made there,
    never sent); the set then holds no key bytes.
    """

    host: str
    fingerprint_sha256: str
    files: Dict[str, bytes] = field(repr=False)
    key_on_host: Optional[str] = None

    @classmethod
    def build(cls, host: str, fingerprint_sha256: str, ca_bundle: bytes, cert: bytes,
              key: Optional[bytes], crl: Optional[bytes] = None,
              key_on_host: Optional[str] = None) -> CredentialSet:
        files = {CA_BUNDLE: ca_bundle, SERVER_CERT: cert, CLIENT_CERT: cert}
        if key is not None:
            files.update({SERVER_KEY: key, CLIENT_KEY: key})
        elif key_on_host is None:
            raise ValueError("a credential set needs its key's bytes or its place on the host")
        if crl:
            files[CRL] = crl
        return cls(host, fingerprint_sha256, files, key_on_host)

    @property
    def names(self) -> frozenset:
        """Every layout name the set provides."""
        return frozenset(self.files) | (frozenset(KEY_FILES) if self.key_on_host else frozenset())

    def digests(self) -> Dict[str, str]:
        return {name: hashlib.sha256(data).hexdigest() for name, data in sorted(self.files.items())}

    @property
    def set_id(self) -> str:
        """Content address: the same files give the same id, which makes re-placing a no-op.

        The key is left out: the certificate binds its public key, so the same
        certificate means the same key, wherever the key was made.
        """
        digests = {n: d for n, d in self.digests().items() if n not in KEY_FILES}
        text = json.dumps({"host": self.host, "files": digests}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def manifest(self, created: str) -> bytes:
        return json.dumps({"host": self.host, "fingerprint_sha256": self.fingerprint_sha256,
                           "files": self.digests(), "created": created},
                          indent=2, sort_keys=True).encode() + b"\n"
