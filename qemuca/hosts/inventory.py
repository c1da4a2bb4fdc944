"""Where host names come from besides the command line: hosts files and Ansible inventories.

An inventory is read the way Ansible's ini and yaml inventory plugins read it, so a cluster
already described for Ansible needs no second list. Only what qemuca uses is kept: the host
names, their groups (for --limit) and the connection variables ansible_host/port/user,
resolved with Ansible's precedence (host vars, then deeper groups, then parents, then all).
"""

from __future__ import annotations

import ast
import ipaddress
import os
import re
import shlex
import string
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Set, Tuple

from qemuca.errors import InvalidInput
from qemuca.hosts.fs import read_user_file


def read_hosts_file(path: str) -> List[str]:
    """Host names, one per line; blank lines and # comments skipped."""
    try:
        lines = read_user_file(path, "hosts file").decode("utf-8-sig").splitlines()  # a BOM is no name
    except UnicodeDecodeError:
        raise InvalidInput(f"hosts file {path} is not UTF-8 text") from None
    hosts = []
    for line in lines:
        line = line.split("#", 1)[0].strip()
        if line:
            hosts.append(line)
    return hosts


@dataclass(frozen=True)
class InventoryHost:
    name: str                       # the inventory host name (becomes the certificate's host name)
    ssh_host: Optional[str] = None  # ansible_host (address or name to connect to), if set
    ssh_port: Optional[int] = None  # ansible_port / ansible_ssh_port
    ssh_user: Optional[str] = None  # ansible_user / ansible_ssh_user


_MAX_HOSTS = 100_000  # a range expanding past this is a typo, not a cluster
_SECTION = re.compile(r"\[([^:\]\s]+)(?::(\w+))?\]\s*(?:#.*)?\Z")
_GROUP_LINE = re.compile(r"([^:\]\s]+)\s*(?:#.*)?\Z")
_VAR_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_YAML_START = re.compile(r"---|%YAML|\{|[\w.-]+:(\s|\Z)")
# field -> variable names; at one level the first name wins over its older alias
_CONN_VARS = (("ssh_host", ("ansible_host", "ansible_ssh_host")),
              ("ssh_port", ("ansible_port", "ansible_ssh_port")),
              ("ssh_user", ("ansible_user", "ansible_ssh_user")))


def read_inventory(path: str, limit: Optional[str] = None) -> List[InventoryHost]:
    """The hosts of an Ansible INI or YAML inventory, all or those `limit` names, first seen first.

    `limit` is group and host names separated by `,` or `:`; a group brings its children.
    """
    raw = read_user_file(path, "inventory")
    if b"\0" in raw:
        raise InvalidInput(f"{path}: binary file, not an inventory")
    inv = _Inventory(path)
    try:
        (_parse_yaml if _looks_like_yaml(path, raw) else _parse_ini)(inv, raw)
        return inv.resolve(inv.select(limit))
    except RecursionError:
        raise InvalidInput(f"{path}: inventory is nested too deeply") from None


def _short(value: Any) -> str:
    """repr() cut to one short line, for messages."""
    text = repr(value)
    return text if len(text) <= 80 else text[:80] + "..."


def _looks_like_yaml(path: str, raw: bytes) -> bool:
    """Ansible picks the plugin by extension; a YAML file without one starts like `all:`."""
    if os.path.splitext(path)[1].lower() in (".yml", ".yaml", ".json"):
        return True
    for line in raw.splitlines():
        line = line.strip()
        if line and line[:1] not in (b"#", b";"):
            return bool(_YAML_START.match(line.decode("utf-8", "replace")))
    return False


class _Inventory:
    """Groups, hosts and vars as Ansible keeps them; dicts keep first-seen order."""

    def __init__(self, path: str):
        self.path = path
        self.hostvars: Dict[str, Dict[str, Any]] = {}
        self.members: Dict[str, Dict[str, None]] = {}   # group -> hosts listed in it
        self.children: Dict[str, Dict[str, None]] = {}  # group -> child groups
        self.groupvars: Dict[str, Dict[str, Any]] = {}
        self.depths: Dict[str, int] = {}
        self.group("all")
        self.group("ungrouped")

    def group(self, name: str) -> str:
        for table in (self.members, self.children, self.groupvars):
            table.setdefault(name, {})
        return name

    def add_host(self, name: str, group: str, variables: Dict[str, Any], where: str) -> None:
        if not name:
            raise InvalidInput(f"{where}: empty host name")
        self.hostvars.setdefault(name, {}).update(variables)
        self.members[self.group(group)][name] = None

    def add_child(self, parent: str, child: str, where: str) -> None:
        if child == "all" or parent in self.below(self.group(child)):
            raise InvalidInput(f"{where}: group {child!r} as a child of {parent!r} makes a loop")
        self.children[self.group(parent)][child] = None

    def below(self, group: str) -> Set[str]:
        """The group and every group under it."""
        seen, todo = set(), [group]
        while todo:
            g = todo.pop()
            if g not in seen:
                seen.add(g)
                todo.extend(self.children[g])
        return seen

    def hosts_of(self, group: str) -> Set[str]:
        if group == "all":
            return set(self.hostvars)
        if group == "ungrouped":  # as Ansible: the hosts no other group has
            grouped = {h for g in self.members if g not in ("all", "ungrouped") for h in self.members[g]}
            return set(self.hostvars) - grouped
        return {h for g in self.below(group) for h in self.members[g]}

    def depth(self, group: str) -> int:
        """Longest path from all: Ansible applies group vars from shallow to deep."""
        if group not in self.depths:
            parents = [p for p, kids in self.children.items() if group in kids]
            self.depths[group] = 0 if group == "all" else 1 + max(map(self.depth, parents), default=0)
        return self.depths[group]

    def select(self, limit: Optional[str]) -> List[str]:
        if limit is None:
            return list(self.hostvars)
        terms: List[str] = []
        for piece in limit.split(","):  # `:` separates too, unless it is part of a name (IPv6)
            piece = piece.strip()
            known = piece in self.members or piece in self.hostvars
            terms += [piece] if known else [term.strip() for term in piece.split(":")]
        if not any(terms):
            raise InvalidInput(f"empty limit for inventory {self.path}")
        chosen: Dict[str, None] = {}
        for term in filter(None, terms):
            if term not in self.members and term not in self.hostvars:
                raise InvalidInput(f"limit: no group or host named {term!r} in {self.path}")
            wanted = self.hosts_of(term) if term in self.members else {term}
            chosen.update((h, None) for h in self.hostvars if h in wanted or h == term)
        return list(chosen)

    def resolve(self, names: List[str]) -> List[InventoryHost]:
        groups: Dict[str, List[str]] = {name: [] for name in names}
        for g in self.members:
            for host in self.hosts_of(g) & groups.keys():
                groups[host].append(g)
        return [self.host(name, groups[name]) for name in names]

    def host(self, name: str, groups: List[str]) -> InventoryHost:
        layers = [self.groupvars[g] for g in sorted(groups, key=lambda g: (self.depth(g), g))]
        found: Dict[str, Tuple[str, Any]] = {}
        for layer in layers + [self.hostvars[name]]:  # host vars last: they win
            for field, variables in _CONN_VARS:
                for var in reversed(variables):
                    if var in layer:
                        found[field] = (var, layer[var])
        return InventoryHost(name, **{f: self.check(name, f, *found[f]) for f in found})

    def check(self, host: str, field: str, var: str, value: Any) -> Any:
        """A connection value we can use, or a clear refusal (not a surprise at connect time)."""
        ok = isinstance(value, (str, int)) and not isinstance(value, bool)
        text, port = str(value).strip() if ok else "", field == "ssh_port"
        if "{{" in text:
            why = "is a Jinja template, which qemuca does not evaluate"
        elif not port and text:
            return text
        elif port and re.fullmatch(r"[0-9]{1,5}", text) and 0 < int(text) < 65536:
            return int(text)
        else:
            why = "is not a port number" if port else "is not a name"
        raise InvalidInput(f"{self.path}: host {host!r}: {var}={_short(value)} {why}")


def _parse_ini(inv: _Inventory, raw: bytes) -> None:
    """Ansible's INI format: hosts before any section are ungrouped; [g], [g:children], [g:vars]."""
    group, state = "ungrouped", "hosts"
    declared = {"all", "ungrouped"}
    needed: Dict[str, str] = {}  # groups named by :vars/:children -> where
    for number, line_bytes in enumerate(raw.splitlines(), 1):
        where = f"{inv.path}:{number}"
        if line_bytes.lstrip()[:1] in (b"#", b";"):
            continue  # Ansible lets comments hold any bytes
        try:
            line = line_bytes.decode("utf-8").strip()
        except UnicodeDecodeError:
            raise InvalidInput(f"{where}: not UTF-8 text") from None
        section = _SECTION.match(line)
        if not line or line[0] in "#;":
            continue
        elif section:
            group, state = inv.group(section.group(1)), section.group(2) or "hosts"
            if state not in ("hosts", "children", "vars"):
                raise InvalidInput(f"{where}: unknown section type {state!r} in {line!r}")
            if state == "vars":
                needed.setdefault(group, where)  # [g:vars] alone does not declare g
            else:
                declared.add(group)
        elif line.startswith("[") and line.endswith("]"):
            raise InvalidInput(f"{where}: invalid section header {_short(line)}")
        elif state == "hosts":
            try:
                tokens = shlex.split(line, comments=True)
            except ValueError as e:
                raise InvalidInput(f"{where}: {e} in host line {_short(line)}") from None
            variables = dict(_key_value(token, where) for token in tokens[1:])
            for name in _host_pattern(tokens[0] if tokens else "", variables, where):
                inv.add_host(name, group, variables, where)
        elif state == "vars":
            key, value = _key_value(line, where, spaced=True)
            inv.groupvars[group][key] = value
        else:
            child = _GROUP_LINE.match(line)
            if not child:
                raise InvalidInput(f"{where}: expected a group name, got {_short(line)}")
            inv.add_child(group, child.group(1), where)
            needed.setdefault(child.group(1), where)
    for group, where in needed.items():
        if group not in declared:
            raise InvalidInput(f"{where}: group {group!r} is never declared as [{group}] "
                               f"or [{group}:children]")


def _key_value(text: str, where: str, spaced: bool = False) -> Tuple[str, Any]:
    """key=value; the value is a Python literal when it parses as one (as Ansible does), else text."""
    key, sep, value = text.partition("=")
    key, value = (key.strip(), value.strip()) if spaced else (key, value)
    if not sep or not _VAR_KEY.match(key):
        raise InvalidInput(f"{where}: expected key=value, got {_short(text)}")
    try:
        parsed = ast.literal_eval(value)
    except Exception:  # literal_eval raises many kinds (SyntaxError, ValueError, MemoryError...)
        return key, value
    return key, parsed if isinstance(parsed, (str, int)) else value


def _host_pattern(token: str, variables: Dict[str, Any], where: str) -> List[str]:
    """Host names of a pattern like web[01:20].example:2222; a :port is put in `variables`."""
    if token.endswith(":"):
        raise InvalidInput(f"{where}: host pattern {_short(token)} ends with ':' (kept for a port)")
    ipv6 = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\](?::([0-9]+))?", token)
    with_port = re.fullmatch(r"(.*):([0-9]+)", token)
    port: Optional[str] = None
    if ipv6 and _is_ipv6(ipv6.group(1)):
        token, port = ipv6.group(1), ipv6.group(2)
    elif with_port and re.sub(r"\[[^\[\]]*\]", "", token).count(":") == 1:  # not a bare IPv6
        token, port = with_port.group(1), with_port.group(2)
    if port is not None:
        variables.setdefault("ansible_port", port)  # an explicit ansible_port wins, as in Ansible
    names, rest = [""], token
    while "[" in rest or "]" in rest:
        m = re.match(r"([^\[\]]*)\[([^\[\]]*)\]", rest)
        if not m:
            raise InvalidInput(f"{where}: unbalanced brackets in host pattern {_short(token)}")
        values = _range(m.group(2), token, where)
        if len(names) * len(values) > _MAX_HOSTS:
            raise InvalidInput(f"{where}: host pattern {_short(token)} expands to too many hosts")
        names = [n + m.group(1) + v for n in names for v in values]
        rest = rest[m.end():]
    return [n + rest for n in names]


def _is_ipv6(text: str) -> bool:
    try:
        return bool(ipaddress.IPv6Address(text))
    except ValueError:
        return False


def _range(body: str, token: str, where: str) -> List[str]:
    """[01:03] -> 01 02 03, [a:c] -> a b c, [0:10:5] -> 0 5 10 (Ansible's rules)."""
    bad = f"{where}: bad range [{body}] in host pattern {_short(token)}"
    parts = body.split(":") + ["1"]  # the step defaults to 1
    if len(parts) not in (3, 4) or not re.fullmatch(r"[1-9][0-9]{0,5}", parts[2]):
        raise InvalidInput(f"{bad}: expected [start:end] or [start:end:step], step > 0")
    first, last, step = parts[0] or "0", parts[1], int(parts[2])
    letters = string.ascii_letters
    if len(first) == len(last) == 1 and first in letters and last in letters:
        values = list(letters[letters.index(first):letters.index(last) + 1:step])
    elif re.fullmatch(r"[0-9]{1,9}", first) and re.fullmatch(r"[0-9]{1,9}", last):
        width = len(first) if first.startswith("0") and len(first) > 1 else 0
        if width and len(last) != width:
            raise InvalidInput(f"{bad}: a zero-padded start needs an end of the same length")
        numbers = range(int(first), int(last) + 1, step)
        if len(numbers) > _MAX_HOSTS:
            raise InvalidInput(f"{bad}: too many hosts")
        values = [str(n).zfill(width) for n in numbers]
    else:
        raise InvalidInput(f"{bad}: expected numbers or single letters")
    if not values:
        raise InvalidInput(f"{bad}: start is after end")
    return values


def _parse_yaml(inv: _Inventory, raw: bytes) -> None:
    """Ansible's YAML format: top-level groups (usually all:), each with hosts, vars, children."""
    try:
        import yaml  # only YAML inventories need it
    except ImportError:
        raise InvalidInput(f"{inv.path}: reading a YAML inventory needs PyYAML") from None
    try:
        data = yaml.safe_load(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise InvalidInput(f"{inv.path}:{raw[:e.start].count(10) + 1}: not UTF-8 text") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{inv.path}:{mark.line + 1}" if mark else inv.path
        problem = " ".join(str(getattr(e, "problem", None) or e).split())
        raise InvalidInput(f"{where}: invalid YAML: {problem}") from None
    except Exception as e:  # PyYAML lets some Python errors through (huge integers, deep nesting)
        raise InvalidInput(f"{inv.path}: invalid YAML: {type(e).__name__}") from None
    if not isinstance(data, dict):
        raise InvalidInput(f"{inv.path}: a YAML inventory is a mapping of groups (like 'all:'), "
                           f"not {type(data).__name__}")
    if "plugin" in data:
        raise InvalidInput(f"{inv.path}: this is an inventory plugin configuration, not an inventory")
    seen: Set[Tuple[str, int]] = set()
    for name, body in data.items():
        _yaml_group(inv, _yaml_name(name, inv.path), body, seen)


def _yaml_group(inv: _Inventory, group: str, body: Any, seen: Set[Tuple[str, int]]) -> None:
    where = f"{inv.path}: group {group!r}"
    inv.group(group)
    if body is None or (group, id(body)) in seen:
        return
    seen.add((group, id(body)))  # YAML aliases can share a body or point back up: read each once
    if not isinstance(body, dict):
        raise InvalidInput(f"{where}: expected a mapping of hosts/vars/children, got {type(body).__name__}")
    for key, entries in body.items():
        if key not in ("hosts", "vars", "children"):
            raise InvalidInput(f"{where}: unexpected key {_short(key)} (expected hosts, vars, children)")
        entries = {entries: None} if isinstance(entries, str) else entries  # one name as a string
        if entries is not None and not isinstance(entries, dict):
            raise InvalidInput(f"{where}: {key} must be a mapping, got {type(entries).__name__}")
        for name, value in (entries or {}).items():
            if key == "vars":
                inv.groupvars[group][name] = value
            elif key == "children":
                inv.add_child(group, _yaml_name(name, where), where)
                _yaml_group(inv, _yaml_name(name, where), value, seen)
            elif value is not None and not isinstance(value, dict):
                raise InvalidInput(f"{where}: host {_short(name)}: its vars must be a mapping")
            else:
                variables = dict(value or {})
                for host in _host_pattern(_yaml_name(name, where), variables, where):
                    inv.add_host(host, group, variables, where)


def _yaml_name(name: Any, where: str) -> str:
    if isinstance(name, bool) or not isinstance(name, (str, int)):
        raise InvalidInput(f"{where}: name {_short(name)} is not text")
    return str(name)
