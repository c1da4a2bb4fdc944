"""What qemuca knows about a hypervisor, asked of the host itself, defined once: the
libvirt daemons it may run, its host name as libvirt announces it, and the group QEMU
runs as (which must be able to read the keys).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from qemuca.errors import NotFound
from qemuca.hosts import qemuconf

# libvirt's daemons that read qemu.conf: modular virtqemud first, then monolithic libvirtd.
DAEMONS = (("virtqemud", "/usr/sbin/virtqemud"), ("libvirtd", "/usr/sbin/libvirtd"))
DAEMON_NAMES = tuple(name for name, _ in DAEMONS)
QEMU_GROUPS = ("qemu", "libvirt-qemu")  # RHEL/Fedora, Debian/Ubuntu


@dataclass(frozen=True)
class HostName:
    """The host's name as libvirt announces it (virGetHostname: `hostname -f`)."""

    name: Optional[str]
    fully_qualified: bool  # False: `hostname -f` failed and `name` is the plain hostname
    problem: str = ""  # why `hostname -f` failed


def host_name(runner) -> HostName:
    result = runner.run_command("hostname_f")
    name = result.text.strip()
    if result.ok and name:
        return HostName(name, True)
    problem = (result.stderr.decode("utf-8", "replace").strip().splitlines() or [f"exit {result.rc}"])[0]
    plain = runner.run(["hostname"])
    return HostName(plain.text.strip() if plain.ok and plain.text.strip() else None, False, problem)


def resolve_group(conn, doc: Optional[qemuconf.Document], wanted: Optional[str]) -> int:
    """The gid QEMU runs as: --group, else qemu.conf's `group`, else qemu / libvirt-qemu."""
    if wanted:
        candidates, source = [wanted], "--group"
    else:
        setting = doc.first("group") if doc is not None else None
        if setting is not None and isinstance(setting.value, str):
            candidates, source = [setting.value], f"qemu.conf group (line {setting.line})"
        else:
            candidates, source = list(QEMU_GROUPS), "default"
    for name in candidates:
        if name.startswith("+") and name[1:].isdigit():  # libvirt's numeric "+107"
            return int(name[1:])
        result = conn.run_command("getent_group", group=name)
        if result.ok and result.text.count(":") >= 2:
            return int(result.text.split(":")[2])
    raise NotFound(f"{conn.name}: no group {' or '.join(candidates)} ({source}) on the host: "
                   "is libvirt's QEMU driver installed? Give --group")
