"""`qemuca verify` against fake hosts over real SSH, and `--local` run inside those hosts.

Every failing case is made of real files on a real (fake) host: crafted certificates
(expired, not yet valid, another CA, ...) are built with `cryptography` and qemuca's own
profile builders, landed with the same install code deploy uses, and then checked twice:
by `qemuca verify HOST` over SSH from the CA, and by `qemuca verify --local` run on the
host itself (inside its namespaces, with its own /etc and hostname). `--pair` is
checked against a real QEMU migration between the same two hosts.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import site
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from qemuca.hosts import install
from qemuca.hosts.fs import LocalFS
from qemuca.hosts.layout import CredentialSet, host_modes
from qemuca.hosts.ssh import connect
from qemuca.hosts.ssh_config import SshOptions
from qemuca.ops import verify
from qemuca.ops.verify import report as verify_report
from qemuca.ops.verify.handshake import handshake
from qemuca.pki import profile
from qemuca.pki.checks import fingerprint
from qemuca.store.index import Store
from tests.support.pki import assert_ok, authority, make_store, revoke, run_qemuca
from tests.support.qemu_migration import QEMU, Endpoint, migrate
from tests.support.tools import require_tool

pytestmark = pytest.mark.sshd

CERT_DIR = "/etc/pki/qemu"
STORE_CHECKS = {"store CA", "store bundle", "store deployed", "store index", "store CRL"}
NOW = profile.utcnow()


# ---------------------------------------------------------------- helpers


def ssh_args(fleet):
    return ["--ssh-config", fleet.ssh_config, "--known-hosts", fleet.known_hosts]


def verify_json(home, fleet, *args):
    """`qemuca verify ... --json` over SSH: (process, {host: report})."""
    proc = run_qemuca(home, "verify", *args, *ssh_args(fleet), "--json")
    assert "Traceback" not in proc.stderr, proc.stderr
    data = json.loads(proc.stdout)
    return proc, ({r["host"]: r for r in data} if isinstance(data, list) else data)


def local_verify(host, *args):
    """`qemuca verify --local --json` run on the fake host itself (its mount and UTS
    namespaces): this interpreter is reached through /proc/PID/root, as the host's
    /root hides it. --home points nowhere: --local needs no store."""
    root = f"/proc/{os.getpid()}/root"
    path = ":".join([root + str(Path(__file__).resolve().parents[2])]
                    + [root + p for p in site.getsitepackages()])
    # The real interpreter, not a venv's link to it: the link's target may sit under /root,
    # which the fake host hides.
    python = root + os.path.realpath(sys.executable)
    argv = host.prefix + ["env", f"PYTHONPATH={path}", "COLUMNS=250", python, "-m", "qemuca",
                          "--home", "/nonexistent/qemuca-home", "verify", "--local", "--json", *args]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc, json.loads(proc.stdout)[0]


def results(report, *levels):
    return {c["check"] for c in report["checks"] if c["result"] in levels}


def detail(report, check):
    found = [c for c in report["checks"] if c["check"] == check]
    assert found, f"no check {check!r} in {[c['check'] for c in report['checks']]}"
    return found[0]["detail"] + " | fix: " + found[0]["fix"]


def new_ca(cn, now=None, days=3650):
    key = ec.generate_private_key(ec.SECP256R1())
    return profile.build_ca_certificate(key, profile.ca_name(cn, None), days, now=now), key


def new_leaf(ca, host, now=None, days=730, sans=()):
    key = ec.generate_private_key(ec.SECP256R1())
    return profile.build_host_certificate(ca[0], ca[1], host, list(sans), key.public_key(), days, now=now), key


def pem(*certs) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


def key_pem(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def make_crl(ca, serials=(), last=None, days=30) -> bytes:
    last = last or NOW
    builder = (x509.CertificateRevocationListBuilder().issuer_name(ca[0].subject)
               .last_update(last).next_update(last + dt.timedelta(days=days))
               .add_extension(x509.CRLNumber(int(time.time())), critical=False))
    for serial in serials:
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(last).build())
    return builder.sign(ca[1], profile.signature_hash(ca[1])).public_bytes(serialization.Encoding.PEM)


def gid_of(host, group="libvirt-qemu") -> int:
    for line in host.read("/etc/group").decode().splitlines():
        if line.startswith(group + ":"):
            return int(line.split(":")[2])
    raise AssertionError(f"{host.name} has no group {group}")


def land(host, bundle: bytes, cert, key, crl=None, client=None):
    """Switch a crafted set into the host's cert dir with deploy's modes (install.py,
    through the host's own root as this machine sees it). `client` (cert, key) replaces
    the set's client links by files of their own, as a hand-made set could have."""
    files = {"ca-cert.pem": bundle, "server-cert.pem": pem(cert), "server-key.pem": key_pem(key),
             "client-cert.pem": pem(cert), "client-key.pem": key_pem(key)}
    if crl:
        files["ca-crl.pem"] = crl
    creds = CredentialSet(host.name, fingerprint(cert), files)
    gid = gid_of(host)
    install.install(LocalFS(), str(host.path(CERT_DIR)), creds, host_modes(gid))
    if client:
        for name, data, mode in (("client-cert.pem", pem(client[0]), 0o644),
                                 ("client-key.pem", key_pem(client[1]), 0o640)):
            path = host.path(f"{CERT_DIR}/.qemuca/{os.readlink(host.path(CERT_DIR + '/.qemuca/current'))}/{name}")
            path.unlink()
            path.write_bytes(data)
            os.chown(path, 0, gid)
            os.chmod(path, mode)


def target(host, name) -> str:
    """The host path a layout name resolves to (inside its set dir), link by link."""
    todo = [p for p in f"{CERT_DIR}/{name}".split("/") if p]
    cur = "/"
    while todo:
        nxt = os.path.join(cur, todo.pop(0))
        if host.path(nxt).is_symlink():
            link = os.readlink(host.path(nxt))
            joined = os.path.normpath(os.path.join("/" if link.startswith("/") else cur, link))
            todo = [p for p in joined.split("/") if p] + todo
            cur = "/"
        else:
            cur = nxt
    return cur


def deploy(home, fleet, *hosts):
    proc = run_qemuca(home, "deploy", *(hosts or fleet.names), *ssh_args(fleet), "--issue", "--json")
    assert_ok(proc)
    return proc


# ---------------------------------------------------------------- a shared, deployed fleet


@pytest.fixture(scope="module")
def deployed(fleet3, tmp_path_factory):
    """fleet3 deployed once from a store (read-only tests below)."""
    home = tmp_path_factory.mktemp("verify") / "home"
    assert_ok(run_qemuca(home, "init", "--no-passphrase", "--key-type", "ecdsa-p256"))
    deploy(home, fleet3)
    return home, fleet3


def test_deployed_fleet_passes_every_check(deployed):
    home, fleet = deployed
    proc, reports = verify_json(home, fleet, *fleet.names)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert set(reports) == set(fleet.names)
    for host, report in reports.items():
        assert report["result"] == "pass" and report["error"] is None
        assert results(report, "warn", "fail") == set(), report
        # The one check that cannot pass on a fake host: no libvirt daemon runs there.
        assert results(report, "skip") == {"daemon settings"}
        assert "no virtqemud or libvirtd running" in detail(report, "daemon settings")
        for needed in ("file server-key.pem", "server-cert.pem chain", "store deployed", "store CA",
                       "server-cert.pem subjectAltName", "qemu.conf migrate cert dir",
                       "qemu.conf migrate verify", "libvirt CA separate", "ca-cert.pem bundle"):
            assert needed in results(report, "pass"), needed
        assert f"{host} is among" in detail(report, "server-cert.pem subjectAltName")


def test_table_output_and_local_mode_on_a_good_host(deployed):
    home, fleet = deployed
    proc = run_qemuca(home, "verify", fleet.names[0], *ssh_args(fleet))
    assert_ok(proc)
    assert f"{fleet.names[0]}: PASS" in proc.stdout
    assert "server-cert.pem chain" in proc.stdout and "issued by" in proc.stdout
    local, report = local_verify(fleet[0])
    assert local.returncode == 0, local.stdout + local.stderr
    assert report["host"] == fleet.names[0]  # hostname -f inside the host
    assert results(report, "fail", "warn") == set()
    assert not any(c.startswith("store") for c in results(report, "pass", "skip"))  # no store in --local
    assert not Path("/nonexistent/qemuca-home").exists()


def test_unreachable_hosts(deployed, tmp_path):
    """A dead host in a fleet: reported failed, exit 1. Alone: exit 8 (remote) or 9 (host key)."""
    home, fleet = deployed
    config = tmp_path / "ssh_config"
    config.write_text(fleet.ssh_config.read_text() + "\nHost dead.qemu.test\n    HostName 127.0.0.1\n"
                      "    Port 9\n    User root\n    UserKnownHostsFile /dev/null\n")
    args = ["--ssh-config", config, "--known-hosts", fleet.known_hosts, "--json"]
    proc = run_qemuca(home, "verify", fleet.names[0], "dead.qemu.test", *args)
    assert proc.returncode == 1, proc.stderr
    reports = {r["host"]: r for r in json.loads(proc.stdout)}
    assert reports[fleet.names[0]]["result"] == "pass"
    dead = reports["dead.qemu.test"]
    assert dead["result"] == "fail" and "connection refused" in dead["error"]
    single = run_qemuca(home, "verify", "dead.qemu.test", *args)
    assert single.returncode == 8
    assert json.loads(single.stdout)[0]["error"] and single.stderr.startswith("qemuca: error: ")
    pair = run_qemuca(home, "verify", "--pair", fleet.names[0], "dead.qemu.test", *args)
    assert pair.returncode == 8 and json.loads(pair.stdout)["error"], pair.stderr
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    (tmp_path / "nokh_config").write_text(
        fleet.ssh_config.read_text().replace(str(fleet.known_hosts), str(empty)))
    hk = run_qemuca(home, "verify", fleet.names[0], "--ssh-config", tmp_path / "nokh_config", "--json")
    assert hk.returncode == 9, hk.stderr
    assert "unknown" in json.loads(hk.stdout)[0]["error"]


def test_pair_good_agrees_with_qemu_and_handshake(deployed):
    require_tool(QEMU)
    require_tool("openssl")
    home, fleet = deployed
    src, dst = fleet[0], fleet[1]
    port = str(_free_port())
    proc, report = verify_json(home, fleet, "--pair", src.name, dst.name, "--handshake",
                               "--address", "127.0.0.1", "--port", port)
    assert proc.returncode == 0, json.dumps(report, indent=1)
    assert report["tls_destination"] == dst.name and report["result"] == "pass"
    assert "TLS handshake" in results(report, "pass")
    result = migrate(Endpoint(CERT_DIR, prefix=src.prefix), Endpoint(CERT_DIR, prefix=dst.prefix),
                     tls_hostname=dst.name)
    assert result.completed, result.error
    assert not _openssl_left(fleet), "openssl processes left behind"


# ---------------------------------------------------------------- defects on hosts

# Defects that shape the credential set: combined into one crafted set per host.
SET_CASES = ("key-of-another-cert", "expired", "not-yet-valid", "another-ca-leaf", "name-not-in-sans",
             "revoked", "stale-crl", "expired-ca-in-bundle", "17-cas", "eku-and-keyusage", "few-days-left",
             "whole-set-of-another-ca")


def _land_set(host, ctx, cases):
    """One crafted set holding every set defect of `cases` (the deployed one otherwise)."""
    store_ca, other = ctx["store_ca"], ctx["other_ca"]
    leaf, client = ctx["deployed"][host.name], None
    bundle, revoke_leaf, stale = [store_ca[0]], False, False
    for case in cases:
        if case == "key-of-another-cert":
            leaf = (new_leaf(store_ca, host.name)[0], new_leaf(store_ca, host.name)[1])
        elif case == "expired":
            leaf = new_leaf(store_ca, host.name, now=NOW - dt.timedelta(days=400), days=30)
        elif case == "not-yet-valid":
            leaf = new_leaf(store_ca, host.name, now=NOW + dt.timedelta(days=30))
        elif case == "another-ca-leaf":
            leaf = new_leaf(other, host.name)
        elif case == "name-not-in-sans":
            leaf = new_leaf(store_ca, "wrong.qemu.test")
        elif case == "revoked":
            revoke_leaf = True
        elif case == "stale-crl":
            stale = True
        elif case == "expired-ca-in-bundle":
            bundle.append(new_ca("old QEMU CA", now=NOW - dt.timedelta(days=400), days=100)[0])
        elif case == "17-cas":
            bundle += ctx["sixteen"]
        elif case == "eku-and-keyusage":
            leaf = _custom_leaf(store_ca, host.name, eku=False, key_encipherment=True)
            client = _custom_leaf(store_ca, host.name, eku=True, key_encipherment=False)
        elif case == "few-days-left":
            leaf = new_leaf(store_ca, host.name, now=NOW - dt.timedelta(days=20), days=30)
        elif case == "whole-set-of-another-ca":
            leaf, bundle = new_leaf(other, host.name), [other[0]]
    crl = None
    if revoke_leaf or stale:
        crl = make_crl(store_ca, [leaf[0].serial_number] if revoke_leaf else [],
                       last=NOW - dt.timedelta(days=40) if stale else NOW)
    land(host, pem(*bundle), *leaf, crl=crl, client=client)


def _apply(host, ctx, cases):
    """Make the defects on the host: its own files, as the host sees them."""
    if any(c in SET_CASES for c in cases):
        _land_set(host, ctx, [c for c in cases if c in SET_CASES])
    store_ca = ctx["store_ca"]
    for name in (c for c in cases if c not in SET_CASES):
        if name == "mode":
            os.chmod(host.path(target(host, "server-key.pem")), 0o644)
        elif name == "owner-group":
            os.chown(host.path(target(host, "ca-cert.pem")), 1000, 0)
        elif name == "wrong-group":  # a group that exists, but not the one libvirt runs QEMU as
            os.chown(host.path(target(host, "server-key.pem")), 0, gid_of(host, "adm"))
        elif name == "libvirt-ca-is-qemu-ca":
            host.write(verify_report.LIBVIRT_CA, pem(store_ca[0]))
        elif name == "libvirt-cert-from-qemu-ca":
            host.write(verify_report.LIBVIRT_CERTS[0], pem(new_leaf(store_ca, host.name)[0]))
            host.write(verify_report.LIBVIRT_CA, pem(new_ca("libvirt CA")[0]))  # a separate CA: passes
        elif name == "qemu-conf-without-keys":
            host.write("/etc/libvirt/qemu.conf", "# no TLS settings\n", 0o600)
        elif name == "qemu-conf-libvirt-migrate-dir":
            host.write("/etc/libvirt/qemu.conf", "# no TLS settings\n", 0o600)
            host.path("/etc/pki/libvirt-migrate").mkdir()
        elif name == "qemu-conf-earlier-key":
            text = host.read("/etc/libvirt/qemu.conf").decode()
            host.path("/etc/pki/other").mkdir()
            host.write("/etc/libvirt/qemu.conf", 'migrate_tls_x509_cert_dir = "/etc/pki/other"\n' + text, 0o600)
        elif name == "qemu-conf-verify-off":
            text = host.read("/etc/libvirt/qemu.conf").decode()
            host.write("/etc/libvirt/qemu.conf", "migrate_tls_x509_verify = 0\n" + text, 0o600)
        elif name == "link-escapes":
            host.write("/etc/ssl/outside.pem", host.read(f"{CERT_DIR}/server-cert.pem"))
            host.path(f"{CERT_DIR}/server-cert.pem").unlink()
            os.symlink("/etc/ssl/outside.pem", host.path(f"{CERT_DIR}/server-cert.pem"))
        elif name == "missing-file":
            host.path(f"{CERT_DIR}/client-key.pem").unlink()
        elif name == "no-cert-dir":
            subprocess.run(host.prefix + ["rm", "-rf", CERT_DIR], check=True)
        elif name == "corrupt-pem":
            host.path(target(host, "server-cert.pem")).write_bytes(
                b"-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydGlmaWNhdGU=\n-----END CERTIFICATE-----\n")
        elif name in ("daemon-before-change", "daemon-after-change"):
            # A process named virtqemud with its pid file, as the real daemon leaves one.
            conf = host.path("/etc/libvirt/qemu.conf")
            os.utime(conf, (time.time() - 3600,) * 2)
            fake = host.path("/tmp/virtqemud")
            fake.write_bytes(Path("/bin/sleep").read_bytes())
            fake.chmod(0o755)
            proc = subprocess.Popen(host.prefix + ["/tmp/virtqemud", "300"], stdin=subprocess.DEVNULL)
            ctx["daemons"].append(proc)
            deadline = time.monotonic() + 5
            while Path(f"/proc/{proc.pid}/comm").read_text().strip() != "virtqemud":  # nsenter exec'd
                assert time.monotonic() < deadline
                time.sleep(0.01)
            host.write("/run/virtqemud.pid", f"{proc.pid}\n")
            if name == "daemon-before-change":
                os.utime(conf, (time.time() + 60,) * 2)  # qemu.conf edited after the daemon started
        else:
            raise AssertionError(name)


def _custom_leaf(ca, host, eku, key_encipherment):
    key = ec.generate_private_key(ec.SECP256R1())
    b = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)]))
         .issuer_name(ca[0].subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
         .not_valid_before(NOW - dt.timedelta(minutes=5)).not_valid_after(NOW + dt.timedelta(days=100))
         .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
         .add_extension(x509.KeyUsage(True, False, key_encipherment, False, False, False, False, False, False),
                        critical=True)
         .add_extension(x509.SubjectAlternativeName([x509.DNSName(host)]), critical=False))
    if eku:
        b = b.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                   ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
    return b.sign(ca[1], profile.signature_hash(ca[1])), key


NEW_LEAF = {"store deployed", "store index"}  # over SSH from the CA: not the certificate deployed
# case: (checks failing in both modes, checks that may fail too, warnings, failing store checks
#        (over SSH only), a check whose detail must hold a text, that text)
CASES = {
    "mode": ({"file server-key.pem"}, {"file client-key.pem"}, set(), set(),
             "file server-key.pem", "mode 0644, want 0640"),
    "owner-group": ({"file ca-cert.pem"}, set(), set(), set(), "file ca-cert.pem", "owner uid 1000"),
    "wrong-group": ({"file server-key.pem"}, {"file client-key.pem"}, set(), set(), "file server-key.pem",
                    "QEMU runs as group libvirt-qemu (libvirt's default on debian (/etc/os-release))"),
    "key-of-another-cert": ({"server-key.pem matches server-cert.pem", "client-key.pem matches client-cert.pem"},
                            set(), set(), NEW_LEAF, "server-key.pem matches server-cert.pem", "another certificate"),
    "expired": ({"server-cert.pem validity"}, set(), set(), NEW_LEAF, "server-cert.pem validity", "expired on"),
    "not-yet-valid": ({"server-cert.pem validity"}, set(), set(), NEW_LEAF, "server-cert.pem validity",
                      "not valid before"),
    "another-ca-leaf": ({"server-cert.pem chain"}, set(), set(), NEW_LEAF | {"store CA"},
                        "server-cert.pem chain", "is not a CA of ca-cert.pem"),
    "name-not-in-sans": ({"server-cert.pem subjectAltName"}, set(), set(), NEW_LEAF,
                         "server-cert.pem subjectAltName", "is not among wrong.qemu.test"),
    "revoked": ({"server-cert.pem revocation"}, set(), set(), NEW_LEAF, "server-cert.pem revocation",
                "revoked on"),
    "stale-crl": ({"ca-crl.pem next update"}, set(), set(), NEW_LEAF, "ca-crl.pem next update", "stale"),
    "expired-ca-in-bundle": ({"ca-cert.pem bundle", "CA 'old QEMU CA' (#2) validity"}, set(), set(),
                             {"store bundle"},
                             "ca-cert.pem bundle", "QEMU before 10.2 then refuses the whole bundle"),
    "17-cas": ({"ca-cert.pem bundle"}, set(), set(), {"store bundle"}, "ca-cert.pem bundle", "holds 17 CAs"),
    "libvirt-ca-is-qemu-ca": ({"libvirt CA separate"}, set(), set(), set(), "libvirt CA separate",
                              "holds the QEMU CA"),
    "libvirt-cert-from-qemu-ca": ({"libvirt servercert.pem separate"}, set(), set(), set(),
                                  "libvirt servercert.pem separate", "issued by the QEMU CA"),
    "qemu-conf-without-keys": (set(), set(), {"qemu.conf migrate cert dir", "qemu.conf migrate verify"}, set(),
                               "qemu.conf migrate verify", "libvirt before 6.10 defaults to 0"),
    "qemu-conf-libvirt-migrate-dir": ({"qemu.conf migrate cert dir"}, set(), {"qemu.conf migrate verify"}, set(),
                                      "qemu.conf migrate cert dir", "libvirt uses /etc/pki/libvirt-migrate"),
    "qemu-conf-earlier-key": ({"qemu.conf migrate cert dir"}, set(), set(), set(), "qemu.conf migrate cert dir",
                              "libvirt uses /etc/pki/other (line 1)"),
    "qemu-conf-verify-off": ({"qemu.conf migrate verify"}, set(), set(), set(), "qemu.conf migrate verify",
                             "0 (line 1)"),
    "link-escapes": ({"file server-cert.pem"}, set(), set(), set(), "file server-cert.pem",
                     "link leading out of /etc/pki/qemu"),
    "missing-file": ({"file client-key.pem"}, set(), set(), set(), "file client-key.pem", "missing"),
    # libvirt itself refuses to start when migrate_tls_x509_cert_dir does not exist.
    "no-cert-dir": ({"cert dir", "qemu.conf"}, set(), set(), set(), "qemu.conf", "libvirt refuses to start"),
    "corrupt-pem": ({"server-cert.pem parses"}, {"client-cert.pem parses"}, set(), set(),
                    "server-cert.pem parses", "corrupt"),
    "eku-and-keyusage": ({"server-cert.pem extendedKeyUsage", "client-cert.pem keyUsage"}, set(), set(), NEW_LEAF,
                         "server-cert.pem extendedKeyUsage", "absent"),
    "few-days-left": (set(), set(), {"server-cert.pem validity"}, NEW_LEAF, "server-cert.pem validity",
                      "9 days left"),
    "whole-set-of-another-ca": (set(), set(), set(), NEW_LEAF | {"store CA", "store bundle"}, "store CA",
                                "lacks this store's CA"),
    "daemon-before-change": (set(), set(), {"daemon settings (virtqemud)"}, set(),
                             "daemon settings (virtqemud)", "may still use the older settings"),
    "daemon-after-change": (set(), set(), set(), set(), "daemon settings (virtqemud)", "started at"),
}

# Independent defects share a host (each check looks at one thing), to keep the run short.
HOSTS = [
    ["expired", "mode", "qemu-conf-verify-off", "libvirt-ca-is-qemu-ca"],
    ["not-yet-valid", "owner-group", "qemu-conf-earlier-key", "libvirt-cert-from-qemu-ca"],
    ["name-not-in-sans", "stale-crl", "missing-file", "qemu-conf-without-keys", "daemon-before-change"],
    ["revoked", "key-of-another-cert", "qemu-conf-libvirt-migrate-dir", "daemon-after-change"],
    ["17-cas", "link-escapes", "wrong-group"],
    ["expired-ca-in-bundle", "corrupt-pem"],
    ["another-ca-leaf"],
    ["eku-and-keyusage"],
    ["few-days-left"],
    ["whole-set-of-another-ca"],
    ["no-cert-dir"],
]


def _openssl_left(fleet):
    """openssl processes still running inside the fleet's hosts (their mount namespaces;
    a zombie waiting for the container's slow init has ended)."""
    spaces = {os.readlink(f"/proc/{h.anchor_pid}/ns/mnt") for h in fleet}
    out = []
    for pid in os.listdir("/proc"):
        try:
            stat = Path(f"/proc/{pid}/stat").read_text() if pid.isdigit() else ""
            if "(openssl)" not in stat or os.readlink(f"/proc/{pid}/ns/mnt") not in spaces:
                continue
        except OSError:
            continue
        if stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X"):
            out.append((pid, stat.rsplit(")", 1)[1].split()[0],
                        Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()))
    return out


def _free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_every_case_is_covered():
    assert sorted(c for host in HOSTS for c in host) == sorted(CASES)


def test_each_defect_fails_over_ssh_and_locally(fleet_factory, tmp_path):
    fleet = fleet_factory(len(HOSTS), names=[f"{cases[0]}.qemu.test" for cases in HOSTS])
    home = make_store(tmp_path)
    deploy(home, fleet)
    store = Store.open(home)
    auth = authority(home)
    ctx = {"store_ca": (auth.cert, auth.key), "other_ca": new_ca("another CA"), "daemons": [],
           "sixteen": [new_ca(f"extra CA {i}")[0] for i in range(16)], "deployed": {}}
    for host in fleet:
        rec = store.valid_for_host(host.name)
        ctx["deployed"][host.name] = (x509.load_pem_x509_certificate(rec.cert_pem.encode()),
                                      serialization.load_pem_private_key(store.key_pem(rec.serial).encode(), None))
    store.close()
    try:
        for cases, host in zip(HOSTS, fleet):
            _apply(host, ctx, cases)
        proc, remote = verify_json(home, fleet, *fleet.names)
        assert proc.returncode == 1
        with ThreadPoolExecutor(2) as pool:
            local = list(pool.map(local_verify, fleet))
    finally:
        for p in ctx["daemons"]:
            p.kill()
            p.wait()
    problems = []
    for cases, host, (local_proc, local_report) in zip(HOSTS, fleet, local):
        required, optional, warns, store_fails = set(), set(), set(), set()
        for case in cases:
            r, o, w, st = CASES[case][:4]
            required |= r
            optional |= o
            warns |= w
            store_fails |= st
        for mode, report in (("ssh", remote[host.name]), ("local", local_report)):
            fails = results(report, "fail")
            if mode == "ssh":
                if fails & STORE_CHECKS != store_fails:
                    problems.append(f"{host.name} (ssh): store fails {fails & STORE_CHECKS} != {store_fails}")
                fails -= STORE_CHECKS
            if not (required <= fails <= required | optional):
                problems.append(f"{host.name} ({mode}): fails {sorted(fails)}, want {sorted(required)}")
            got_warns = results(report, "warn") - STORE_CHECKS
            if got_warns != warns:
                problems.append(f"{host.name} ({mode}): warns {sorted(got_warns)}, want {sorted(warns)}")
            for case in cases:
                check, text = CASES[case][4:]
                if mode == "local" and check.startswith("store"):
                    continue
                if text not in detail(report, check):
                    problems.append(f"{case} ({mode}): {check!r} says {detail(report, check)!r}, want {text!r}")
        if local_proc.returncode != (1 if required else 0):
            problems.append(f"{host.name} (local): exit {local_proc.returncode}")
    assert not problems, "\n".join(problems)
    # The file a link resolves to is named, with the fix.
    mode_host = fleet[0]
    assert target(mode_host, "server-key.pem") in detail(remote[mode_host.name], "file server-key.pem")
    assert "chmod 0640" in detail(remote[mode_host.name], "file server-key.pem")
    # Warnings fail only with --strict.
    warned = fleet["few-days-left.qemu.test"]
    strict, _ = local_verify(warned, "--strict")
    assert strict.returncode == 1


# ---------------------------------------------------------------- the issue's acceptance


def test_acceptance_deploy_verify_break_verify(fleet_factory, tmp_path):
    fleet = fleet_factory(3)
    home = tmp_path / "home"
    assert_ok(run_qemuca(home, "init", "--no-passphrase"))
    deploy(home, fleet)
    proc, reports = verify_json(home, fleet, *fleet.names)
    assert proc.returncode == 0, proc.stdout
    assert all(r["result"] == "pass" and not results(r, "warn", "fail") for r in reports.values())

    broken = fleet[1]
    key_file = target(broken, "server-key.pem")
    assert "/.qemuca/sets/" in key_file
    os.chmod(broken.path(key_file), 0o644)
    proc, reports = verify_json(home, fleet, *fleet.names)
    assert proc.returncode == 1
    assert [h for h, r in reports.items() if r["result"] == "fail"] == [broken.name]
    assert key_file in detail(reports[broken.name], "file server-key.pem")
    os.chmod(broken.path(key_file), 0o640)

    victim = fleet[2]
    auth = authority(home)
    old = new_ca("expired QEMU CA", now=NOW - dt.timedelta(days=800), days=365)
    cert = x509.load_pem_x509_certificate(victim.read(f"{CERT_DIR}/server-cert.pem"))
    key = serialization.load_pem_private_key(victim.read(f"{CERT_DIR}/server-key.pem"), None)
    land(victim, pem(auth.cert, old[0]), cert, key)
    proc, reports = verify_json(home, fleet, *fleet.names)
    assert proc.returncode == 1
    assert [h for h, r in reports.items() if r["result"] == "fail"] == [victim.name]
    assert "expired" in detail(reports[victim.name], "ca-cert.pem bundle")
    assert "not the bundle last deployed" in detail(reports[victim.name], "store bundle")


# ---------------------------------------------------------------- --pair against real QEMU


@pytest.fixture
def pair_env(fleet_factory, tmp_path):
    require_tool(QEMU)
    fleet = fleet_factory(2)
    home = make_store(tmp_path, hosts=fleet.names)
    auth = authority(home)
    conns = [connect(h.name, SshOptions(ssh_config=str(fleet.ssh_config), allow_agent=False)) for h in fleet]
    from qemuca.hosts.remotefs import RemoteFS

    sides = [verify.Side(h.name, RemoteFS(c), c) for h, c in zip(fleet, conns)]
    yield fleet, home, (auth.cert, auth.key), sides
    for c in conns:
        c.close()


def test_pair_agrees_with_real_qemu_migrations(pair_env):
    fleet, home, ca, (src_side, dst_side) = pair_env
    src, dst = fleet[0], fleet[1]
    other = new_ca("another CA")
    store = Store.open(home)
    reference = verify.Reference.from_store(store)
    store.close()
    s_leaf, d_leaf = new_leaf(ca, src.name), new_leaf(ca, dst.name)
    bundle = pem(ca[0])
    good = lambda: (land(src, bundle, *s_leaf), land(dst, bundle, *d_leaf))  # noqa: E731
    openssl = bool(require_tool("openssl"))

    def case(setup, want_fails, qemu_ok, name=None, handshake=False, ref=reference):
        good()
        setup()
        opts = verify.PairOptions(tls_destination=name, handshake=handshake, address="127.0.0.1",
                                  port=_free_port())
        report = verify.verify_pair(src_side, dst_side, opts, ref)
        fails = {c.check for c in report.findings if c.result == "fail"}
        result = migrate(Endpoint(CERT_DIR, prefix=src.prefix), Endpoint(CERT_DIR, prefix=dst.prefix),
                         tls_hostname=name or dst.name)
        rows = "\n".join(f"{c.check}: {c.result}: {c.detail}" for c in report.findings)
        if handshake:  # the handshake between the hosts agrees with QEMU
            assert ("TLS handshake" in fails) == (not qemu_ok), rows
            fails.discard("TLS handshake")
        assert fails == want_fails, rows
        assert result.completed == qemu_ok, result.error
        return report, result

    # Good: every check passes, the handshake too, and QEMU migrates.
    report, _ = case(lambda: None, set(), True, handshake=openssl)
    assert report.result == "pass"
    # The destination's whole set from another CA: neither side trusts the other.
    d_other = new_leaf(other, dst.name)
    report, result = case(lambda: land(dst, pem(other[0]), *d_other),
                          {"source trusts destination", "destination trusts source"}, False, handshake=openssl)
    assert [c for c in report.findings if c.check == "TLS handshake"][0].result == "fail"
    # Only the source's certificate from another CA (its bundle trusts both CAs).
    s_other = new_leaf(other, src.name)
    case(lambda: land(src, pem(ca[0], other[0]), *s_other), {"destination trusts source"}, False)
    # The source revoked in the destination's CRL: QEMU's destination refuses it.
    _, result = case(lambda: land(dst, bundle, *d_leaf, crl=make_crl(ca, [s_leaf[0].serial_number])),
                     {"source not revoked (destination's CRL)"}, False, handshake=openssl)
    assert "revoked" in result.error.lower()
    # A name the destination's certificate does not hold.
    report, _ = case(lambda: None, {"destination name in SANs"}, False, name="other.qemu.test", handshake=openssl)
    assert "verify error" in [c for c in report.findings if c.check == "TLS handshake"][0].detail
    # An expired CA in the destination's bundle (QEMU before 10.2 refuses the bundle).
    old = new_ca("old CA", now=NOW - dt.timedelta(days=400), days=100)
    case(lambda: land(dst, pem(ca[0], old[0]), *d_leaf), {"destination bundle"}, False)
    # 17 CAs in the source's bundle, its own CA last (as after appending a new CA): QEMU
    # before 10.1 reads only the first 16 and refuses its own certificate. (With its CA
    # among the first 16 this QEMU still works: qemuca's limit of 16 is stricter there.)
    extra = [new_ca(f"extra {i}")[0] for i in range(16)]
    report, result = case(lambda: land(src, pem(*extra, ca[0]), *s_leaf), {"source bundle"}, False)
    assert "#17" in [c for c in report.findings if c.check == "source bundle"][0].detail
    assert "Our own certificate" in result.error
    # A stale CRL on the destination: GnuTLS (3.7) still uses it and QEMU migrates; a warning.
    report, _ = case(lambda: land(dst, bundle, *d_leaf, crl=make_crl(ca, [], last=NOW - dt.timedelta(days=40))),
                     set(), True)
    assert "stale" in [c.detail for c in report.findings if c.result == "warn"][0]
    # The source's certificate expired.
    s_expired = new_leaf(ca, src.name, now=NOW - dt.timedelta(days=400), days=30)
    case(lambda: land(src, bundle, *s_expired), {"source certificate"}, False)
    # The destination's key is not its certificate's.
    case(lambda: land(dst, bundle, d_leaf[0], new_leaf(ca, dst.name)[1]), {"destination files"}, False)
    # Beyond QEMU: the CA revoked the destination; QEMU's source never reads a CRL, so the
    # migration goes ahead, and qemuca reports what QEMU cannot see.
    revoke(home, dst.name, "key-compromise")
    store = Store.open(home)
    revoked_ref = verify.Reference.from_store(store)
    store.close()
    d_issued = x509.load_pem_x509_certificate(store_cert(home, dst.name))
    d_key = serialization.load_pem_private_key(store_key(home, dst.name), None)
    report, _ = case(lambda: land(dst, bundle, d_issued, d_key), {"destination not revoked (CA's CRL)"}, True,
                     ref=revoked_ref)
    assert "never reads a CRL" in [c for c in report.findings if c.check.startswith("destination not")][0].detail
    assert not _openssl_left(fleet), "openssl processes left behind"


def store_cert(home, host):
    store = Store.open(home)
    try:
        return store.certificates(host=host)[-1].cert_pem.encode()
    finally:
        store.close()


def store_key(home, host):
    store = Store.open(home)
    try:
        return store.key_pem(store.certificates(host=host)[-1].serial).encode()
    finally:
        store.close()


def test_handshake_cleans_up_and_skips_without_openssl(pair_env):
    """A port already taken: s_server cannot start; nothing is left running. A host
    without openssl: skipped with a note (PATH without openssl for that runner)."""
    require_tool("openssl")
    fleet, home, ca, (src_side, dst_side) = pair_env
    for host in fleet:
        land(host, pem(ca[0]), *new_leaf(ca, host.name))
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        check = handshake(src_side, dst_side, fleet[1].name,
                                 verify.PairOptions(address="127.0.0.1", port=port, timeout=5))
    assert check.result == "fail" and f"port {port} is already in use" in check.detail, check
    assert not _openssl_left(fleet)

    class NoOpenssl:
        """The host's own runner, as on a host where `openssl` is not installed."""

        def __init__(self, runner):
            self.runner, self.name = runner, runner.name

        def run(self, argv, **kw):
            if argv[0] == "openssl":
                argv = ["test", "-x", "/nonexistent/openssl"]
            return self.runner.run(argv, **kw)

    bare = verify.Side(dst_side.name, dst_side.fs, NoOpenssl(dst_side.runner))
    check = handshake(src_side, bare, fleet[1].name, verify.PairOptions(address="127.0.0.1"))
    assert check.result == "skip" and "has no openssl" in check.detail
    # A client that never reaches the server: s_server is left waiting in accept() and
    # must be killed by PID. The client talks to a listener that never answers: `timeout`
    # bounds it.
    with socket.socket() as mute:
        mute.bind(("127.0.0.1", 0))
        mute.listen(1)
        mute_port = mute.getsockname()[1]

        class Elsewhere(NoOpenssl):
            def run(self, argv, **kw):
                argv = [f"127.0.0.1:{mute_port}" if a.endswith(f":{port2}") else a for a in argv]
                return self.runner.run(argv, **kw)

        port2 = _free_port()
        lost = verify.Side(src_side.name, src_side.fs, Elsewhere(src_side.runner))
        check = handshake(lost, dst_side, fleet[1].name,
                                 verify.PairOptions(address="127.0.0.1", port=port2, timeout=2))
    assert check.result == "fail", check
    assert not _openssl_left(fleet), "s_server or s_client left running"
