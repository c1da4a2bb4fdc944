"""SSH to the hosts the way an OpenSSH user expects, with paramiko underneath.

ssh_config is honoured (Host, HostName, Port, User, IdentityFile, IdentitiesOnly,
ProxyJump, ProxyCommand, HostKeyAlias, UserKnownHostsFile, GlobalKnownHostsFile,
HashKnownHosts, ConnectTimeout, Include). paramiko applies no StrictHostKeyChecking,
so the host-key policy lives here: unknown and changed keys are refused unless
`accept_new_host_key` is set, which adds unknown keys and never accepts a changed one
(StrictHostKeyChecking in the config is deliberately ignored: the tool is strict unless
told otherwise on its own command line).

Remote commands are argv lists of allowlisted programs, quoted with shlex into one
command line for the remote POSIX shell; a user-typed string is never a command.
Secrets go on stdin, never into argv (argv is visible in `ps` on the host).
"""

from __future__ import annotations

import base64
import errno
import getpass
import glob
import hashlib
import hmac
import os
import re
import select
import shlex
import socket
import stat as stat_mod
import threading
import time
from dataclasses import dataclass, replace
from typing import Dict, List, Optional, Sequence, Tuple

import paramiko

from qemuca.errors import HostKeyError, InvalidInput, RemoteError
from qemuca.hosts.fs import LocalFS

DEFAULT_CONNECT_TIMEOUT = 10.0
DEFAULT_COMMAND_TIMEOUT = 60.0
MAX_JUMPS = 8

# Programs the tool runs on hosts. Anything else is refused before it leaves this process.
PROGRAMS = frozenset({
    "cat", "certtool", "chmod", "cp", "chown", "getent", "hostname", "id", "kill", "libvirtd", "ln", "ls",
    "mkdir", "mv", "openssl", "printf", "readlink", "rm", "setpriv", "sha256sum", "stat", "sync",
    "systemctl", "test", "timeout", "true", "uname", "virsh", "virtqemud",
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

_DEFAULT_IDENTITIES = ("~/.ssh/id_rsa", "~/.ssh/id_ecdsa", "~/.ssh/id_ed25519")
_KNOWN_HOSTS_LOCK = threading.Lock()


# ---------------------------------------------------------------- options and config


@dataclass(frozen=True)
class SshOptions:
    """What the command line can say about SSH; None means "ask ssh_config"."""

    ssh_config: Optional[str] = None  # None: ~/.ssh/config then /etc/ssh/ssh_config
    known_hosts: Optional[str] = None  # None: UserKnownHostsFile, else ~/.ssh/known_hosts
    accept_new_host_key: bool = False
    identity_file: Optional[str] = None
    user: Optional[str] = None
    connect_timeout: Optional[float] = None  # None: ConnectTimeout, else 10 s
    command_timeout: float = DEFAULT_COMMAND_TIMEOUT
    allow_agent: bool = True


@dataclass(frozen=True)
class HostTarget:
    """One host alias resolved through ssh_config: everything needed to reach it."""

    alias: str
    hostname: str
    port: int = 22
    user: str = ""
    identity_files: Tuple[str, ...] = ()
    identities_only: bool = False
    proxy_jump: Optional[str] = None
    proxy_command: Optional[str] = None
    host_key_alias: Optional[str] = None
    known_hosts_files: Tuple[str, ...] = ()  # keys are added to the first one
    global_known_hosts_files: Tuple[str, ...] = ()  # read only
    hash_known_hosts: bool = False
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT

    @property
    def known_hosts_name(self) -> str:
        """The name OpenSSH stores this host's key under."""
        if self.host_key_alias:
            return self.host_key_alias.lower()
        host = self.hostname.lower()
        return host if self.port == 22 else f"[{host}]:{self.port}"


_INCLUDE = re.compile(r"^\s*include(?:\s*=\s*|\s+)(.+)$", re.IGNORECASE)


def _config_lines(path: str, base: str, depth: int = 0) -> List[str]:
    """The file's lines with `Include` expanded in place (paramiko has no Include)."""
    if depth > 16:
        raise InvalidInput(f"{path}: Include nested too deeply")
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    out: List[str] = []
    for line in lines:
        m = _INCLUDE.match(line)
        if not m:
            out.append(line)
            continue
        for pattern in shlex.split(m.group(1)):
            pattern = os.path.expanduser(pattern)
            for inc in sorted(glob.glob(os.path.join(base, pattern))):
                out.extend(_config_lines(inc, base, depth + 1))
    return out


def load_ssh_config(path: Optional[str] = None) -> paramiko.SSHConfig:
    """An explicit file alone (like `ssh -F`), else the user's and the system's files."""
    if path is not None:
        if not os.path.isfile(path):
            raise InvalidInput(f"ssh config {path}: no such file")
        files = [(path, os.path.expanduser("~/.ssh"))]
    else:
        files = [(p, b) for p, b in ((os.path.expanduser("~/.ssh/config"), os.path.expanduser("~/.ssh")),
                                     ("/etc/ssh/ssh_config", "/etc/ssh")) if os.path.isfile(p)]
    lines: List[str] = []
    for p, base in files:
        try:
            # A Host line ends any block an earlier file left open.
            lines += (["Host *"] if lines else []) + _config_lines(p, base)
        except OSError as e:
            raise InvalidInput(f"ssh config {p}: {e.strerror}") from None
    try:
        return paramiko.SSHConfig.from_text("\n".join(lines))
    except paramiko.ssh_exception.ConfigParseError as e:
        raise InvalidInput(f"ssh config {files[0][0]}: {e}") from None


def _int_option(value, name: str, alias: str) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        raise InvalidInput(f"{alias}: ssh config {name} {value!r} is not a number") from None


def resolve(alias: str, options: SshOptions = SshOptions(), config: Optional[paramiko.SSHConfig] = None,
            user: Optional[str] = None, port: Optional[int] = None,
            hostname: Optional[str] = None) -> HostTarget:
    """Apply ssh_config to `alias`; `user`/`port`/`hostname` (from a ProxyJump spec or an
    inventory's ansible_host/port/user) and options override it."""
    if config is None:
        config = load_ssh_config(options.ssh_config)
    d = config.lookup(alias)
    identities = list(d.get("identityfile") or _DEFAULT_IDENTITIES)
    if options.identity_file:
        identities.insert(0, options.identity_file)
    if options.known_hosts:
        user_files, global_files = [options.known_hosts], []
    else:
        user_files = d.get("userknownhostsfile", "~/.ssh/known_hosts ~/.ssh/known_hosts2").split()
        global_files = d.get("globalknownhostsfile",
                             "/etc/ssh/ssh_known_hosts /etc/ssh/ssh_known_hosts2").split()
    timeout = options.connect_timeout or _int_option(d.get("connecttimeout", DEFAULT_CONNECT_TIMEOUT),
                                                     "ConnectTimeout", alias)
    jump = d.get("proxyjump")
    return HostTarget(
        alias=alias,
        hostname=hostname or d["hostname"],
        port=port or _int_option(d.get("port", 22), "Port", alias),
        user=user or options.user or d.get("user") or getpass.getuser(),
        identity_files=tuple(os.path.expanduser(p) for p in identities),
        identities_only=d.get("identitiesonly", "no").lower() == "yes",
        proxy_jump=None if not jump or jump.lower() == "none" else jump,
        proxy_command=d.get("proxycommand"),
        host_key_alias=d.get("hostkeyalias"),
        known_hosts_files=tuple(os.path.expanduser(p) for p in user_files),
        global_known_hosts_files=tuple(os.path.expanduser(p) for p in global_files),
        hash_known_hosts=d.get("hashknownhosts", "no").lower() == "yes",
        connect_timeout=float(timeout),
    )


def parse_jump(spec: str) -> Tuple[Optional[str], str, Optional[int]]:
    """`[user@]host[:port]` or `ssh://[user@]host[:port]` -> (user, host, port)."""
    rest = spec.strip()
    if rest.startswith("ssh://"):
        rest = rest[len("ssh://"):].rstrip("/")
    user, _, hostport = rest.rpartition("@")
    m = re.fullmatch(r"\[([^\]]+)\](?::(\d+))?|([^:\[\]]+)(?::(\d+))?", hostport)
    if not m or (user == "" and "@" in rest):
        raise InvalidInput(f"ProxyJump {spec!r}: expected [user@]host[:port]")
    host, port = (m.group(1), m.group(2)) if m.group(1) else (m.group(3), m.group(4))
    return user or None, host, int(port) if port else None


# ---------------------------------------------------------------- known_hosts


def fingerprint(blob: bytes) -> str:
    """OpenSSH's fingerprint: SHA256:base64 without padding."""
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


def _hash_name(name: str, salt: bytes) -> str:
    digest = hmac.new(salt, name.encode(), hashlib.sha1).digest()
    return f"|1|{base64.b64encode(salt).decode()}|{base64.b64encode(digest).decode()}"


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
                salt = base64.b64decode(self.hosts.split("|")[2])
            except (IndexError, ValueError):
                return False
            return hmac.compare_digest(_hash_name(name, salt), self.hosts)
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
        with open(path, encoding="utf-8", errors="replace") as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        return []
    except OSError as e:
        raise InvalidInput(f"known_hosts {path}: {e.strerror}") from None
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
    host = _hash_name(name.lower(), os.urandom(20)) if hashed else name
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


def _known_entries(target: HostTarget) -> List[KnownHost]:
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
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    LocalFS().write_atomic(path, (old + line + "\n").encode(), stat_mod.S_IMODE(st.st_mode) if st else 0o600)


def check_host_key(target: HostTarget, key: paramiko.PKey, accept_new: bool = False) -> None:
    """Accept the server's key or raise HostKeyError; with accept_new, remember an unknown one."""
    name, keytype, blob = target.known_hosts_name, key.get_name(), key.asbytes()
    fp = f"{keytype} {fingerprint(blob)}"
    line = known_hosts_line(name, keytype, blob)
    where = target.known_hosts_files[0] if target.known_hosts_files else "known_hosts"

    def refuse(status: str, entry: Optional[KnownHost]) -> None:
        if status == "revoked":
            msg = f"host key {fp} for {name} is revoked ({entry.path}:{entry.lineno})"
        elif status == "unknown":
            msg = (f"host key for {name} is unknown: {fp}. If that is the host's key, add this "
                   f"line to {where}: {line} (or connect once with --accept-new-host-key)")
        else:
            old = f"{entry.keytype} {fingerprint(entry.blob)}"
            msg = (f"HOST KEY CHANGED for {name}: it offers {fp}, {entry.path}:{entry.lineno} has "
                   f"{old}. Someone could be intercepting the connection; if the change is expected, "
                   f"remove the old key (ssh-keygen -R '{name}' -f {entry.path}) and add: {line}")
        exc = HostKeyError(f"{target.alias}: {msg}")
        exc.fingerprint, exc.known_hosts_line = fingerprint(blob), line
        raise exc

    status, entry = host_key_status(_known_entries(target), name, keytype, blob)
    if status == "ok":
        return
    if status != "unknown" or not accept_new or not target.known_hosts_files:
        refuse(status, entry)
    with _KNOWN_HOSTS_LOCK:  # parallel hosts in one process: re-read under the lock
        status, entry = host_key_status(_known_entries(target), name, keytype, blob)
        if status == "unknown":
            try:
                _add_known_host(where, line, target.hash_known_hosts, name)
            except OSError as e:
                raise RemoteError(f"{target.alias}: cannot add host key to {where}: {e.strerror}") from None
        elif status != "ok":
            refuse(status, entry)


def _prefer_aead_ciphers(transport: paramiko.Transport) -> None:
    """AES-GCM first (as OpenSSH ranks it, after chacha20 which paramiko lacks): its tag is
    checked in C, while paramiko checks the HMAC of the other ciphers byte by byte in
    Python (about a tenth of a deploy's CPU time, bench/bench_deploy.py)."""
    opts = transport.get_security_options()
    aead = [c for c in opts.ciphers if c.endswith("-gcm@openssh.com")]
    opts.ciphers = aead + [c for c in opts.ciphers if c not in aead]


def _prefer_known_key_types(transport: paramiko.Transport, target: HostTarget) -> None:
    """Ask the server for a key type we already know (as OpenSSH orders HostKeyAlgorithms)."""
    known = [e.keytype for e in _known_entries(target)
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
        return self._chan.eof_received or self._chan.closed

    def exited(self) -> bool:
        return self._chan.exit_status_ready()

    def wait_exit(self, seconds: float) -> bool:
        """Wait up to `seconds` for the program's end; whether it ended."""
        return self._chan.status_event.wait(seconds)

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
                self._sftp.get_channel().settimeout(self.command_timeout)
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
                    while chan.recv_stderr_ready():
                        err += chan.recv_stderr(65536)
                    if chan.eof_received or chan.closed:
                        break
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise socket.timeout()
                    select.select([chan], [], [], min(left, 1.0))
                while chan.recv_ready():  # data that came in with the EOF
                    out += chan.recv(65536)
                while chan.recv_stderr_ready():
                    err += chan.recv_stderr(65536)
                if not chan.status_event.wait(max(deadline - time.monotonic(), 0)):
                    raise socket.timeout()
                result = RunResult(chan.recv_exit_status(), bytes(out), bytes(err))
            finally:
                chan.close()
        except (paramiko.SSHException, OSError, EOFError) as e:
            raise self.error(e, argv[0], timeout) from None
        if check and not result.ok:
            first = (result.stderr.decode("utf-8", "replace").strip().splitlines() or [""])[0]
            raise RemoteError(f"{self.name}: {argv[0]} failed (exit {result.rc})" + (f": {first}" if first else ""))
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
        keys = list(paramiko.Agent().get_keys())
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
    sock = t = None
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
