"""Self-tests of the QEMU migration harness: real QEMU 7.2 TLS migrations on 127.0.0.1,
with credential sets made here by the openssl CLI (independent of qemuca's own CA code)."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from tests.support.fixtures import fleet_factory, qemu_migrate  # noqa: F401
from tests.support.qemu_migration import Endpoint
from tests.support.tools import require_tool

pytestmark = pytest.mark.qemu

LEAF_EXT = ("subjectAltName=DNS:{name}\nbasicConstraints=critical,CA:FALSE\n"
            "keyUsage=critical,digitalSignature,keyEncipherment\n"
            "extendedKeyUsage=serverAuth,clientAuth\n")


def openssl(*args: str) -> None:
    subprocess.run([require_tool("openssl"), *args], check=True, capture_output=True, timeout=60)


def make_ca(directory: Path, cn: str) -> Path:
    directory.mkdir(parents=True)
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "30", "-subj", f"/CN={cn}",
            "-keyout", str(directory / "ca-key.pem"), "-out", str(directory / "ca-cert.pem"),
            "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    return directory


def make_host_set(ca: Path, name: str, out: Path) -> dict[str, bytes]:
    """The QEMU layout for host `name` signed by `ca`: {file name: bytes}, also in `out`."""
    out.mkdir(parents=True)
    key, csr, ext = out / "server-key.pem", out / "req.csr", out / "ext.cnf"
    ext.write_text(LEAF_EXT.format(name=name))
    openssl("req", "-new", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}",
            "-keyout", str(key), "-out", str(csr))
    openssl("x509", "-req", "-in", str(csr), "-CA", str(ca / "ca-cert.pem"), "-CAkey",
            str(ca / "ca-key.pem"), "-CAcreateserial", "-days", "10", "-extfile", str(ext),
            "-out", str(out / "server-cert.pem"))
    csr.unlink()
    ext.unlink()
    files = {"ca-cert.pem": (ca / "ca-cert.pem").read_bytes(),
             "server-cert.pem": (out / "server-cert.pem").read_bytes(),
             "server-key.pem": key.read_bytes()}
    files["client-cert.pem"], files["client-key.pem"] = files["server-cert.pem"], files["server-key.pem"]
    for file, data in files.items():
        (out / file).write_bytes(data)
    return files


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Path:
    """CA "a" with host1/host2, CA "b" with its own host2."""
    base = tmp_path_factory.mktemp("pki")
    a, b = make_ca(base / "ca-a", "QEMU CA a"), make_ca(base / "ca-b", "QEMU CA b")
    make_host_set(a, "host1.qemu.test", base / "host1")
    make_host_set(a, "host2.qemu.test", base / "host2")
    make_host_set(b, "host2.qemu.test", base / "other-host2")
    return base


def our_qemus() -> list[int]:
    """QEMU processes that are children of this test process."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = open(f"/proc/{pid}/stat").read()
        except OSError:
            continue
        comm, rest = stat[stat.index("(") + 1:stat.rindex(")")], stat[stat.rindex(")") + 2:].split()
        if comm.startswith("qemu-system") and rest[0] != "Z" and int(rest[1]) == os.getpid():
            found.append(int(pid))
    return found


def test_tls_migration_completes_with_the_right_hostname(qemu_migrate, pki):
    started = time.monotonic()
    result = qemu_migrate(Endpoint(str(pki / "host1")), Endpoint(str(pki / "host2")),
                          "host2.qemu.test")
    total = time.monotonic() - started
    print(f"TLS migration: {result.seconds:.3f} s migrating, {total:.3f} s with both QEMUs, "
          f"{result.transferred_bytes} bytes")
    assert result.completed, result.error
    assert (result.src_status, result.dst_status, result.error) == ("completed", "completed", None)
    assert result.transferred_bytes > 0
    assert our_qemus() == []


def test_wrong_tls_hostname_fails_and_names_it(qemu_migrate, pki):
    result = qemu_migrate(Endpoint(str(pki / "host1")), Endpoint(str(pki / "host2")),
                          "wrong.qemu.test")
    assert not result.completed
    assert result.src_status == "failed"
    assert "does not match the hostname wrong.qemu.test" in result.error


def test_no_tls_hostname_checks_the_uri_address(qemu_migrate, pki):
    """Without tls-hostname the source checks 127.0.0.1, which no dNSName SAN matches."""
    result = qemu_migrate(Endpoint(str(pki / "host1")), Endpoint(str(pki / "host2")), None)
    assert not result.completed
    assert "hostname 127.0.0.1" in result.error


def test_destination_from_another_ca_is_refused(qemu_migrate, pki):
    result = qemu_migrate(Endpoint(str(pki / "host1")), Endpoint(str(pki / "other-host2")),
                          "host2.qemu.test")
    assert not result.completed
    assert "known issuer" in result.error


def test_plain_migration_completes(qemu_migrate):
    result = qemu_migrate(Endpoint(), Endpoint(), None, tls=False)
    print(f"plain migration: {result.seconds:.3f} s, {result.transferred_bytes} bytes")
    assert result.completed, result.error


def test_unloadable_credentials_fail_fast_with_qemus_message(qemu_migrate, pki, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("ca-cert.pem", "server-cert.pem"):  # no server-key.pem
        (broken / name).write_bytes((pki / "host2" / name).read_bytes())
    started = time.monotonic()
    result = qemu_migrate(Endpoint(str(pki / "host1")), Endpoint(str(broken)), "host2.qemu.test",
                          timeout=120)
    assert not result.completed
    assert "server-key.pem" in result.error
    assert result.src_status == "not-started"
    assert time.monotonic() - started < 60  # it failed at once, not at the 120 s timeout
    # The source's client credentials are checked too: a key that is not the cert's.
    (broken / "client-cert.pem").write_bytes((pki / "host2" / "server-cert.pem").read_bytes())
    (broken / "client-key.pem").write_bytes((pki / "host1" / "server-key.pem").read_bytes())
    result = qemu_migrate(Endpoint(str(broken)), Endpoint(str(pki / "host2")), "host2.qemu.test")
    assert not result.completed and "source: object-add" in result.error, result.error
    assert our_qemus() == []


def test_qemu_that_cannot_start_is_reported(qemu_migrate, pki):
    result = qemu_migrate(Endpoint(str(pki / "host1")),
                          Endpoint(str(pki / "host2"), prefix=["false"]), "host2.qemu.test")
    assert not result.completed
    assert result.error.startswith("destination: QEMU exited (1)")
    assert result.dst_status == "not-started" and our_qemus() == []


def test_migration_between_two_fake_hosts_reads_their_etc_pki_qemu(qemu_migrate, pki,
                                                                    fleet_factory):
    fleet = fleet_factory(2)
    h1, h2 = fleet
    for host in fleet:
        for name in ("ca-cert.pem", "server-cert.pem", "server-key.pem", "client-cert.pem",
                     "client-key.pem"):
            host.write(f"/etc/pki/qemu/{name}", (pki / host.name.split(".")[0] / name).read_bytes(),
                       0o640 if "key" in name else 0o644)
    assert not Path("/etc/pki/qemu").exists()  # only the fake hosts have these files

    def endpoint(host):
        return Endpoint("/etc/pki/qemu", prefix=host.prefix)

    result = qemu_migrate(endpoint(h1), endpoint(h2), "host2.qemu.test")
    print(f"fake host1 -> host2 TLS migration: {result.seconds:.3f} s")
    assert result.completed, result.error
    back = qemu_migrate(endpoint(h2), endpoint(h1), "host1.qemu.test")
    assert back.completed, back.error
    # host2 now holds a set from the other CA: host1 must refuse it.
    h2.write("/etc/pki/qemu/ca-cert.pem", (pki / "other-host2" / "ca-cert.pem").read_bytes())
    h2.write("/etc/pki/qemu/server-cert.pem", (pki / "other-host2" / "server-cert.pem").read_bytes())
    h2.write("/etc/pki/qemu/server-key.pem", (pki / "other-host2" / "server-key.pem").read_bytes())
    refused = qemu_migrate(endpoint(h1), endpoint(h2), "host2.qemu.test")
    assert not refused.completed and "known issuer" in refused.error
    assert our_qemus() == []
