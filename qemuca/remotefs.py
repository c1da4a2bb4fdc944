"""The FS interface over one SFTP session, so deploy and verify treat a host like this machine.

File-level failures stay OSError (FileNotFoundError, PermissionError, ...) as with LocalFS,
their filename being "host:path"; a lost or stuck connection is a RemoteError naming the host.
SFTP cannot fsync a directory, so a rename is durable only once the host syncs it.
"""

from __future__ import annotations

import errno
import os
import socket
import stat as stat_mod
from contextlib import contextmanager
from typing import Iterator

import paramiko
from paramiko.sftp import CMD_EXTENDED, CMD_HANDLE, SFTP_FLAG_CREATE, SFTP_FLAG_EXCL, SFTP_FLAG_WRITE
from paramiko.sftp_attr import SFTPAttributes
from paramiko.sftp_file import SFTPFile

from qemuca.fs import FS, FileStat, temp_name
from qemuca.transport import Connection


def _unsupported(exc: OSError) -> bool:
    return exc.errno is None and "unsupported" in str(exc).lower()


class RemoteFS(FS):
    """A host's file system through `conn`'s one SFTP session (opened on first use)."""

    def __init__(self, conn: Connection):
        self.conn = conn
        self._fsync = True  # fsync@openssh.com, until the server says it has none

    @property
    def sftp(self) -> paramiko.SFTPClient:
        return self.conn.sftp()

    @contextmanager
    def _op(self, what: str, path: str) -> Iterator[None]:
        try:
            yield
        except paramiko.SFTPError as e:  # a protocol error, e.g. a login shell that prints text
            raise self.conn.error(e, f"{what} {path}: SFTP failed (does the login shell print "
                                     "text, e.g. from ~/.bashrc?)") from None
        except (paramiko.SSHException, EOFError, socket.timeout, ConnectionError) as e:
            raise self.conn.error(e, f"{what} {path}") from None
        except OSError as e:
            if not self.conn.transport.is_active():  # paramiko: OSError("Socket is closed")
                raise self.conn.error(EOFError(), f"{what} {path}") from None
            where = f"{self.conn.name}:{path}"
            if e.errno:
                raise OSError(e.errno, e.strerror or os.strerror(e.errno), where) from None
            raise OSError(f"{where}: {what} failed: {e}") from None

    def read_bytes(self, path: str) -> bytes:
        with self._op("read", path), self.sftp.open(path, "rb") as f:
            return f.read()

    def write_atomic(self, path, data, mode, uid=None, gid=None):
        sftp, tmp = self.sftp, temp_name(path)
        with self._op("write", path):
            # Opened O_EXCL with at most 0600 (no-one else can read it), owner and final
            # mode set on the handle before the first byte, then renamed over the target.
            attrs = SFTPAttributes()
            attrs.st_mode = mode & 0o600
            t, msg = sftp._request(paramiko.sftp.CMD_OPEN, tmp,
                                   SFTP_FLAG_WRITE | SFTP_FLAG_CREATE | SFTP_FLAG_EXCL, attrs)
            if t != CMD_HANDLE:
                raise paramiko.SFTPError("expected a handle")
            try:
                with SFTPFile(sftp, msg.get_binary(), "wb") as f:
                    if uid is not None or gid is not None:
                        st = f.stat() if uid is None or gid is None else None
                        f.chown(st.st_uid if uid is None else uid, st.st_gid if gid is None else gid)
                    f.chmod(mode)
                    f.write(data)
                    f.flush()
                    self._sync(f)
                sftp.posix_rename(tmp, path)
            except BaseException:
                try:
                    sftp.remove(tmp)
                except (OSError, paramiko.SSHException, EOFError):
                    pass
                raise

    def _sync(self, f: SFTPFile) -> None:
        if self._fsync:
            try:
                self.sftp._request(CMD_EXTENDED, "fsync@openssh.com", f.handle)
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
                self.sftp.posix_rename(tmp, path)
            except BaseException:
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
                self.sftp._request(CMD_EXTENDED, "lsetstat@openssh.com", path, attrs)
            except OSError as e:
                if not _unsupported(e):
                    raise
                if stat_mod.S_ISLNK(self.sftp.lstat(path).st_mode):
                    raise OSError(errno.ENOTSUP, "server cannot chown a symlink", path) from None
                self.sftp.chown(path, uid, gid)

    def chmod(self, path, mode):
        with self._op("chmod", path):
            self.sftp.chmod(path, mode)
