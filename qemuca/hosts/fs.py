"""The places a credential set can live, behind one small interface.

`LocalFS` works on this machine; `RemoteFS` (qemuca.hosts.remotefs) does the same over SFTP.
Everything that writes goes through `write_atomic`: a temp file in the same
directory, created with its final mode, fsynced, then renamed over the target, so a
reader sees the old bytes or the new bytes, never a mix, and a crash never leaves a
half-written file.
"""

from __future__ import annotations

import errno
import os
import secrets
import shutil
import stat as stat_mod
from dataclasses import dataclass
from typing import List, Optional, Sequence

from qemuca.errors import InvalidInput


@dataclass(frozen=True)
class FileStat:
    mode: int  # full st_mode (type and permission bits)
    uid: int
    gid: int
    size: int
    mtime: float

    @property
    def perms(self) -> int:
        return stat_mod.S_IMODE(self.mode)

    @property
    def is_dir(self) -> bool:
        return stat_mod.S_ISDIR(self.mode)

    @property
    def is_file(self) -> bool:
        return stat_mod.S_ISREG(self.mode)

    @property
    def is_link(self) -> bool:
        return stat_mod.S_ISLNK(self.mode)


TEMP_MARK = ".qemuca-tmp-"
NOT_A_LINK = ""  # FS.links(): the path exists and is not a symbolic link
MAX_USER_FILE = 16 << 20  # a hosts file, inventory or PEM file beyond this is not one
# A file read from a place (a cert, key, bundle, CRL, qemu.conf, a /proc entry) beyond this
# is not one: a hostile host could otherwise make us read a 300 MB sparse file into memory.
MAX_PLACE_FILE = 4 << 20


def too_large(path: str, limit: int) -> OSError:
    return OSError(errno.EFBIG, f"File too large (over {limit} bytes)", path)


def temp_name(path: str, directory: Optional[str] = None) -> str:
    """A hidden name for staging `path`, beside it (or in `directory`, on the same file
    system); random so parallel writers never clash."""
    head, tail = os.path.split(path)
    return os.path.join(directory or head, f".{tail}{TEMP_MARK}{secrets.token_hex(6)}")


class FS:
    """What deploy, export and verify need from a place. Paths are absolute."""

    def read_bytes(self, path: str, limit: int = MAX_PLACE_FILE) -> bytes:
        """The file's bytes; OSError(EFBIG) past `limit` (nothing more is read)."""
        raise NotImplementedError

    def write_atomic(self, path: str, data: bytes, mode: int, uid: Optional[int] = None,
                     gid: Optional[int] = None) -> None:
        raise NotImplementedError

    def stat(self, path: str, follow: bool = True) -> Optional[FileStat]:
        """FileStat of path, or None when it does not exist."""
        raise NotImplementedError

    def makedirs(self, path: str, mode: int = 0o755) -> None:
        raise NotImplementedError

    def listdir(self, path: str) -> List[str]:
        raise NotImplementedError

    def make_dir(self, path: str, mode: int) -> bool:
        """One directory (its parent exists) with exactly `mode`; False when it was
        there already (it is given `mode` too)."""
        st = self.stat(path, follow=False)
        if st is not None and not st.is_dir:
            raise FileExistsError(errno.EEXIST, "exists and is not a directory", path)
        if st is None:
            self.makedirs(path, mode)
        self.chmod(path, mode)
        return st is None

    def readlink(self, path: str) -> str:
        raise NotImplementedError

    def symlink_atomic(self, target: str, path: str, temp_dir: Optional[str] = None) -> None:
        """Point `path` at `target`, replacing whatever link was there in one rename
        (of a temp link made beside it, or in `temp_dir`: where leftovers are looked for)."""
        raise NotImplementedError

    def rename(self, source: str, target: str) -> None:
        """Move within the place, replacing `target` atomically."""
        raise NotImplementedError

    def copy(self, source: str, target: str) -> None:
        """Copy a file within the place, keeping mode and owner; the bytes never leave it."""
        raise NotImplementedError

    def remove(self, path: str) -> None:
        raise NotImplementedError

    def rmtree(self, path: str, expect: Sequence[str] = ()) -> None:
        """Delete a directory tree; `expect`: the names it most likely holds (a place
        over the network removes those without listing first)."""
        raise NotImplementedError

    def chown(self, path: str, uid: int, gid: int) -> None:
        raise NotImplementedError

    def chmod(self, path: str, mode: int) -> None:
        raise NotImplementedError

    # Batches: a place over the network answers a whole batch in one round trip
    # (RemoteFS pipelines them); here, one at a time.

    def read_many(self, paths: List[str], limit: int = MAX_PLACE_FILE,
                  sizes: Optional[List[int]] = None) -> List[Optional[bytes]]:
        """Each file's bytes; None where it is missing (or a link that dangles). `sizes`:
        the sizes expected (a read-back): a file may then come back cut after one byte
        more than expected, which is enough to tell it differs."""
        out: List[Optional[bytes]] = []
        for path in paths:
            try:
                out.append(self.read_bytes(path, limit))
            except FileNotFoundError:
                out.append(None)
        return out

    def write_many(self, files, atomic: bool = True) -> None:
        """write_atomic each (path, data, mode, uid, gid); without `atomic` a target may be
        written in place (only in a directory no reader uses yet)."""
        for path, data, mode, uid, gid in files:
            self.write_atomic(path, data, mode, uid, gid)

    def stat_many(self, paths: List[str], follow: bool = True) -> List[Optional[FileStat]]:
        """None where missing, or where a file stands in the path (as sftp-server answers)."""
        out: List[Optional[FileStat]] = []
        for path in paths:
            try:
                out.append(self.stat(path, follow))
            except NotADirectoryError:
                out.append(None)
        return out

    def links(self, paths: List[str]) -> List[Optional[str]]:
        """Per path: None (missing), NOT_A_LINK, or the symbolic link's target."""
        out: List[Optional[str]] = []
        for path, st in zip(paths, self.stat_many(paths, follow=False)):
            out.append(None if st is None else self.readlink(path) if st.is_link else NOT_A_LINK)
        return out

    def remove_many(self, paths: List[str]) -> None:
        """Remove each file; the missing ones are fine."""
        for path in paths:
            if self.stat(path, follow=False) is not None:
                self.remove(path)

    def sync(self, paths: List[str]) -> None:
        """Make each file or directory durable (for a directory: the renames in it)."""
        raise NotImplementedError

    def exists(self, path: str) -> bool:
        return self.stat(path, follow=False) is not None

    def is_dir(self, path: str) -> bool:
        st = self.stat(path)
        return st is not None and st.is_dir


def make_dirs(path: str, mode: int = 0o755) -> None:
    """Create `path` and its missing parents, each with exactly `mode` whatever the umask
    (os.makedirs gives the parents umask-dependent modes: 0777 under umask 000)."""
    if os.path.isdir(path):
        return
    parent = os.path.dirname(path)
    if parent and parent != path:
        make_dirs(parent, mode)
    try:
        os.mkdir(path, mode)
    except FileExistsError:
        if os.path.isdir(path):
            return  # made meanwhile by someone else
        raise
    os.chmod(path, mode)


def read_user_file(path: str, what: str, limit: int = MAX_USER_FILE) -> bytes:
    """The bytes of a regular file the user named; InvalidInput for anything else.

    Opened non-blocking and checked on the open descriptor: a FIFO, a device or a
    directory is refused at once instead of hanging (or reading /dev/zero forever),
    and a file larger than `limit` is refused without being read whole.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise InvalidInput(f"cannot read {what} {path}: {e.strerror or e}") from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat_mod.S_ISREG(mode):
            why = os.strerror(errno.EISDIR) if stat_mod.S_ISDIR(mode) else "not a regular file"
            raise InvalidInput(f"cannot read {what} {path}: {why}")
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read(limit + 1)
    except OSError as e:
        raise InvalidInput(f"cannot read {what} {path}: {e.strerror or e}") from None
    finally:
        os.close(fd)
    if len(data) > limit:
        raise InvalidInput(f"{what} {path} is larger than {limit >> 20} MiB")
    return data


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class LocalFS(FS):
    """This machine's file system."""

    def read_bytes(self, path: str, limit: int = MAX_PLACE_FILE) -> bytes:
        with open(path, "rb") as f:
            data = f.read(limit + 1)
        if len(data) > limit:
            raise too_large(path, limit)
        return data

    def write_atomic(self, path, data, mode, uid=None, gid=None):
        tmp = temp_name(path)
        # Created with its final mode (0 umask effect is fixed by fchmod before any
        # byte is written), so a secret is never briefly readable by others.
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode & 0o600)
        try:
            try:
                if uid is not None or gid is not None:
                    os.fchown(fd, -1 if uid is None else uid, -1 if gid is None else gid)
                os.fchmod(fd, mode)
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(tmp, path)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
        _fsync_dir(os.path.dirname(path) or ".")

    def stat(self, path, follow=True):
        try:
            st = os.stat(path) if follow else os.lstat(path)
        except FileNotFoundError:
            return None
        return FileStat(st.st_mode, st.st_uid, st.st_gid, st.st_size, st.st_mtime)

    def makedirs(self, path, mode=0o755):
        make_dirs(path, mode)

    def listdir(self, path):
        return sorted(os.listdir(path))

    def readlink(self, path):
        return os.readlink(path)

    def symlink_atomic(self, target, path, temp_dir=None):
        tmp = temp_name(path, temp_dir)
        os.symlink(target, tmp)
        try:
            os.rename(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise
        _fsync_dir(os.path.dirname(path) or ".")

    def rename(self, source, target):
        os.rename(source, target)
        _fsync_dir(os.path.dirname(target) or ".")

    def copy(self, source, target):
        st = os.stat(source)
        shutil.copy2(source, target)
        os.chown(target, st.st_uid, st.st_gid)

    def remove(self, path):
        os.unlink(path)

    def sync(self, paths):
        for path in paths:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def rmtree(self, path, expect=()):
        shutil.rmtree(path)

    def chown(self, path, uid, gid):
        os.chown(path, uid, gid, follow_symlinks=False)

    def chmod(self, path, mode):
        os.chmod(path, mode)
