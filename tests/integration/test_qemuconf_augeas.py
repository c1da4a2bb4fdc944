"""Files written by `qemuca qemu-conf` against libvirt's own readers of qemu.conf:
the augeas lens libvirtd_qemu.aug (augtool) and the daemon's virconf parser (libvirt.so)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qemuca.errors import ConfigSyntaxError
from qemuca.hosts import qemuconf as qc
from tests.hosts.test_qemuconf import FILES, LENS_FILES, TRICKY, tls_settings
from tests.support.augeas import lens_read, lens_read_one, virconf_parse, virconf_read
from tests.support.tools import missing

pytestmark = pytest.mark.augeas

STOCK = Path(__file__).resolve().parents[1] / ".cache" / "qemu.conf"
BOOLS = [qc.VERIFY, qc.FORCE]
STRINGS = [qc.CERT_DIR, qc.DEFAULT_DIR]


@pytest.fixture
def stock(tmp_path) -> Path:
    """A copy of Debian's stock qemu.conf (scripts/fetch-stock-qemu-conf.sh)."""
    if not STOCK.is_file():
        missing(f"{STOCK} (fetched by scripts/fetch-stock-qemu-conf.sh)")
    copy = tmp_path / "qemu.conf"
    copy.write_bytes(STOCK.read_bytes())
    return copy


def qemuca(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "qemuca", *args], capture_output=True, text=True, timeout=60)


def libvirt_reads(path, cert_dir="/etc/pki/qemu", verify=True):
    res = virconf_read(str(path), STRINGS, BOOLS)
    assert res.error is None
    assert res.values[qc.CERT_DIR] == cert_dir and res.values[qc.VERIFY] is verify


def test_acceptance_on_debian_stock_qemu_conf(stock):
    original = stock.read_bytes()
    assert lens_read_one(str(stock)).error is None  # the lens reads the stock file

    first = qemuca("qemu-conf", "apply", "--file", str(stock))
    assert first.returncode == 0, first.stderr
    assert "updated" in first.stdout and "restart libvirt" in first.stderr
    lens = lens_read_one(str(stock))
    assert lens.error is None
    assert lens.first(qc.CERT_DIR) == "/etc/pki/qemu" and lens.first(qc.VERIFY) == "1"
    libvirt_reads(stock)
    applied = stock.read_bytes()
    assert applied.startswith(original)  # the stock file has no active line: only appended

    second = qemuca("qemu-conf", "apply", "--file", str(stock))
    assert second.returncode == 0 and second.stdout.startswith("unchanged")
    assert "restart" not in second.stderr and stock.read_bytes() == applied

    removed = qemuca("qemu-conf", "remove", "--file", str(stock))
    assert removed.returncode == 0 and stock.read_bytes() == original


def test_an_earlier_active_value_loses_to_ours(stock):
    original = stock.read_bytes().replace(
        b'#migrate_tls_x509_cert_dir = "/etc/pki/libvirt-migrate"\n',
        b'migrate_tls_x509_cert_dir = "/other"\n', 1)
    assert original != stock.read_bytes()
    stock.write_bytes(original)
    assert lens_read_one(str(stock)).first(qc.CERT_DIR) == "/other"

    assert qemuca("qemu-conf", "apply", "--file", str(stock), "--force-tls").returncode == 0
    lens = lens_read_one(str(stock))
    assert lens.error is None
    assert lens.first(qc.CERT_DIR) == "/etc/pki/qemu" and lens.first(qc.FORCE) == "1"
    libvirt_reads(stock)
    assert b'#qemuca# migrate_tls_x509_cert_dir = "/other"\n' in stock.read_bytes()

    assert qemuca("qemu-conf", "remove", "--file", str(stock)).returncode == 0
    assert stock.read_bytes() == original


def test_tricky_files_are_read_by_the_lens_and_by_libvirt(tmp_path):
    """Every output parses with the lens and gives our values first. The lens knows no
    '\\r', so CRLF outputs are checked after CRLF -> LF; libvirt reads them as they are."""
    tls = qc.TlsSettings(cert_dir="/srv/pki/qemu", force=True, default_dir=True)
    paths = {}
    for i, (name, text) in enumerate(sorted(TRICKY.items())):
        out = qc.apply_tls(qc.parse(text), tls).to_bytes()
        path = tmp_path / f"f{i}.conf"
        path.write_bytes(out)
        libvirt_reads(path, "/srv/pki/qemu")
        lf = tmp_path / f"f{i}.lf.conf"
        lf.write_bytes(out.replace(b"\r\n", b"\n"))
        paths[name] = str(lf)
    results = lens_read(list(paths.values()))
    for name, path in paths.items():
        lens = results[path]
        assert lens.error is None, (name, lens.error)
        assert [lens.first(k) for k in (qc.CERT_DIR, qc.VERIFY, qc.FORCE, qc.DEFAULT_DIR)] == [
            "/srv/pki/qemu", "1", "1", "/srv/pki/qemu"], name


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(LENS_FILES, tls_settings)
def test_lens_reads_our_values_in_generated_files(tmp_path, text, tls):
    before, after = tmp_path / "before.conf", tmp_path / "after.conf"
    before.write_text(text)
    after.write_bytes(qc.apply_tls(qc.parse(text), tls).to_bytes())
    results = lens_read([str(before), str(after)])
    assert results[str(before)].error is None  # the generator keeps to the lens
    lens = results[str(after)]
    assert lens.error is None
    for key, value in tls.values():
        assert lens.first(key) == str(value)


@settings(max_examples=200, deadline=None)
@given(FILES, st.integers(0, 10**6), st.sampled_from("\"'[]=#;,x1 \n\t\r"))
def test_parser_agrees_with_libvirt(text, where, char):
    """Same verdict as virConfReadString, on valid files and one-character mutations,
    with the same line and message on errors."""
    where %= len(text) + 1
    for candidate in (text, text[:where] + char + text[where:]):
        data = candidate.encode()
        theirs = virconf_parse(data)
        try:
            qc.parse(data, "memory conf")
        except ConfigSyntaxError as e:
            assert theirs.error == f"configuration file syntax error: memory conf:{e.line}: {str(e).split(': ', 1)[1]}"
        else:
            assert theirs.error is None, candidate


@settings(max_examples=60, deadline=None)
@given(FILES, tls_settings)
def test_libvirt_reads_our_values_in_generated_files(text, tls):
    strings = [k for k, v in tls.values() if isinstance(v, str)]
    bools = [k for k, v in tls.values() if isinstance(v, int)]
    res = virconf_parse(qc.apply_tls(qc.parse(text), tls).to_bytes(), strings, bools)
    assert res.error is None
    assert res.values == {k: (v if isinstance(v, str) else bool(v)) for k, v in tls.values()}


def test_debian_stock_file_documents_libvirt_qemu_as_the_default(stock):
    """Debian's build substitutes its QEMU user and group into the stock file's comments:
    that is what deploy takes when qemu.conf sets no group."""
    doc = qc.parse(stock.read_bytes(), str(stock))
    assert doc.first("group") is None and doc.first("user") is None
    assert doc.documented_default("group")[0] == "libvirt-qemu"
    assert doc.documented_default("user")[0] == "libvirt-qemu"
    applied = qc.apply_tls(doc, qc.TlsSettings(cert_dir="/etc/pki/qemu", verify=True))
    assert applied.documented_default("group") == doc.documented_default("group")  # our edit keeps it


@pytest.mark.parametrize("text", [
    b"# c\n# old\rmigrate_tls_x509_verify = 0\n",
    b"#\rmigrate_tls_x509_cert_dir = \"/tmp/evil\"\n",
    b"# a\r\n# b\rmigrate_tls_x509_verify = 0\r\n",
])
def test_a_statement_after_a_bare_cr_is_refused_as_libvirt_reads_it(tmp_path, text):
    """libvirt ends a line at a bare CR too: the statement after it is live. apply must not
    exit 0 while libvirt would still read that value first; the file is left as it was."""
    path = tmp_path / "qemu.conf"
    path.write_bytes(text)
    libvirt = virconf_read(str(path), STRINGS, BOOLS)
    assert libvirt.error is None
    assert libvirt.values[qc.CERT_DIR] == "/tmp/evil" or libvirt.values[qc.VERIFY] is False
    proc = qemuca("qemu-conf", "apply", "--file", str(path))
    assert proc.returncode == 3, proc.stderr
    assert "carriage return" in proc.stderr
    assert len(proc.stderr.splitlines()) == 1 and "Traceback" not in proc.stderr
    assert path.read_bytes() == text and list(tmp_path.iterdir()) == [path]
    shown = qemuca("qemu-conf", "show", "--file", str(path), "--json")
    assert shown.returncode == 0, shown.stderr  # show tells what libvirt reads
    got = json.loads(shown.stdout)
    assert (got["cert_dir"]["value"], got["verify"]["value"]) == (
        libvirt.values[qc.CERT_DIR] or "/etc/pki/qemu", libvirt.values[qc.VERIFY] is not False)
