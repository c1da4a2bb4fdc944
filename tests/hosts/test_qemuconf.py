"""qemuca.hosts.qemuconf: libvirt's virconf grammar, lossless edits, libvirt's TLS resolution."""

from __future__ import annotations

import dataclasses
import os
import stat
import string

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qemuca.errors import ConfigSyntaxError, InvalidInput, NotFound
from qemuca.hosts import qemuconf as qc
from qemuca.hosts.fs import LocalFS

MANAGED = [qc.CERT_DIR, qc.VERIFY, qc.FORCE, qc.DEFAULT_DIR]
# Keys libvirt's augeas lens knows, with the value type it accepts.
LENS_KEYS = {
    qc.CERT_DIR: "str", qc.VERIFY: "bool", qc.FORCE: "bool", qc.DEFAULT_DIR: "str",
    qc.DEFAULT_VERIFY: "bool", "vnc_listen": "str", "security_driver": "str", "vnc_tls": "bool",
    "max_queued": "int", "remote_display_port_min": "int", "nvram": "list", "capability_filters": "list",
}

# --- generated files -----------------------------------------------------------
# Texts use "\n" for structure only and are converted to the file's line ending at the
# end; free text never holds a line ending ('\r' ends a comment for libvirt) or NUL.
# A fixed alphabet (no Unicode tables to build: they cost seconds on every fresh run).
FREE = st.text(string.ascii_letters + string.digits + string.punctuation + " \t\x01é€中😀", max_size=12)
NAME = st.tuples(st.sampled_from(string.ascii_letters),
                 st.text(string.ascii_letters + string.digits + "_", max_size=8)).map("".join)
SPACE = st.sampled_from(["", " ", "  ", "\t", " \t "])
GAP = st.sampled_from(["", " ", "\n", " \n  ", "\n\n\t"])  # inside lists: may span lines


def _free_without(chars: str, min_size: int = 0):
    return FREE.map(lambda s: "".join(c for c in s if c not in chars)).filter(lambda s: len(s) >= min_size)


def _join(parts) -> str:
    return "".join(parts)


def _values(lens: bool) -> dict:
    """Value strategies by type (built once: building strategies is what costs)."""
    dq = _free_without('"\\' if lens else '"').map(lambda t: f'"{t}"')  # the lens takes no backslash
    sq = _free_without("'").map(lambda t: f"'{t}'")
    triple_line = st.one_of(_free_without('"', 1), st.sampled_from(
        ["migrate_tls_force = 1", "#qemuca# not a comment", qc.BEGIN_MARKER]))
    triple = st.lists(triple_line, min_size=1, max_size=3).map(lambda ls: '"""' + "\n".join(ls) + '"""')
    values = {
        "str": dq if lens else st.one_of(dq, sq, triple),
        "bool": st.sampled_from(["0", "1"] if lens else ["0", "1", "+1", "-0", "17"]),
        "int": st.integers(0, 70000).map(str),
    }
    item = dq if lens else st.one_of(values["str"], values["bool"], values["int"])
    items = st.lists(st.tuples(item, GAP).map(_join), max_size=3)
    trailing = st.just("") if lens else st.sampled_from(["", ","])
    values["list"] = st.tuples(GAP, items, st.lists(GAP, min_size=3, max_size=3), trailing).map(
        lambda t: "[" + t[0] + ("," + t[2][0]).join(t[1]) + (t[3] if t[1] else "") + "]")
    return values


def _settings(lens: bool, names, trail: bool = True):
    values = _values(lens)
    if lens:
        by_name = [st.tuples(st.just(n), values[LENS_KEYS[n]]) for n in sorted(LENS_KEYS)]
        pair = st.one_of(by_name).filter(lambda p: p[0] in names)
        end = st.just("")
    else:  # libvirt does not care about types: any value for any name
        pair = st.tuples(st.sampled_from(names) if isinstance(names, list) else names, st.one_of(values.values()))
        end = st.sampled_from(["", " ", "  # note", "#x"]) if trail else st.just("")
    return st.tuples(SPACE, pair, SPACE, SPACE, end).map(
        lambda t: t[0] + t[1][0] + t[2] + "=" + t[3] + t[1][1] + t[4])


def _files(lens: bool):
    """Files libvirt accepts; lens=True keeps to what the augeas lens accepts too."""
    if lens:
        names, managed = sorted(LENS_KEYS), MANAGED
        units = [st.sampled_from(["", " ", "\t "]), FREE.map(lambda t: "#" + t)]
    else:
        names = st.one_of(st.sampled_from(sorted(LENS_KEYS)),
                          NAME)
        managed = st.sampled_from(MANAGED)
        others = names.filter(lambda n: n not in MANAGED)
        units = [SPACE, st.tuples(SPACE, FREE).map(lambda t: t[0] + "#" + t[1]),
                 # two statements on one line, never with a key we manage
                 st.tuples(_settings(False, others, trail=False), SPACE, _settings(False, others)).map(
                     lambda t: t[0] + ";" + t[1] + t[2].lstrip(" \t"))]
    units += [st.sampled_from(MANAGED).map(lambda k: f"#{k} = 0"),
              _settings(lens, names), _settings(lens, managed)]
    eols = st.just("\n") if lens else st.sampled_from(["\n", "\r\n"])
    return st.tuples(st.lists(st.one_of(units), max_size=12), st.booleans(), eols).map(
        lambda t: ("\n".join(t[0]) + ("\n" if t[0] and t[1] else "")).replace("\n", t[2])
    ).filter(lambda text: text == "" or text.strip(" \t\r\n"))  # libvirt refuses blanks only


FILES = _files(lens=False)
LENS_FILES = _files(lens=True)


def qemu_conf_texts(lens: bool = False):
    return LENS_FILES if lens else FILES


tls_settings = st.builds(
    qc.TlsSettings,
    cert_dir=st.sampled_from(["/etc/pki/qemu", "/srv/pki/q emu", "/etc/pki/qemu/", "/é/#x"]),
    verify=st.booleans(), force=st.sampled_from([None, True, False]), default_dir=st.booleans())

PROPS = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def only_ours_changed(orig: str, new: str, tls: qc.TlsSettings) -> None:
    """new == orig plus our section, with only our keys' statements disabled."""
    doc = qc.parse(new)
    begin, end = doc.section()
    lines = doc.lines()
    rest = lines[:begin - 1] + lines[end:]
    before = qc.split_lines(orig)
    assert len(rest) == len(before)
    keys = {k for k, _ in tls.values()}
    ours = {n for s in qc.parse(orig).settings if s.name in keys for n in range(s.line, s.end_line + 1)}
    for n, (old, now) in enumerate(zip(before, rest), 1):
        expected = qc.DISABLED_PREFIX + old if n in ours else old
        assert now == expected or (n == len(before) and now == expected + doc.eol), (n, old, now)


def assert_libvirt_reads_ours(text: str, tls: qc.TlsSettings) -> None:
    doc = qc.parse(text)
    begin, end = doc.section()
    for key, value in tls.values():
        first = doc.first(key)
        assert begin < first.line < end and first.value == value


# --- properties -------------------------------------------------------------------

@PROPS
@given(qemu_conf_texts(), tls_settings)
def test_apply_is_idempotent_lossless_and_touches_only_our_lines(text, tls):
    data = text.encode()
    doc = qc.parse(data)
    assert doc.to_bytes() == data
    applied = qc.apply_tls(doc, tls)
    assert qc.apply_tls(applied, tls).to_bytes() == applied.to_bytes()
    assert qc.remove_tls(applied).to_bytes() == data
    only_ours_changed(text, applied.text, tls)
    assert_libvirt_reads_ours(applied.text, tls)


@PROPS
@given(qemu_conf_texts(), tls_settings, tls_settings)
def test_changing_options_equals_applying_them_fresh(text, first, second):
    """...with one exception: an apply that does not mention force keeps the one already
    applied (the effective settings are then `second` with `first`'s force)."""
    doc = qc.parse(text)
    again = qc.apply_tls(qc.apply_tls(doc, first), second)
    effective = second if second.force is not None else dataclasses.replace(second, force=first.force)
    assert again.text == qc.apply_tls(doc, effective).text


@PROPS
@given(qemu_conf_texts(), st.integers(0, 10**6), st.sampled_from("\"'[]=#;,x1 \n"))
def test_parser_is_total_and_lossless(text, where, char):
    """Any text either parses back to its exact bytes or fails with a line and column."""
    where %= len(text) + 1
    mutated = text[:where] + char + text[where:]
    try:
        doc = qc.parse(mutated.encode())
    except ConfigSyntaxError as e:
        assert 1 <= e.line <= mutated.count("\n") + 1 and e.column >= 1
    else:
        assert doc.to_bytes() == mutated.encode()


# --- the grammar --------------------------------------------------------------------

@pytest.mark.parametrize("text, line, column, message", [
    ("\n", 2, 1, "expecting a name"),  # libvirt refuses a file of blanks only
    ("x = 1 y = 2\n", 1, 7, "expecting a separator"),
    ("x = 'abc\n", 1, 9, "unterminated string"),
    ('x = "abc\ny = 1\n', 1, 9, "unterminated string"),
    ('x = """abc\n\n', 1, 11, "unterminated string"),  # libvirt's scan stops 2 before the end
    ('x = """abc\n\nde', 3, 1, "unterminated string"),
    ("x = [1,\n 2\n", 3, 1, "list is not closed with ]"),
    ("x = [1 2]\n", 1, 8, "expecting a separator in list"),
    ("1x = 2\n", 1, 1, "expecting a name"),
    ("a.b = 2\n", 1, 2, "expecting an assignment"),
    ("x 1\n", 1, 3, "expecting an assignment"),
    ("x =\n", 1, 4, "expecting a value"),
    ("x = -\n", 1, 6, "unterminated number"),
    ("x = [ # c\n ]\n", 1, 7, "expecting a value"),
    ("# ok\r\n  x = yes\r\n", 2, 7, "expecting a value"),
])
def test_syntax_errors_name_line_and_column(text, line, column, message):
    with pytest.raises(ConfigSyntaxError) as e:
        qc.parse(text.encode(), "/etc/libvirt/qemu.conf")
    assert (e.value.line, e.value.column) == (line, column)
    assert str(e.value) == f"/etc/libvirt/qemu.conf:{line}:{column}: {message}"


def test_values_and_positions():
    text = ("a = 'single' # c\r\n"
            "b=-3;c = +4\r\n"
            'd = """x\r\ny"""\r\n'
            'e = [ "p",\r\n  1 ,\r\n ]\r\n'
            "  # indented comment\r\n"
            "#top")
    doc = qc.parse(text.encode())
    got = [(s.name, s.kind, s.value, s.line, s.end_line) for s in doc.settings]
    assert got == [
        ("a", "string", "single", 1, 1), ("b", "signed", -3, 2, 2), ("c", "unsigned", 4, 2, 2),
        ("d", "string", "x\r\ny", 3, 4), ("e", "list", [("string", "p"), ("unsigned", 1)], 5, 7),
    ]
    assert doc.comment_lines == {9}  # only comments that start their line count
    assert doc.eol == "\r\n" and doc.to_bytes() == text.encode()


def test_empty_file_and_undecodable_bytes_are_kept():
    assert qc.parse(b"").settings == ()
    data = b"# caf\xe9 in latin-1\nvnc_listen = \"\xff\"\n"
    doc = qc.parse(data)
    assert doc.to_bytes() == data
    applied = qc.apply_tls(doc, qc.TlsSettings())
    assert qc.remove_tls(applied).to_bytes() == data


# --- apply / remove on tricky files ----------------------------------------------------

TRICKY = {
    "set earlier": 'migrate_tls_x509_cert_dir = "/other"\nvnc_tls = 1\n',
    "set twice around": 'migrate_tls_x509_verify = 0\n# mid\nmigrate_tls_x509_verify=0 # again\n',
    "commented": '#migrate_tls_x509_cert_dir = "/etc/pki/libvirt-migrate"\n#migrate_tls_force = 0\n',
    "odd spacing": '\t migrate_tls_force\t=  0   \nmigrate_tls_x509_cert_dir="/a"',
    "list spanning lines": 'migrate_tls_x509_cert_dir = [\n  "/a",\n  "/b"\n]\nnvram = [ "x",\n "y" ]\n',
    "crlf": 'vnc_tls = 1\r\nmigrate_tls_force = 0\r\n\r\n',
    "no final newline": 'migrate_tls_x509_verify = 0',
    "crlf no final newline": '# head\r\nmigrate_tls_x509_verify = 0',
    "empty": "",
}


@pytest.mark.parametrize("name", sorted(TRICKY))
def test_tricky_files(name):
    text = TRICKY[name]
    tls = qc.TlsSettings(force=True, default_dir=True)
    applied = qc.apply_tls(qc.parse(text), tls)
    only_ours_changed(text, applied.text, tls)
    assert_libvirt_reads_ours(applied.text, tls)
    assert qc.apply_tls(applied, tls).text == applied.text
    assert qc.remove_tls(applied).text == text
    if text:
        assert applied.text.endswith("\n") == text.endswith("\n")
        assert ("\r\n" in applied.text) == ("\r\n" in text)


def test_disabled_lines_and_section_look():
    text = 'migrate_tls_x509_cert_dir = [\n  "/a" ]\nmigrate_tls_force = 0\n'
    applied = qc.apply_tls(qc.parse(text), qc.TlsSettings(cert_dir="/srv/q"))
    assert applied.text == (
        '#qemuca# migrate_tls_x509_cert_dir = [\n'
        '#qemuca#   "/a" ]\n'
        'migrate_tls_force = 0\n'  # not managed without --force-tls/--no-force-tls
        f'{qc.BEGIN_MARKER}\n'
        '## Written by `qemuca qemu-conf apply`; `qemuca qemu-conf remove` undoes it.\n'
        '## Other lines setting these keys are disabled with "#qemuca#".\n'
        'migrate_tls_x509_cert_dir = "/srv/q"\n'
        'migrate_tls_x509_verify = 1\n'
        f'{qc.END_MARKER}\n')


def test_section_is_rewritten_in_place_and_lines_restored_when_no_longer_managed():
    text = 'default_tls_x509_cert_dir = "/old"\nx = 1\n'
    first = qc.apply_tls(qc.parse(text), qc.TlsSettings(default_dir=True))
    # Move our section to the top by hand: later applies keep it there.
    lines = first.lines()
    b, e = first.section()
    moved = "".join(lines[b - 1:e] + lines[:b - 1])
    second = qc.apply_tls(qc.parse(moved), qc.TlsSettings(cert_dir="/new"))
    assert second.text.startswith(qc.BEGIN_MARKER)
    assert 'default_tls_x509_cert_dir = "/old"\nx = 1\n' in second.text  # no longer ours: restored
    assert second.first(qc.CERT_DIR).value == "/new"
    assert second.first(qc.DEFAULT_DIR).line == second.section()[1] + 1
    assert qc.remove_tls(second).text == text


def test_stray_disabled_lines_are_restored_by_remove():
    text = "#qemuca# migrate_tls_force = 1\n# keep\n"
    assert qc.remove_tls(qc.parse(text)).text == "migrate_tls_force = 1\n# keep\n"


def test_refuses_a_key_sharing_its_line():
    with pytest.raises(InvalidInput, match=r"qemu.conf:2: migrate_tls_x509_verify shares a line with x"):
        qc.apply_tls(qc.parse("# c\nx = 1; migrate_tls_x509_verify = 0\n"), qc.TlsSettings())
    with pytest.raises(InvalidInput, match=r":1: migrate_tls_force shares a line with y"):
        qc.apply_tls(qc.parse("migrate_tls_force = [\n1 ]; y = 2\n"), qc.TlsSettings(force=False))


@pytest.mark.parametrize("text", [
    f"{qc.BEGIN_MARKER}\nx = 1\n",
    f"{qc.END_MARKER}\n{qc.BEGIN_MARKER}\n",
    f"{qc.BEGIN_MARKER}\n{qc.END_MARKER}\n{qc.BEGIN_MARKER}\n{qc.END_MARKER}\n",
])
def test_damaged_markers_are_refused(text):
    with pytest.raises(InvalidInput, match="damaged qemuca section markers"):
        qc.apply_tls(qc.parse(text), qc.TlsSettings())
    with pytest.raises(InvalidInput):
        qc.remove_tls(qc.parse(text))
    shown = _resolve(text)  # show still works: libvirt ignores our markers
    assert shown.section is None and "damaged qemuca section markers" in shown.warnings[-1]


def test_markers_inside_a_string_are_not_markers():
    text = f'x = """\n{qc.BEGIN_MARKER}\n"""\n'
    applied = qc.apply_tls(qc.parse(text), qc.TlsSettings())
    assert applied.section()[0] == 4 and qc.remove_tls(applied).text == text


@pytest.mark.parametrize("cert_dir", ["etc/pki", "", '/a"b', "/a'b", "/a\\b", "/a\nb", "/a\tb", "/a\x7f"])
def test_bad_cert_dirs_are_refused(cert_dir):
    with pytest.raises(InvalidInput, match="must be an absolute path"):
        qc.apply_tls(qc.parse(""), qc.TlsSettings(cert_dir=cert_dir))


# --- what libvirt resolves --------------------------------------------------------------

def _resolve(text, existing=()):
    return qc.resolve_migration_tls(qc.parse(text), lambda p: p in existing)


def test_resolution_defaults():
    tls = _resolve("", existing={"/etc/pki/qemu"})
    assert (tls.cert_dir.value, tls.cert_dir.source) == ("/etc/pki/qemu", "default")
    assert (tls.verify.value, tls.verify.source) == (True, "default")
    assert (tls.force.value, tls.force.source) == (False, "default")
    assert tls.section is None and tls.warnings == ()


def test_resolution_inherits_from_default_keys_and_libvirt_migrate_dir():
    text = 'default_tls_x509_cert_dir = "/d"\ndefault_tls_x509_verify = 0\n'
    tls = _resolve(text, existing={"/d"})
    assert (tls.cert_dir.value, tls.cert_dir.source, tls.cert_dir.line) == (
        "/d", "inherited from default_tls_x509_cert_dir (line 1)", 1)
    assert (tls.verify.value, tls.verify.source) == (False, "inherited from default_tls_x509_verify (line 2)")
    assert any("verify is off" in w for w in tls.warnings)
    # /etc/pki/libvirt-migrate, when it exists, comes before default_tls_x509_cert_dir.
    tls = _resolve(text, existing={"/d", qc.LIBVIRT_MIGRATE_DIR})
    assert tls.cert_dir.value == qc.LIBVIRT_MIGRATE_DIR and "exists" in tls.cert_dir.source


def test_resolution_first_occurrence_wins_and_missing_dirs_warn():
    text = 'migrate_tls_x509_cert_dir = "/a"\nmigrate_tls_x509_cert_dir = "/b"\nmigrate_tls_force = 1\n'
    tls = _resolve(text, existing={qc.LIBVIRT_MIGRATE_DIR})
    assert (tls.cert_dir.value, tls.cert_dir.line) == ("/a", 1)
    assert tls.force.value is True and tls.force.source == "line 3"
    assert tls.warnings == ("migrate_tls_x509_cert_dir /a does not exist: libvirt refuses to start",)


@pytest.mark.parametrize("text, message", [
    ("migrate_tls_x509_verify = 2\n", "qemu.conf:1: migrate_tls_x509_verify must be 0 or 1"),
    ("migrate_tls_force = -0\n", "migrate_tls_force must be 0 or 1"),
    ("x = 1\ndefault_tls_x509_verify = '1'\n", "qemu.conf:2: default_tls_x509_verify must be 0 or 1"),
    ("migrate_tls_x509_cert_dir = [ ]\n", "migrate_tls_x509_cert_dir must be a string"),
])
def test_resolution_refuses_values_libvirt_refuses(text, message):
    with pytest.raises(InvalidInput, match=message):
        _resolve(text)


# --- the file cycle on LocalFS -----------------------------------------------------------

def test_edit_file_keeps_mode_owner_and_writes_a_backup(tmp_path):
    path = tmp_path / "qemu.conf"
    original = b"# stock\nmigrate_tls_force = 0\n"
    path.write_bytes(original)
    os.chmod(path, 0o640)
    owner = (0, 12) if os.geteuid() == 0 else (os.getuid(), os.getgid())
    os.chown(path, *owner)
    tls = qc.TlsSettings(force=True)
    edit = qc.edit_file(LocalFS(), str(path), lambda d: qc.apply_tls(d, tls))
    assert edit.changed and edit.written and not edit.created
    backup = tmp_path / ("qemu.conf" + qc.BACKUP_SUFFIX)
    assert edit.backup == str(backup) and backup.read_bytes() == original
    for p in (path, backup):
        st_ = os.stat(p)
        assert (stat.S_IMODE(st_.st_mode), st_.st_uid, st_.st_gid) == (0o640, *owner)
    assert path.read_bytes() == edit.after
    assert sorted(os.listdir(tmp_path)) == ["qemu.conf", "qemu.conf" + qc.BACKUP_SUFFIX]  # no temp left
    mtime = os.stat(path).st_mtime_ns
    again = qc.edit_file(LocalFS(), str(path), lambda d: qc.apply_tls(d, tls))
    assert not again.changed and not again.written and os.stat(path).st_mtime_ns == mtime


def test_edit_file_creates_a_missing_file_0600_and_follows_symlinks(tmp_path):
    target = tmp_path / "real.conf"
    link = tmp_path / "qemu.conf"
    os.symlink("real.conf", link)
    edit = qc.edit_file(LocalFS(), str(link), lambda d: qc.apply_tls(d, qc.TlsSettings()), create=True)
    assert edit.created and edit.backup is None and edit.path == str(target)
    assert stat.S_IMODE(os.stat(target).st_mode) == 0o600 and os.path.islink(link)
    removed = qc.edit_file(LocalFS(), str(link), qc.remove_tls)
    assert removed.changed and target.read_bytes() == b""  # we created it: left empty


def test_edit_file_refuses_what_it_cannot_edit(tmp_path):
    fs = LocalFS()
    with pytest.raises(NotFound, match="does not exist"):
        qc.edit_file(fs, str(tmp_path / "missing.conf"), qc.remove_tls)
    with pytest.raises(NotFound, match="directory .*/nodir does not exist"):
        qc.edit_file(fs, str(tmp_path / "nodir" / "q.conf"), qc.remove_tls, create=True)
    os.mkfifo(tmp_path / "fifo")  # never opened: reading it would block
    for bad in ("fifo", ""):
        with pytest.raises(InvalidInput, match="is not a regular file"):
            qc.edit_file(fs, str(tmp_path / bad).rstrip("/"), qc.remove_tls)


def test_dry_run_writes_nothing_and_diff_marks_missing_newline(tmp_path):
    path = tmp_path / "q.conf"
    path.write_bytes(b"x = 1")
    edit = qc.edit_file(LocalFS(), str(path), lambda d: qc.apply_tls(d, qc.TlsSettings()), dry_run=True)
    assert edit.changed and not edit.written and path.read_bytes() == b"x = 1"
    diff = qc.unified_diff(edit.before, edit.after, str(path))
    assert diff.startswith(f"--- {path}\n+++ {path}\n")
    assert "-x = 1\n\\ No newline at end of file\n+x = 1\n" in diff
    assert diff.endswith(f"+{qc.END_MARKER}\n\\ No newline at end of file\n")


def test_documented_default_is_the_stock_comment():
    """libvirt's build writes its QEMU user and group into the stock file as comments;
    an admin's own commented-out lines that disagree make the default unknown."""
    stock = qc.parse(b'# The group for QEMU processes\n#group = "libvirt-qemu"\n#user = "libvirt-qemu"\n')
    assert stock.documented_default("group") == ("libvirt-qemu", 2)
    assert stock.documented_default("user") == ("libvirt-qemu", 3)
    examples = qc.parse(b'#       user = "qemu"   # A user named "qemu"\n')
    assert examples.documented_default("user") is None  # the documentation's examples
    edited = qc.parse(b'#group = "qemu"\ngroup = "kvm"\n#group = "kvm"\n')
    assert edited.documented_default("group") is None
    assert edited.first("group").value == "kvm"
    assert qc.parse(b'  #group = "qemu"\n').documented_default("group") is None  # not a column-1 comment


def test_force_is_kept_by_a_later_apply_that_does_not_mention_it():
    """enroll --force-tls, then renew (no option): libvirt must still refuse plain migrations."""
    forced = qc.apply_tls(qc.parse(b"# stock\n"), qc.TlsSettings(force=True))
    again = qc.apply_tls(forced, qc.TlsSettings())
    assert again.text == forced.text and again.first(qc.FORCE).value == 1
    off = qc.apply_tls(forced, qc.TlsSettings(force=False))
    assert off.first(qc.FORCE).value == 0
    assert qc.apply_tls(off, qc.TlsSettings()).first(qc.FORCE).value == 0
    assert qc.apply_tls(qc.parse(b""), qc.TlsSettings()).first(qc.FORCE) is None  # never asked: absent
