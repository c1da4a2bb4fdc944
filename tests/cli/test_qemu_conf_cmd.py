"""`qemuca qemu-conf apply|remove|show`, run as the real command."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys

import pytest
from click.testing import CliRunner

from qemuca.cli import cli
from qemuca.hosts import qemuconf as qc

ORIGINAL = (b"# qemu.conf\n"
            b"migrate_tls_x509_cert_dir = \"/other\"\n"
            b"vnc_tls = 1\n")
OWNER = (0, 12) if os.geteuid() == 0 else (os.getuid(), os.getgid())  # a group other than root's


def qemuca(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "qemuca", "qemu-conf", *args],
                          capture_output=True, text=True, timeout=60)


def run_main(capsys, *args: str):
    """The console script's entry point in this process: the same error handling and
    exit codes as `qemuca`, without a Python start per case."""
    from qemuca.cli import main

    with pytest.raises(SystemExit) as e:
        main(["qemu-conf", *args])
    out, err = capsys.readouterr()
    return e.value.code, out, err


def snapshot(path):
    return path.read_bytes(), os.stat(path).st_mtime_ns


@pytest.fixture
def conf(tmp_path):
    path = tmp_path / "qemu.conf"
    path.write_bytes(ORIGINAL)
    os.chmod(path, 0o640)
    os.chown(path, *OWNER)
    return path


def test_apply_is_idempotent_and_remove_restores_the_bytes(conf):
    first = qemuca("apply", "--file", str(conf), "--force-tls")
    assert first.returncode == 0, first.stderr
    backup = f"{conf}{qc.BACKUP_SUFFIX}"
    assert first.stdout == f"updated: {conf} (previous content in {backup})\n"
    assert "restart libvirt" in first.stderr and "virtqemud" in first.stderr
    text = conf.read_text()
    assert '#qemuca# migrate_tls_x509_cert_dir = "/other"\n' in text and "migrate_tls_force = 1\n" in text
    st_ = os.stat(conf)
    assert (stat.S_IMODE(st_.st_mode), st_.st_uid, st_.st_gid) == (0o640, *OWNER)
    with open(backup, "rb") as f:
        assert f.read() == ORIGINAL

    before = snapshot(conf)
    second = qemuca("apply", "--file", str(conf), "--force-tls")
    assert (second.returncode, second.stdout, second.stderr) == (0, f"unchanged: {conf}\n", "")
    assert snapshot(conf) == before

    removed = qemuca("remove", "--file", str(conf))
    assert removed.returncode == 0 and removed.stdout.startswith("updated: ")
    assert conf.read_bytes() == ORIGINAL


def test_dry_run_prints_a_diff_and_writes_nothing(conf):
    before = snapshot(conf)
    out = qemuca("apply", "--file", str(conf), "--cert-dir", "/srv/qemu", "--dry-run")
    assert out.returncode == 0
    assert out.stdout.startswith(f"--- {conf}\n+++ {conf}\n@@ ")
    assert '-migrate_tls_x509_cert_dir = "/other"\n+#qemuca# migrate_tls_x509_cert_dir = "/other"\n' in out.stdout
    assert '+migrate_tls_x509_cert_dir = "/srv/qemu"\n' in out.stdout
    assert "nothing written" in out.stderr and "restart" not in out.stderr
    assert snapshot(conf) == before
    assert not os.path.exists(f"{conf}{qc.BACKUP_SUFFIX}")


def test_json_output_and_no_verify_warning(conf):
    out = qemuca("apply", "--file", str(conf), "--no-verify", "--default-dir", "--json")
    assert out.returncode == 0
    data = json.loads(out.stdout)
    assert data == {
        "path": str(conf), "changed": True, "created": False, "written": True,
        "backup": f"{conf}{qc.BACKUP_SUFFIX}", "dry_run": False, "restart_required": True,
        "settings": {qc.CERT_DIR: "/etc/pki/qemu", qc.VERIFY: 0, qc.DEFAULT_DIR: "/etc/pki/qemu"},
    }
    assert "warning: migrate_tls_x509_verify = 0" in out.stderr
    dry = json.loads(qemuca("remove", "--file", str(conf), "--dry-run", "--json").stdout)
    assert dry["changed"] and not dry["written"] and dry["diff"].startswith("--- ")


def test_a_missing_file_is_created_0600_and_remove_leaves_it_empty(tmp_path):
    path = tmp_path / "qemu.conf"
    out = qemuca("apply", "--file", str(path))
    assert out.returncode == 0 and out.stdout == f"created: {path}\n"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert qemuca("remove", "--file", str(path)).returncode == 0
    assert path.read_bytes() == b"" and sorted(os.listdir(tmp_path)) == ["qemu.conf", "qemu.conf" + qc.BACKUP_SUFFIX]


def test_show_resolves_like_libvirt(tmp_path):
    path = tmp_path / "qemu.conf"
    path.write_text(f'default_tls_x509_cert_dir = "{tmp_path}"\ndefault_tls_x509_verify = 0\n'
                    "migrate_tls_force = 1\n")
    data = json.loads(qemuca("show", "--file", str(path), "--json").stdout)
    # /etc/pki/libvirt-migrate would come first if it existed on this machine.
    if not os.path.exists(qc.LIBVIRT_MIGRATE_DIR):
        assert data["cert_dir"] == {"value": str(tmp_path), "line": 1,
                                    "source": "inherited from default_tls_x509_cert_dir (line 1)"}
    assert data["verify"] == {"value": False, "line": 2, "source": "inherited from default_tls_x509_verify (line 2)"}
    assert data["force"] == {"value": True, "line": 3, "source": "line 3"}
    assert data["qemuca_section"] is None and data["path"] == str(path)

    assert qemuca("apply", "--file", str(path), "--cert-dir", "/nonexistent/pki").returncode == 0
    shown = qemuca("show", "--file", str(path))
    assert shown.returncode == 0
    lines = [" ".join(line.split()) for line in shown.stdout.splitlines()]
    assert "cert dir /nonexistent/pki (line 7)" in lines
    assert "verify clients yes (line 8)" in lines and "force TLS yes (line 3)" in lines
    assert "qemuca section lines 4-9" in lines
    assert ("warning: migrate_tls_x509_cert_dir /nonexistent/pki does not exist: libvirt refuses to start"
            in shown.stderr)


def _fifo(tmp_path):
    os.mkfifo(tmp_path / "fifo")
    return tmp_path / "fifo"


@pytest.mark.parametrize("content, args, code, message", [
    (b"# a\nx = yes\n", ["apply"], 3, "{f}:2:5: expecting a value"),
    (b"x = 1\n", ["apply", "--cert-dir", "etc/pki"], 3, "cert dir 'etc/pki': must be an absolute path"),
    (b"x = 1\n", ["apply", "--cert-dir", '/a"b'], 3, "cert dir '/a\"b': must be an absolute path"),
    (b"x = 1\n", ["apply", "--cert-dir", "/a\nb"], 3, "cert dir '/a\\nb': must be an absolute path"),
    (b"a = 1; migrate_tls_x509_verify = 0\n", ["apply"], 3,
     "{f}:1: migrate_tls_x509_verify shares a line with a; put it on a line of its own"),
    (qc.END_MARKER.encode() + b"\n", ["remove"], 3, "{f}: damaged qemuca section markers (lines 1)"),
    (b"migrate_tls_x509_verify = 5\n", ["show"], 3, "{f}:1: migrate_tls_x509_verify must be 0 or 1"),
])
def test_bad_input_leaves_the_file_untouched(capsys, tmp_path, content, args, code, message):
    path = tmp_path / "qemu.conf"
    path.write_bytes(content)
    before = snapshot(path)
    rc, out, err = run_main(capsys, *args, "--file", str(path))
    assert (rc, out) == (code, "")
    assert err.startswith("qemuca: error: " + message.format(f=path)) and err.count("\n") == 1
    assert snapshot(path) == before and os.listdir(tmp_path) == ["qemu.conf"]


@pytest.mark.parametrize("target, args, code, message", [
    (lambda d: d, ["apply"], 3, "{f} is not a regular file"),
    (_fifo, ["apply"], 3, "{f} is not a regular file"),
    (lambda d: d / "missing.conf", ["remove"], 4, "{f} does not exist"),
    (lambda d: d / "missing.conf", ["show"], 4, "{f} does not exist"),
    (lambda d: d / "nodir" / "qemu.conf", ["apply"], 4, "directory {d}/nodir does not exist"),
    (lambda d: d / "file" / "qemu.conf", ["apply"], 10, "Not a directory: {f}"),
])
def test_unusable_paths(capsys, tmp_path, target, args, code, message):
    (tmp_path / "file").write_bytes(b"")
    path = target(tmp_path)
    rc, _, err = run_main(capsys, *args, "--file", str(path))
    assert rc == code
    assert err == "qemuca: error: " + message.format(f=path, d=tmp_path) + "\n"
    assert set(os.listdir(tmp_path)) <= {"file", "fifo"}  # nothing created


def test_exit_codes_of_the_real_command(tmp_path):
    bad = tmp_path / "bad.conf"
    bad.write_bytes(b"x = 1 y\n")
    cases = [(["apply", "--file", str(bad)], 3, f"{bad}:1:7: expecting a separator"),
             (["remove", "--file", str(tmp_path / "none.conf")], 4, f"{tmp_path}/none.conf does not exist"),
             (["show", "--file", f"{bad}/q.conf"], 10, f"Not a directory: {bad}/q.conf")]
    for args, code, message in cases:
        out = qemuca(*args)
        assert (out.returncode, out.stdout, out.stderr) == (code, "", f"qemuca: error: {message}\n")
    assert bad.read_bytes() == b"x = 1 y\n"


def test_help_tells_what_force_tls_does():
    out = CliRunner().invoke(cli, ["qemu-conf", "apply", "--help"], terminal_width=200)
    assert out.exit_code == 0
    text = " ".join(out.output.split())
    assert "REFUSES every migration without --tls" in text and "libvirt >= 6.9" in text
