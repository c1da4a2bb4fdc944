"""What qemuca knows about a hypervisor, asked of the host itself, defined once: the
libvirt daemons it may run, its host name as libvirt announces it, and the group QEMU
runs as (which must be able to read the keys).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

from qemuca import names
from qemuca.errors import InvalidInput, NotFound
from qemuca.hosts import qemuconf
from qemuca.text import printable

# libvirt's daemons that read qemu.conf: modular virtqemud first, then monolithic libvirtd.
DAEMONS = (("virtqemud", "/usr/sbin/virtqemud"), ("libvirtd", "/usr/sbin/libvirtd"))
DAEMON_NAMES = tuple(name for name, _ in DAEMONS)
QEMU_GROUPS = {"debian": "libvirt-qemu", "rhel": "qemu"}  # libvirt's build default per family


@dataclass(frozen=True)
class HostName:
    """The host's name as libvirt announces it (virGetHostname: `hostname -f`)."""

    name: Optional[str]
    fully_qualified: bool  # False: `hostname -f` failed and `name` is the plain hostname
    problem: str = ""  # why `hostname -f` failed


def host_name(runner) -> HostName:
    """What libvirt announces; output that is not a host name counts as a failure (it is
    shown, escaped, in the problem, never used as a name)."""
    result = runner.run_command("hostname_f")
    name = _valid_name(result.text.strip()) if result.ok else None
    if name is not None:
        return HostName(name, True)
    if result.ok:
        problem = f"it printed {printable(result.text.strip()[:80])!r}, not a host name"
    else:
        problem = printable((result.stderr.decode("utf-8", "replace").strip().splitlines()
                             or [f"exit {result.rc}"])[0][:200])
    plain = runner.run(["hostname"])
    return HostName(_valid_name(plain.text.strip()) if plain.ok else None, False, problem)


def _valid_name(text: str) -> Optional[str]:
    try:
        return names.host_name(text) if text else None
    except InvalidInput:
        return None


@dataclass(frozen=True)
class QemuGroup:
    """The group libvirt runs QEMU as on a host, and why we think so (shown to the admin)."""

    name: str
    gid: int
    source: str

    def to_dict(self) -> dict:
        return {"name": self.name, "gid": self.gid, "source": self.source}


def resolve_group(conn, fs, doc: Optional[qemuconf.Document], wanted: Optional[str]) -> QemuGroup:
    """The group QEMU runs as, found the way libvirt finds it.

    libvirt takes qemu.conf's `group`, else its build default: that is a property of the
    host's libvirt build, never of which group names happen to exist (a Debian host may
    have a `qemu` group that libvirt's QEMU is not in). The build default is read off the
    host: the stock qemu.conf documents it (`#group = "libvirt-qemu"`), else the distro
    family in /etc/os-release, else the user libvirt's packages created.
    """
    for name, source in _group_candidates(conn, fs, doc, wanted):
        if name.startswith("+") and name[1:].isdigit():  # libvirt's numeric "+107"
            return QemuGroup(name, int(name[1:]), source)
        fields = account(conn, fs, "group", name)
        if fields is not None and len(fields) >= 3 and fields[2].isdigit():
            return QemuGroup(name, int(fields[2]), source)
        raise NotFound(f"{conn.name}: QEMU's group is {name} ({source}), but the host has no such group: "
                       "is libvirt's QEMU driver installed? (or give --group)")
    raise NotFound(f"{conn.name}: cannot tell which group libvirt runs QEMU as (no `group` in qemu.conf, "
                   "no documented default, no known distribution, no libvirt-qemu or qemu user): give --group")


def account(conn, fs, database: str, name: str) -> Optional[List[str]]:
    """The fields of `name`'s entry in the host's group or passwd database, or None.

    /etc/group (/etc/passwd) is read first, over the file system the rest of the work
    uses: libvirt's QEMU user and group are local ones its packages create, and a
    command costs the host a process. A name it does not hold is asked of `getent`,
    which sees every NSS source (LDAP, SSSD)."""
    try:
        text = fs.read_bytes(f"/etc/{database}").decode("utf-8", "replace")
    except OSError:
        text = ""
    for line in text.splitlines():
        fields = line.split(":")
        if fields[0] == name:
            return fields
    result = conn.run_command(f"getent_{database}", **{"group" if database == "group" else "user": name})
    return result.text.strip().split(":") if result.ok else None


def _group_candidates(conn, fs, doc, wanted):
    if wanted:
        yield wanted, "--group"
        return
    if doc is not None:
        setting = doc.first("group")
        if setting is not None and isinstance(setting.value, str):
            yield setting.value, f"qemu.conf group (line {setting.line})"
            return
        documented = doc.documented_default("group")
        if documented is not None:
            value, line = documented
            yield value, f"libvirt's default, documented in qemu.conf (line {line})"
            return
    family = os_family(fs)
    if family is not None:
        yield QEMU_GROUPS[family], f"libvirt's default on {family} (/etc/os-release)"
        return
    for user in (QEMU_GROUPS["debian"], QEMU_GROUPS["rhel"]):  # the user libvirt's packages create
        fields = account(conn, fs, "passwd", user)
        if fields is not None and len(fields) >= 4 and fields[3].isdigit():
            yield f"+{fields[3]}", f"the primary group of user {user}"
            return


OS_RELEASE = ("/etc/os-release", "/usr/lib/os-release")
_FAMILIES = {"debian": "debian", "ubuntu": "debian", "rhel": "rhel", "fedora": "rhel", "centos": "rhel"}


def os_family(fs) -> Optional[str]:
    """"debian" or "rhel" from os-release's ID and ID_LIKE, or None (unknown or unreadable)."""
    for path in OS_RELEASE:
        try:
            text = fs.read_bytes(path, limit=64 << 10).decode("utf-8", "replace")
        except OSError:
            continue
        fields = {}
        for line in text.splitlines():
            key, sep, value = line.partition("=")
            if sep:
                fields[key.strip()] = value.strip().strip("\"'")
        for ident in [fields.get("ID", "")] + fields.get("ID_LIKE", "").split():
            if ident.lower() in _FAMILIES:
                return _FAMILIES[ident.lower()]
        return None
    return None
