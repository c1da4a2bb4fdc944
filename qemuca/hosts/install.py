"""Place a credential set into a cert dir on any FS, switching it in atomically.

Layout inside the cert dir (every path stays inside it, as Debian's AppArmor
profile for QEMU only allows reads under /etc/pki/qemu/**):

    .qemuca/sets/<id>/...       one directory per credential set, files with final modes;
                                client-*.pem are links to server-*.pem inside it
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
import secrets
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

from qemuca.errors import Conflict, InvalidInput, NotFound, QemucaError
from qemuca.hosts.certdir import resolve_inside, unsafe_dir
from qemuca.hosts.fs import FS, TEMP_MARK
from qemuca.hosts.layout import ALL_FILES, CLIENT_LINKS, KEY_FILES, SERVER_KEY, CredentialSet, Modes

STATE_DIR = ".qemuca"
SETS = "sets"
CURRENT = "current"
PREVIOUS = "previous"
MANIFEST = "manifest.json"
STAGING_PREFIX = "staging-"  # sets/staging-*: where enroll makes a key on the host
# An enroll takes seconds: a staging dir this old was left by an interrupted one, and holds
# a private key nobody will use. A day's margin also covers a host clock that is off.
STAGING_MAX_AGE_S = 24 * 3600


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

    def scan(self) -> Dict[str, Optional[str]]:
        """The layout names present in the dir: name -> link target (None: not a link)."""
        found: Dict[str, Optional[str]] = {}
        for name in ALL_FILES:
            path = posixpath.join(self.path, name)
            st = self.fs.stat(path, follow=False)
            if st is not None:
                found[name] = self.fs.readlink(path) if st.is_link else None
        return found

    def foreign_names(self, scan: Optional[Dict[str, Optional[str]]] = None) -> List[str]:
        """Layout names present in the dir that are not qemuca's links."""
        scan = self.scan() if scan is None else scan
        return [n for n in ALL_FILES if n in scan and scan[n] != link_target(n)]

    def set_names(self, set_id: str) -> List[str]:
        """The layout names a stored set holds (files or in-set links)."""
        return [n for n in self.fs.listdir(posixpath.join(self.sets, set_id)) if n in ALL_FILES]

    def set_files(self, set_id: str, keys: bool = True) -> Dict[str, bytes]:
        """The bytes of a stored set's names (keys left out unless asked: they may be
        keys that were made on the host and must not travel)."""
        directory = posixpath.join(self.sets, set_id)
        return {n: self.fs.read_bytes(posixpath.join(directory, n)) for n in self.set_names(set_id)
                if keys or n not in KEY_FILES}

    def set_intact(self, creds: CredentialSet, modes: Modes) -> bool:
        """The stored set is exactly `creds`: files, in-set links, modes and owners."""
        directory = posixpath.join(self.sets, creds.set_id)
        if self.fs.stat(directory) is None or set(self.set_names(creds.set_id)) != set(creds.names):
            return False
        for name in creds.names:
            path = posixpath.join(directory, name)
            st = self.fs.stat(path, follow=False)
            if name in CLIENT_LINKS:
                if st is None or not st.is_link or self.fs.readlink(path) != CLIENT_LINKS[name]:
                    return False
                continue
            if st is None or not st.is_file or st.perms != modes.of(name):
                return False
            if (modes.uid is not None and st.uid != modes.uid) or \
                    (modes.gid is not None and st.gid != modes.gid):
                return False
            if name in creds.files and _sha(self.fs.read_bytes(path)) != _sha(creds.files[name]):
                return False
        return True

    def links_match(self, names, scan: Optional[Dict[str, Optional[str]]] = None) -> bool:
        """Exactly `names` are present, each as qemuca's link."""
        scan = self.scan() if scan is None else scan
        return set(scan) == set(names) and all(scan[n] == link_target(n) for n in names)

    def landed_as(self, creds: CredentialSet) -> bool:
        """Every name of the set resolves, with the expected bytes where they are known;
        no other layout name resolves."""
        for name in ALL_FILES:
            path = posixpath.join(self.path, name)
            if name in creds.files:
                try:
                    if _sha(self.fs.read_bytes(path)) != _sha(creds.files[name]):
                        return False
                except FileNotFoundError:  # missing, or a link that dangles
                    return False
            elif (self.fs.stat(path) is not None) != (name in creds.names):
                return False
        return True


def _unchanged(target: CertDir, creds: CredentialSet, modes: Modes,
               scan: Optional[Dict[str, Optional[str]]] = None) -> bool:
    return (target.current_id() == creds.set_id and target.links_match(creds.names, scan)
            and target.set_intact(creds, modes))


def plan(fs: FS, cert_dir: str, creds: CredentialSet, modes: Modes) -> InstallResult:
    """What install would do, without writing anything (for --dry-run)."""
    target = CertDir(fs, cert_dir)
    result = InstallResult(changed=False, set_id=creds.set_id)
    exists = fs.stat(cert_dir) is not None
    if not exists:
        result.actions.append(f"create {cert_dir} (mode {modes.directory:04o})")
    elif _unchanged(target, creds, modes):
        return result
    result.changed = True
    result.previous_id = target.current_id() if exists else None
    result.adopted = target.foreign_names() if exists else []
    current: Dict[str, bytes] = {}
    if result.previous_id:
        try:
            current = target.set_files(result.previous_id, keys=creds.key_on_host is None)
        except OSError:
            current = {}
    for name in sorted(creds.names):
        if name not in creds.files:
            verb = "add (made on the host)"
        elif name not in current:
            verb = "add"
        elif _sha(current[name]) != _sha(creds.files[name]):
            verb = "replace"
        else:
            verb = "keep"
        result.actions.append(f"{verb} {name} (mode {modes.of(name):04o})")
    for name in sorted(set(current) - set(creds.names)):
        result.actions.append(f"remove {name}")
    return result


def prepare(fs: FS, cert_dir: str, modes: Modes) -> CertDir:
    """The cert dir, created when missing; on a host (root-owned placement) refused when
    it or a directory above it could be changed by someone other than root."""
    if modes.uid == 0:
        check_secure(fs, posixpath.dirname(posixpath.normpath(cert_dir)))
    st = fs.stat(cert_dir)
    if st is None:
        fs.makedirs(cert_dir, modes.directory)
        if modes.uid is not None:
            fs.chown(cert_dir, modes.uid, 0)
    elif not st.is_dir:
        raise Conflict(f"{cert_dir} exists and is not a directory")
    target = CertDir(fs, cert_dir)
    if modes.uid == 0:
        for path in (cert_dir, target.state, target.sets):
            check_secure(fs, path, parents=False)
    return target


def check_secure(fs: FS, path: str, parents: bool = True) -> None:
    """Refuse a directory that someone other than root could change (certdir.unsafe_dir,
    the rule verify applies too): whoever can write there can swap the links QEMU
    follows, or plant one to a root-only file. With `parents`, `path` is above the cert
    dir and so is each directory up to /: root-owned sticky ones are fine there."""
    cur = posixpath.normpath(path)
    while True:
        st = fs.stat(cur)
        problems = unsafe_dir(st, sticky_ok=parents) if st is not None else []
        if problems:
            raise InvalidInput(f"{cur}: {'; '.join(problems)}: anyone who can write there could swap the "
                               f"files QEMU reads; fix it first: chown root {cur} && chmod go-w {cur}")
        if not parents or cur == "/":
            return
        cur = posixpath.dirname(cur)


def make_staging(fs: FS, cert_dir: str, modes: Modes) -> str:
    """A fresh directory only its owner can enter, inside the cert dir's state, where a
    key can be made on the host and later moved into its set (same file system)."""
    target = prepare(fs, cert_dir, modes)
    if target.foreign_names():
        _sources(target)  # a planted link is refused before anything is created
    fs.makedirs(target.sets, 0o755)
    path = posixpath.join(target.sets, STAGING_PREFIX + secrets.token_hex(6))
    fs.makedirs(path, 0o700)
    fs.chmod(path, 0o700)
    return path


def install(fs: FS, cert_dir: str, creds: CredentialSet, modes: Modes, force: bool = False,
            now: Optional[Callable[[], dt.datetime]] = None) -> InstallResult:
    """Stage, read back, switch, read back again; foreign files need `force`."""
    target = prepare(fs, cert_dir, modes)
    names = target.scan()
    foreign = target.foreign_names(names)
    sources = _sources(target) if foreign else {}  # a planted link is refused, with or without --force
    if foreign and not force:
        raise Conflict(f"{cert_dir} holds files qemuca did not write ({', '.join(foreign)}); "
                       "use --force to replace them (they are kept for rollback)")
    set_id = creds.set_id
    if not foreign and _unchanged(target, creds, modes, names):
        _finish_clean_up(target)
        return InstallResult(changed=False, set_id=set_id, previous_id=target.previous_id())
    fs.makedirs(target.sets, 0o755)

    stamp = (now or (lambda: dt.datetime.now(dt.timezone.utc)))().strftime("%Y-%m-%dT%H:%M:%SZ")
    _write_set(target, creds, modes, creds.manifest(stamp))
    old_id = target.current_id()
    if foreign:
        # What QEMU reads now becomes a set of ours, `current` points at it, and the
        # foreign names become links to the same bytes: nothing changes for QEMU yet.
        old_id = _adopt(target, stamp, sources)
        _point(target, CURRENT, old_id)

    # Every name the new set has links into `current` before the switch (a new name
    # dangles until then, which QEMU takes as absent), so one rename switches them all.
    _add_links(target, creds.names, None if foreign else names)
    if old_id and old_id != set_id:
        _point(target, PREVIOUS, old_id)  # harmless alone
    _point(target, CURRENT, set_id)  # the switch
    try:
        _remove_stale_links(target, creds.names)
        if not target.landed_as(creds):
            raise InstallError(f"{cert_dir}: the files read back differ from what was written; "
                               "the previous set is in use")
    except BaseException:
        if old_id and old_id != set_id:
            try:
                _switch(target, old_id)
            except Exception:  # the first error is the one to report
                pass
        raise
    try:
        _collect_garbage(target)
    except OSError:  # leftovers cost disk space only; the next install retries
        pass
    return InstallResult(changed=True, set_id=set_id, previous_id=old_id,
                         adopted=foreign, actions=[f"switched to set {set_id}"])


def _point(target: CertDir, which: str, set_id: str) -> None:
    target.fs.symlink_atomic(posixpath.join(SETS, set_id), posixpath.join(target.state, which))


def _write_set(target: CertDir, creds: CredentialSet, modes: Modes, manifest: bytes) -> None:
    fs = target.fs
    directory = posixpath.join(target.sets, creds.set_id)
    fs.makedirs(directory, modes.directory)
    fs.chmod(directory, modes.directory)
    real = {n: d for n, d in creds.files.items() if n not in CLIENT_LINKS}
    for name, data in real.items():
        fs.write_atomic(posixpath.join(directory, name), data, modes.of(name), modes.uid, modes.gid)
    if creds.key_on_host:
        # Final owner and mode while the key is still in its 0700 staging directory;
        # only then does it move where others can traverse.
        if modes.uid is not None and modes.gid is not None:
            fs.chown(creds.key_on_host, modes.uid, modes.gid)
        fs.chmod(creds.key_on_host, modes.of(SERVER_KEY))
        fs.rename(creds.key_on_host, posixpath.join(directory, SERVER_KEY))
    for name, source in CLIENT_LINKS.items():
        fs.symlink_atomic(source, posixpath.join(directory, name))
    for name in fs.listdir(directory):  # leftovers of an interrupted attempt at this set
        if (name in ALL_FILES and name not in creds.names) or TEMP_MARK in name:
            fs.remove(posixpath.join(directory, name))
    fs.write_atomic(posixpath.join(directory, MANIFEST), manifest, 0o644, modes.uid, modes.gid)
    for name, data in real.items():
        if _sha(fs.read_bytes(posixpath.join(directory, name))) != _sha(data):
            raise InstallError(f"{directory}/{name} did not read back as written")


def _adopt(target: CertDir, stamp: str, sources: Dict[str, str]) -> str:
    """Keep what QEMU reads now (copied on the place, with modes) as a set for rollback.

    Every layout name is copied, not only the foreign ones: a dir mixing foreign
    files with qemuca's links must roll back to that whole mix (rollback removes the
    names a set does not hold). The copy happens on the place itself, so a key that
    was there never travels.
    """
    fs = target.fs
    set_id = "adopted-" + stamp.replace(":", "").replace("-", "")
    directory = posixpath.join(target.sets, set_id)
    fs.makedirs(directory, 0o755)
    for name, path in sources.items():  # _sources(): resolved, and checked, before any write
        fs.copy(path, posixpath.join(directory, name))
    return set_id


def _sources(target: CertDir) -> Dict[str, str]:
    """The regular file each layout name gives QEMU now, every link resolved inside the
    dir; a link leading out (planted, to a root-only file) is refused, never copied."""
    fs, out = target.fs, {}
    for name in ALL_FILES:
        if fs.stat(posixpath.join(target.path, name), follow=False) is None:
            continue
        path, why = resolve_inside(fs, target.path, name)
        if path is None and why is not None and why.startswith("missing"):
            continue  # a dangling link: QEMU sees no file there either
        if path is None:
            raise InvalidInput(f"{target.path}/{name} {why}: qemuca never copies such a file into a set "
                               "QEMU's group can read; remove it (or make it a file in the dir) and retry")
        st = fs.stat(path, follow=False)
        if st is not None and st.is_file:
            out[name] = path
    return out


def _add_links(target: CertDir, names, scan: Optional[Dict[str, Optional[str]]] = None) -> None:
    """Each layout name of the set becomes a link into `current` (foreign files replaced).
    `scan`: the names as CertDir.scan() found them, when nothing has changed them since."""
    scan = target.scan() if scan is None else scan
    for name in sorted(names):
        if scan.get(name) != link_target(name):
            target.fs.symlink_atomic(link_target(name), posixpath.join(target.path, name))


def _remove_stale_links(target: CertDir, names) -> None:
    """Layout names the set does not hold (a CRL no longer needed) go, after the switch."""
    for name in ALL_FILES:
        path = posixpath.join(target.path, name)
        if name not in names and target.fs.stat(path, follow=False) is not None:
            target.fs.remove(path)


def _switch(target: CertDir, set_id: str) -> None:
    names = target.set_names(set_id)
    _add_links(target, names)
    _point(target, CURRENT, set_id)
    _remove_stale_links(target, names)


def _garbage(target: CertDir) -> List[str]:
    """Sets other than current and previous, and staging dirs interrupted enrolls left.
    (The kept sets hold no leftovers: _write_set cleared the current one before the
    switch, and the previous one was cleared when it was current.)"""
    fs = target.fs
    keep = {target.current_id(), target.previous_id()}
    out = []
    for name in fs.listdir(target.sets):
        if name.startswith(STAGING_PREFIX):
            st = fs.stat(posixpath.join(target.sets, name), follow=False)
            if st is not None and time.time() - st.mtime > STAGING_MAX_AGE_S:
                out.append(name)  # else maybe an enroll running now
        elif name not in keep:
            out.append(name)
    return out


def _collect_garbage(target: CertDir, garbage: Optional[List[str]] = None) -> None:
    """Remove the garbage sets and the temp files an interrupted run left."""
    for name in _garbage(target) if garbage is None else garbage:
        target.fs.rmtree(posixpath.join(target.sets, name))
    _remove_temp_files(target.fs, target.state)
    _remove_temp_files(target.fs, target.path)


def _finish_clean_up(target: CertDir) -> None:
    """A run cut off after its switch never removed the old sets (they hold old keys):
    a later run that finds the set in place removes them. One listing when clean."""
    try:
        garbage = _garbage(target)
        if garbage:
            _collect_garbage(target, garbage)
    except OSError:  # leftovers cost disk space only
        pass


def _remove_temp_files(fs: FS, directory: str) -> None:
    for name in fs.listdir(directory):
        if TEMP_MARK in name:
            fs.remove(posixpath.join(directory, name))


def rollback(fs: FS, cert_dir: str) -> InstallResult:
    """Switch back to the previous set (and make the current one the previous).

    `current` moves first: interrupted between the two pointer writes, the host uses
    the set it is switched back to (both pointers name it). The other order would
    leave both naming the set switched away from, and the next install would delete
    the set this rollback was for.
    """
    target = CertDir(fs, cert_dir)
    current, previous = target.current_id(), target.previous_id()
    if previous is None or fs.stat(posixpath.join(target.sets, previous)) is None:
        raise NotFound(f"{cert_dir} has no previous credential set to roll back to")
    _switch(target, previous)
    if current:
        _point(target, PREVIOUS, current)
    return InstallResult(changed=True, set_id=previous, previous_id=current,
                         actions=[f"switched back to set {previous}"])
