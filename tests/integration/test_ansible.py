"""The qemuca.qemu_tls collection driven by a real ansible-playbook against fake hosts.

The collection is built with `ansible-galaxy collection build` (proving galaxy.yml) and
installed into a temporary collections path; every play runs `ansible-playbook` from the
test venv as a subprocess, with an inventory of fake hosts (ansible_host 127.0.0.1, their
sshd's port, root, the fleet's key, UserKnownHostsFile in ansible_ssh_common_args) and a
real store whose CA key is encrypted. What is asserted is what landed on the hosts and in
the store, then `qemuca verify` and a real QEMU TLS migration (`qemuca probe`) on it.

One fleet serves the module: host1/host2 are enrolled once (`enrolled`), host3's key is
absent from the inventory's known_hosts, host4 is enrolled only by the failure test.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import pytest

from tests.support.fakehosts import start_fleet
from tests.support.fixtures import require_fleet_tools
from tests.support.pki import (
    assert_ok,
    audit_actions,
    clean_env,
    index_rows,
    make_store,
    run_qemuca,
    snapshot_dir,
    snapshot_store,
    write_secret,
)
from tests.support.qemu_migration import QEMU
from tests.support.tools import in_ci, require_tool

pytestmark = [pytest.mark.sshd, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
COLLECTION = ROOT / "ansible" / "qemuca" / "qemu_tls"
CERT_DIR = "/etc/pki/qemu"
PASSPHRASE = "ansible test passphrase"

# Writes each host's last task result as JSON (the playbook has one task that matters).
RESULTS_CALLBACK = '''
import json, os
from ansible.plugins.callback import CallbackBase

class CallbackModule(CallbackBase):
    CALLBACK_VERSION = 2.0
    CALLBACK_TYPE = "notification"
    CALLBACK_NAME = "qemuca_results"
    CALLBACK_NEEDS_ENABLED = True

    def _write(self, result, status):
        data = dict(getattr(result, "result", None) or result._result)
        data["_status"] = status
        path = os.path.join(os.environ["QEMUCA_TEST_RESULTS"], result._host.get_name() + ".json")
        with open(path, "w") as f:
            json.dump(data, f, default=str)

    def v2_runner_on_ok(self, result):
        self._write(result, "ok")

    def v2_runner_on_failed(self, result, ignore_errors=False):
        self._write(result, "failed")

    def v2_runner_on_unreachable(self, result):
        self._write(result, "unreachable")
'''

PLAYBOOK = """\
- name: QEMU migration TLS
  hosts: all
  gather_facts: false
  tasks:
    - name: Credentials from the qemuca store (options from the inventory's variables)
      qemuca.qemu_tls.host_credentials: {}
"""


def _ansible_tool(name: str) -> str:
    """From the venv running the tests (the `test` extra brings ansible-core), else PATH."""
    beside = Path(sys.executable).with_name(name)
    found = str(beside) if beside.exists() else shutil.which(name)
    if not found:
        message = f"{name} is missing (ansible-core: pip install -e '.[test]', see scripts/setup-venv.sh)"
        if in_ci():
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    return found


def _inventory(fleet, base: Path, home: str, passphrase_file: str) -> Path:
    """An INI inventory of the fleet; host3's key is left out of its known_hosts."""
    known = base / "known_hosts"
    known.write_text("".join(f"[127.0.0.1]:{h.port} {h.host_key_line}\n" for h in fleet.hosts
                             if h.name != "host3.qemu.test"))
    lines = ["[hv]"]
    lines += [f"{h.name} ansible_host=127.0.0.1 ansible_port={h.port}" for h in fleet.hosts[:2]]
    lines += ["", "[others]"]
    lines += [f"{h.name} ansible_host=127.0.0.1 ansible_port={h.port}" for h in fleet.hosts[2:]]
    lines += ["", "[all:vars]", "ansible_user=root", f"ansible_ssh_private_key_file={fleet.identity}",
              f"ansible_ssh_common_args='-o UserKnownHostsFile={known} -o IdentitiesOnly=yes'",
              f"qemuca_home={home}", f"qemuca_passphrase_file={passphrase_file}", "qemu_tls_renew_before_days=30"]
    path = base / "inventory.ini"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def world():
    require_fleet_tools()
    playbook_bin = _ansible_tool("ansible-playbook")
    galaxy = _ansible_tool("ansible-galaxy")
    doc = _ansible_tool("ansible-doc")
    base = Path(tempfile.mkdtemp(prefix="qa-ansible-"))
    fleet = start_fleet(4, Path(tempfile.mkdtemp(prefix="qf-")))
    try:
        home = make_store(base, passphrase=PASSPHRASE.encode())
        secret = write_secret(base / "passphrase", PASSPHRASE)
        # Build the collection from the repository and install the tarball.
        built = subprocess.run([galaxy, "collection", "build", str(COLLECTION), "--output-path", str(base)],
                               capture_output=True, text=True, timeout=120)
        assert built.returncode == 0, built.stdout + built.stderr
        tarball = base / "qemuca-qemu_tls-0.1.0.tar.gz"
        installed = subprocess.run([galaxy, "collection", "install", "-p", str(base / "collections"),
                                    str(tarball)], capture_output=True, text=True, timeout=120)
        assert installed.returncode == 0, installed.stdout + installed.stderr
        callbacks = base / "callbacks"
        callbacks.mkdir()
        (callbacks / "qemuca_results.py").write_text(RESULTS_CALLBACK)
        (base / "site.yml").write_text(PLAYBOOK)
        (base / "ansible.cfg").write_text("[defaults]\n")
        yield SimpleNamespace(fleet=fleet, home=home, base=base, playbook_bin=playbook_bin, doc_bin=doc,
                              inventory=_inventory(fleet, base, home, secret), callbacks=callbacks,
                              collections=base / "collections")
    finally:
        fleet.stop()
        shutil.rmtree(base, ignore_errors=True)


def ansible_env(world, collections=None, **extra) -> dict:
    return clean_env({
        "ANSIBLE_COLLECTIONS_PATH": str(collections or world.collections),
        "ANSIBLE_CALLBACK_PLUGINS": str(world.callbacks), "ANSIBLE_CALLBACKS_ENABLED": "qemuca_results",
        "ANSIBLE_HOME": str(world.base / "ansible-home"), "ANSIBLE_LOCAL_TEMP": str(world.base / "tmp"),
        "ANSIBLE_NOCOLOR": "1", "ANSIBLE_FORKS": "4", "ANSIBLE_RETRY_FILES_ENABLED": "0",
        "ANSIBLE_CONFIG": str(world.base / "ansible.cfg"), **extra})  # not the machine's ansible.cfg


def play(world, *args: str, limit: str = "hv", playbook: str = "site.yml", inventory=None, collections=None):
    """ansible-playbook PLAYBOOK -l LIMIT ARGS: (process, {host: its task result})."""
    results = Path(tempfile.mkdtemp(dir=world.base, prefix="results-"))
    env = ansible_env(world, collections)
    env["QEMUCA_TEST_RESULTS"] = str(results)  # (clean_env drops QEMUCA_* settings)
    proc = subprocess.run([world.playbook_bin, "-i", str(inventory or world.inventory), str(world.base / playbook),
                           "-l", limit, *args], capture_output=True, text=True, env=env, timeout=180)
    assert "Traceback" not in proc.stdout + proc.stderr, proc.stdout + proc.stderr
    return proc, {p.stem: json.loads(p.read_text()) for p in results.glob("*.json")}


def recap(proc) -> dict:
    """host -> {ok, changed, failed, ...} from PLAY RECAP."""
    out = {}
    for m in re.finditer(r"^(\S+)\s+:\s+(.*)$", proc.stdout, re.M):
        counts = dict(re.findall(r"(\w+)=(\d+)", m.group(2)))
        if counts:
            out[m.group(1)] = {k: int(v) for k, v in counts.items()}
    return out


def ssh(fleet):
    return ["--ssh-config", str(fleet.ssh_config), "--known-hosts", str(fleet.known_hosts)]


def host_state(host) -> dict:
    return {"certs": snapshot_dir(host.path(CERT_DIR)), "qemu.conf": host.read("/etc/libvirt/qemu.conf")}


@pytest.fixture(scope="module")
def enrolled(world):
    """The first run: host1 and host2 enrolled by the collection."""
    proc, results = play(world)
    return SimpleNamespace(proc=proc, results=results)


# ---------------------------------------------------------------- the tests


def test_first_run_enrolls_with_keys_made_on_the_hosts(world, enrolled):
    proc, results = enrolled.proc, enrolled.results
    assert proc.returncode == 0, proc.stdout + proc.stderr
    hv = world.fleet.hosts[:2]
    assert {h.name: recap(proc)[h.name]["changed"] for h in hv} == {h.name: 1 for h in hv}
    rows = {r[1]: r for r in index_rows(world.home, ["certificates"])["certificates"]}
    for host in hv:
        r = results[host.name]
        assert (r["_status"], r["operation"], r["qemuca_result"], r["changed"]) == ("ok", "enroll", "changed", True)
        assert r["qemu_group"]["name"] == "libvirt-qemu"
        assert r["restart_needed"] is True  # qemu.conf changed, no qemu_tls_restart
        # The layout qemuca deploy places: root-owned, QEMU's group, keys 0640, links.
        for name, mode in (("ca-cert.pem", 0o644), ("server-cert.pem", 0o644), ("server-key.pem", 0o640)):
            st = os.stat(host.path(f"{CERT_DIR}/{name}"))
            assert stat.S_IMODE(st.st_mode) == mode, name
            assert host.owner(f"{CERT_DIR}/.qemuca/current/{name}") == ("root", "libvirt-qemu")
        assert os.readlink(host.path(f"{CERT_DIR}/.qemuca/current/client-key.pem")) == "server-key.pem"
        conf = host.read("/etc/libvirt/qemu.conf").decode()
        assert 'migrate_tls_x509_cert_dir = "/etc/pki/qemu"' in conf and "migrate_tls_x509_verify = 1" in conf
        # Made on the host: the index holds no key; the certificate is the one in place.
        row = rows[host.name]
        record = dict(zip(["serial", "host", "sans", "not_before", "not_after", "fingerprint_sha256", "status"],
                          row))
        assert record["status"] == "valid" and record["fingerprint_sha256"] == r["fingerprint_sha256"]
        key_pem = host.read(f"{CERT_DIR}/server-key.pem")
        assert b"".join(key_pem.splitlines()[1:-1]) not in Path(world.home, "index.sqlite").read_bytes()
    csr_rows = index_rows(world.home, ["certificates"])["certificates"]
    assert all("csr" in row and None in row for row in csr_rows)  # key_source csr, key_pem NULL
    actions = audit_actions(world.home)
    assert actions.count("enroll") == 2 and actions.count("deploy") == 2
    assert world.fleet.hosts[2].name not in rows  # outside the limit: untouched

    verify = run_qemuca(world.home, "verify", *[h.name for h in hv], *ssh(world.fleet), "--json")
    assert verify.returncode == 0, verify.stdout + verify.stderr


def test_second_run_changes_nothing(world, enrolled):
    before = index_rows(world.home, ["certificates"])
    states = {h.name: host_state(h) for h in world.fleet.hosts[:2]}
    # the collection's own example playbook, as shipped
    proc, results = play(world, "-e", "qemu_tls_hosts=hv", playbook=str(COLLECTION / "playbooks" / "example.yml"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert {h: c["changed"] for h, c in recap(proc).items()} == {h: 0 for h in states}
    for name in states:
        assert (results[name]["operation"], results[name]["qemuca_result"]) == ("deploy", "unchanged")
    assert index_rows(world.home, ["certificates"]) == before  # no new certificate
    assert {h.name: host_state(h) for h in world.fleet.hosts[:2]} == states


def test_renew_before_days_renews_for_the_key_on_the_host(world, enrolled):
    host = world.fleet.hosts[0]
    key = host.read(f"{CERT_DIR}/server-key.pem")
    old = host.read(f"{CERT_DIR}/server-cert.pem")
    proc, results = play(world, "-e", "qemu_tls_renew_before_days=3650", limit=host.name)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    r = results[host.name]
    assert (r["operation"], r["qemuca_result"], recap(proc)[host.name]["changed"]) == ("renew", "changed", 1)
    assert host.read(f"{CERT_DIR}/server-key.pem") == key and host.read(f"{CERT_DIR}/server-cert.pem") != old
    statuses = sorted(row[6] for row in index_rows(world.home, ["certificates"])["certificates"] if row[1] == host.name)
    assert statuses == ["superseded", "valid"] and audit_actions(world.home).count("renew") == 1
    again, _ = play(world, limit=host.name)  # the new certificate is in place: nothing to do
    assert recap(again)[host.name]["changed"] == 0


def test_hosts_reached_through_ssh_config_alone(world, enrolled):
    """No ansible_host/port/user: ssh_config's HostName, Port, User, IdentityFile and
    UserKnownHostsFile apply (as with `ssh NAME`); a become: play is told it is not used."""
    host = world.fleet.hosts[1]
    inventory = world.base / "by-ssh-config.ini"
    inventory.write_text(f"{host.name}\n\n[all:vars]\nqemuca_home={world.home}\n"
                         f"qemuca_ssh_config={world.fleet.ssh_config}\n")
    become = PLAYBOOK.replace("gather_facts: false", "gather_facts: false\n  become: true")
    (world.base / "become.yml").write_text(become)
    proc, results = play(world, limit="all", inventory=inventory, playbook="become.yml")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    r = results[host.name]
    assert (r["operation"], r["qemuca_result"], r["changed"]) == ("deploy", "unchanged", False)
    assert any("become is not used" in w for w in r.get("warnings", [])) or "become is not used" in proc.stdout


def test_check_diff_changes_nothing_and_shows_the_qemu_conf_diff(world, enrolled):
    fleet = world.fleet
    targets = [fleet.hosts[0], fleet.hosts[1], fleet.hosts[3]]  # host4: an enrollment to preview
    store = snapshot_store(world.home)
    deployments = index_rows(world.home, ["deployments"])
    states = {h.name: host_state(h) for h in targets if h.path(CERT_DIR).exists()}
    conf4 = fleet.hosts[3].read("/etc/libvirt/qemu.conf")
    proc, results = play(world, "--check", "--diff", "-e", "qemu_tls_force=true",
                         limit=",".join(h.name for h in targets))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert {h.name: recap(proc)[h.name]["changed"] for h in targets} == {h.name: 1 for h in targets}
    assert proc.stdout.count("+migrate_tls_force = 1") == 3, proc.stdout  # --diff shows each qemu.conf diff
    for h in targets[:2]:
        assert (results[h.name]["operation"], results[h.name]["qemuca_result"]) == ("deploy", "would-change")
    r4 = results[fleet.hosts[3].name]
    assert (r4["operation"], r4["qemuca_result"], r4["fingerprint_sha256"]) == ("enroll", "would-change", None)
    assert any("make a ecdsa-p256 key" in a for a in r4["actions"])
    assert "would make a ecdsa-p256 key" in proc.stdout  # the file actions are in the diff too
    # Nothing anywhere: the store (files, certificates, audit, deployments) and the hosts.
    assert snapshot_store(world.home) == store and index_rows(world.home, ["deployments"]) == deployments
    assert {h.name: host_state(h) for h in targets if h.path(CERT_DIR).exists()} == states
    assert not fleet.hosts[3].path(CERT_DIR).exists() and fleet.hosts[3].read("/etc/libvirt/qemu.conf") == conf4


def test_a_real_tls_migration_between_two_enrolled_hosts(world, enrolled):
    require_tool(QEMU)
    h1, h2 = world.fleet.hosts[:2]
    proc = run_qemuca(world.home, "probe", h1.name, h2.name, *ssh(world.fleet), "--address", "127.0.0.1",
                      "--ram", "16", "--json", timeout=120)
    assert_ok(proc)
    report = json.loads(proc.stdout)
    report = report[0] if isinstance(report, list) else report
    assert report["result"] == "pass", proc.stdout


def test_failures_are_one_line_task_failures_and_others_go_on(world, enrolled):
    fleet = world.fleet
    host3, host4 = fleet.hosts[2], fleet.hosts[3]
    unsafe = host4.path("/etc/pki")
    unsafe.mkdir(exist_ok=True)
    os.chmod(unsafe, 0o777)  # anyone could swap the files QEMU reads
    try:
        proc, results = play(world, limit="all")
    finally:
        os.chmod(unsafe, 0o755)
    assert proc.returncode == 2, proc.stdout + proc.stderr  # Ansible: some host failed
    counts = recap(proc)
    for h in fleet.hosts[:2]:
        assert (counts[h.name]["failed"], counts[h.name]["changed"]) == (0, 0)
        assert results[h.name]["qemuca_result"] == "unchanged"
    for host, needle in ((host3, "known_hosts"), (host4, "anyone who can write there")):
        r = results[host.name]
        assert r["_status"] == "failed" and r["qemuca_result"] == "failed", r
        assert needle in r["msg"] and "\n" not in r["msg"] and "Traceback" not in r["msg"], r["msg"]
        assert counts[host.name]["failed"] == 1
    assert "qemuca_accept_new_host_key: true" in results[host3.name]["msg"]  # the module's option, not the CLI's
    hosts = {r[1] for r in index_rows(world.home, ["certificates"])["certificates"]}
    assert host3.name not in hosts and host4.name not in hosts  # nothing recorded for them


LOOKUP_PLAYBOOK = """\
- name: The store, read on the controller
  hosts: localhost
  gather_facts: false
  tasks:
    - name: Bundle, CRL and host facts
      ansible.builtin.debug:
        msg:
          bundle: "{{ lookup('qemuca.qemu_tls.ca_bundle', qemuca_home=home) }}"
          crl: "{{ lookup('qemuca.qemu_tls.ca_bundle', crl=true, qemuca_home=home) }}"
          hosts: "{{ query('qemuca.qemu_tls.ca_bundle', 'host1.qemu.test', 'HOST2.qemu.test', qemuca_home=home) }}"
          missing: "{{ query('qemuca.qemu_tls.ca_bundle', 'nohost.qemu.test', missing='empty', qemuca_home=home) }}"
"""


def test_the_source_tree_is_a_collection_with_docs_and_a_lookup(world, enrolled):
    """ANSIBLE_COLLECTIONS_PATH at the repository's own files (no build): ansible-doc reads
    the module's documentation; the lookup gives the store's bundle and certificates."""
    tree = world.base / "source" / "ansible_collections" / "qemuca"
    tree.mkdir(parents=True)
    (tree / "qemu_tls").symlink_to(COLLECTION)
    collections = world.base / "source"
    docs = subprocess.run([world.doc_bin, "qemuca.qemu_tls.host_credentials"], capture_output=True, text=True,
                          env=ansible_env(world, collections), timeout=60)
    assert docs.returncode == 0 and "qemu_tls_cert_dir" in docs.stdout and "migrate_tls_force" in docs.stdout, docs
    (world.base / "lookup.yml").write_text(LOOKUP_PLAYBOOK)
    proc, results = play(world, "-e", f"home={world.home}", limit="localhost", playbook="lookup.yml",
                         inventory="localhost,", collections=collections)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    msg = results["localhost"]["msg"]
    assert msg["bundle"] == Path(world.home, "ca", "ca-cert.pem").read_text()
    assert msg["crl"] == ""  # nothing revoked
    rows = {r[1]: r for r in index_rows(world.home, ["certificates"])["certificates"] if r[6] == "valid"}
    assert [h["host"] for h in msg["hosts"]] == ["host1.qemu.test", "host2.qemu.test"]
    for h in msg["hosts"]:
        assert h["fingerprint_sha256"] == rows[h["host"]][5] and h["cert_pem"].startswith("-----BEGIN CERTIFICATE")
        assert h["key_source"] == "csr" and "key_pem" not in h
    assert msg["missing"] == [{}]
