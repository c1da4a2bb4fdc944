"""`qemuca deploy` / `qemuca rollback` against fake hosts over real OpenSSH (no mocked SSH).

Assertions look at what QEMU and libvirt would see on a host: the names in
/etc/pki/qemu followed through their links, and qemu.conf read by libvirt's own
parsers. The internal .qemuca layout is only looked at where a test is about the switch.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import posixpath
import shutil
import stat
import tempfile
from pathlib import Path
from types import SimpleNamespace
from typing import Dict, List, Optional

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from qemuca.hosts import qemuconf
from qemuca.hosts.known_hosts import fingerprint as ssh_fingerprint
from qemuca.pki.ca import CertificateAuthority, fingerprint
from qemuca.store.index import Store
from tests.support.augeas import lens_read, virconf_read
from tests.support.fakehosts import DEFAULT_QEMU_CONF, FakeHost, Fleet, start_fleet
from tests.support.faults import FaultProxy, close_all, write_proxy_client_files
from tests.support.fixtures import require_fleet_tools
from tests.support.pki import assert_ok, current, index_rows, issue, make_store, run_many, run_qemuca
from tests.support.qemu_migration import QEMU, Endpoint, migrate
from tests.support.tools import require_tool

pytestmark = [pytest.mark.sshd]

CERT_DIR = "/etc/pki/qemu"
QEMU_CONF = "/etc/libvirt/qemu.conf"
CERTS = ("ca-cert.pem", "server-cert.pem", "client-cert.pem")
KEYS = ("server-key.pem", "client-key.pem")
LAYOUT = CERTS + KEYS
ALL_NAMES = LAYOUT + ("ca-crl.pem",)
INDEX_TABLES = ("deployments", "audit")
REPORT_KEYS = {"host", "result", "fingerprint_sha256", "error"}


# --------------------------------------------------------------------- helpers


def ssh_args(config, known) -> List[str]:
    return ["--ssh-config", str(config), "--known-hosts", str(known)]


def fleet_ssh(fleet: Fleet) -> List[str]:
    return ssh_args(fleet.ssh_config, fleet.known_hosts)


def reports_of(proc) -> Dict[str, dict]:
    """--json output as host -> report, checking the documented shape on the way."""
    data = json.loads(proc.stdout)
    assert isinstance(data, list), proc.stdout
    for r in data:
        assert REPORT_KEYS <= set(r), r
    return {r["host"]: r for r in data}


def resolve(host: FakeHost, path: str) -> str:
    """Follow symlinks by hand inside the host (os.path.realpath would leave it through
    /proc/PID/root). Returns the host-side path of the file reached."""
    for _ in range(40):
        p = host.path(path)
        if not p.is_symlink():
            return path
        target = os.readlink(p)
        path = posixpath.normpath(target if target.startswith("/")
                                  else posixpath.join(posixpath.dirname(path), target))
    raise AssertionError(f"{host.name}:{path}: symlink loop")


def group_name(host: FakeHost, gid: int) -> str:
    for line in host.read("/etc/group").decode().splitlines():
        parts = line.split(":")
        if len(parts) > 2 and parts[2] == str(gid):
            return parts[0]
    return str(gid)


def cert_fp(data: bytes) -> str:
    return fingerprint(x509.load_pem_x509_certificate(data))


def key_matches(cert_pem: bytes, key_pem: bytes) -> bool:
    cert = x509.load_pem_x509_certificate(cert_pem)
    key = serialization.load_pem_private_key(key_pem, None)
    return key.public_key().public_bytes(serialization.Encoding.DER,
                                         serialization.PublicFormat.SubjectPublicKeyInfo) == \
        cert.public_key().public_bytes(serialization.Encoding.DER,
                                       serialization.PublicFormat.SubjectPublicKeyInfo)


def host_set(host: FakeHost, cert_dir: str = CERT_DIR) -> Optional[str]:
    """The fingerprint of the set QEMU would load from cert_dir, None if it holds none.
    Fails on anything QEMU could trip over: a partial set, a key that is
    not the cert's, a cert not issued by ca-cert.pem, names resolving into two sets."""
    # A name that dangles is absent for QEMU (it checks access(2)): qemuca links a new
    # set's names before switching `current`, so they may dangle until the switch.
    present = [n for n in ALL_NAMES if host.path(f"{cert_dir}/{n}").exists()]
    if not present:
        return None
    assert set(LAYOUT) <= set(present), f"{host.name}: partial set in {cert_dir}: {present}"
    data = {n: host.read(f"{cert_dir}/{n}") for n in present}
    assert data["server-cert.pem"] == data["client-cert.pem"], f"{host.name}: two certificates"
    assert key_matches(data["server-cert.pem"], data["server-key.pem"]), host.name
    assert key_matches(data["client-cert.pem"], data["client-key.pem"]), host.name
    cert = x509.load_pem_x509_certificate(data["server-cert.pem"])
    bundle = x509.load_pem_x509_certificates(data["ca-cert.pem"])
    assert any(_issued_by(cert, ca) for ca in bundle), f"{host.name}: cert not from ca-cert.pem"
    homes = {posixpath.dirname(resolve(host, f"{cert_dir}/{n}")) for n in present}
    assert len(homes) == 1, f"{host.name}: names resolve into several sets: {homes}"
    return fingerprint(cert)


def _issued_by(cert, ca) -> bool:
    try:
        cert.verify_directly_issued_by(ca)
        return True
    except Exception:
        return False


def tree(host: FakeHost, *roots: str) -> Dict[str, tuple]:
    """Every entry under roots with type, mode, owner, size, mtime, inode and content
    digest (or link target): any write shows up here."""
    out: Dict[str, tuple] = {}
    for root in roots:
        base = host.path(root)
        if not os.path.lexists(base):
            out[root] = ("absent",)
            continue
        for p in [base, *sorted(base.rglob("*"))]:
            st = os.lstat(p)
            if stat.S_ISLNK(st.st_mode):
                what = os.readlink(p)
            elif stat.S_ISREG(st.st_mode):
                what = hashlib.sha256(p.read_bytes()).hexdigest()
            else:
                what = None
            out[str(p)] = (stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode), st.st_uid,
                           st.st_gid, st.st_size, st.st_mtime_ns, st.st_ino, what)
    return out


def fleet_tree(fleet, roots=("/etc/pki", "/etc/libvirt")) -> Dict[str, dict]:
    return {h.name: tree(h, *roots) for h in fleet}


def store_fp(home, host: str) -> str:
    return current(home, host).fingerprint_sha256


# (set, qemu.conf) a host holds after the fault at each point of FAULTS. What the relay
# guarantees (see tests/support/faults.py): the step logged ran, the next one did not.
# So these outcomes are exact, not likely; a dropped connection leaves the same.
KILL_MATRIX_OUTCOMES = {
    "connect (SSH banner)": ("old", "old"),
    "1st upload opened": ("old", "old"),
    "2nd upload written": ("old", "old"),
    "before switch (current link staged)": ("old", "old"),
    "right after switch": ("new", "old"),
    "during qemu.conf write": ("new", "old"),
    "qemu.conf renamed": ("new", "new"),
    "new host: 1st upload written": ("none", "old"),
}


def two_sets(home, hosts, had_a, deploy_a):
    """What a faulty deploy must leave each host with, A or B, never a mix: set A placed
    by deploy_a() on the hosts of had_a, then set B issued for every host.
    Returns (fingerprints of A, qemu.conf after A, fingerprints of B)."""
    deploy_a()
    set_a = {n: store_fp(home, n) for n in had_a}
    conf_a = {h.name: h.read(QEMU_CONF) for h in hosts}
    issue(home, *had_a, force=True)
    issue(home, *[h.name for h in hosts if h.name not in had_a])
    return set_a, conf_a, {h.name: store_fp(home, h.name) for h in hosts}


def arm_all(proxies, faults) -> None:
    """Each proxy armed with its fault: (label, trigger, nth, ...) per host."""
    for proxy, (label, trigger, nth, *_) in zip(proxies, faults):
        if trigger == "connect":
            proxy.arm_connect(label)
        else:
            proxy.arm(label, trigger, nth)


def deployments(home) -> dict:
    store = Store.open(home)
    try:
        return store.deployed()
    finally:
        store.close()


def ca_bundle(home) -> bytes:
    store = Store.open(home)
    try:
        return CertificateAuthority(store).bundle()
    finally:
        store.close()


def new_fleet(n: int, **kw) -> Fleet:
    require_fleet_tools()
    return start_fleet(n, Path(tempfile.mkdtemp(prefix="qf-")), **kw)


# ------------------------------------------------- five hosts, one deploy (module)

SOMEGROUP_CONF = DEFAULT_QEMU_CONF + 'group = "somegroup"\n'
RHEL_STOCK_CONF = DEFAULT_QEMU_CONF + '#group = "qemu"\n'
EXPECTED_GROUP = {"host4.qemu.test": "qemu", "host5.qemu.test": "somegroup"}
EXPECTED_SOURCE = {"host1.qemu.test": "libvirt's default on debian (/etc/os-release)",
                   "host3.qemu.test": "libvirt's default on debian (/etc/os-release)",
                   "host4.qemu.test": "libvirt's default, documented in qemu.conf (line 2)",
                   "host5.qemu.test": "qemu.conf group (line 2)"}


@pytest.fixture(scope="module")
def five(tmp_path_factory):
    """Five hosts deployed once with --issue: three Debian-like (libvirt-qemu; host3 also
    has a `qemu` group, which must not win), one RHEL-like (the stock qemu.conf documents
    `#group = "qemu"`), one whose qemu.conf names group "somegroup" (it also has
    libvirt-qemu, which must lose). Tests on it only read, or run deploys that change
    nothing, so they can share it."""
    fleet = new_fleet(2)
    try:
        fleet.add_host("host3.qemu.test", extra_groups=["qemu"])
        fleet.add_host("host4.qemu.test", distro="rhel", qemu_conf=RHEL_STOCK_CONF)
        fleet.add_host("host5.qemu.test", extra_groups=["somegroup"], qemu_conf=SOMEGROUP_CONF)
        home = make_store(tmp_path_factory.mktemp("five"))
        proc = run_qemuca(home, "deploy", *fleet.names, "--issue", *fleet_ssh(fleet), "--json")
        yield SimpleNamespace(fleet=fleet, home=home, proc=proc)
    finally:
        fleet.stop()


def test_deploy_to_five_hosts_places_the_full_set(five):
    reports = reports_of(assert_ok(five.proc))
    assert list(reports) == five.fleet.names
    for host in five.fleet:
        r = reports[host.name]
        fp = store_fp(five.home, host.name)
        assert (r["result"], r["error"], r["fingerprint_sha256"]) == ("changed", None, fp), r
        assert r["restart_needed"] is True  # qemu.conf changed; --restart not given

        cert_dir = os.stat(host.path(CERT_DIR))
        assert (stat.S_IMODE(cert_dir.st_mode), cert_dir.st_uid) == (0o755, 0)
        group = EXPECTED_GROUP.get(host.name, "libvirt-qemu")
        assert r["qemu_group"]["name"] == group and group_name(host, r["qemu_group"]["gid"]) == group, r
        assert r["qemu_group"]["source"] == EXPECTED_SOURCE.get(host.name, EXPECTED_SOURCE["host1.qemu.test"])
        for name in LAYOUT:
            st = os.stat(host.path(f"{CERT_DIR}/{name}"))  # what QEMU opens: links followed
            want = 0o640 if name in KEYS else 0o644
            assert stat.S_ISREG(st.st_mode), (host.name, name)
            assert (stat.S_IMODE(st.st_mode), st.st_uid, group_name(host, st.st_gid)) == \
                (want, 0, group), (host.name, name)
        assert not os.path.lexists(host.path(f"{CERT_DIR}/ca-crl.pem"))  # nothing revoked
        assert host_set(host) == fp
        record = current(five.home, host.name)
        assert host.read(f"{CERT_DIR}/server-cert.pem") == record.cert_pem.encode()
        assert host.read(f"{CERT_DIR}/ca-cert.pem") == ca_bundle(five.home)


@pytest.mark.augeas
def test_qemu_conf_is_read_by_libvirt_as_ours(five):
    paths = {h.name: str(h.path(QEMU_CONF)) for h in five.fleet}
    lens = lens_read(list(paths.values()))
    for host in five.fleet:
        path = paths[host.name]
        res = lens[os.path.abspath(path)]
        assert res.error is None, (host.name, res.error)
        assert res.first("migrate_tls_x509_cert_dir") == CERT_DIR, host.name
        assert res.first("migrate_tls_x509_verify") == "1", host.name
        daemon = virconf_read(path, strings=["migrate_tls_x509_cert_dir", "group"],
                              bools=["migrate_tls_x509_verify"])
        assert daemon.error is None, (host.name, daemon.error)
        assert daemon.values["migrate_tls_x509_cert_dir"] == CERT_DIR
        assert daemon.values["migrate_tls_x509_verify"] is True
        text = host.read(QEMU_CONF)
        assert text.startswith(DEFAULT_QEMU_CONF.encode())  # the admin's lines are kept
        assert (b'#group = "qemu"\n' in text) == (host.name == "host4.qemu.test")
        doc = qemuconf.parse(text, QEMU_CONF)
        tls = qemuconf.resolve_migration_tls(doc, lambda p, h=host: h.path(p).is_dir())
        assert (tls.cert_dir.value, tls.verify.value, tls.warnings) == (CERT_DIR, True, ())
        assert stat.S_IMODE(os.stat(host.path(QEMU_CONF)).st_mode) == 0o600  # mode kept
    assert lens[os.path.abspath(paths["host5.qemu.test"])].first("group") == "somegroup"


def test_second_deploy_reports_unchanged_and_touches_nothing(five):
    before = fleet_tree(five.fleet)
    proc = assert_ok(run_qemuca(five.home, "deploy", *five.fleet.names, *fleet_ssh(five.fleet),
                                "--json"))
    for host, r in reports_of(proc).items():
        assert (r["result"], r["error"], r["restart_needed"]) == ("unchanged", None, False), r
        assert r["fingerprint_sha256"] == store_fp(five.home, host)
    assert fleet_tree(five.fleet) == before  # same inodes, mtimes, bytes: nothing rewritten


def test_index_records_deployments(five):
    assert_ok(five.proc)
    deployed = deployments(five.home)
    assert set(deployed) == set(five.fleet.names)
    for host in five.fleet.names:
        assert deployed[host][0] == store_fp(five.home, host)


def test_dry_run_shows_changes_and_writes_nothing(five, tmp_path):
    """A new certificate for host1 and --force-tls everywhere: the dry run lists the
    file changes and the qemu.conf diff, and writes nothing on hosts or in the store."""
    home = tmp_path / "copy"
    shutil.copytree(five.home, home, symlinks=True)
    issue(home, "host1.qemu.test", force=True)
    before, rows_before = fleet_tree(five.fleet), index_rows(home, INDEX_TABLES)
    args = ["deploy", *five.fleet.names, *fleet_ssh(five.fleet), "--dry-run", "--force-tls"]
    human, as_json = run_many(home, [args, args + ["--json"]])
    assert fleet_tree(five.fleet) == before
    assert index_rows(home, INDEX_TABLES) == rows_before
    assert_ok(human)
    reports = reports_of(assert_ok(as_json))
    for host, r in reports.items():
        assert r["result"] == "would-change", r
        assert "+migrate_tls_force = 1" in r["qemu_conf_diff"], r
        assert f"--- {host}: qemu.conf" in human.stdout
    new_fp = store_fp(home, "host1.qemu.test")
    assert reports["host1.qemu.test"]["fingerprint_sha256"] == new_fp
    actions = reports["host1.qemu.test"]["actions"]
    assert "replace server-cert.pem (mode 0644)" in actions, actions
    assert "replace server-key.pem (mode 0640)" in actions, actions
    assert "keep ca-cert.pem (mode 0644)" in actions, actions
    assert "host1.qemu.test: would replace server-cert.pem (mode 0644)" in human.stdout
    assert "+migrate_tls_force = 1" in human.stdout
    assert reports["host2.qemu.test"]["actions"] == []  # certificate already there


def test_inventory_with_limit(five, tmp_path):
    inventory = tmp_path / "hosts.ini"
    inventory.write_text(
        "[hypervisors]\nhost1.qemu.test\nhost2.qemu.test\n\n"
        "[edge]\nhost4.qemu.test ansible_user=root\n\n"
        "[rhel]\nhost5.qemu.test\n\n"
        "[cluster:children]\nhypervisors\nedge\n\n"
        "[other]\nnot-deployed.qemu.test\n")
    base = ["deploy", "--inventory", str(inventory), *fleet_ssh(five.fleet), "--json"]
    cluster, pieces = run_many(five.home, [base + ["--limit", "cluster"],
                                           base + ["--limit", "edge,host5.qemu.test"]])
    got = reports_of(assert_ok(cluster))
    assert list(got) == ["host1.qemu.test", "host2.qemu.test", "host4.qemu.test"]
    assert {r["result"] for r in got.values()} == {"unchanged"}
    got = reports_of(assert_ok(pieces))
    assert list(got) == ["host4.qemu.test", "host5.qemu.test"]
    assert {r["result"] for r in got.values()} == {"unchanged"}


def test_inventory_addresses_replace_ssh_config(five, tmp_path):
    """ansible_host/ansible_port/ansible_user reach hosts no ssh_config names."""
    inventory = tmp_path / "hosts.yml"
    hosts = "".join(f"        {h.name}: {{ansible_host: 127.0.0.1, ansible_port: {h.port}}}\n"
                    for h in five.fleet.hosts[:2])
    inventory.write_text(f"all:\n  vars:\n    ansible_user: root\n  children:\n    hv:\n      hosts:\n{hosts}")
    empty = tmp_path / "ssh_config"
    empty.write_text("")
    got = reports_of(assert_ok(run_qemuca(
        five.home, "deploy", "--inventory", inventory, "--ssh-config", empty, "-i", five.fleet.identity,
        "--known-hosts", five.fleet.known_hosts, "--json")))
    assert list(got) == five.fleet.names[:2]
    assert {r["result"] for r in got.values()} == {"unchanged"}


def test_accept_new_host_key_adds_keys_then_strict_run_works(five, tmp_path):
    known = tmp_path / "known_hosts"
    known.write_text("")
    args = ["deploy", *five.fleet.names, *ssh_args(five.fleet.ssh_config, known), "--json"]
    first = reports_of(assert_ok(run_qemuca(five.home, *args, "--accept-new-host-key")))
    assert {r["result"] for r in first.values()} == {"unchanged"}
    lines = sorted(known.read_text().splitlines())
    assert lines == sorted(f"[127.0.0.1]:{h.port} {h.host_key_line}" for h in five.fleet)
    strict = reports_of(assert_ok(run_qemuca(five.home, *args)))
    assert {r["result"] for r in strict.values()} == {"unchanged"}


@pytest.mark.qemu
def test_tls_migration_uses_the_deployed_files(five, tmp_path):
    """Real QEMU inside the hosts, reading exactly /etc/pki/qemu as deployed."""
    require_tool(QEMU)
    h1, h2 = five.fleet["host1.qemu.test"], five.fleet["host2.qemu.test"]
    e1, e2 = (Endpoint(cert_dir=CERT_DIR, prefix=h.prefix) for h in (h1, h2))
    there = migrate(e1, e2, tls_hostname="host2.qemu.test", workdir=tmp_path)
    assert there.completed, there.error
    back = migrate(e2, e1, tls_hostname="host1.qemu.test")
    assert back.completed, back.error
    # The name is really checked: host2's certificate does not say host3.
    wrong = migrate(e1, e2, tls_hostname="host3.qemu.test")
    assert not wrong.completed
    assert "does not match the hostname host3.qemu.test" in wrong.error, wrong.error


# -------------------------------------------------- host keys (fleet3, read-only)


def test_unknown_host_keys_are_refused_and_nothing_is_written(fleet3, tmp_path):
    home = make_store(tmp_path, hosts=fleet3.names)
    known = tmp_path / "known_hosts"
    known.write_text("")
    before = fleet_tree(fleet3)
    proc = run_qemuca(home, "deploy", *fleet3.names, *ssh_args(fleet3.ssh_config, known), "--json")
    assert proc.returncode == 1, proc.stderr
    reports = reports_of(proc)
    for host in fleet3:
        r = reports[host.name]
        fp = ssh_fingerprint(_key_blob(host.host_key_line))
        assert r["result"] == "failed", r
        assert fp in r["error"] and "unknown" in r["error"], r["error"]
    assert fleet_tree(fleet3) == before
    assert known.read_text() == ""
    assert deployments(home) == {}


def test_changed_host_keys_are_refused_even_with_accept_new(fleet3, tmp_path):
    home = make_store(tmp_path, hosts=fleet3.names)
    known = tmp_path / "known_hosts"
    known.write_text("".join(f"[127.0.0.1]:{h.port} {other_host_key()}\n" for h in fleet3))
    saved = known.read_bytes()
    before = fleet_tree(fleet3)
    args = ["deploy", *fleet3.names, *ssh_args(fleet3.ssh_config, known), "--json"]
    for proc in run_many(home, [args, args + ["--accept-new-host-key"]]):
        assert proc.returncode == 1, proc.stderr
        reports = reports_of(proc)
        for host in fleet3:
            r = reports[host.name]
            assert r["result"] == "failed", r
            assert "HOST KEY CHANGED" in r["error"], r["error"]
            assert ssh_fingerprint(_key_blob(host.host_key_line)) in r["error"], r["error"]
    assert known.read_bytes() == saved
    assert fleet_tree(fleet3) == before


def _key_blob(line: str) -> bytes:
    return base64.b64decode(line.split()[1])


def other_host_key() -> str:
    """A public key line no fake host has."""
    key = Ed25519PrivateKey.generate().public_key()
    return key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()


def test_dry_run_on_new_hosts_lists_every_file(fleet3, tmp_path):
    home = make_store(tmp_path, hosts=fleet3.names)
    before, rows_before = fleet_tree(fleet3), index_rows(home, INDEX_TABLES)
    proc = assert_ok(run_qemuca(home, "deploy", *fleet3.names, *fleet_ssh(fleet3), "--dry-run"))
    assert fleet_tree(fleet3) == before
    assert index_rows(home, INDEX_TABLES) == rows_before
    for host in fleet3.names:
        for action in ("create /etc/pki/qemu (mode 0755)", "add ca-cert.pem (mode 0644)",
                       "add server-key.pem (mode 0640)", "add client-cert.pem (mode 0644)"):
            assert f"{host}: would {action}" in proc.stdout, proc.stdout
        assert f"--- {host}: qemu.conf" in proc.stdout
    assert '+migrate_tls_x509_cert_dir = "/etc/pki/qemu"' in proc.stdout


# ----------------------------------------------------- groups, failures, --json


def test_one_failing_host_never_stops_the_others(fleet_factory, tmp_path):
    """host3 has no QEMU group, host4's sshd is down, host5's login shell prints a
    greeting (which breaks SFTP): all three fail, each with its reason; host1/host2 succeed."""
    fleet = fleet_factory(2)
    fleet.add_host("host3.qemu.test", distro="bare")
    fleet.add_hosts(["host4.qemu.test", "host5.qemu.test"])
    fleet["host4.qemu.test"].kill()
    fleet["host5.qemu.test"].write("/root/.bashrc", "echo 'Welcome to host5!'\n")
    home = make_store(tmp_path)
    proc = run_qemuca(home, "deploy", *fleet.names, "--issue", *fleet_ssh(fleet), "--json")
    assert proc.returncode == 1, proc.stderr
    reports = reports_of(proc)
    assert list(reports) == fleet.names
    for name in ("host1.qemu.test", "host2.qemu.test"):
        assert reports[name]["result"] == "changed", reports[name]
        assert host_set(fleet[name]) == store_fp(home, name)
    r3 = reports["host3.qemu.test"]
    assert r3["result"] == "failed" and "--group" in r3["error"], r3
    assert "libvirt-qemu" in r3["error"], r3
    assert not os.path.lexists(fleet["host3.qemu.test"].path(CERT_DIR))  # nothing written
    assert fleet["host3.qemu.test"].read(QEMU_CONF) == DEFAULT_QEMU_CONF.encode()
    r4 = reports["host4.qemu.test"]
    assert r4["result"] == "failed" and "connection refused" in r4["error"], r4
    r5 = reports["host5.qemu.test"]
    assert r5["result"] == "failed" and r5["error"].startswith("host5.qemu.test: "), r5
    assert set(deployments(home)) == {"host1.qemu.test", "host2.qemu.test"}

    proc = assert_ok(run_qemuca(home, "deploy", "host3.qemu.test", "--group", "root",
                                *fleet_ssh(fleet), "--json"))
    assert reports_of(proc)["host3.qemu.test"]["result"] == "changed"
    h3 = fleet["host3.qemu.test"]
    for name in LAYOUT:
        st = os.stat(h3.path(f"{CERT_DIR}/{name}"))
        assert (st.st_uid, st.st_gid) == (0, 0), name
    assert host_set(h3) == store_fp(home, "host3.qemu.test")


# ------------------------------------------------------------------- rollback


def test_rollback_brings_back_the_previous_certificate_and_back_again(fleet_factory, tmp_path):
    fleet = fleet_factory(2)
    home = make_store(tmp_path)
    h1 = fleet["host1.qemu.test"]
    assert_ok(run_qemuca(home, "deploy", *fleet.names, "--issue", *fleet_ssh(fleet)))
    old = store_fp(home, h1.name)
    issue(home, h1.name, force=True)
    new = store_fp(home, h1.name)
    assert new != old
    proc = assert_ok(run_qemuca(home, "deploy", h1.name, *fleet_ssh(fleet), "--json"))
    assert reports_of(proc)[h1.name]["result"] == "changed"
    assert cert_fp(h1.read(f"{CERT_DIR}/server-cert.pem")) == new

    # host2 was deployed once: nothing to roll back to; host1 must not care.
    proc = run_qemuca(home, "rollback", *fleet.names, *fleet_ssh(fleet), "--json")
    assert proc.returncode == 1, proc.stderr
    reports = reports_of(proc)
    assert (reports[h1.name]["result"], reports[h1.name]["fingerprint_sha256"]) == ("changed", old)
    assert reports["host2.qemu.test"]["result"] == "failed"
    assert "no previous" in reports["host2.qemu.test"]["error"]
    assert cert_fp(h1.read(f"{CERT_DIR}/server-cert.pem")) == old
    assert host_set(h1) == old

    proc = assert_ok(run_qemuca(home, "rollback", h1.name, *fleet_ssh(fleet), "--json"))
    assert reports_of(proc)[h1.name]["fingerprint_sha256"] == new
    assert host_set(h1) == new


# ----------------------------------------------------- sshd killed mid-deploy

SET_FILE = r'/\.qemuca/sets/[^/"]+/'
# (label, trigger: sftp log regex or "connect", nth match, host had set A before)
FAULTS = [
    ("connect (SSH banner)", "connect", 1, True),
    ("1st upload opened", r'^open "[^"]*' + SET_FILE + r'[^"]*" flags WRITE', 1, True),
    ("2nd upload written", r'^close "[^"]*' + SET_FILE + r'[^/"]+\.pem" bytes read 0 written', 2, True),
    ("before switch (current link staged)", r'^symlink old "sets/[^"]+" new "[^"]*/\.current\.', 1, True),
    ("right after switch", r'^posix-rename old "[^"]*" new "[^"]*/\.qemuca/current"', 1, True),
    ("during qemu.conf write", r'^open "/etc/libvirt/\.qemu\.conf\.qemuca-tmp', 1, True),
    ("qemu.conf renamed", r'^posix-rename old "[^"]*" new "/etc/libvirt/qemu\.conf"', 1, True),
    ("new host: 1st upload written", r'^close "[^"]*' + SET_FILE + r'[^"]*" bytes read 0 written', 1, False),
]


def conf_state(host: FakeHost, old_conf: bytes) -> str:
    """'old' / 'new' qemu.conf, after checking libvirt's parser reads it."""
    data = host.read(QEMU_CONF)
    qemuconf.parse(data, QEMU_CONF)  # raises on a file libvirt would refuse
    if data == old_conf:
        return "old"
    doc = qemuconf.parse(data, QEMU_CONF)
    assert doc.first("migrate_tls_force") is not None and doc.first("migrate_tls_force").value == 1
    return "new"


@pytest.mark.augeas
def test_sshd_killed_mid_deploy_leaves_old_or_new_set_never_a_mix(fleet_factory, tmp_path):
    """Each host is killed at another step of deploying set B over set A (and with a new
    qemu.conf setting); each must hold A or B whole and a qemu.conf libvirt reads, and a
    rerun after the restart converges."""
    fleet = fleet_factory(len(FAULTS))
    hosts = list(fleet)
    had_a = [h.name for h, f in zip(hosts, FAULTS) if f[3]]
    home = make_store(tmp_path)
    proxies = [FaultProxy(h) for h in hosts]
    try:
        config, known = write_proxy_client_files(proxies, fleet.identity, tmp_path)
        ssh = ssh_args(config, known)
        set_a, conf_a, set_b = two_sets(home, hosts, had_a,
                                        lambda: assert_ok(run_qemuca(home, "deploy", *had_a, "--issue", *ssh)))
        arm_all(proxies, FAULTS)
        proc = run_qemuca(home, "deploy", *fleet.names, "--force-tls", *ssh, "--json")
        assert proc.returncode == 1, proc.stderr
        killed = reports_of(proc)

        rows, state = [], {}
        for host, proxy in zip(hosts, proxies):
            assert proxy.fired, f"{proxy.label}: trigger never matched on {host.name}"
            r = killed[host.name]
            assert r["result"] == "failed" and host.name in r["error"], r
            fp = host_set(host)  # complete and consistent, or nothing
            if fp is None:
                which = "none"
            else:
                which = "new" if fp == set_b[host.name] else "old"
                assert fp in (set_b[host.name], set_a.get(host.name)), f"{host.name}: unknown set"
            state[host.name] = (which, conf_state(host, conf_a[host.name]))
        lens = lens_read([str(h.path(QEMU_CONF)) for h in hosts])
        assert all(res.error is None for res in lens.values()), lens

        for h in hosts:
            h.restart()
        rerun = reports_of(assert_ok(run_qemuca(home, "deploy", *fleet.names, "--force-tls", *ssh,
                                                "--json")))
        for host, (label, *_) in zip(hosts, FAULTS):
            r = rerun[host.name]
            expected = "unchanged" if state[host.name] == ("new", "new") else "changed"
            leftovers = sum("qemuca-tmp" in k for k in tree(host, CERT_DIR, "/etc/libvirt"))
            rows.append((label, *state[host.name], r["result"], leftovers))
            assert r["result"] == expected, (label, state[host.name], r)
            assert host_set(host) == set_b[host.name]
            assert conf_state(host, conf_a[host.name]) == "new"
    finally:
        close_all(proxies)

    print("\nfault point                          | set after kill | qemu.conf | rerun     | "
          "temp files left")
    for label, which, conf, result, leftovers in rows:
        print(f"{label:36} | {which:14} | {conf:9} | {result:9} | {leftovers}")
    assert {label: (w, c) for label, w, c, _, _ in rows} == KILL_MATRIX_OUTCOMES


def test_first_deploy_killed_between_the_links_leaves_no_partial_set(fleet_factory, tmp_path):
    fleet = fleet_factory(1)
    host = fleet[0]
    home = make_store(tmp_path, hosts=[host.name])
    with FaultProxy(host) as proxy:
        config, known = write_proxy_client_files([proxy], fleet.identity, tmp_path)
        proxy.arm("between the name links", r'^posix-rename old "[^"]*" new "/etc/pki/qemu/'
                  r'server-cert\.pem"')
        proc = run_qemuca(home, "deploy", host.name, *ssh_args(config, known), "--json")
        assert proc.returncode == 1 and proxy.fired, proc.stdout
        fp = host_set(host)
        assert fp in (None, store_fp(home, host.name))
