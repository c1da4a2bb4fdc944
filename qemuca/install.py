"""Place a credential set into a cert dir on any FS, switching it in atomically.

Layout inside the cert dir (every path stays inside it, as Debian's AppArmor
profile for QEMU only allows reads under /etc/pki/qemu/**):

    .qemuca/sets/<id>/...       one directory per credential set, files with final modes
    .qemuca/sets/<id>/manifest.json
    .qemuca/current -> sets/<id>          the set QEMU uses
    .qemuca/previous -> sets/<old id>     kept for rollback
    ca-cert.pem -> .qemuca/current/ca-cert.pem   (and every other layout name)

A new set is written and read back before one rename of `current` switches every
name at once; a reader sees the whole old set or the whole new one. Placing the
set that is already current changes nothing. The same code serves `export`
(LocalFS) and `deploy` (RemoteFS over SFTP).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import posixpath
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

from qemuca.errors import Conflict, NotFound, QemucaError
from qemuca.fs import FS
from qemuca.layout import ALL_FILES, CredentialSet, Modes

STATE_DIR = ".qemuca"
SETS = "sets"
CURRENT = "current"
PREVIOUS = "previous"
MANIFEST = "manifest.json"


class InstallError(QemucaError):
    """The placed files did not read back as written; the previous set stays in use."""


@dataclass
class InstallResult:
    changed: bool
    set_id: str
    previous_id: Optional[str] = None
    adopted: List[str] = field(default_factory=list)  # foreign files kept in a set
    actions: List[str] = field(default_factory=list)  # what changed, for people


def link_target(name: str) -> str:
    return posixpath.join(STATE_DIR, CURRENT, name)


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class CertDir:
    """A cert dir on some FS, with the state qemuca keeps inside it."""

    def __init__(self, fs: FS, path: str):
        self.fs = fs
        self.path = path.rstrip("/") or "/"
        self.state = posixpath.join(self.path, STATE_DIR)
        self.sets = posixpath.join(self.state, SETS)

    def _pointer(self, which: str) -> Optional[str]:
        link = posixpath.join(self.state, which)
        if self.fs.stat(link, follow=False) is None:
            return None
        return posixpath.basename(self.fs.readlink(link).rstrip("/"))

    def current_id(self) -> Optional[str]:
        return self._pointer(CURRENT)

    def previous_id(self) -> Optional[str]:
        return self._pointer(PREVIOUS)

    def foreign_names(self) -> List[str]:
        """Layout names present in the dir that are not qemuca's links."""
        foreign = []
        for name in ALL_FILES:
            path = posixpath.join(self.path, name)
            st = self.fs.stat(path, follow=False)
            if st is None:
                continue
            if not (st.is_link and self.fs.readlink(path) == link_target(name)):
                foreign.append(name)
        return foreign

    def set_files(self, set_id: str) -> Dict[str, bytes]:
        """The layout files of a stored set."""
        directory = posixpath.join(self.sets, set_id)
        names = self.fs.listdir(directory)
        return {n: self.fs.read_bytes(posixpath.join(directory, n)) for n in names if n in ALL_FILES}

    def set_intact(self, creds: CredentialSet, modes: Modes) -> bool:
        directory = posixpath.join(self.sets, creds.set_id)
        for name, data in creds.files.items():
            path = posixpath.join(directory, name)
            st = self.fs.stat(path, follow=False)
            if st is None or not st.is_file or st.perms != modes.of(name):
                return False
            if (modes.uid is not None and st.uid != modes.uid) or \
                    (modes.gid is not None and st.gid != modes.gid):
                return False
            if _sha(self.fs.read_bytes(path)) != _sha(data):
                return False
        return True

    def links_match(self, names) -> bool:
        for name in ALL_FILES:
            path = posixpath.join(self.path, name)
            st = self.fs.stat(path, follow=False)
            wanted = name in names
            present = st is not None and st.is_link and self.fs.readlink(path) == link_target(name)
            if wanted != present or (not wanted and st is not None):
                return False
        return True

    def read_through_links(self) -> Dict[str, bytes]:
        out = {}
        for name in ALL_FILES:
            path = posixpath.join(self.path, name)
            if self.fs.stat(path) is not None:
                out[name] = self.fs.read_bytes(path)
        return out


def plan(fs: FS, cert_dir: str, creds: CredentialSet, modes: Modes) -> InstallResult:
    """What install would do, without writing anything (for --dry-run)."""
    target = CertDir(fs, cert_dir)
    result = InstallResult(changed=False, set_id=creds.set_id)
    if fs.stat(cert_dir) is None:
        result.actions.append(f"create {cert_dir} (mode {modes.directory:04o})")
    elif target.current_id() == creds.set_id and target.links_match(creds.files) \
            and target.set_intact(creds, modes):
        return result
    result.changed = True
    result.previous_id = target.current_id() if fs.stat(cert_dir) else None
    if fs.stat(cert_dir):
        result.adopted = target.foreign_names()
    current = {}
    if result.previous_id:
        try:
            current = target.set_files(result.previous_id)
        except OSError:
            current = {}
    for name, data in sorted(creds.files.items()):
        if name not in current:
            verb = "add"
        elif _sha(current[name]) != _sha(data):
            verb = "replace"
        else:
            verb = "keep"
        result.actions.append(f"{verb} {name} (mode {modes.of(name):04o})")
    for name in sorted(set(current) - set(creds.files)):
        result.actions.append(f"remove {name}")
    return result


def install(fs: FS, cert_dir: str, creds: CredentialSet, modes: Modes, force: bool = False,
            now: Optional[Callable[[], dt.datetime]] = None) -> InstallResult:
    """Stage, read back, switch, read back again; foreign files need `force`."""
    target = CertDir(fs, cert_dir)
    if fs.stat(cert_dir) is None:
        fs.makedirs(cert_dir, modes.directory)
        if modes.uid is not None:
            fs.chown(cert_dir, modes.uid, 0)
    elif not (fs.stat(cert_dir).is_dir):
        raise Conflict(f"{cert_dir} exists and is not a directory")
    foreign = target.foreign_names()
    if foreign and not force:
        raise Conflict(f"{cert_dir} holds files qemuca did not write ({', '.join(foreign)}); "
                       "use --force to replace them (they are kept for rollback)")
    set_id = creds.set_id
    old_id = target.current_id()
    if not foreign and old_id == set_id and target.links_match(creds.files) \
            and target.set_intact(creds, modes):
        return InstallResult(changed=False, set_id=set_id, previous_id=target.previous_id())

    stamp = (now or (lambda: dt.datetime.now(dt.timezone.utc)))().strftime("%Y-%m-%dT%H:%M:%SZ")
    fs.makedirs(target.sets, 0o755)
    _write_set(target, set_id, creds.files, modes, creds.manifest(stamp))
    if foreign:
        old_id = _adopt(target, foreign, stamp)

    # The switch: `previous` first (harmless alone), then one rename of `current`.
    if old_id and old_id != set_id:
        fs.symlink_atomic(posixpath.join(SETS, old_id), posixpath.join(target.state, PREVIOUS))
    fs.symlink_atomic(posixpath.join(SETS, set_id), posixpath.join(target.state, CURRENT))
    _sync_links(target, creds.files)

    landed = target.read_through_links()
    if {n: _sha(d) for n, d in landed.items()} != {n: _sha(d) for n, d in creds.files.items()}:
        raise InstallError(f"{cert_dir}: the files read back differ from what was written")
    _collect_garbage(target)
    return InstallResult(changed=True, set_id=set_id, previous_id=old_id,
                         adopted=foreign, actions=[f"switched to set {set_id}"])


def _write_set(target: CertDir, set_id: str, files: Dict[str, bytes], modes: Modes,
               manifest: bytes) -> None:
    fs = target.fs
    directory = posixpath.join(target.sets, set_id)
    fs.makedirs(directory, modes.directory)
    fs.chmod(directory, modes.directory)
    for name, data in files.items():
        fs.write_atomic(posixpath.join(directory, name), data, modes.of(name), modes.uid, modes.gid)
    for name in fs.listdir(directory):
        if name in ALL_FILES and name not in files:  # leftover of an interrupted attempt
            fs.remove(posixpath.join(directory, name))
    fs.write_atomic(posixpath.join(directory, MANIFEST), manifest, 0o644, modes.uid, modes.gid)
    for name, data in files.items():
        if _sha(fs.read_bytes(posixpath.join(directory, name))) != _sha(data):
            raise InstallError(f"{directory}/{name} did not read back as written")


def _adopt(target: CertDir, names: List[str], stamp: str) -> str:
    """Keep what QEMU reads now (copied with modes) as a set, so rollback restores it.

    Every layout name is copied, not only the foreign `names`: a dir mixing foreign
    files with qemuca's links must roll back to that whole mix, not to the foreign
    files alone (rollback removes the names a set does not hold).
    """
    fs = target.fs
    set_id = "adopted-" + stamp.replace(":", "").replace("-", "")
    directory = posixpath.join(target.sets, set_id)
    fs.makedirs(directory, 0o755)
    for name in ALL_FILES:
        path = posixpath.join(target.path, name)
        st = fs.stat(path)
        if st is None or not st.is_file:
            continue
        fs.write_atomic(posixpath.join(directory, name), fs.read_bytes(path), st.perms, st.uid, st.gid)
    return set_id


def _sync_links(target: CertDir, names) -> None:
    """Each layout name in the set links into `current`; the others are removed."""
    fs = target.fs
    for name in ALL_FILES:
        path = posixpath.join(target.path, name)
        st = fs.stat(path, follow=False)
        ours = st is not None and st.is_link and fs.readlink(path) == link_target(name)
        if name in names and not ours:
            fs.symlink_atomic(link_target(name), path)
        elif name not in names and st is not None:
            fs.remove(path)


def _collect_garbage(target: CertDir) -> None:
    keep = {target.current_id(), target.previous_id()}
    for name in target.fs.listdir(target.sets):
        if name not in keep:
            target.fs.rmtree(posixpath.join(target.sets, name))


def rollback(fs: FS, cert_dir: str) -> InstallResult:
    """Switch back to the previous set (and make the current one the previous)."""
    target = CertDir(fs, cert_dir)
    current, previous = target.current_id(), target.previous_id()
    if previous is None or fs.stat(posixpath.join(target.sets, previous)) is None:
        raise NotFound(f"{cert_dir} has no previous credential set to roll back to")
    names = target.set_files(previous)
    fs.symlink_atomic(posixpath.join(SETS, previous), posixpath.join(target.state, CURRENT))
    if current:
        fs.symlink_atomic(posixpath.join(SETS, current), posixpath.join(target.state, PREVIOUS))
    _sync_links(target, names)
    return InstallResult(changed=True, set_id=previous, previous_id=current,
                         actions=[f"switched back to set {previous}"])
