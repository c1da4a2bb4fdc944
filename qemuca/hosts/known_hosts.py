"""known_hosts as OpenSSH keeps it, and OpenSSH's host-key policy.

paramiko applies no StrictHostKeyChecking, so the policy lives here: unknown and changed
keys are refused unless `accept_new` is set, which adds unknown keys and never accepts a
changed one (StrictHostKeyChecking in ssh_config is deliberately ignored: qemuca is
strict unless told otherwise on its own command line). Hashed entries, wildcards,
negations, @revoked and @cert-authority markers are read as OpenSSH reads them.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import re
import stat as stat_mod
import threading
from dataclasses import dataclass
from typing import List, NoReturn, Optional, Sequence, Tuple

import paramiko

from qemuca.errors import HostKeyError, InvalidInput, RemoteError
from qemuca.hosts.fs import LocalFS, make_dirs, read_user_file
from qemuca.hosts.ssh_config import HostTarget

MAX_KNOWN_HOSTS = 16 << 20
_KNOWN_HOSTS_LOCK = threading.Lock()


class HostKeyRefused(HostKeyError):
    """HostKeyError with what the admin needs to act on it: the offered key's fingerprint
    and the known_hosts line that would accept it."""

    def __init__(self, message: str, fingerprint: str, known_hosts_line: str):
        super().__init__(message)
        self.fingerprint, self.known_hosts_line = fingerprint, known_hosts_line


def fingerprint(blob: bytes) -> str:
    """OpenSSH's fingerprint of a key blob: SHA256:base64 without padding (what paramiko's
    PKey.fingerprint gives for a key it can load; known_hosts may hold types it cannot)."""
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


def _pattern_match(pattern: str, name: str) -> bool:
    if "*" not in pattern and "?" not in pattern:  # the common case, without a regex: every
        return pattern.lower() == name  # connection scans all of known_hosts
    rx = "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern.lower())
    return re.fullmatch(rx, name) is not None


@dataclass(frozen=True)
class KnownHost:
    """One key line of a known_hosts file."""

    path: str
    lineno: int
    hosts: str
    keytype: str
    blob: bytes
    marker: Optional[str] = None  # "@revoked", "@cert-authority" or None

    def matches(self, name: str) -> bool:
        """OpenSSH's rules: hashed entries, wildcards, and a matching `!pattern` vetoes."""
        name = name.lower()
        if self.hosts.startswith("|1|"):
            try:
                hashed = paramiko.HostKeys.hash_host(name, self.hosts)
            except (IndexError, ValueError, TypeError):  # a malformed |1|salt|hash entry
                return False
            return hmac.compare_digest(hashed, self.hosts)
        hit = False
        for pattern in self.hosts.split(","):
            if pattern.startswith("!"):
                if _pattern_match(pattern[1:], name):
                    return False
            elif _pattern_match(pattern, name):
                hit = True
        return hit


def read_known_hosts(path: str) -> List[KnownHost]:
    """The key lines of `path` (missing file: none); unparsable lines are skipped like ssh does."""
    try:
        if stat_mod.S_ISCHR(os.stat(path).st_mode):
            return []  # /dev/null (as in GlobalKnownHostsFile /dev/null) holds no key
    except FileNotFoundError:
        return []
    except OSError as e:
        raise InvalidInput(f"known_hosts {path}: {e.strerror}") from None
    lines = read_user_file(path, "known_hosts", MAX_KNOWN_HOSTS).decode("utf-8", "replace").splitlines()
    entries = []
    for n, line in enumerate(lines, 1):
        fields = line.split()
        if not fields or fields[0].startswith("#"):
            continue
        marker = fields.pop(0) if fields[0].startswith("@") else None
        if len(fields) < 3:
            continue
        try:
            blob = base64.b64decode(fields[2], validate=True)
        except ValueError:
            continue
        entries.append(KnownHost(path, n, fields[0], fields[1], blob, marker))
    return entries


def known_hosts_line(name: str, keytype: str, blob: bytes, hashed: bool = False) -> str:
    host = paramiko.HostKeys.hash_host(name.lower()) if hashed else name
    return f"{host} {keytype} {base64.b64encode(blob).decode()}"


def host_key_status(entries: Sequence[KnownHost], name: str, keytype: str,
                    blob: bytes) -> Tuple[str, Optional[KnownHost]]:
    """Decide like OpenSSH: ("ok" | "revoked" | "changed" | "other-type" | "unknown", entry).

    "other-type": only keys of other types are known. The tool asks the server for a known
    type first, so this means the known key is gone: refused like a changed key.
    """
    ours = [e for e in entries if e.marker != "@cert-authority" and e.matches(name)]
    for e in ours:
        if e.marker == "@revoked" and e.blob == blob:
            return "revoked", e
    plain = [e for e in ours if e.marker is None]
    for e in plain:
        if e.keytype == keytype and e.blob == blob:
            return "ok", e
    for e in plain:
        if e.keytype == keytype:
            return "changed", e
    return ("other-type", plain[0]) if plain else ("unknown", None)


def known_entries(target: HostTarget) -> List[KnownHost]:
    return [e for p in target.known_hosts_files + target.global_known_hosts_files
            for e in read_known_hosts(p)]


def _add_known_host(path: str, line: str, hashed_default: bool, name: str) -> None:
    """Append one line to `path`, atomically (temp file + rename), keeping its mode."""
    path = os.path.realpath(path)
    st = os.stat(path) if os.path.exists(path) else None
    if st is not None and not stat_mod.S_ISREG(st.st_mode):
        return  # e.g. UserKnownHostsFile /dev/null: accepted, nowhere to remember it
    old = LocalFS().read_bytes(path).decode("utf-8", "replace") if st else ""
    if hashed_default or "|1|" in old:
        keytype, b64 = line.split()[1:3]
        line = known_hosts_line(name, keytype, base64.b64decode(b64), hashed=True)
    if old and not old.endswith("\n"):
        old += "\n"
    make_dirs(os.path.dirname(path), 0o700)
    LocalFS().write_atomic(path, (old + line + "\n").encode(), stat_mod.S_IMODE(st.st_mode) if st else 0o600)


def check_host_key(target: HostTarget, key: paramiko.PKey, accept_new: bool = False) -> None:
    """Accept the server's key or raise HostKeyError; with accept_new, remember an unknown one."""
    name, keytype, blob = target.known_hosts_name, key.get_name(), key.asbytes()
    fp = f"{keytype} {fingerprint(blob)}"
    line = known_hosts_line(name, keytype, blob)
    where = target.known_hosts_files[0] if target.known_hosts_files else "known_hosts"

    def refuse(status: str, entry: Optional[KnownHost]) -> NoReturn:
        if status == "unknown" or entry is None:  # no entry: only ever "unknown"
            msg = (f"host key for {name} is unknown: {fp}. If that is the host's key, add this "
                   f"line to {where}: {line} (or connect once with --accept-new-host-key)")
        elif status == "revoked":
            msg = f"host key {fp} for {name} is revoked ({entry.path}:{entry.lineno})"
        else:
            old = f"{entry.keytype} {fingerprint(entry.blob)}"
            msg = (f"HOST KEY CHANGED for {name}: it offers {fp}, {entry.path}:{entry.lineno} has "
                   f"{old}. Someone could be intercepting the connection; if the change is expected, "
                   f"remove the old key (ssh-keygen -R '{name}' -f {entry.path}) and add: {line}")
        raise HostKeyRefused(f"{target.alias}: {msg}", fingerprint(blob), line)

    status, entry = host_key_status(known_entries(target), name, keytype, blob)
    if status == "ok":
        return
    if status != "unknown" or not accept_new or not target.known_hosts_files:
        refuse(status, entry)
    with _KNOWN_HOSTS_LOCK:  # parallel hosts in one process: re-read under the lock
        status, entry = host_key_status(known_entries(target), name, keytype, blob)
        if status == "unknown":
            try:
                _add_known_host(where, line, target.hash_known_hosts, name)
            except OSError as e:
                raise RemoteError(f"{target.alias}: cannot add host key to {where}: {e.strerror}") from None
        elif status != "ok":
            refuse(status, entry)
