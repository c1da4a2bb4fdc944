"""Lossless editing of libvirt's qemu.conf for migration TLS.

qemu.conf is read by libvirt's virconf parser (src/util/virconf.c); `parse` follows it
rule for rule, so we refuse exactly the files libvirt refuses, naming line and column.
A `Document` keeps the text itself: writing it back gives the same bytes (CRLF, a
missing final newline and invalid UTF-8 in comments included).

Our settings live in one section between BEGIN_MARKER and END_MARKER. libvirt takes
the *first* occurrence of a key, so every other active line of a key we set is
disabled by prefixing DISABLED_PREFIX; `remove_tls` drops the section and strips the
prefixes, giving back the original bytes. The functions work on text only, so deploy
can edit a file read over SFTP; `edit_file` is the read/change/atomic-write cycle on
any qemuca.hosts.fs.FS.
"""

from __future__ import annotations

import bisect
import dataclasses
import difflib
import posixpath
import re
import string
from dataclasses import dataclass
from typing import Callable, Dict, FrozenSet, List, Optional, Tuple, Union

from qemuca.errors import ConfigSyntaxError, InvalidInput, NotFound
from qemuca.hosts.fs import FileStat
from qemuca.hosts.layout import DEFAULT_CERT_DIR

DEFAULT_PATH = "/etc/libvirt/qemu.conf"
LIBVIRT_MIGRATE_DIR = "/etc/pki/libvirt-migrate"  # used by libvirt when it exists
BEGIN_MARKER = "## beginning of configuration section by qemuca"
END_MARKER = "## end of configuration section by qemuca"
DISABLED_PREFIX = "#qemuca# "
BACKUP_SUFFIX = ".qemuca-backup"
NEW_FILE_MODE = 0o600

CERT_DIR = "migrate_tls_x509_cert_dir"
VERIFY = "migrate_tls_x509_verify"
FORCE = "migrate_tls_force"
DEFAULT_DIR = "default_tls_x509_cert_dir"
DEFAULT_VERIFY = "default_tls_x509_verify"

_SECTION_NOTE = [
    "## Written by `qemuca qemu-conf apply`; `qemuca qemu-conf remove` undoes it.",
    f'## Other lines setting these keys are disabled with "{DISABLED_PREFIX.strip()}".',
]
_NAME_START = set(string.ascii_letters)
_NAME_CHARS = set(string.ascii_letters + string.digits + "_")
_DIGITS = set(string.digits)


@dataclass(frozen=True)
class Setting:
    """One `name = value` statement. kind is libvirt's value type: "string",
    "unsigned" (a number without '-'), "signed" or "list" (value: [(kind, value)])."""

    name: str
    kind: str
    value: object
    line: int  # 1-based line of the name
    end_line: int  # last line of the value (lists and \"\"\" strings span lines)


@dataclass(frozen=True)
class Document:
    """The file's exact text plus the statements libvirt sees in it."""

    text: str
    path: str
    settings: Tuple[Setting, ...]
    comment_lines: FrozenSet[int]  # lines starting (column 1) with a '#' comment

    def to_bytes(self) -> bytes:
        return self.text.encode("utf-8", "surrogateescape")

    def lines(self) -> List[str]:
        return split_lines(self.text)

    def first(self, name: str) -> Optional[Setting]:
        """The occurrence libvirt uses."""
        return next((s for s in self.settings if s.name == name), None)

    def documented_default(self, name: str) -> Optional[Tuple[str, int]]:
        """(value, line) of a commented-out `#name = "value"` line: libvirt's build writes
        its default there in the stock file (e.g. `#group = "libvirt-qemu"` on Debian)."""
        pattern = re.compile(r'#\s*' + re.escape(name) + r'\s*=\s*"([^"\\]*)"\s*$')
        lines = self.lines()
        found = [(m.group(1), n) for n in sorted(self.comment_lines)
                 if (m := pattern.match(lines[n - 1].rstrip("\r\n")))]
        if not found or len({value for value, _ in found}) > 1:  # none, or an admin's old lines
            return None
        return found[0]

    @property
    def eol(self) -> str:
        """The file's line ending, taken from its first line."""
        i = self.text.find("\n")
        return "\r\n" if i > 0 and self.text[i - 1] == "\r" else "\n"

    def section(self) -> Optional[Tuple[int, int]]:
        """(begin, end) lines of our section, or None."""
        lines = self.lines()
        found: Dict[str, List[int]] = {BEGIN_MARKER: [], END_MARKER: []}
        for n in sorted(self.comment_lines):
            bare = lines[n - 1].rstrip()
            if bare in found:
                found[bare].append(n)
        begins, ends = found[BEGIN_MARKER], found[END_MARKER]
        if not begins and not ends:
            return None
        if len(begins) != 1 or len(ends) != 1 or ends[0] < begins[0]:
            where = ", ".join(str(n) for n in sorted(begins + ends))
            raise InvalidInput(f"{self.path}: damaged qemuca section markers (lines {where}): need one "
                               "begin line followed by one end line; fix them by hand")
        return begins[0], ends[0]


def split_lines(text: str) -> List[str]:
    """Lines with their endings; only '\\n' ends a line (a CRLF line keeps its '\\r')."""
    parts = text.split("\n")
    lines = [p + "\n" for p in parts[:-1]]
    if parts[-1]:
        lines.append(parts[-1])
    return lines


class _Parser:
    """A transcription of virConfParse (VIR_CONF_FLAG none, as qemu.conf is read)."""

    def __init__(self, text: str, path: str):
        self.s, self.n, self.i, self.path = text, len(text), 0, path
        self._newlines = [m.start() for m in re.finditer("\n", text)]
        self.settings: List[Setting] = []
        self.comment_lines: set = set()

    def cur(self) -> str:
        # libvirt reads the NUL after the buffer at the end; '' plays that role.
        return self.s[self.i] if self.i < self.n else ""

    def line_of(self, pos: int) -> int:
        """1-based line of a position: a binary search in the newline offsets (counting
        newlines from the start each time made a file of many comments quadratic)."""
        return bisect.bisect_left(self._newlines, pos) + 1

    def error(self, message: str):
        col = self.i - (self.s.rfind("\n", 0, self.i) + 1) + 1
        raise ConfigSyntaxError(self.path, self.line_of(self.i), col, message)

    def skip(self, chars: str) -> None:
        while self.i < self.n and self.s[self.i] in chars:
            self.i += 1

    def skip_to_eol(self) -> None:
        while self.i < self.n and self.s[self.i] not in "\r\n":
            self.i += 1

    def parse(self) -> None:
        while self.i < self.n:
            self.statement()
            self.separator()

    def statement(self) -> None:
        self.skip(" \t\r\n")
        start = self.i
        if self.cur() == "#":
            if start == 0 or self.s[start - 1] == "\n":
                self.comment_lines.add(self.line_of(start))
            self.skip_to_eol()
            return
        if not self.cur() or self.cur() not in _NAME_START:
            self.error("expecting a name")
        while self.cur() and self.cur() in _NAME_CHARS:
            self.i += 1
        name = self.s[start:self.i]
        self.skip(" \t")
        if self.cur() != "=":
            self.error("expecting an assignment")
        self.i += 1
        kind, value = self.value()
        end = self.i
        self.skip(" \t")
        if self.cur() == "#":
            self.skip_to_eol()
        self.settings.append(Setting(name, kind, value, self.line_of(start), self.line_of(end - 1)))

    def value(self):
        self.skip(" \t")
        c = self.cur()
        if not c:
            self.error("expecting a value")
        if c in "\"'":
            return "string", self.string()
        if c == "[":
            return "list", self.list_value()
        if c in _DIGITS or c in "+-":
            return ("signed" if c == "-" else "unsigned"), self.number()
        self.error("expecting a value")

    def string(self) -> str:
        s = self.s
        if self.cur() != "'" and self.i + 6 < self.n and s.startswith('"""', self.i):
            end = s.find('"""', self.i + 3)
            if end < 0:  # libvirt's scan stops 2 characters before the end
                self.i = max(self.i + 3, self.n - 2)
                self.error("unterminated string")
            value, self.i = s[self.i + 3:end], end + 3
            return value
        quote = self.cur()
        self.i += 1
        start = self.i
        while self.i < self.n and s[self.i] != quote and s[self.i] not in "\r\n":
            self.i += 1
        if self.cur() != quote:
            self.error("unterminated string")
        self.i += 1
        return s[start:self.i - 1]

    def list_value(self) -> list:
        self.i += 1
        self.skip(" \t\r\n")
        items = []
        if self.i < self.n and self.cur() != "]":
            items.append(self.value())
            self.skip(" \t\r\n")
        while self.i < self.n and self.cur() != "]":
            if self.cur() != ",":
                self.error("expecting a separator in list")
            self.i += 1
            self.skip(" \t\r\n")
            if self.cur() == "]":
                break
            items.append(self.value())
            self.skip(" \t\r\n")
        if self.cur() != "]":
            self.error("list is not closed with ]")
        self.i += 1
        return items

    def number(self) -> int:
        sign = -1 if self.cur() == "-" else 1
        if self.cur() in ("-", "+"):
            self.i += 1
        start = self.i
        while self.cur() and self.cur() in _DIGITS:
            self.i += 1
        if start == self.i:
            self.error("unterminated number")
        return sign * int(self.s[start:self.i])

    def separator(self) -> None:
        self.skip(" \t")
        if self.i >= self.n:
            return
        if self.cur() in "\r\n":
            self.skip(" \t\r\n")
        elif self.cur() == ";":
            self.i += 1
            self.skip(" \t\r\n")
        else:
            self.error("expecting a separator")


def parse(data: Union[bytes, str], path: str = "qemu.conf") -> Document:
    """Parse qemu.conf text as libvirt does; ConfigSyntaxError where libvirt fails."""
    text = data.decode("utf-8", "surrogateescape") if isinstance(data, (bytes, bytearray)) else data
    p = _Parser(text, path)
    p.parse()
    return Document(text, path, tuple(p.settings), frozenset(p.comment_lines))


@dataclass(frozen=True)
class TlsSettings:
    """What `apply` writes. force None leaves migrate_tls_force as it is: the value our
    section already holds (a renew must not drop an earlier --force-tls), else none."""

    cert_dir: str = DEFAULT_CERT_DIR
    verify: bool = True
    force: Optional[bool] = None
    default_dir: bool = False  # also point default_tls_x509_cert_dir at cert_dir

    def validate(self) -> None:
        d = self.cert_dir
        if not d.startswith("/") or any(c in "\"'\\" or ord(c) < 0x20 or ord(c) == 0x7F for c in d):
            raise InvalidInput(f"cert dir {d!r}: must be an absolute path without quotes, "
                               "backslashes or control characters")

    def values(self) -> List[Tuple[str, Union[str, int]]]:
        """(key, value) in section order."""
        out: List[Tuple[str, Union[str, int]]] = [(CERT_DIR, self.cert_dir), (VERIFY, int(self.verify))]
        if self.force is not None:
            out.append((FORCE, int(self.force)))
        if self.default_dir:
            out.append((DEFAULT_DIR, self.cert_dir))
        return out

    def entries(self) -> List[Tuple[str, str]]:
        """(key, value as written: strings always in double quotes, as the lens needs)."""
        return [(k, f'"{v}"' if isinstance(v, str) else str(v)) for k, v in self.values()]


def _reparse(lines: List[str], path: str) -> Document:
    try:
        return parse("".join(lines), path)
    except ConfigSyntaxError as e:  # only reachable after hand edits of our lines
        raise InvalidInput(f"{path}: editing would leave a file libvirt cannot read ({e}); "
                           "fix the qemuca lines by hand") from None


def _unapply(doc: Document) -> Tuple[List[str], Optional[int]]:
    """The lines without our section and with disabled lines restored, and the index
    where the section was (None when there was none)."""
    lines = doc.lines()
    section = doc.section()
    inside = range(section[0], section[1] + 1) if section else range(0)
    out = [line[len(DISABLED_PREFIX):] if n in doc.comment_lines and n not in inside
           and line.startswith(DISABLED_PREFIX) else line
           for n, line in enumerate(lines, 1)]
    if section is None:
        return out, None
    begin, end = section
    at = begin - 1
    last_has_eol = out[end - 1].endswith("\n")
    del out[at:end]
    if not last_has_eol and at > 0:
        # The section was appended to a file without a final newline: drop the line
        # ending we added before it (the same ending as our own lines).
        added = "\r\n" if lines[begin - 1].endswith("\r\n") else "\n"
        if out[at - 1].endswith(added):
            out[at - 1] = out[at - 1][:-len(added)]
    return out, at


def remove_tls(doc: Document) -> Document:
    """The document without our section and with the lines we disabled restored."""
    lines, _ = _unapply(doc)
    return _reparse(lines, doc.path)


def apply_tls(doc: Document, settings: TlsSettings) -> Document:
    """The document with our section holding `settings` (rewritten in place if present,
    else appended) and every other active line of those keys disabled."""
    settings.validate()
    if settings.force is None:
        ours = _section_value(doc, FORCE)
        if ours is not None:
            settings = dataclasses.replace(settings, force=bool(ours))
    lines, at = _unapply(doc)
    base = _reparse(lines, doc.path)
    entries = settings.entries()
    keys = {k for k, _ in entries}
    for s in base.settings:
        if s.name not in keys:
            continue
        for other in base.settings:
            if other is not s and other.line <= s.end_line and s.line <= other.end_line:
                raise InvalidInput(f"{doc.path}:{s.line}: {s.name} shares a line with {other.name}; "
                                   "put it on a line of its own and retry")
        for n in range(s.line, s.end_line + 1):
            lines[n - 1] = DISABLED_PREFIX + lines[n - 1]
    eol = base.eol
    block = [BEGIN_MARKER, *_SECTION_NOTE, *(f"{k} = {v}" for k, v in entries), END_MARKER]
    block = [b + eol for b in block]
    if at is None or at == len(lines):
        at = len(lines)
        if lines and not lines[-1].endswith("\n"):
            # Keep the file's "no final newline": end the old last line, not ours.
            lines[-1] += eol
            block[-1] = block[-1][:-len(eol)]
    lines[at:at] = block
    result = _reparse(lines, doc.path)
    _check_ours_first(result, keys)
    return result


def _section_value(doc: Document, key: str):
    """The value of `key` inside our section, or None."""
    section = doc.section()
    if section is None:
        return None
    return next((s.value for s in doc.settings if s.name == key and section[0] < s.line < section[1]), None)


def _check_ours_first(doc: Document, keys) -> None:
    """libvirt uses the first occurrence of a key: after an edit it must be ours. A line
    we disabled can still hide a live statement, e.g. after a bare carriage return
    (libvirt ends a line there as well), so the result is checked as libvirt reads it."""
    section = doc.section()
    for key in sorted(keys):
        first = doc.first(key)
        if first is not None and (section is None or not section[0] < first.line < section[1]):
            raw = doc.lines()[first.line - 1]
            why = (" (a carriage return inside the line starts a new one for libvirt)"
                   if "\r" in raw.rstrip("\r\n") else "")
            raise InvalidInput(f"{doc.path}:{first.line}: libvirt would still read {key} from this line"
                               f"{why}, before qemuca's section; fix the line by hand and retry")


@dataclass(frozen=True)
class Resolved:
    value: object
    source: str  # "line N", "default", "inherited from KEY (line N)", ...
    line: Optional[int] = None

    def to_dict(self) -> dict:
        return {"value": self.value, "source": self.source, "line": self.line}


class ConfWarning(str):
    """Something libvirt will do with this file that the admin should know: the text,
    with a `code` saying which for programs (verify decides its severity by the code,
    never by the words)."""

    code: str

    def __new__(cls, code: str, text: str) -> ConfWarning:
        warning = super().__new__(cls, text)
        warning.code = code
        return warning


# Warning codes
CERT_DIR_MISSING = "cert-dir-missing"  # an explicitly set cert dir: libvirt refuses to start
DEFAULT_CERT_DIR_MISSING = "default-cert-dir-missing"  # the built-in one: TLS migrations fail
VERIFY_OFF = "verify-off"
MARKERS = "markers"  # qemuca's section markers are damaged


@dataclass(frozen=True)
class MigrationTls:
    """The migration TLS settings as libvirt resolves them (virQEMUDriverConfigSetDefaults)."""

    cert_dir: Resolved
    verify: Resolved
    force: Resolved
    section: Optional[Tuple[int, int]]
    warnings: Tuple[ConfWarning, ...]

    def to_dict(self) -> dict:
        return {
            "cert_dir": self.cert_dir.to_dict(),
            "verify": self.verify.to_dict(),
            "force": self.force.to_dict(),
            "qemuca_section": ({"begin_line": self.section[0], "end_line": self.section[1]}
                               if self.section else None),
            "warnings": [str(w) for w in self.warnings],
        }


def _typed(doc: Document, name: str, kind: str) -> Optional[Setting]:
    s = doc.first(name)
    if s is None:
        return None
    if kind == "bool" and (s.kind != "unsigned" or s.value not in (0, 1)):
        raise InvalidInput(f"{doc.path}:{s.line}: {name} must be 0 or 1 (libvirt refuses to start)")
    if kind == "string" and s.kind != "string":
        raise InvalidInput(f"{doc.path}:{s.line}: {name} must be a string (libvirt refuses to start)")
    return s


def resolve_migration_tls(doc: Document, dir_exists: Callable[[str], bool]) -> MigrationTls:
    """Effective migration TLS settings. dir_exists(path) tells whether a path exists
    on the host the file belongs to (libvirt only checks existence)."""
    warnings: List[ConfWarning] = []
    mig, dflt = _typed(doc, CERT_DIR, "string"), _typed(doc, DEFAULT_DIR, "string")
    for s in (mig, dflt):
        if s is not None and not dir_exists(str(s.value)):
            warnings.append(ConfWarning(CERT_DIR_MISSING,
                                        f"{s.name} {s.value} does not exist: libvirt refuses to start"))
    if mig is not None:
        cert_dir = Resolved(mig.value, f"line {mig.line}", mig.line)
    elif dir_exists(LIBVIRT_MIGRATE_DIR):
        cert_dir = Resolved(LIBVIRT_MIGRATE_DIR, f"default ({LIBVIRT_MIGRATE_DIR} exists)")
    elif dflt is not None:
        cert_dir = Resolved(dflt.value, f"inherited from {DEFAULT_DIR} (line {dflt.line})", dflt.line)
    else:
        cert_dir = Resolved(DEFAULT_CERT_DIR, "default")
        if not dir_exists(DEFAULT_CERT_DIR):
            warnings.append(ConfWarning(DEFAULT_CERT_DIR_MISSING,
                                    f"{DEFAULT_CERT_DIR} does not exist: TLS migrations will fail"))

    verify_s, dverify = _typed(doc, VERIFY, "bool"), _typed(doc, DEFAULT_VERIFY, "bool")
    if verify_s is not None:
        verify = Resolved(verify_s.value == 1, f"line {verify_s.line}", verify_s.line)
    elif dverify is not None:
        verify = Resolved(dverify.value == 1, f"inherited from {DEFAULT_VERIFY} (line {dverify.line})",
                          dverify.line)
    else:
        verify = Resolved(True, "default")  # libvirt >= 6.10; older versions defaulted to 0
    if not verify.value:
        warnings.append(ConfWarning(VERIFY_OFF, "verify is off: a destination accepts migrations from any client"))

    force_s = _typed(doc, FORCE, "bool")
    force = (Resolved(force_s.value == 1, f"line {force_s.line}", force_s.line) if force_s
             else Resolved(False, "default"))
    try:
        section = doc.section()
    except InvalidInput as e:  # libvirt does not care about our markers
        section = None
        warnings.append(ConfWarning(MARKERS, str(e)))
    return MigrationTls(cert_dir, verify, force, section, tuple(warnings))


def unified_diff(before: bytes, after: bytes, path: str) -> str:
    """A unified diff for people (undecodable bytes shown as U+FFFD)."""
    a = split_lines(before.decode("utf-8", "replace"))
    b = split_lines(after.decode("utf-8", "replace"))
    return "".join(line if line.endswith("\n") else line + "\n\\ No newline at end of file\n"
                   for line in difflib.unified_diff(a, b, path, path))


# --- the read / change / atomic write cycle, on any qemuca.hosts.fs.FS -------------------

@dataclass(frozen=True)
class FileEdit:
    path: str  # the file written (symlinks resolved)
    before: bytes
    after: bytes
    created: bool  # the file did not exist
    written: bool
    backup: Optional[str]  # where the previous content was saved

    @property
    def changed(self) -> bool:
        return self.created or self.before != self.after


def _real_path(fs, path: str) -> Tuple[str, Optional[FileStat]]:
    """Follow symlinks so that the atomic rename replaces the file, not the link; with
    the file's own stat (None: missing)."""
    for _ in range(40):
        st = fs.stat(path, follow=False)
        if st is None or not st.is_link:
            return path, st
        path = posixpath.normpath(posixpath.join(posixpath.dirname(path), fs.readlink(path)))
    raise InvalidInput(f"{path}: too many levels of symbolic links")


def read_document(fs, path: str) -> Document:
    """Parse the file at path; NotFound when missing, InvalidInput if not a file."""
    return read_file(fs, path).doc


@dataclass(frozen=True)
class ConfFile:
    """A qemu.conf as read: its real path (links followed), what it holds, its stat."""

    path: str
    doc: Document
    stat: Optional[FileStat]


def read_file(fs, path: str) -> ConfFile:
    """read_document, keeping what edit_file needs to write the file without reading
    it again."""
    real, st = _real_path(fs, path)
    doc, st = _read(fs, real, st, create=False)
    return ConfFile(real, doc, st)


def _read(fs, path: str, st: Optional[FileStat], create: bool):
    """The parsed file and its stat (`st`: its lstat, from _real_path)."""
    if st is None:
        parent = posixpath.dirname(path) or "/"
        pst = fs.stat(parent)
        if not create or pst is None or not pst.is_dir:
            missing = path if not create else f"directory {parent}"
            raise NotFound(f"{missing} does not exist")
        return parse(b"", path), None
    if not st.is_file:
        raise InvalidInput(f"{path} is not a regular file")
    return parse(fs.read_bytes(path), path), st


def edit_file(fs, path: str, change: Callable[[Document], Document], dry_run: bool = False,
              create: bool = False, current: Optional[ConfFile] = None) -> FileEdit:
    """Read path, apply change, and write the result atomically with the file's mode and
    owner, after saving the previous bytes to path + BACKUP_SUFFIX. Nothing is written
    when nothing changes, on dry_run, or when the file (or result) does not parse.
    A missing file is created with mode 0600 when create is true. `current`: the file as
    read_file() gave it moments ago (not read again; looked at once more before a write,
    and read again if it changed meanwhile)."""
    if current is None or current.stat is None:
        path, st = _real_path(fs, path)
        doc, st = _read(fs, path, st, create)
    else:
        path, doc, st = current.path, current.doc, current.stat
    before, after = doc.to_bytes(), change(doc).to_bytes()
    created = st is None
    if dry_run or (before == after and not created):
        return FileEdit(path, before, after, created, False, None)
    if current is not None and current.stat is not None and fs.stat(path) != current.stat:
        return edit_file(fs, path, change, dry_run, create)  # changed since it was read
    backup = None
    if created:
        fs.write_atomic(path, after, NEW_FILE_MODE)
    else:
        backup = path + BACKUP_SUFFIX
        fs.write_atomic(backup, before, st.perms, st.uid, st.gid)
        fs.write_atomic(path, after, st.perms, st.uid, st.gid)
    return FileEdit(path, before, after, created, True, backup)
