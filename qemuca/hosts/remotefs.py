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
from typing import Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import paramiko
from paramiko.message import Message
from paramiko.sftp import (
    CMD_ATTRS,
    CMD_CLOSE,
    CMD_DATA,
    CMD_EXTENDED,
    CMD_EXTENDED_REPLY,
    CMD_FSETSTAT,
    CMD_FSTAT,
    CMD_HANDLE,
    CMD_LSTAT,
    CMD_MKDIR,
    CMD_NAME,
    CMD_OPEN,
    CMD_READ,
    CMD_READLINK,
    CMD_REMOVE,
    CMD_RMDIR,
    CMD_SETSTAT,
    CMD_STAT,
    CMD_STATUS,
    CMD_WRITE,
    SFTP_FLAG_CREATE,
    SFTP_FLAG_EXCL,
    SFTP_FLAG_READ,
    SFTP_FLAG_WRITE,
    int64,
)
from paramiko.sftp_attr import SFTPAttributes

from qemuca.errors import RemoteError
from qemuca.hosts.fs import FS, MAX_PLACE_FILE, NOT_A_LINK, FileStat, temp_name, too_large
from qemuca.hosts.ssh import Connection

# Operations that write: an errno-less SFTP failure of one of these is diagnosed with statvfs.
_WRITES = frozenset({"write", "mkdir", "symlink", "rename", "remove", "rmtree", "chown", "chmod"})
_ST_RDONLY = 0x1  # statvfs@openssh.com flag


# paramiko has no public API for OpenSSH's SFTP extensions (statvfs@, fsync@, lsetstat@),
# for an O_EXCL open that sets the mode at creation, nor for sending several requests
# before reading their replies: these three functions are the only places that use its
# private request calls, so the rest of this module is plain SFTP.
def _extended(sftp: paramiko.SFTPClient, name: str, *args: object) -> Tuple[int, paramiko.Message]:
    """Send the extension request `name`; returns (reply type, message)."""
    # SFTPClient._request is private (no stubs): see above.
    return sftp._request(CMD_EXTENDED, name, *args)  # type: ignore[attr-defined]


class _Replies:
    """Where paramiko hands the replies to pipelined requests (its `_async_response` hook,
    which SFTPFile's prefetch uses the same way)."""

    def __init__(self) -> None:
        self.got: Dict[int, Tuple[int, Message]] = {}

    def _async_response(self, t: int, msg: Message, num: int) -> None:
        self.got[num] = (t, msg)


def _pipeline(sftp: paramiko.SFTPClient, requests: Sequence[Tuple[int, tuple]]) -> List[Tuple[int, Message]]:
    """Send every request, then read the replies: one round trip for the lot instead of
    one each. The host runs them in order whatever fails, so a batch only ever holds
    requests whose later members are harmless when an earlier one failed."""
    replies = _Replies()
    # SFTPClient._async_request/_read_response are private (no stubs): see above.
    nums = [sftp._async_request(replies, t, *args) for t, args in requests]  # type: ignore[attr-defined]
    for num in nums:
        while num not in replies.got:
            sftp._read_response()  # type: ignore[attr-defined]
    return [replies.got[n] for n in nums]


def _check(sftp: paramiko.SFTPClient, reply: Tuple[int, Message], want: int) -> Message:
    """The reply's message when it is of type `want` (a status: OK); any other status
    raised as paramiko raises it (OSError, FileNotFoundError, EOFError)."""
    t, msg = reply
    if t == CMD_STATUS:
        sftp._convert_status(msg)  # type: ignore[attr-defined]  # raises unless OK
    if t != want:
        raise paramiko.SFTPError(f"unexpected SFTP reply {t}")
    return msg


def _attrs(uid: Optional[int], gid: Optional[int], mode: Optional[int]) -> SFTPAttributes:
    attrs = SFTPAttributes()
    if uid is not None and gid is not None:
        attrs.st_uid, attrs.st_gid = uid, gid
    if mode is not None:
        attrs.st_mode = mode
    return attrs


def _named(e: OSError, path: str) -> OSError:
    """The failure of one request of a batch, named by the file it was about."""
    return OSError(e.errno, e.strerror or str(e), path)


def _open_all(sftp: paramiko.SFTPClient, paths: Sequence[str], flags: int = SFTP_FLAG_READ,
              modes: Optional[Sequence[int]] = None) -> List[Union[bytes, OSError]]:
    """Open every path in one round trip: per path its handle, or why it was refused."""
    opens = [(CMD_OPEN, (p, flags, _attrs(None, None, None if modes is None else modes[i])))
             for i, p in enumerate(paths)]
    out: List[Union[bytes, OSError]] = []
    for reply in _pipeline(sftp, opens):
        try:
            out.append(_check(sftp, reply, CMD_HANDLE).get_binary())
        except OSError as e:
            out.append(e)
    return out


def _close_all(sftp: paramiko.SFTPClient, handles: Iterable[bytes]) -> None:
    requests = [(CMD_CLOSE, (h,)) for h in handles]
    if requests:
        _pipeline(sftp, requests)


READ_CHUNK = 64 << 10  # what one READ asks for (OpenSSH serves up to 255 KiB)
WRITE_CHUNK = 32 << 10  # paramiko's own request size for writes


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
            where = f"{self.conn.name}:{e.filename or path}"
            code = e.errno or (self._diagnose(path, need) if what in _WRITES else None)
            if code:
                raise OSError(code, _strerror(code) if not e.errno else e.strerror or os.strerror(code),
                              where) from None
            raise OSError(f"{where}: {what} failed: {e.strerror or e}") from None

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
        data = self.read_many([path], limit)[0]
        if data is None:
            raise FileNotFoundError(errno.ENOENT, "No such file", f"{self.conn.name}:{path}")
        return data

    def read_many(self, paths: List[str], limit: int = MAX_PLACE_FILE,
                  sizes: Optional[List[int]] = None) -> List[Optional[bytes]]:
        """The files' bytes (None: missing) in three round trips for the lot: open all,
        read all, read again (end of file expected) and close. A file still giving bytes
        then (larger than one read, or a /proc file served a page at a time) is read on
        to its end. With `sizes` (a read-back of regular files): two round trips, one
        read of size + 1 bytes each, closed with it (a regular file's short read is its
        end; a longer file comes back cut at size + 1, which tells it differs)."""
        if sizes is not None and all(n + 1 <= READ_CHUNK for n in sizes):
            return self._read_sized(paths, sizes)
        out: List[Optional[bytes]] = [None] * len(paths)
        if not paths:
            return out
        sftp = self.sftp
        with self._op("read", paths[0]):
            handles = self._opened_for_reading(sftp, paths)
            try:
                chunks: Dict[int, bytearray] = {i: bytearray() for i in handles}
                replies = _pipeline(sftp, [(CMD_READ, (h, int64(0), READ_CHUNK)) for h in handles.values()])
                for i, reply in zip(handles, replies):
                    try:
                        chunks[i] += _check(sftp, reply, CMD_DATA).get_string()
                    except EOFError:
                        pass
                second: List[Tuple[int, tuple]] = []
                for i, h in handles.items():
                    second += [(CMD_READ, (h, int64(len(chunks[i])), READ_CHUNK)), (CMD_CLOSE, (h,))]
                replies = _pipeline(sftp, second)
                closed, handles = handles, {}
                more = []
                for n, i in enumerate(closed):
                    try:
                        data = _check(sftp, replies[2 * n], CMD_DATA).get_string()
                        more.append(i)  # not at its end: read on, below
                        chunks[i] += data
                    except EOFError:
                        pass
                for i in more:
                    chunks[i] = bytearray(self._read_on(paths[i], len(chunks[i]), limit, chunks[i]))
            finally:
                _close_all(sftp, handles.values())
        for i, chunk in chunks.items():
            if len(chunk) > limit:
                raise too_large(f"{self.conn.name}:{paths[i]}", limit)
            out[i] = bytes(chunk)
        return out

    def _read_sized(self, paths: List[str], sizes: List[int]) -> List[Optional[bytes]]:
        sftp = self.sftp
        out: List[Optional[bytes]] = [None] * len(paths)
        with self._op("read", paths[0]):
            opened = self._opened_for_reading(sftp, paths)
            body: List[Tuple[int, tuple]] = []
            for i, h in opened.items():
                body += [(CMD_READ, (h, int64(0), sizes[i] + 1)), (CMD_CLOSE, (h,))]
            replies = _pipeline(sftp, body)
            for n, i in enumerate(opened):
                try:
                    out[i] = _check(sftp, replies[2 * n], CMD_DATA).get_string()
                except EOFError:
                    out[i] = b""
        return out

    @staticmethod
    def _opened_for_reading(sftp: paramiko.SFTPClient, paths: List[str]) -> Dict[int, bytes]:
        """Handles by index of the files there; a refusal other than 'missing' closes the
        rest and is raised."""
        handles: Dict[int, bytes] = {}
        failure: Optional[OSError] = None
        for i, got in enumerate(_open_all(sftp, paths)):
            if isinstance(got, bytes):
                handles[i] = got
            elif not isinstance(got, FileNotFoundError) and failure is None:
                failure = _named(got, paths[i])
        if failure is not None:
            _close_all(sftp, handles.values())
            raise failure
        return handles

    def _read_on(self, path: str, offset: int, limit: int, head: bytearray) -> bytes:
        """The rest of a file read_many could not finish in its two reads, reopened."""
        f = self.sftp.open(path, "rb")
        try:
            f.seek(offset)
            return bytes(head) + f.read(max(limit + 1 - offset, 0))
        finally:
            f.close()

    def write_atomic(self, path, data, mode, uid=None, gid=None):
        self.write_many([(path, data, mode, uid, gid)])

    def write_many(self, files, atomic: bool = True) -> None:
        """Write files in three round trips whatever their number: every file opened
        (O_EXCL, at most 0600: no-one else can read it); then per file its owner and final
        mode in one set-stat before the first byte, the bytes, fsync and close; then, once
        every write has succeeded, each temp file renamed over its target (`atomic`).
        Without `atomic` the targets are created directly, which only a directory no
        reader uses yet may have (a new set's): no-one then sees a partial file."""
        if not files:
            return
        targets = [f[0] for f in files]
        written = [temp_name(t) if atomic else t for t in targets]
        sftp = self.sftp
        created: List[str] = []  # removed again if anything fails
        try:
            with self._op("write", targets[0], sum(len(f[1]) for f in files)):
                opened = _open_all(sftp, written, SFTP_FLAG_WRITE | SFTP_FLAG_CREATE | SFTP_FLAG_EXCL,
                                   [f[2] & 0o600 for f in files])
                handles = [h for h in opened if isinstance(h, bytes)]
                created = [w for w, h in zip(written, opened) if isinstance(h, bytes)]
                errors = [_named(h, t) for t, h in zip(targets, opened) if isinstance(h, OSError)]
                if errors:
                    _close_all(sftp, handles)
                    raise errors[0]
                owners = self._owners(sftp, handles, files)
                body: List[Tuple[int, tuple]] = []
                where: List[str] = []
                for handle, (target, data, mode, *_ids), (uid, gid) in zip(handles, files, owners):
                    ops: List[Tuple[int, tuple]] = [(CMD_FSETSTAT, (handle, _attrs(uid, gid, mode)))]
                    ops += [(CMD_WRITE, (handle, int64(at), data[at:at + WRITE_CHUNK]))
                            for at in range(0, len(data), WRITE_CHUNK)]
                    if self._fsync:
                        ops.append((CMD_EXTENDED, ("fsync@openssh.com", handle)))
                    ops.append((CMD_CLOSE, (handle,)))  # every handle is closed, whatever failed
                    body += ops
                    where += [target] * len(ops)
                self._statuses(sftp, body, _pipeline(sftp, body), where)
                if atomic:
                    renames = [(CMD_EXTENDED, ("posix-rename@openssh.com", w, t)) for w, t in zip(written, targets)]
                    self._statuses(sftp, renames, _pipeline(sftp, renames), targets)
                    created = []
        except BaseException:
            if self._lost is None and created:
                try:
                    _pipeline(sftp, [(CMD_REMOVE, (w,)) for w in created])
                except (OSError, paramiko.SSHException, EOFError):
                    pass
            raise

    def _owners(self, sftp, handles, files) -> List[Tuple[Optional[int], Optional[int]]]:
        """(uid, gid) per file; SFTP sets both or neither, so a half given is completed
        from the new file's own (an fstat, only then)."""
        owners = [(f[3], f[4]) for f in files]
        half = [i for i, (uid, gid) in enumerate(owners) if (uid is None) != (gid is None)]
        if half:
            replies = _pipeline(sftp, [(CMD_FSTAT, (handles[i],)) for i in half])
            for i, reply in zip(half, replies):
                st = SFTPAttributes._from_msg(_check(sftp, reply, CMD_ATTRS))  # type: ignore[attr-defined]
                uid, gid = owners[i]
                owners[i] = (st.st_uid if uid is None else uid, st.st_gid if gid is None else gid)
        return owners

    def _statuses(self, sftp, requests, replies, where: List[str]) -> None:
        """Raise the first failure among status replies, naming the file of the request
        (`where`); a host without fsync@ is noted (sync_host then runs `sync`)."""
        for (t, args), reply, path in zip(requests, replies, where):
            try:
                _check(sftp, reply, CMD_STATUS)
            except OSError as e:
                if t == CMD_EXTENDED and args[0] == "fsync@openssh.com" and _unsupported(e):
                    self._fsync = False
                    continue
                raise _named(e, path) from None
            except EOFError as e:
                raise OSError(errno.EIO, str(e) or "unexpected end of file", path) from None

    def stat_many(self, paths: List[str], follow: bool = True) -> List[Optional[FileStat]]:
        """stat (or lstat) of every path in one round trip; None where missing."""
        sftp = self.sftp
        out: List[Optional[FileStat]] = []
        with self._op("stat", paths[0] if paths else "/"):
            replies = _pipeline(sftp, [(CMD_STAT if follow else CMD_LSTAT, (p,)) for p in paths])
            for path, reply in zip(paths, replies):
                try:
                    st = SFTPAttributes._from_msg(_check(sftp, reply, CMD_ATTRS))  # type: ignore[attr-defined]
                except FileNotFoundError:
                    out.append(None)
                    continue
                except OSError as e:
                    raise _named(e, path) from None
                out.append(FileStat(st.st_mode or 0, st.st_uid or 0, st.st_gid or 0, st.st_size or 0,
                                    float(st.st_mtime or 0)))
        return out

    def links(self, paths: List[str]) -> List[Optional[str]]:
        """For each path: None (missing), NOT_A_LINK, or the symlink's target; one round
        trip when all are links or missing (an SFTP readlink of a file fails without
        saying why, so those are told apart by an lstat)."""
        sftp = self.sftp
        out: List[Optional[str]] = []
        unclear: List[int] = []
        with self._op("readlink", paths[0] if paths else "/"):
            for i, (path, reply) in enumerate(zip(paths, _pipeline(sftp, [(CMD_READLINK, (p,)) for p in paths]))):
                try:
                    msg = _check(sftp, reply, CMD_NAME)
                except FileNotFoundError:
                    out.append(None)
                    continue
                except OSError:
                    out.append(None)
                    unclear.append(i)
                    continue
                if msg.get_int() != 1:
                    raise paramiko.SFTPError(f"{path}: readlink returned no single name")
                out.append(msg.get_string().decode("utf-8", "surrogateescape"))
        if unclear:
            for i, st in zip(unclear, self.stat_many([paths[i] for i in unclear], follow=False)):
                if st is not None and st.is_link:  # a link readlink could not read
                    raise OSError(errno.EIO, "cannot read the link", f"{self.conn.name}:{paths[i]}")
                out[i] = None if st is None else NOT_A_LINK
        return out

    def sync(self, paths: List[str]) -> None:
        """fsync each file or directory (a directory makes the renames in it durable):
        OpenSSH's sftp-server opens a directory read-only like a file, and fsync@ then
        syncs it. OSError(ENOTSUP) when the host cannot: sync_host falls back to `sync`."""
        if not paths:
            return
        if not self._fsync:
            raise OSError(errno.ENOTSUP, "the SFTP server has no fsync@openssh.com", self.conn.name)
        sftp = self.sftp
        with self._op("fsync", paths[0]):
            handles = [h if isinstance(h, bytes) else None for h in _open_all(sftp, paths)]
            body: List[Tuple[int, tuple]] = []
            for h in handles:
                if h is not None:
                    body += [(CMD_EXTENDED, ("fsync@openssh.com", h)), (CMD_CLOSE, (h,))]
            replies = _pipeline(sftp, body)
            failed = None in handles
            for (t, _), reply in zip(body, replies):
                try:
                    _check(sftp, reply, CMD_STATUS)
                except (OSError, EOFError) as e:
                    if t == CMD_EXTENDED and isinstance(e, OSError) and _unsupported(e):
                        self._fsync = False
                    failed = True
            if failed:
                raise OSError(errno.ENOTSUP, "fsync over SFTP failed", self.conn.name)

    def remove_many(self, paths: List[str]) -> None:
        """Remove files in one round trip; the missing ones are fine."""
        if not paths:
            return
        sftp = self.sftp
        with self._op("remove", paths[0]):
            for path, reply in zip(paths, _pipeline(sftp, [(CMD_REMOVE, (p,)) for p in paths])):
                try:
                    _check(sftp, reply, CMD_STATUS)
                except FileNotFoundError:
                    continue
                except OSError as e:
                    raise _named(e, path) from None

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

    def make_dir(self, path: str, mode: int) -> bool:
        """mkdir and chmod in one round trip (the chmod undoes the host's umask)."""
        sftp = self.sftp
        with self._op("mkdir", path):
            made, _ = _pipeline(sftp, [(CMD_MKDIR, (path, _attrs(None, None, mode))),
                                       (CMD_SETSTAT, (path, _attrs(None, None, mode)))])
            try:
                _check(sftp, made, CMD_STATUS)
                return True
            except FileNotFoundError:
                raise
            except OSError:
                pass  # there already, or a real failure: the lstat tells
        st = self.stat(path, follow=False)
        if st is None or not st.is_dir:
            with self._op("mkdir", path):
                self.sftp.mkdir(path, mode)  # the failure again, with its cause
            raise FileExistsError(errno.EEXIST, "exists and is not a directory", f"{self.conn.name}:{path}")
        return False

    def listdir(self, path):
        with self._op("list", path):
            return sorted(self.sftp.listdir(path))

    def readlink(self, path):
        with self._op("readlink", path):
            target = self.sftp.readlink(path)
        if target is None:
            raise OSError(errno.EINVAL, "not a symbolic link", f"{self.conn.name}:{path}")
        return target

    def symlink_atomic(self, target, path, temp_dir=None):
        tmp = temp_name(path, temp_dir)
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

    def rmtree(self, path, expect=()):
        """Delete a directory tree without following symlinks (like shutil.rmtree): the
        expected names and the directory go in one batch; only if that leaves the
        directory in place is it listed and emptied."""
        base = path.rstrip("/")
        if expect:
            sftp = self.sftp
            with self._op("rmtree", path):
                replies = _pipeline(sftp, [(CMD_REMOVE, (f"{base}/{n}",)) for n in expect] + [(CMD_RMDIR, (path,))])
                try:
                    _check(sftp, replies[-1], CMD_STATUS)
                    return
                except OSError:
                    pass  # more in it (or not a directory): the careful way below
        st = self.stat(path, follow=False)
        if st is None:
            raise FileNotFoundError(errno.ENOENT, "no such directory", f"{self.conn.name}:{path}")
        if not st.is_dir:
            raise NotADirectoryError(errno.ENOTDIR, "not a directory", f"{self.conn.name}:{path}")
        with self._op("rmtree", path):
            entries = self.sftp.listdir_attr(path)
        for entry in entries:
            if stat_mod.S_ISDIR(entry.st_mode or 0):
                self.rmtree(f"{base}/{entry.filename}")
        self.remove_many([f"{base}/{e.filename}" for e in entries if not stat_mod.S_ISDIR(e.st_mode or 0)])
        with self._op("rmtree", path):
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
