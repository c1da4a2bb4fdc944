"""ssh_config as OpenSSH reads it, for the hosts qemuca reaches: Host, HostName, Port,
User, IdentityFile, IdentitiesOnly, ProxyJump, ProxyCommand, HostKeyAlias,
UserKnownHostsFile, GlobalKnownHostsFile, HashKnownHosts, ConnectTimeout, Include
(paramiko has no Include: it is expanded here). Every file is read as a regular file of
bounded size: a FIFO or /dev/zero named by an Include is refused, never read forever.
"""

from __future__ import annotations

import getpass
import glob
import os
import re
import shlex
from dataclasses import dataclass
from typing import List, Optional, Tuple

import paramiko

from qemuca.errors import InvalidInput
from qemuca.hosts.fs import read_user_file

DEFAULT_CONNECT_TIMEOUT = 10.0
DEFAULT_COMMAND_TIMEOUT = 60.0
MAX_CONFIG = 1 << 20  # an ssh_config (or an included file) beyond this is not one
_DEFAULT_IDENTITIES = ("~/.ssh/id_rsa", "~/.ssh/id_ecdsa", "~/.ssh/id_ed25519")


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
    lines = read_user_file(path, "ssh config", MAX_CONFIG).decode("utf-8", "replace").splitlines()
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


class _SSHConfig(paramiko.SSHConfig):
    """paramiko's parser, minus one cost: for every Host block that does not match,
    paramiko asks getpass.getuser() (a passwd lookup when $USER is unset, as under
    cron or a systemd unit) before finding the block has no Match criteria. With a
    generated config of one block per host, resolving every host of a fleet became
    quadratic in the fleet's size. A block without Match criteria matches nothing here,
    which is what paramiko returns for it (an empty list)."""

    def _does_match(self, match_list, *args):
        if not match_list:
            return []
        return super()._does_match(match_list, *args)


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
        # A Host line ends any block an earlier file left open.
        lines += (["Host *"] if lines else []) + _config_lines(p, base)
    try:
        return _SSHConfig.from_text("\n".join(lines))
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
