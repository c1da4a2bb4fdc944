"""How an Ansible host's connection variables become qemuca's SSH target.

The collection (ansible/qemuca/qemu_tls) connects with qemuca's own transport, not
Ansible's: the action plugin hands over what Ansible resolved for the task's host
(ansible_host, ansible_port, ansible_user, ansible_ssh_private_key_file and the
OpenSSH arguments in ansible_ssh_common_args / ansible_ssh_extra_args) and gets back
what `qemuca deploy --inventory` would use. Host keys are always checked: an argument
that asks OpenSSH not to (StrictHostKeyChecking=no) is refused with the way out, never
followed silently. Knows nothing of Ansible itself, so it is tested without it.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from typing import Optional

from qemuca.errors import InvalidInput
from qemuca.hosts.ssh_config import DEFAULT_COMMAND_TIMEOUT, SshOptions

# Options qemuca cannot take from a command line: they belong in an ssh_config file.
_CONFIG_ONLY = frozenset({"proxyjump", "proxycommand", "hostkeyalias"})


@dataclass(frozen=True)
class AnsibleConnection:
    """What Ansible resolved for one host (None: not set)."""

    host: Optional[str] = None  # ansible_host (else the inventory name is connected to)
    port: Optional[int] = None
    user: Optional[str] = None
    private_key_file: Optional[str] = None
    ssh_args: str = ""  # ansible_ssh_common_args + ansible_ssh_extra_args, as ssh takes them


@dataclass(frozen=True)
class SshTarget:
    options: SshOptions
    hostname: Optional[str]
    port: Optional[int]
    user: Optional[str]


def _split_option(text: str):
    key, sep, value = text.partition("=")
    if not sep:
        key, _, value = text.strip().partition(" ")
    return key.strip().lower(), value.strip()


def _parse_args(args: str) -> dict:
    """OpenSSH client arguments -> {lower-case option: value}; -F -i -p -l -J too; other
    options (ControlMaster, ServerAliveInterval...) concern ssh itself and are ignored."""
    try:
        words = shlex.split(args or "")
    except ValueError as e:
        raise InvalidInput(f"ansible_ssh_common_args/extra_args {args!r}: {e}") from None
    flags = {"-F": "configfile", "-i": "identityfile", "-p": "port", "-l": "user", "-J": "proxyjump"}
    out: dict = {}
    i = 0
    while i < len(words):
        word = words[i]
        flag, attached = word[:2], word[2:]
        if flag == "-o" or flag in flags:
            if attached:
                value = attached
            elif i + 1 < len(words):
                i += 1
                value = words[i]
            else:
                raise InvalidInput(f"ssh argument {word} has no value (in {args!r})")
            if flag == "-o":
                key, val = _split_option(value)
            else:
                key, val = flags[flag], value
            out.setdefault(key, val)  # OpenSSH: the first value given wins
        i += 1
    return out


def ssh_target(conn: AnsibleConnection, known_hosts: Optional[str] = None, ssh_config: Optional[str] = None,
               accept_new_host_key: bool = False, connect_timeout: Optional[float] = None,
               command_timeout: Optional[float] = None) -> SshTarget:
    """The SshOptions and address overrides `qemuca deploy` would use for this host.

    Explicit arguments (the module's known_hosts, ssh_config...) win over what the SSH
    arguments say, which win over ssh_config files, as on OpenSSH's command line."""
    opts = _parse_args(conn.ssh_args)
    for key in sorted(set(opts) & _CONFIG_ONLY):
        raise InvalidInput(f"{key} in ansible_ssh_common_args/extra_args: qemuca's SSH transport takes it "
                           "from an ssh_config file only (give it with the ssh_config option)")
    strict = opts.get("stricthostkeychecking", "").lower()
    if strict in ("no", "off", "false"):
        raise InvalidInput("StrictHostKeyChecking=no in ansible_ssh_common_args/extra_args: qemuca always "
                           "checks host keys; add the hosts' keys to the known_hosts file (or use "
                           "accept_new_host_key: true, like StrictHostKeyChecking=accept-new)")
    accept_new = accept_new_host_key or strict == "accept-new"
    known = known_hosts or (opts.get("userknownhostsfile", "").split() or [None])[0]
    if known == "/dev/null" and not accept_new:
        raise InvalidInput("UserKnownHostsFile=/dev/null: no host key could ever be checked; give the "
                           "known_hosts file that holds the hosts' keys")
    port = conn.port if conn.port is not None else opts.get("port")
    try:
        port = int(port) if port is not None else None
    except (TypeError, ValueError):
        raise InvalidInput(f"ansible_port {port!r} is not a number") from None
    if port is not None and not 0 < port < 65536:
        raise InvalidInput(f"ansible_port {port} is not a TCP port")
    timeout = connect_timeout
    if timeout is None and opts.get("connecttimeout"):
        try:
            timeout = float(opts["connecttimeout"])
        except ValueError:
            raise InvalidInput(f"ConnectTimeout {opts['connecttimeout']!r} is not a number") from None
    options = SshOptions(ssh_config=ssh_config or opts.get("configfile"), known_hosts=known,
                         accept_new_host_key=accept_new,
                         identity_file=conn.private_key_file or opts.get("identityfile"),
                         user=conn.user or opts.get("user"), connect_timeout=timeout,
                         command_timeout=command_timeout or DEFAULT_COMMAND_TIMEOUT)
    return SshTarget(options, conn.host, port, conn.user or opts.get("user"))
