"""Reading a credential set off any place (this machine or a host over SFTP), as QEMU
would find it: each layout name resolved through its links, which must stay inside the
cert dir, then parsed. Nothing is written; every problem is kept for the report.
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes

from qemuca.errors import InvalidInput
from qemuca.hosts.fs import FileStat
from qemuca.hosts.layout import ALL_FILES, CA_BUNDLE, CLIENT_CERT, CRL, KEY_FILES, SERVER_CERT
from qemuca.pki.certinfo import load_certificates, read_pem_blocks


@dataclass
class Placed:
    """One layout name in the cert dir: where it leads and what it holds."""

    name: str
    path: str  # cert_dir/name
    resolved: Optional[str] = None  # the regular file it resolves to, inside the dir
    stat: Optional[FileStat] = None  # of `resolved`
    data: Optional[bytes] = None
    problem: Optional[str] = None  # missing, escapes the dir, not a regular file, unreadable


def inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def resolve_inside(fs, root: str, name: str, limit: int = 40) -> Tuple[Optional[str], Optional[str]]:
    """(path, None) when root/name resolves, every link on the way staying inside root;
    (None, why) otherwise. Each component is looked at, so a link to a directory counts."""
    root = posixpath.normpath(root)
    todo = [p for p in name.split("/") if p]
    cur, hops = root, 0
    while todo:
        part = todo.pop(0)
        if part == ".":
            continue
        nxt = posixpath.dirname(cur) if part == ".." else posixpath.join(cur, part)
        if not inside(nxt, root):
            return None, f"leads out of {root} (to {nxt})"
        st = fs.stat(nxt, follow=False)
        if st is None:
            return None, "missing" if cur == root else f"missing ({nxt} does not exist)"
        if st.is_link:
            hops += 1
            if hops > limit:
                return None, "too many levels of symbolic links"
            target = fs.readlink(nxt)
            base = "/" if target.startswith("/") else posixpath.dirname(nxt)
            joined = posixpath.normpath(posixpath.join(base, target))
            if not inside(joined, root):
                return None, f"is a link leading out of {root} (to {joined})"
            # Continue from the root with the rest of the path appended.
            rel = posixpath.relpath(joined, root)
            todo = [p for p in rel.split("/") if p and p != "."] + todo
            cur = root
            continue
        cur = nxt
    return cur, None


def read_placed(fs, cert_dir: str, name: str) -> Placed:
    placed = Placed(name, posixpath.join(cert_dir, name))
    try:
        path, why = resolve_inside(fs, cert_dir, name)
        if path is None:
            placed.problem = why
            return placed
        st = fs.stat(path, follow=False)
        if not st.is_file:
            placed.problem = f"{path} is not a regular file"
            return placed
        placed.resolved, placed.stat = path, st
        placed.data = fs.read_bytes(path)
    except OSError as e:
        placed.problem = f"cannot read it: {e.strerror or e}"
    return placed


@dataclass
class CertSet:
    """A cert dir's files, parsed; each parse problem kept for the report."""

    cert_dir: str
    exists: bool
    files: Dict[str, Placed]
    bundle: List[x509.Certificate] = field(default_factory=list)
    certs: Dict[str, x509.Certificate] = field(default_factory=dict)
    keys: Dict[str, PrivateKeyTypes] = field(default_factory=dict)
    crls: List[x509.CertificateRevocationList] = field(default_factory=list)
    parse_errors: Dict[str, str] = field(default_factory=dict)

    def present(self, name: str) -> bool:
        return self.files[name].data is not None


def read_set(fs, cert_dir: str) -> CertSet:
    """Every layout file of the cert dir, read through its links and parsed."""
    cert_dir = posixpath.normpath(cert_dir)
    st = fs.stat(cert_dir)
    cs = CertSet(cert_dir, bool(st and st.is_dir), {})
    for name in ALL_FILES:
        cs.files[name] = read_placed(fs, cert_dir, name) if cs.exists else Placed(name, posixpath.join(
            cert_dir, name), problem="missing")
    for name, placed in cs.files.items():
        if placed.data is None:
            continue
        try:
            if name == CA_BUNDLE:
                cs.bundle = load_certificates(placed.data, name)
            elif name in (SERVER_CERT, CLIENT_CERT):
                certs = load_certificates(placed.data, name)
                cs.certs[name] = certs[0]
                if len(certs) > 1:
                    cs.parse_errors[name] = (f"holds {len(certs)} certificates: the first is the host's, "
                                             "the others go to peers as its chain (qemuca writes one)")
            elif name in KEY_FILES:
                cs.keys[name] = load_key(placed.data, name)
            elif name == CRL:
                blocks = [b for label, b in read_pem_blocks(placed.data, name) if label == "X509 CRL"]
                if not blocks:
                    raise InvalidInput(f"{name} holds no CRL")
                cs.crls = [x509.load_pem_x509_crl(b) for b in blocks]
        except (InvalidInput, ValueError) as e:
            cs.parse_errors[name] = str(e) if isinstance(e, InvalidInput) else f"{name} is corrupt"
    return cs


def load_key(data: bytes, name: str) -> PrivateKeyTypes:
    try:
        return serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise InvalidInput(f"{name} is encrypted: QEMU needs a libvirt secret for it and qemuca "
                           "cannot check it") from None
    except Exception:  # ValueError, or a key type this cryptography cannot load
        raise InvalidInput(f"{name} holds no usable private key") from None


def unsafe_dir(st: FileStat, sticky_ok: bool = False) -> List[str]:
    """Why someone other than root could change a directory QEMU's files are reached
    through (empty: nobody can). `sticky_ok`: a root-owned sticky directory (/tmp) is
    fine, as nobody else may rename what root put there: true of a directory above the
    cert dir, never of the cert dir itself (others could add names to it)."""
    problems = []
    if st.uid != 0:
        problems.append(f"owner uid {st.uid}, not root")
    writable = st.perms & 0o022
    if writable and not (sticky_ok and st.uid == 0 and st.perms & 0o1000):
        who = {0o022: "group and others", 0o020: "group", 0o002: "others"}[writable]
        problems.append(f"mode {st.perms:04o}: writable by {who}")
    return problems


def dirs_between(cert_dir: str, path: str) -> List[str]:
    """The directories from cert_dir down to path's parent (whose modes guard the file)."""
    out, cur = [], posixpath.dirname(path)
    while inside(cur, cert_dir) and cur != cert_dir:
        out.append(cur)
        cur = posixpath.dirname(cur)
    return out


def read_certs(fs, path: str) -> Tuple[List[x509.Certificate], Optional[str]]:
    """The certificates of a PEM file on a place: ([], None) when it is absent, ([], why)
    when it cannot be read or parsed."""
    try:
        if fs.stat(path) is None:
            return [], None
        return load_certificates(fs.read_bytes(path), path), None
    except (InvalidInput, ValueError) as e:
        return [], str(e)
    except OSError as e:
        return [], f"{path}: {e.strerror or e}"
