"""SSH to the hosts the way an OpenSSH user expects, with paramiko underneath.

ssh_config is honoured as OpenSSH reads it (hosts/ssh_config.py) and host keys are
checked as OpenSSH checks them (hosts/known_hosts.py); this module connects (jump hosts,
agent and identity files) and runs commands. It is the one place that drives paramiko's
connections and channels.

Remote commands are argv lists of allowlisted programs, quoted with shlex into one
command line for the remote POSIX shell; a user-typed string is never a command.
Secrets go on stdin, never into argv (argv is visible in `ps` on the host).
"""

from __future__ import annotations

import base64
import errno
import os
import re
import select
import shlex
import socket
import threading
import time
from dataclasses import dataclass, replace
from typing import Dict, List, Optional, Sequence, Tuple, Union

import paramiko

from qemuca.errors import HostKeyError, InvalidInput, RemoteError
from qemuca.hosts.known_hosts import check_host_key, known_entries
from qemuca.hosts.ssh_config import (
    DEFAULT_COMMAND_TIMEOUT,
    HostTarget,
    SshOptions,
    load_ssh_config,
    parse_jump,
    resolve,
)

MAX_JUMPS = 8
# What a command may print: every command qemuca runs prints a line or a small PEM, so
# more is a hostile or broken host (e.g. `hostname -f` printing 300 MB of NULs), refused
# before it fills memory.
MAX_STDOUT = 1 << 20
MAX_STDERR = 64 << 10

# Programs the tool runs on hosts. Anything else is refused before it leaves this process.
PROGRAMS = frozenset({
    "cat", "certtool", "chmod", "cp", "chown", "getent", "hostname", "id", "kill", "libvirtd", "ln", "ls",
    "mkdir", "mv", "openssl", "printf", "readlink", "rm", "setpriv", "sha256sum", "stat", "sync",
    "systemctl", "test", "timeout", "true", "uname", "virsh", "virt-ssh-helper", "virtqemud",
})

# Fixed templates; each "{name}" item becomes exactly one argv item, whatever its value.
COMMANDS: Dict[str, Tuple[str, ...]] = {
    "hostname_f": ("hostname", "-f"),
    "getent_group": ("getent", "group", "{group}"),
    "getent_passwd": ("getent", "passwd", "{user}"),
    "id_u": ("id", "-u"),
    "systemctl_is_active": ("systemctl", "is-active", "{unit}"),
    "systemctl_try_restart": ("systemctl", "try-restart", "{unit}"),
}


def _prefer_aead_ciphers(transport: paramiko.Transport) -> None:
    """AES-GCM first (as OpenSSH ranks it, after chacha20 which paramiko lacks): its tag is
    checked in C, while paramiko checks the HMAC of the other ciphers byte by byte in
    Python (about a tenth of a deploy's CPU time, bench/bench_deploy.py)."""
    opts = transport.get_security_options()
    aead = [c for c in opts.ciphers if c.endswith("-gcm@openssh.com")]
    opts.ciphers = aead + [c for c in opts.ciphers if c not in aead]


def _prefer_known_key_types(transport: paramiko.Transport, target: HostTarget) -> None:
    """Ask the server for a key type we already know (as OpenSSH orders HostKeyAlgorithms)."""
    known = [e.keytype for e in known_entries(target)
             if e.marker is None and e.matches(target.known_hosts_name)]
    wanted: List[str] = []
    for t in known:
        wanted += ["rsa-sha2-512", "rsa-sha2-256"] if t == "ssh-rsa" else [t]
    opts = transport.get_security_options()
    first = [t for t in dict.fromkeys(wanted) if t in opts.key_types]
    if first:
        opts.key_types = first + [t for t in opts.key_types if t not in first]


# ---------------------------------------------------------------- commands


@dataclass(frozen=True)
class RunResult:
    rc: int
    stdout: bytes
    stderr: bytes

    @property
    def ok(self) -> bool:
        return self.rc == 0

    @property
    def text(self) -> str:
        return self.stdout.decode("utf-8", "replace")


def within_caps(where: str, program: str, out: bytearray, err: bytearray) -> None:
    """A command's output is bounded: a host that prints without end is refused."""
    for data, cap, stream in ((out, MAX_STDOUT, "output"), (err, MAX_STDERR, "error output")):
        if len(data) > cap:
            raise RemoteError(f"{where}: {program} printed more than {cap} bytes of {stream}: "
                              "refused (a broken or hostile host?)")


def checked(where: str, program: str, result: RunResult) -> None:
    """RemoteError naming the exit status and the first line of error output unless it succeeded."""
    if not result.ok:
        first = (result.stderr.decode("utf-8", "replace").strip().splitlines() or [""])[0]
        raise RemoteError(f"{where}: {program} failed (exit {result.rc})" + (f": {first}" if first else ""))


def command_line(argv: Sequence[str]) -> str:
    """The one remote command line for `argv`: allowlisted program, every item quoted."""
    if isinstance(argv, (str, bytes)) or not argv:
        raise InvalidInput("a remote command must be a non-empty argv list")
    for item in argv:
        if not isinstance(item, str) or "\0" in item:
            raise InvalidInput(f"remote argument {item!r} is not a string without NUL")
    if argv[0] not in PROGRAMS:
        raise InvalidInput(f"remote program {argv[0]!r} is not one qemuca runs")
    return shlex.join(argv)


def command(name: str, **args: str) -> List[str]:
    """argv from a COMMANDS template; each value fills exactly one argv item."""
    try:
        return [item.format(**args) for item in COMMANDS[name]]
    except KeyError as e:
        raise InvalidInput(f"command template {name!r}: missing or unknown {e}") from None


# ---------------------------------------------------------------- connections


def _describe(exc: BaseException, timeout: float) -> str:
    """One line for what went wrong on the wire."""
    text, cause = str(exc), exc.__context__  # paramiko wraps a socket timeout in SSHException
    if isinstance(exc, (socket.timeout, TimeoutError)) or isinstance(cause, (socket.timeout, TimeoutError)) \
            or re.search("timed out|timeout", text, re.I):
        return f"timed out after {timeout:g}s"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, socket.gaierror):
        return f"cannot resolve host name ({exc.strerror})"
    if isinstance(exc, OSError) and exc.errno in (errno.EHOSTUNREACH, errno.ENETUNREACH):
        return "no route to host"
    if isinstance(exc, paramiko.AuthenticationException):
        return "authentication failed"
    if isinstance(exc, (EOFError, ConnectionResetError)) or "EOFError" in text or "dropped" in text:
        return "connection closed by the remote side"
    if isinstance(exc, paramiko.ProxyCommandFailure):
        return f"ProxyCommand failed: {text}"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower()
    return text or type(exc).__name__


class ExecChannel:
    """A long-running remote program on its own SSH exec channel: what its stdin and
    stdout carry is the caller's protocol (probe speaks QMP over it). Failures of the
    channel are EOFError, whatever paramiko raised."""

    def __init__(self, chan: paramiko.Channel):
        self._chan = chan

    def send(self, data: bytes) -> None:
        try:
            self._chan.sendall(data)
        except (OSError, paramiko.SSHException) as e:
            raise EOFError(str(e)) from None

    def wait_readable(self, seconds: float) -> None:
        """Until stdout or stderr has data, the channel ends, or `seconds` pass."""
        select.select([self._chan], [], [], seconds)

    def read(self) -> bytes:
        """What stdout holds now (b"" when nothing)."""
        return self._chan.recv(65536) if self._chan.recv_ready() else b""

    def read_stderr(self) -> bytes:
        out = bytearray()
        while self._chan.recv_stderr_ready():
            out += self._chan.recv_stderr(65536)
        return bytes(out)

    @property
    def at_eof(self) -> bool:
        return bool(self._chan.eof_received or self._chan.closed)

    def exited(self) -> bool:
        return self._chan.exit_status_ready()

    def wait_exit(self, seconds: float) -> bool:
        """Wait up to `seconds` for the program's end; whether it ended."""
        return self._chan.status_event.wait(seconds)

    def fileno(self) -> int:
        """For select(): readable when stdout or stderr has data or the channel ends."""
        return self._chan.fileno()

    def close(self) -> None:
        self._chan.close()


class Connection:
    """One authenticated SSH connection to one host; close it (or use `with`)."""

    def __init__(self, target: HostTarget, transport: paramiko.Transport,
                 command_timeout: float = DEFAULT_COMMAND_TIMEOUT, via: Optional[Connection] = None):
        self.target, self.transport, self.via = target, transport, via
        self.command_timeout = command_timeout
        self._sftp: Optional[paramiko.SFTPClient] = None

    @property
    def name(self) -> str:
        return self.target.alias

    def __enter__(self) -> Connection:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        for closable in (self._sftp, self.transport, self.via):
            if closable is not None:
                closable.close()
        self._sftp = self.via = None

    def error(self, exc: BaseException, what: str = "", timeout: Optional[float] = None) -> RemoteError:
        """A RemoteError naming this host for a low-level exception."""
        desc = _describe(exc, self.command_timeout if timeout is None else timeout)
        return RemoteError(f"{self.name}: {what + ': ' if what else ''}{desc}")

    def sftp(self) -> paramiko.SFTPClient:
        """The connection's one SFTP session, opened on first use."""
        if self._sftp is None:
            try:
                self._sftp = self.transport.open_sftp_client()
                chan = self._sftp.get_channel()
                assert chan is not None  # a client opened on the transport runs on its channel
                chan.settimeout(self.command_timeout)
            except paramiko.SFTPError as e:
                raise self.error(e, "SFTP failed (does the login shell print text, e.g. from "
                                    "~/.bashrc?)") from None
            except (paramiko.SSHException, OSError, EOFError) as e:
                raise self.error(e, "sftp") from None
        return self._sftp

    def run(self, argv: Sequence[str], stdin: Optional[bytes] = None, timeout: Optional[float] = None,
            check: bool = False) -> RunResult:
        """Run an allowlisted program with literal arguments; `check` raises on rc != 0."""
        line = command_line(argv)
        timeout = self.command_timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        try:
            chan = self.transport.open_session(timeout=timeout)
            try:
                chan.settimeout(timeout)
                chan.exec_command(line)
                if stdin:
                    chan.sendall(stdin)
                chan.shutdown_write()
                out, err = bytearray(), bytearray()
                while True:
                    while chan.recv_ready():
                        out += chan.recv(65536)
                        within_caps(self.name, argv[0], out, err)
                    while chan.recv_stderr_ready():
                        err += chan.recv_stderr(65536)
                        within_caps(self.name, argv[0], out, err)
                    if chan.eof_received or chan.closed:
                        break
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise socket.timeout()
                    select.select([chan], [], [], min(left, 1.0))
                while chan.recv_ready():  # data that came in with the EOF
                    out += chan.recv(65536)
                    within_caps(self.name, argv[0], out, err)
                while chan.recv_stderr_ready():
                    err += chan.recv_stderr(65536)
                    within_caps(self.name, argv[0], out, err)
                if not chan.status_event.wait(max(deadline - time.monotonic(), 0)):
                    raise socket.timeout()
                result = RunResult(chan.recv_exit_status(), bytes(out), bytes(err))
            finally:
                chan.close()
        except (paramiko.SSHException, OSError, EOFError) as e:
            raise self.error(e, argv[0], timeout) from None
        if check:
            checked(self.name, argv[0], result)
        return result

    def run_command(self, name: str, stdin: Optional[bytes] = None, timeout: Optional[float] = None,
                    check: bool = False, **args: str) -> RunResult:
        """run() a COMMANDS template."""
        return self.run(command(name, **args), stdin=stdin, timeout=timeout, check=check)

    @property
    def alive(self) -> bool:
        """Whether the connection is still up (a lost one fails every later operation)."""
        return self.transport.is_active()

    def open_exec(self, argv: Sequence[str], what: str) -> ExecChannel:
        """Start an allowlisted program on its own channel and leave it running."""
        line = command_line(argv)
        try:
            chan = self.transport.open_session(timeout=self.command_timeout)
            chan.exec_command(line)
        except (paramiko.SSHException, OSError, EOFError) as e:
            raise self.error(e, what) from None
        return ExecChannel(chan)

    def _tunnel(self, host: str, port: int, timeout: float) -> paramiko.Channel:
        """A direct-tcpip channel from this host to host:port (ProxyJump's hop)."""
        try:
            return self.transport.open_channel("direct-tcpip", (host, port), ("127.0.0.1", 0),
                                               timeout=timeout)
        except paramiko.ChannelException as e:
            raise RemoteError(f"{self.name}: cannot forward to {host}:{port}: {e.text.lower()}") from None
        except (paramiko.SSHException, OSError, EOFError) as e:
            raise self.error(e, f"forward to {host}:{port}", timeout) from None


def _agent_keys(target: HostTarget, allow: bool) -> List[paramiko.PKey]:
    if not allow or not os.environ.get("SSH_AUTH_SOCK"):
        return []
    try:
        keys: List[paramiko.PKey] = list(paramiko.Agent().get_keys())
    except (paramiko.SSHException, OSError):
        return []
    if target.identities_only:  # only the agent's copies of the configured identities
        wanted = set()
        for path in target.identity_files:
            try:
                with open(path + ".pub", encoding="utf-8") as f:
                    wanted.add(base64.b64decode(f.read().split()[1]))
            except (OSError, IndexError, ValueError):
                pass
        keys = [k for k in keys if k.asbytes() in wanted]
    return keys


def _authenticate(t: paramiko.Transport, target: HostTarget, options: SshOptions) -> None:
    """Public keys only, agent first, then identity files (OpenSSH's order)."""
    if options.identity_file and not os.path.isfile(os.path.expanduser(options.identity_file)):
        raise InvalidInput(f"identity file {options.identity_file}: no such file")
    tried, skipped = set(), []

    def keys():
        yield from _agent_keys(target, options.allow_agent)
        for path in dict.fromkeys(target.identity_files):
            if not os.path.isfile(path):
                continue
            try:
                yield paramiko.PKey.from_path(path)
            except (paramiko.PasswordRequiredException, TypeError):
                skipped.append(f"{path} is encrypted and not in ssh-agent")
            except (paramiko.SSHException, ValueError, OSError) as e:
                skipped.append(f"{path}: {e}")

    for key in keys():
        if key.asbytes() in tried:
            continue
        tried.add(key.asbytes())
        try:
            if not t.auth_publickey(target.user, key):
                return
            skipped.append("the server wants a second factor")
            break
        except paramiko.BadAuthenticationType as e:
            raise RemoteError(f"{target.alias}: authentication failed as {target.user} "
                              f"(server allows only: {', '.join(e.allowed_types)})") from None
        except paramiko.AuthenticationException:
            pass
    note = f"; {'; '.join(skipped)}" if skipped else ""
    raise RemoteError(f"{target.alias}: authentication failed as {target.user} "
                      f"({len(tried)} key{'s' if len(tried) != 1 else ''} tried{note})")


def _open(alias: str, options: SshOptions, config: paramiko.SSHConfig, user: Optional[str],
          port: Optional[int], jumps: Optional[str], depth: int,
          hostname: Optional[str] = None) -> Connection:
    target = resolve(alias, options, config, user=user, port=port, hostname=hostname)
    jumps = target.proxy_jump if jumps is None else jumps
    timeout = target.connect_timeout
    via: Optional[Connection] = None
    sock: Union[paramiko.Channel, paramiko.ProxyCommand, socket.socket, None] = None
    t: Optional[paramiko.Transport] = None
    try:
        if jumps:
            if depth >= MAX_JUMPS:
                raise RemoteError(f"{alias}: more than {MAX_JUMPS} ProxyJump hops (a loop?)")
            hops = [h for h in jumps.split(",") if h.strip()]
            juser, jhost, jport = parse_jump(hops[-1])
            try:
                # Earlier hops of a chain are forced; a single hop follows its own config.
                via = _open(jhost, replace(options, user=None), config, juser, jport,
                            ",".join(hops[:-1]) or None, depth + 1)
            except HostKeyError:
                raise
            except RemoteError as e:
                raise RemoteError(f"{alias}: via {e}") from None
            sock = via._tunnel(target.hostname, target.port, timeout)
        elif target.proxy_command:
            sock = paramiko.ProxyCommand(target.proxy_command)
        else:
            sock = socket.create_connection((target.hostname, target.port), timeout=timeout)
            # Without it Nagle holds each small request (a channel
            # open, an SFTP call) until the host's delayed ACK, about 40 ms per exchange.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        t = paramiko.Transport(sock)
        t.banner_timeout = t.handshake_timeout = t.auth_timeout = timeout
        _prefer_known_key_types(t, target)
        _prefer_aead_ciphers(t)
        done = threading.Event()
        t.start_client(event=done)
        if not done.wait(timeout):
            raise socket.timeout()
        if not t.is_active():
            raise t.get_exception() or paramiko.SSHException("SSH negotiation failed")
        check_host_key(target, t.get_remote_server_key(), options.accept_new_host_key)
        _authenticate(t, target, options)
        return Connection(target, t, options.command_timeout, via)
    except BaseException as e:
        if t is not None:
            t.close()
        elif sock is not None:
            sock.close()
        if via is not None:
            via.close()
        if isinstance(e, (RemoteError, InvalidInput)) or not isinstance(e, Exception):
            raise
        raise RemoteError(f"{alias}: {_describe(e, timeout)}") from None


def connect(alias: str, options: SshOptions = SshOptions(),
            config: Optional[paramiko.SSHConfig] = None, hostname: Optional[str] = None,
            port: Optional[int] = None, user: Optional[str] = None) -> Connection:
    """Connect to the ssh_config host `alias` (jump hosts included), check its key, log in.

    hostname/port/user override what ssh_config says (an inventory's ansible_host...).
    """
    if config is None:
        config = load_ssh_config(options.ssh_config)
    return _open(alias, options, config, user, port, None, 0, hostname)
