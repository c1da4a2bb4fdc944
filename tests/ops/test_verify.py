"""qemuca.ops.verify on this machine's file system: link containment, the checks on crafted
files, the daemon's start time against qemu.conf's, pair logic, and the CLI's shape.

The host's absolute paths (/etc/pki/qemu, /etc/libvirt/qemu.conf, /run) are mapped into a
temporary root by a small FS wrapper, so the same code that reads a host over SFTP reads
real files here. Integration tests (tests/integration/test_verify.py) run it over SSH.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from qemuca.cli import cli
from qemuca.errors import InvalidInput
from qemuca.hosts import certdir, install, qemuconf
from qemuca.hosts.fs import MAX_PLACE_FILE, LocalFS
from qemuca.hosts.layout import CredentialSet, host_modes
from qemuca.hosts.runner import LocalRunner
from qemuca.ops import verify
from qemuca.ops.verify import pair as verify_pair
from qemuca.pki import checks, profile
from qemuca.pki.checks import fingerprint

NOW = profile.utcnow()
CERT_DIR = "/etc/pki/qemu"
CONF = "/etc/libvirt/qemu.conf"


class RootedFS(LocalFS):
    """LocalFS seen from `root`: absolute host paths land under a temporary dir."""

    def __init__(self, root: Path):
        self.root = str(root)

    def _p(self, path):
        return path if path.startswith("/proc/") else self.root + path  # one kernel for all

    def read_bytes(self, path, limit=MAX_PLACE_FILE):
        return super().read_bytes(self._p(path), limit)

    def stat(self, path, follow=True):
        return super().stat(self._p(path), follow)

    def listdir(self, path):
        return super().listdir(self._p(path))

    def readlink(self, path):
        return super().readlink(self._p(path))

    def write_atomic(self, path, data, mode, uid=None, gid=None):
        return super().write_atomic(self._p(path), data, mode, uid, gid)

    def makedirs(self, path, mode=0o755):
        return super().makedirs(self._p(path), mode)

    def symlink_atomic(self, target, path, temp_dir=None):
        return super().symlink_atomic(target, self._p(path), temp_dir and self._p(temp_dir))

    def remove(self, path):
        return super().remove(self._p(path))

    def rmtree(self, path, expect=()):
        return super().rmtree(self._p(path))

    def chown(self, path, uid, gid):
        return super().chown(self._p(path), uid, gid)

    def chmod(self, path, mode):
        return super().chmod(self._p(path), mode)


def new_ca(cn="QEMU CA", now=NOW, days=3650):
    key = ec.generate_private_key(ec.SECP256R1())
    return profile.build_ca_certificate(key, profile.ca_name(cn, None), days, now=now), key


def new_leaf(ca, host, now=NOW, days=730, sans=()):
    key = ec.generate_private_key(ec.SECP256R1())
    return profile.build_host_certificate(ca[0], ca[1], host, list(sans), key.public_key(), days, now=now), key


def pem(*certs):
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


def key_pem(key):
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


GID = os.getgid()
OPTS = dict(group=f"+{GID}", hostname="a.qemu.test")


def host_root(tmp_path, name, ca, leaf=None, bundle=None, conf=True, conf_dir=CERT_DIR):
    """A host's files under tmp_path/name: a set installed with deploy's modes, qemu.conf."""
    root = tmp_path / name
    fs = RootedFS(root)
    leaf = leaf or new_leaf(ca, f"{name}.qemu.test")
    files = {"ca-cert.pem": bundle or pem(ca[0]), "server-cert.pem": pem(leaf[0]),
             "server-key.pem": key_pem(leaf[1]), "client-cert.pem": pem(leaf[0]),
             "client-key.pem": key_pem(leaf[1])}
    install.install(fs, CERT_DIR, CredentialSet(name, fingerprint(leaf[0]), files), host_modes(GID))
    if conf:
        text = qemuconf.apply_tls(qemuconf.parse(b"# qemu.conf\n", CONF),
                                  qemuconf.TlsSettings(cert_dir=conf_dir)).to_bytes()
        (root / "etc/libvirt").mkdir(parents=True)
        (root / "etc/libvirt/qemu.conf").write_bytes(text)
    (root / "run").mkdir()
    return root, fs


def fails(report, level="fail"):
    return {c.check for c in report.findings if c.result == level}


def detail(report, check):
    return next(c.detail for c in report.findings if c.check == check)


@pytest.fixture(scope="module")
def ca():
    return new_ca()


# ---------------------------------------------------------------- links stay inside


def test_resolve_inside_follows_our_links_and_refuses_escapes(tmp_path):
    fs = LocalFS()
    d = tmp_path / "pki"
    (d / ".qemuca/sets/s1").mkdir(parents=True)
    (d / ".qemuca/sets/s1/server-key.pem").write_text("k")
    os.symlink("server-key.pem", d / ".qemuca/sets/s1/client-key.pem")  # the set's own link
    os.symlink("sets/s1", d / ".qemuca/current")
    os.symlink(".qemuca/current/client-key.pem", d / "client-key.pem")
    os.symlink(str(d / ".qemuca/sets/s1/server-key.pem"), d / "absolute-inside.pem")
    (tmp_path / "outside.pem").write_text("x")
    os.symlink(str(tmp_path / "outside.pem"), d / "server-cert.pem")
    os.symlink("../outside.pem", d / "ca-cert.pem")
    os.symlink(str(tmp_path), d / "escape-dir")
    os.symlink("loop", d / "loop")
    os.symlink(".qemuca/sets/gone/x.pem", d / "dangling.pem")
    root = str(d)
    assert certdir.resolve_inside(fs, root, "client-key.pem") == (f"{root}/.qemuca/sets/s1/server-key.pem", None)
    assert certdir.resolve_inside(fs, root, "absolute-inside.pem")[0] == f"{root}/.qemuca/sets/s1/server-key.pem"
    for name in ("server-cert.pem", "ca-cert.pem", "escape-dir/outside.pem"):
        path, why = certdir.resolve_inside(fs, root, name)
        assert path is None and "out of" in why, (name, why)
    assert "too many levels" in certdir.resolve_inside(fs, root, "loop")[1]
    assert certdir.resolve_inside(fs, root, "dangling.pem")[1].startswith("missing")
    assert certdir.resolve_inside(fs, root, "server-key.pem") == (None, "missing")


# ---------------------------------------------------------------- one host, over a real FS


def test_a_good_host_passes_and_crafted_defects_fail(tmp_path, ca):
    root, fs = host_root(tmp_path, "a", ca, leaf=new_leaf(ca, "a.qemu.test"))
    runner = LocalRunner()
    report = verify.verify_host(None, fs, runner, verify.VerifyOptions(**OPTS))
    assert report.host == "a.qemu.test" and report.result == "pass", [c for c in report.findings if c.result != "pass"]
    assert fails(report, "skip") == {"daemon settings"}
    assert "a.qemu.test is among" in detail(report, "server-cert.pem subjectAltName")

    # A key readable by others, a certificate of another CA, a CRL revoking it, a
    # libvirt CA that is the QEMU CA: each fails with the file it concerns.
    target = root / "etc/pki/qemu/.qemuca" / os.readlink(root / "etc/pki/qemu/.qemuca/current") / "server-key.pem"
    os.chmod(target, 0o604)
    os.chmod(root / "etc/pki/qemu", 0o775)
    (root / "etc/pki/CA").mkdir(parents=True)
    (root / "etc/pki/CA/cacert.pem").write_bytes(pem(ca[0]))
    report = verify.verify_host(None, fs, runner, verify.VerifyOptions(**OPTS))
    assert fails(report) == {"file server-key.pem", "file client-key.pem", "libvirt CA separate", "cert dir"}
    assert "writable by group" in detail(report, "cert dir")
    text = detail(report, "file server-key.pem")
    assert "mode 0604, want 0640" in text and "readable by others" in text and "/.qemuca/sets/" in text
    assert report.failed() and report.result == "fail"


def test_warn_days_and_strict(tmp_path, ca):
    leaf = new_leaf(ca, "a.qemu.test", now=NOW - dt.timedelta(days=700), days=710)
    _, fs = host_root(tmp_path, "a", ca, leaf=leaf)
    report = verify.verify_host("a.qemu.test", fs, LocalRunner(), verify.VerifyOptions(**OPTS))
    assert fails(report, "warn") == {"server-cert.pem validity"} and report.result == "warn"
    assert not report.failed() and report.failed(strict=True)
    quiet = verify.verify_host("a.qemu.test", fs, LocalRunner(),
                               verify.VerifyOptions(**OPTS, warn_days=5))
    assert quiet.result == "pass"


def test_bundle_limits_name_qemus_rules():
    ca = new_ca("ours")
    leaf = new_leaf(ca, "a.qemu.test")[0]
    others = [new_ca(f"other {i}")[0] for i in range(16)]
    assert checks.bundle_problems([ca[0]] + others[:15], NOW, leaf) == []
    first = checks.bundle_problems([ca[0]] + others, NOW, leaf)
    assert len(first) == 1 and "holds 17 CAs" in first[0] and "#" not in first[0]
    last = checks.bundle_problems(others + [ca[0]], NOW, leaf)
    assert "#17" in last[0] and "refuses its own certificate" in last[0]
    old = new_ca("old", now=NOW - dt.timedelta(days=100), days=10)[0]
    future = new_ca("future", now=NOW + dt.timedelta(days=10))[0]
    problems = checks.bundle_problems([ca[0], old, future], NOW, leaf)
    assert any("'old' expired" in p for p in problems) and any("'future' is not valid before" in p
                                                               for p in problems)


# ---------------------------------------------------------------- the running daemon


@pytest.fixture
def fake_daemon(tmp_path):
    """A real process named virtqemud (a copy of sleep), killed at the end."""
    binary = tmp_path / "virtqemud"
    shutil.copy("/bin/sleep", binary)
    proc = subprocess.Popen([str(binary), "300"])
    deadline = time.monotonic() + 5
    while Path(f"/proc/{proc.pid}/comm").read_text().strip() != "virtqemud":
        assert time.monotonic() < deadline
        time.sleep(0.01)
    yield proc
    proc.kill()
    proc.wait()


def test_daemon_started_before_or_after_the_last_qemu_conf_change(tmp_path, ca, fake_daemon):
    root, fs = host_root(tmp_path, "a", ca, leaf=new_leaf(ca, "a.qemu.test"))
    conf = root / "etc/libvirt/qemu.conf"
    opts = verify.VerifyOptions(**OPTS, proc="/proc")
    (root / "run/virtqemud.pid").write_text(f"{fake_daemon.pid}\n")

    def daemon_row():
        report = verify.verify_host(None, fs, LocalRunner(), opts)
        return next(c for c in report.findings if c.check.startswith("daemon settings"))

    os.utime(conf, (time.time() - 3600,) * 2)
    row = daemon_row()
    assert (row.check, row.result) == ("daemon settings (virtqemud)", "pass")
    assert f"pid {fake_daemon.pid}" in row.detail
    os.utime(conf, (time.time() + 120,) * 2)
    row = daemon_row()
    assert row.result == "warn" and "may still use the older settings" in row.detail
    assert "systemctl try-restart virtqemud" in row.fix
    # A pid file left by a daemon that is gone (its pid now someone else's): no daemon.
    (root / "run/virtqemud.pid").write_text(f"{os.getpid()}\n")
    row = daemon_row()
    assert row.result == "skip" and "not a running virtqemud" in row.detail


# ---------------------------------------------------------------- pairs


def test_pair_logic_on_local_sets(tmp_path, ca):
    _, a = host_root(tmp_path, "a", ca, leaf=new_leaf(ca, "a.qemu.test"))
    _, b = host_root(tmp_path, "b", ca, leaf=new_leaf(ca, "b.qemu.test", sans=["10.0.0.2"]))
    runner = LocalRunner()
    src, dst = verify.Side("a.qemu.test", a, runner), verify.Side("b.qemu.test", b, runner)
    report = verify.verify_pair(src, dst, verify.PairOptions(tls_destination="b.qemu.test"))
    assert report.result == "pass", report.as_dict()
    by_ip = verify.verify_pair(src, dst, verify.PairOptions(tls_destination="10.0.0.2"))
    assert by_ip.result == "pass"
    wrong = verify.verify_pair(src, dst, verify.PairOptions(tls_destination="a.qemu.test"))
    assert fails(wrong) == {"destination name in SANs"}
    other = new_ca("other")
    _, c = host_root(tmp_path, "c", other, leaf=new_leaf(other, "b.qemu.test"))
    report = verify.verify_pair(src, verify.Side("c", c, runner), verify.PairOptions(tls_destination="b.qemu.test"))
    assert fails(report) == {"source trusts destination", "destination trusts source"}
    data = report.as_dict()
    assert data["source"] == "a.qemu.test" and data["result"] == "fail" and data["tls_destination"] == "b.qemu.test"


@pytest.mark.parametrize("name,sans,ok", [
    ("b.qemu.test", ["b.qemu.test"], True),
    ("B.Qemu.Test.", ["b.qemu.test"], True),
    ("x.qemu.test", ["*.qemu.test"], True),
    ("x.y.qemu.test", ["*.qemu.test"], False),
    ("10.0.0.2", ["10.0.0.2"], True),
    ("10.0.0.2", ["b.qemu.test"], False),
    ("::1", ["0:0:0:0:0:0:0:1"], True),
    ("b.qemu.test", ["10.0.0.2"], False),
])
def test_name_matching_follows_the_sources_rules(name, sans, ok):
    assert verify_pair._name_matches(name, sans) is ok


# ---------------------------------------------------------------- runner and CLI shape


def test_local_runner_uses_the_same_allowlist():
    runner = LocalRunner()
    assert runner.run(["hostname"]).ok
    with pytest.raises(InvalidInput):
        runner.run(["sh", "-c", "true"])
    assert runner.run_command("getent_group", group="root").text.startswith("root:")


def test_cli_local_json_and_exit_codes(tmp_path, ca):
    root, _ = host_root(tmp_path, "a", ca, leaf=new_leaf(ca, "a.qemu.test"),
                        conf_dir=str(tmp_path / "a/etc/pki/qemu"))
    base = ["--home", str(tmp_path / "no-store"), "verify", "--local", "--json",
            "--cert-dir", str(root / "etc/pki/qemu"), "--qemu-conf", str(root / "etc/libvirt/qemu.conf"),
            "--group", f"+{GID}", "--hostname", "a.qemu.test"]
    result = CliRunner().invoke(cli, base, standalone_mode=False)
    assert result.exception is None, result.output
    report = json.loads(result.output)[0]
    assert report["host"] == "a.qemu.test" and report["result"] == "pass", report
    assert result.return_value == 0
    assert not (tmp_path / "no-store").exists()
    # Another cert dir than qemu.conf's: that check fails, exit 1; the table names it.
    base[base.index("--cert-dir") + 1] = str(root / "etc/pki/qemu/")
    (root / "etc/libvirt/qemu.conf").write_text('migrate_tls_x509_cert_dir = "/nonexistent/qemu"\n'
                                               "migrate_tls_x509_verify = 1\n")
    base.remove("--json")
    result = CliRunner().invoke(cli, base, standalone_mode=False)
    assert result.return_value == 1
    assert "a.qemu.test: FAIL" in result.output and "libvirt uses /nonexistent/qemu (line 1)" in result.output


@pytest.mark.parametrize("args", [
    ["--local", "host1.qemu.test"],
    ["--local", "--pair", "a", "b"],
    ["--pair", "a", "b", "c"],
    ["host1.qemu.test", "--handshake"],
    ["host1.qemu.test", "--hostname", "x"],
])
def test_cli_usage_errors(tmp_path, args):
    result = CliRunner().invoke(cli, ["--home", str(tmp_path), "verify", *args])
    assert result.exit_code == 2, result.output
