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
from typing import Callable, Dict, List, Optional, Tuple

from qemuca.errors import Conflict, InvalidInput, NotFound, QemucaError
from qemuca.hosts.certdir import resolve_inside, unsafe_dir
from qemuca.hosts.fs import FS, TEMP_MARK, FileStat
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
    changed_dirs: List[str] = field(default_factory=list)  # whose entries changed (to fsync)


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
        self.sets_exist = False  # known once prepare() looked

    def make_sets(self) -> None:
        """The sets dir, unless prepare() found it."""
        if not self.sets_exist:
            self.fs.makedirs(self.sets, 0o755)
            self.sets_exist = True

    def _pointed(self, *pointers: str) -> List[Optional[str]]:
        """The set ids the pointers name (None: no such pointer), read in one batch."""
        found = self.fs.links([posixpath.join(self.state, p) for p in pointers])
        return [posixpath.basename(t.rstrip("/")) if t else None for t in found]

    def pointers(self) -> Tuple[Optional[str], Optional[str]]:
        """(current, previous)."""
        current, previous = self._pointed(CURRENT, PREVIOUS)
        return current, previous

    def current_id(self) -> Optional[str]:
        return self._pointed(CURRENT)[0]

    def scan(self) -> Dict[str, Optional[str]]:
        """The layout names present in the dir: name -> link target (None: not a link)."""
        found: Dict[str, Optional[str]] = {}
        for name, target in zip(ALL_FILES, self.fs.links([posixpath.join(self.path, n) for n in ALL_FILES])):
            if target is not None:
                found[name] = target or None  # NOT_A_LINK ("") -> None
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
        try:
            if set(self.set_names(creds.set_id)) != set(creds.names):
                return False
        except FileNotFoundError:
            return False
        names = sorted(creds.names)
        paths = [posixpath.join(directory, n) for n in names]
        links = [n for n in names if n in CLIENT_LINKS]
        targets = dict(zip(links, self.fs.links([posixpath.join(directory, n) for n in links])))
        if any(targets[n] != CLIENT_LINKS[n] for n in links):
            return False
        for name, st in zip(names, self.fs.stat_many(paths, follow=False)):
            if name in CLIENT_LINKS:
                continue
            if st is None or not st.is_file or st.perms != modes.of(name):
                return False
            if (modes.uid is not None and st.uid != modes.uid) or \
                    (modes.gid is not None and st.gid != modes.gid):
                return False
        known = [n for n in names if n in creds.files and n not in CLIENT_LINKS]
        got = self.fs.read_many([posixpath.join(directory, n) for n in known])
        return all(data is not None and _sha(data) == _sha(creds.files[n]) for n, data in zip(known, got))

    def links_match(self, names, scan: Optional[Dict[str, Optional[str]]] = None) -> bool:
        """Exactly `names` are present, each as qemuca's link."""
        scan = self.scan() if scan is None else scan
        return set(scan) == set(names) and all(scan[n] == link_target(n) for n in names)

    def landed_as(self, creds: CredentialSet) -> bool:
        """After the switch: `current` names the set, every name of the set resolves to
        a regular file of the size written and no other layout name resolves. (The bytes
        were read back in the set before the switch: one read-back pass.)"""
        if self.current_id() != creds.set_id:
            return False
        stats = self.fs.stat_many([posixpath.join(self.path, n) for n in ALL_FILES])
        for name, st in zip(ALL_FILES, stats):
            if name not in creds.names:
                if st is not None:
                    return False
            elif st is None or not st.is_file:  # missing, or a link that dangles
                return False
            elif name in creds.files and st.size != len(creds.files[name]):
                return False
        return True


def _unchanged(target: CertDir, creds: CredentialSet, modes: Modes, current: Optional[str],
               scan: Optional[Dict[str, Optional[str]]] = None) -> bool:
    """`current` names the set, the links are in place and the stored set is intact."""
    return (current == creds.set_id and target.links_match(creds.names, scan)
            and target.set_intact(creds, modes))


def plan(fs: FS, cert_dir: str, creds: CredentialSet, modes: Modes) -> InstallResult:
    """What install would do, without writing anything (for --dry-run)."""
    target = CertDir(fs, cert_dir)
    result = InstallResult(changed=False, set_id=creds.set_id)
    exists = fs.stat(cert_dir) is not None
    current_id = target.current_id() if exists else None
    if not exists:
        result.actions.append(f"create {cert_dir} (mode {modes.directory:04o})")
    elif _unchanged(target, creds, modes, current_id):
        return result
    result.changed = True
    result.previous_id = current_id
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
    it or a directory above it could be changed by someone other than root. The dirs
    are looked at in one batch: the cert dir, its state dirs, every dir above it."""
    target = CertDir(fs, cert_dir)
    above = _above(posixpath.dirname(posixpath.normpath(cert_dir)))
    own = [target.path, target.state, target.sets]
    stats = dict(zip(above + own, fs.stat_many(above + own)))
    if modes.uid == 0:
        check_secure(above, stats, parents=True)
    st = stats[target.path]
    if st is None:
        fs.makedirs(cert_dir, modes.directory)
        if modes.uid is not None:
            fs.chown(cert_dir, modes.uid, 0)
    elif not st.is_dir:
        raise Conflict(f"{cert_dir} exists and is not a directory")
    elif modes.uid == 0:
        check_secure(own, stats, parents=False)
    sets = stats[target.sets]
    target.sets_exist = sets is not None and sets.is_dir
    return target


def _above(path: str) -> List[str]:
    """`path` and each directory above it, up to /."""
    out = [posixpath.normpath(path)]
    while out[-1] != "/":
        out.append(posixpath.dirname(out[-1]))
    return out


def check_secure(paths: List[str], stats: Dict[str, Optional[FileStat]], parents: bool) -> None:
    """Refuse a directory that someone other than root could change (certdir.unsafe_dir,
    the rule verify applies too): whoever can write there can swap the links QEMU
    follows, or plant one to a root-only file. With `parents`, the dirs are above the
    cert dir: root-owned sticky ones are fine there."""
    for path in paths:
        st = stats[path]
        problems = unsafe_dir(st, sticky_ok=parents) if st is not None else []
        if problems:
            raise InvalidInput(f"{path}: {'; '.join(problems)}: anyone who can write there could swap the "
                               f"files QEMU reads; fix it first: chown root {path} && chmod go-w {path}")


def make_staging(fs: FS, cert_dir: str, modes: Modes) -> str:
    """A fresh directory only its owner can enter, inside the cert dir's state, where a
    key can be made on the host and later moved into its set (same file system)."""
    target = prepare(fs, cert_dir, modes)
    if target.foreign_names():
        _sources(target)  # a planted link is refused before anything is created
    target.make_sets()
    path = posixpath.join(target.sets, STAGING_PREFIX + secrets.token_hex(6))
    fs.makedirs(path, 0o700)
    fs.chmod(path, 0o700)
    return path


def install(fs: FS, cert_dir: str, creds: CredentialSet, modes: Modes, force: bool = False,
            now: Optional[Callable[[], dt.datetime]] = None) -> InstallResult:
    """Stage, read back, switch, check the names; foreign files need `force`."""
    target = prepare(fs, cert_dir, modes)
    names = target.scan()
    old_id, previous_id = target.pointers()
    foreign = target.foreign_names(names)
    sources = _sources(target) if foreign else {}  # a planted link is refused, with or without --force
    if foreign and not force:
        raise Conflict(f"{cert_dir} holds files qemuca did not write ({', '.join(foreign)}); "
                       "use --force to replace them (they are kept for rollback)")
    set_id = creds.set_id
    if not foreign and _unchanged(target, creds, modes, old_id, names):
        _finish_clean_up(target, old_id, previous_id)
        return InstallResult(changed=False, set_id=set_id, previous_id=previous_id)
    target.make_sets()

    stamp = (now or (lambda: dt.datetime.now(dt.timezone.utc)))().strftime("%Y-%m-%dT%H:%M:%SZ")
    _write_set(target, creds, modes, creds.manifest(stamp))
    if foreign:
        # What QEMU reads now becomes a set of ours, `current` points at it, and the
        # foreign names become links to the same bytes: nothing changes for QEMU yet.
        old_id = _adopt(target, stamp, sources)
        _point(target, CURRENT, old_id)
        names = target.scan()

    # Every name the new set has links into `current` before the switch (a new name
    # dangles until then, which QEMU takes as absent), so one rename switches them all.
    _add_links(target, creds.names, names)
    if old_id and old_id != set_id:
        _point(target, PREVIOUS, old_id)  # harmless alone
    _point(target, CURRENT, set_id)  # the switch
    try:
        _remove_stale_links(target, creds.names, names)
        if not target.landed_as(creds):
            raise InstallError(f"{cert_dir}: the names do not lead to the set written; "
                               "the previous set is in use")
    except BaseException:
        if old_id and old_id != set_id:
            try:
                _switch(target, old_id)
            except Exception:  # the first error is the one to report
                pass
        raise
    keep = {set_id, old_id} if old_id and old_id != set_id else {set_id, previous_id}
    try:
        _collect_garbage(target, _garbage(target, keep))
    except OSError:  # leftovers cost disk space only; the next install retries
        pass
    names_changed = foreign or set(names) != set(creds.names) or not target.links_match(creds.names, names)
    return InstallResult(changed=True, set_id=set_id, previous_id=old_id, adopted=foreign,
                         actions=[f"switched to set {set_id}"],
                         changed_dirs=[posixpath.join(target.sets, set_id), target.sets, target.state]
                         + ([target.path] if names_changed else []))


def _point(target: CertDir, which: str, set_id: str) -> None:
    target.fs.symlink_atomic(posixpath.join(SETS, set_id), posixpath.join(target.state, which), target.sets)


def _write_set(target: CertDir, creds: CredentialSet, modes: Modes, manifest: bytes) -> None:
    """The set's directory, written then read back (before any switch: the one read-back
    pass). A directory made just now is written in place, in batches; one left by an
    interrupted attempt is cleaned of leftovers and its files replaced atomically."""
    fs = target.fs
    directory = posixpath.join(target.sets, creds.set_id)
    fresh = fs.make_dir(directory, modes.directory)
    real = {n: d for n, d in creds.files.items() if n not in CLIENT_LINKS}
    if not fresh:
        fs.remove_many([posixpath.join(directory, n) for n in fs.listdir(directory)  # leftovers
                        if (n in ALL_FILES and n not in creds.names) or TEMP_MARK in n])
    fs.write_many([(posixpath.join(directory, n), d, modes.of(n), modes.uid, modes.gid) for n, d in real.items()]
                  + [(posixpath.join(directory, MANIFEST), manifest, 0o644, modes.uid, modes.gid)],
                  atomic=not fresh)
    if creds.key_on_host:
        # Final owner and mode while the key is still in its 0700 staging directory;
        # only then does it move where others can traverse.
        if modes.uid is not None and modes.gid is not None:
            fs.chown(creds.key_on_host, modes.uid, modes.gid)
        fs.chmod(creds.key_on_host, modes.of(SERVER_KEY))
        fs.rename(creds.key_on_host, posixpath.join(directory, SERVER_KEY))
    for name, source in CLIENT_LINKS.items():
        fs.symlink_atomic(source, posixpath.join(directory, name))
    got = fs.read_many([posixpath.join(directory, n) for n in real], sizes=[len(d) for d in real.values()])
    for (name, data), back in zip(real.items(), got):
        if back is None or _sha(back) != _sha(data):
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


def _add_links(target: CertDir, names, scan: Dict[str, Optional[str]]) -> None:
    """Each layout name of the set becomes a link into `current` (foreign files replaced).
    `scan`: the names as CertDir.scan() found them, nothing having changed them since."""
    for name in sorted(names):
        if scan.get(name) != link_target(name):
            target.fs.symlink_atomic(link_target(name), posixpath.join(target.path, name), target.sets)


def _remove_stale_links(target: CertDir, names, scan: Dict[str, Optional[str]]) -> None:
    """Layout names the set does not hold (a CRL no longer needed) go, after the switch.
    `scan`: the names present before _add_links (which only adds names of the set)."""
    target.fs.remove_many([posixpath.join(target.path, n) for n in ALL_FILES if n in scan and n not in names])


def _switch(target: CertDir, set_id: str) -> None:
    names = target.set_names(set_id)
    scan = target.scan()
    _add_links(target, names, scan)
    _point(target, CURRENT, set_id)
    _remove_stale_links(target, names, scan)


def _garbage(target: CertDir, keep) -> List[str]:
    """Sets other than those in `keep` (current and previous), and staging dirs
    interrupted enrolls left. (The kept sets hold no leftovers: _write_set cleared the
    current one before the switch, and the previous one was cleared when it was current.)"""
    fs = target.fs
    names = fs.listdir(target.sets)
    staging = [n for n in names if n.startswith(STAGING_PREFIX)]
    ages = dict(zip(staging, fs.stat_many([posixpath.join(target.sets, n) for n in staging], follow=False)))
    out = []
    for name in names:
        if name in ages:
            st = ages[name]
            if st is not None and time.time() - st.mtime > STAGING_MAX_AGE_S:
                out.append(name)  # else maybe an enroll running now
        elif name not in keep:
            out.append(name)
    return out


def _collect_garbage(target: CertDir, garbage: List[str]) -> None:
    """Remove what _garbage found: old sets, and the temp links an interrupted run left
    (they are made in the sets dir: one listing finds every one)."""
    fs = target.fs
    for name in garbage:
        path = posixpath.join(target.sets, name)
        if TEMP_MARK in name:
            fs.remove(path)
        else:
            fs.rmtree(path, expect=ALL_FILES + (MANIFEST,))


def _finish_clean_up(target: CertDir, current: Optional[str], previous: Optional[str]) -> None:
    """A run cut off after its switch never removed the old sets (they hold old keys):
    a later run that finds the set in place removes them. One listing when clean."""
    try:
        _collect_garbage(target, _garbage(target, {current, previous}))
    except OSError:  # leftovers cost disk space only
        pass


def rollback(fs: FS, cert_dir: str) -> InstallResult:
    """Switch back to the previous set (and make the current one the previous).

    `current` moves first: interrupted between the two pointer writes, the host uses
    the set it is switched back to (both pointers name it). The other order would
    leave both naming the set switched away from, and the next install would delete
    the set this rollback was for.
    """
    target = CertDir(fs, cert_dir)
    current, previous = target.pointers()
    if previous is None or fs.stat(posixpath.join(target.sets, previous)) is None:
        raise NotFound(f"{cert_dir} has no previous credential set to roll back to")
    _switch(target, previous)
    if current:
        _point(target, PREVIOUS, current)
    return InstallResult(changed=True, set_id=previous, previous_id=current,
                         actions=[f"switched back to set {previous}"])
