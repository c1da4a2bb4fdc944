"""The FS interface over one SFTP session, so deploy and verify treat a host like this machine.

File-level failures stay OSError (FileNotFoundError, PermissionError, ...) as with LocalFS,
their filename being "host:path"; a lost or stuck connection is a RemoteError naming the host.
SFTP cannot fsync a directory, so a rename is durable only once the host syncs it.

SFTP version 3 reports most errno values as a bare "Failure": when a write fails that way,
the host's statvfs (OpenSSH's statvfs@openssh.com) tells a full (ENOSPC) or read-only
(EROFS) file system apart, so the admin reads the cause rather than "Failure".
A host that does not answer within the command timeout is hung: the connection is closed
at once, so the steps after it (clean-up, switching back) fail at once instead of each
waiting out the timeout again.
"""

from __future__ import annotations

import errno
import os
import posixpath
import socket
import stat as stat_mod
from contextlib import contextmanager
from typing import Iterator, Optional, Tuple

import paramiko
from paramiko.sftp import (
    CMD_EXTENDED,
    CMD_EXTENDED_REPLY,
    CMD_HANDLE,
    CMD_OPEN,
    SFTP_FLAG_CREATE,
    SFTP_FLAG_EXCL,
    SFTP_FLAG_WRITE,
)
from paramiko.sftp_attr import SFTPAttributes
from paramiko.sftp_file import SFTPFile

from qemuca.errors import RemoteError
from qemuca.hosts.fs import FS, MAX_PLACE_FILE, FileStat, temp_name, too_large
from qemuca.hosts.ssh import Connection

# Operations that write: an errno-less SFTP failure of one of these is diagnosed with statvfs.
_WRITES = frozenset({"write", "mkdir", "symlink", "rename", "remove", "rmtree", "chown", "chmod"})
_ST_RDONLY = 0x1  # statvfs@openssh.com flag


# paramiko has no public API for OpenSSH's SFTP extensions (statvfs@, fsync@, lsetstat@)
# nor for an O_EXCL open that sets the mode at creation: these two functions are the only
# places that use its private request call, so the rest of this module is plain SFTP.
def _extended(sftp: paramiko.SFTPClient, name: str, *args: object) -> Tuple[int, paramiko.Message]:
    """Send the extension request `name`; returns (reply type, message)."""
    # SFTPClient._request is private (no stubs): see above.
    return sftp._request(CMD_EXTENDED, name, *args)  # type: ignore[attr-defined]


def _open_exclusive(sftp: paramiko.SFTPClient, path: str, mode: int) -> SFTPFile:
    """Create `path` for writing, failing if it exists, with `mode` from the first byte."""
    attrs = SFTPAttributes()
    attrs.st_mode = mode
    flags = SFTP_FLAG_WRITE | SFTP_FLAG_CREATE | SFTP_FLAG_EXCL
    # SFTPClient._request is private (no stubs): see above.
    t, msg = sftp._request(CMD_OPEN, path, flags, attrs)  # type: ignore[attr-defined]
    if t != CMD_HANDLE:
        raise paramiko.SFTPError("expected a handle")
    # Unbuffered: a failed write is not sent again by close() (or by __del__).
    return SFTPFile(sftp, msg.get_binary(), "wb", bufsize=0)


def _unsupported(exc: OSError) -> bool:
    return exc.errno is None and "unsupported" in str(exc).lower()


def _strerror(code: int) -> str:
    """The C library's text with the errno name, e.g. 'No space left on device (ENOSPC)'."""
    return f"{os.strerror(code)} ({errno.errorcode.get(code, code)})"


class RemoteFS(FS):
    """A host's file system through `conn`'s one SFTP session (opened on first use)."""

    def __init__(self, conn: Connection):
        self.conn = conn
        self._fsync = True  # fsync@openssh.com, until the server says it has none
        self._lost: Optional[str] = None  # why the connection was given up (a timeout)

    @property
    def sftp(self) -> paramiko.SFTPClient:
        return self.conn.sftp()

    @contextmanager
    def _op(self, what: str, path: str, need: int = 1) -> Iterator[None]:
        """Map what goes wrong during one operation; `need`: bytes it writes (for ENOSPC)."""
        if self._lost is not None:
            raise RemoteError(self._lost)
        try:
            yield
        except socket.timeout as e:  # the host stopped answering: give it up now
            if self._lost is None:
                self._lost = str(self.conn.error(e, f"{what} {path}"))
                self.conn.close()
            raise RemoteError(self._lost) from None
        except paramiko.SFTPError as e:  # a protocol error, e.g. a login shell that prints text
            raise self.conn.error(e, f"{what} {path}: SFTP failed (does the login shell print "
                                     "text, e.g. from ~/.bashrc?)") from None
        except (paramiko.SSHException, EOFError, ConnectionError) as e:
            raise RemoteError(self._lost) if self._lost else self.conn.error(e, f"{what} {path}") from None
        except OSError as e:
            if self._lost is not None:
                raise RemoteError(self._lost) from None
            if not self.conn.transport.is_active():  # paramiko: OSError("Socket is closed")
                raise self.conn.error(EOFError(), f"{what} {path}") from None
            where = f"{self.conn.name}:{path}"
            code = e.errno or (self._diagnose(path, need) if what in _WRITES else None)
            if code:
                raise OSError(code, _strerror(code) if not e.errno else e.strerror or os.strerror(code),
                              where) from None
            raise OSError(f"{where}: {what} failed: {e}") from None

    def _diagnose(self, path: str, need: int) -> Optional[int]:
        """ENOSPC or EROFS when the host's statvfs shows why a write failed, else None."""
        for candidate in (path, posixpath.dirname(path.rstrip("/")) or "/"):
            try:
                t, msg = _extended(self.sftp, "statvfs@openssh.com", candidate)
            except (OSError, paramiko.SSHException, EOFError):
                continue  # e.g. the path does not exist: try its directory
            if t != CMD_EXTENDED_REPLY:
                return None
            (_bsize, frsize, _blocks, _bfree, bavail, _files, _ffree, favail, _fsid, flag,
             _namemax) = (msg.get_int64() for _ in range(11))
            if flag & _ST_RDONLY:
                return errno.EROFS
            if favail == 0 or bavail * frsize < max(need, frsize):
                return errno.ENOSPC
            return None
        return None

    def read_bytes(self, path: str, limit: int = MAX_PLACE_FILE) -> bytes:
        with self._op("read", path):
            f = self.sftp.open(path, "rb")
            try:
                with self._op("read", path):  # a timeout hangs up before close() waits again
                    data = f.read(limit + 1)
            finally:
                f.close()
        if len(data) > limit:
            raise too_large(f"{self.conn.name}:{path}", limit)
        return data

    def write_atomic(self, path, data, mode, uid=None, gid=None):
        tmp = temp_name(path)
        with self._op("write", path, len(data)):
            sftp = self.sftp
            # Opened O_EXCL with at most 0600 (no-one else can read it), owner and final
            # mode set on the handle before the first byte, then renamed over the target.
            f = _open_exclusive(sftp, tmp, mode & 0o600)
            try:
                with f:
                    with self._op("write", path, len(data)):  # a timeout hangs up before close()
                        if uid is not None or gid is not None:
                            st = f.stat() if uid is None or gid is None else None
                            f.chown(st.st_uid if uid is None else uid, st.st_gid if gid is None else gid)
                        f.chmod(mode)
                        f.write(data)
                        self._sync(f)
                sftp.posix_rename(tmp, path)
            except BaseException:
                if self._lost is None:
                    try:
                        sftp.remove(tmp)
                    except (OSError, paramiko.SSHException, EOFError):
                        pass
                raise

    def _sync(self, f: SFTPFile) -> None:
        if self._fsync:
            try:
                _extended(self.sftp, "fsync@openssh.com", f.handle)
            except OSError as e:
                if not _unsupported(e):
                    raise
                self._fsync = False

    def stat(self, path, follow=True):
        try:
            with self._op("stat", path):
                st = self.sftp.stat(path) if follow else self.sftp.lstat(path)
        except FileNotFoundError:
            return None
        return FileStat(st.st_mode, st.st_uid, st.st_gid, st.st_size, float(st.st_mtime))

    def makedirs(self, path, mode=0o755):
        """Create `path` and missing parents, each with exactly `mode` (no remote umask)."""
        st = self.stat(path)
        if st is not None:
            if not st.is_dir:
                raise FileExistsError(errno.EEXIST, "not a directory", f"{self.conn.name}:{path}")
            return
        parent = os.path.dirname(path.rstrip("/"))
        if parent and parent != path:
            self.makedirs(parent, mode)
        with self._op("mkdir", path):
            try:
                self.sftp.mkdir(path, mode)
            except OSError:
                st = self.stat(path)
                if st is not None and st.is_dir:
                    return  # someone else made it meanwhile
                raise
            self.sftp.chmod(path, mode)

    def listdir(self, path):
        with self._op("list", path):
            return sorted(self.sftp.listdir(path))

    def readlink(self, path):
        with self._op("readlink", path):
            target = self.sftp.readlink(path)
        if target is None:
            raise OSError(errno.EINVAL, "not a symbolic link", f"{self.conn.name}:{path}")
        return target

    def symlink_atomic(self, target, path):
        tmp = temp_name(path)
        with self._op("symlink", path):
            self.sftp.symlink(target, tmp)
            try:
                with self._op("symlink", path):
                    self.sftp.posix_rename(tmp, path)
            except BaseException:
                if self._lost is None:
                    try:
                        self.sftp.remove(tmp)
                    except (OSError, paramiko.SSHException, EOFError):
                        pass
                raise

    def rename(self, source, target):
        with self._op("rename", source):
            self.sftp.posix_rename(source, target)

    def copy(self, source, target):
        """`cp -p` on the host itself: the bytes (a key, maybe) never cross the network."""
        self.conn.run(["cp", "-p", "--", source, target], check=True)

    def remove(self, path):
        with self._op("remove", path):
            self.sftp.remove(path)

    def rmtree(self, path):
        """Delete a directory tree without following symlinks (like shutil.rmtree)."""
        st = self.stat(path, follow=False)
        if st is None:
            raise FileNotFoundError(errno.ENOENT, "no such directory", f"{self.conn.name}:{path}")
        if not st.is_dir:
            raise NotADirectoryError(errno.ENOTDIR, "not a directory", f"{self.conn.name}:{path}")
        with self._op("rmtree", path):
            for entry in self.sftp.listdir_attr(path):
                child = f"{path.rstrip('/')}/{entry.filename}"
                if stat_mod.S_ISDIR(entry.st_mode or 0):
                    self.rmtree(child)
                else:
                    self.sftp.remove(child)
            self.sftp.rmdir(path)

    def chown(self, path, uid, gid):
        """Change the owner of `path` itself, not of a link's target (like lchown)."""
        attrs = SFTPAttributes()
        attrs.st_uid, attrs.st_gid = uid, gid
        with self._op("chown", path):
            try:
                _extended(self.sftp, "lsetstat@openssh.com", path, attrs)
            except OSError as e:
                if not _unsupported(e):
                    raise
                if stat_mod.S_ISLNK(self.sftp.lstat(path).st_mode):
                    raise OSError(errno.ENOTSUP, "server cannot chown a symlink", path) from None
                self.sftp.chown(path, uid, gid)

    def chmod(self, path, mode):
        with self._op("chmod", path):
            self.sftp.chmod(path, mode)
