"""Switching a credential set into a cert dir on LocalFS (what export and deploy share)."""

from __future__ import annotations

import grp
import os
import stat

import pytest

from qemuca.errors import Conflict, NotFound
from qemuca.hosts import install
from qemuca.hosts.fs import LocalFS
from qemuca.hosts.layout import (
    ALL_FILES,
    CA_BUNDLE,
    CLIENT_CERT,
    CLIENT_KEY,
    CRL,
    EXPORT_MODES,
    SERVER_CERT,
    SERVER_KEY,
    CredentialSet,
    Modes,
)
from tests.support.pki import snapshot_dir

FS = LocalFS()
BASE_NAMES = {CA_BUNDLE, SERVER_CERT, SERVER_KEY, CLIENT_CERT, CLIENT_KEY}


def _set(tag: str, crl: bool = False) -> CredentialSet:
    return CredentialSet.build("a.qemu.test", "f" * 64, f"CA {tag}\n".encode(), f"CERT {tag}\n".encode(),
                               f"KEY {tag}\n".encode(), f"CRL {tag}\n".encode() if crl else None)


def _visible(d) -> dict:
    """What QEMU reads: each layout name, through the links."""
    return {n: open(os.path.join(d, n), "rb").read() for n in ALL_FILES if os.path.exists(os.path.join(d, n))}


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture
def cert_dir(tmp_path):
    return str(tmp_path / "pki" / "qemu")


def test_first_install_creates_the_layout(cert_dir):
    creds = _set("1")
    result = install.install(FS, cert_dir, creds, EXPORT_MODES)
    assert result.changed and result.set_id == creds.set_id and result.previous_id is None
    assert _visible(cert_dir) == creds.files
    assert set(os.listdir(cert_dir)) == BASE_NAMES | {".qemuca"}
    for name in BASE_NAMES:
        path = os.path.join(cert_dir, name)
        assert os.readlink(path) == f".qemuca/current/{name}"
        assert _mode(path) == (0o600 if name in (SERVER_KEY, CLIENT_KEY) else 0o644)
    assert _mode(os.path.join(cert_dir, ".qemuca", "sets", creds.set_id)) == 0o755
    assert install.CertDir(FS, cert_dir).current_id() == creds.set_id


def test_installing_the_same_set_again_changes_nothing(cert_dir):
    creds = _set("1")
    install.install(FS, cert_dir, creds, EXPORT_MODES)
    before = snapshot_dir(cert_dir)
    mtimes = {p: os.lstat(os.path.join(cert_dir, p)).st_mtime_ns for p in before}
    again = install.install(FS, cert_dir, _set("1"), EXPORT_MODES)
    assert not again.changed
    assert snapshot_dir(cert_dir) == before
    assert {p: os.lstat(os.path.join(cert_dir, p)).st_mtime_ns for p in before} == mtimes
    assert not install.plan(FS, cert_dir, creds, EXPORT_MODES).changed


def test_a_damaged_set_is_repaired(cert_dir):
    """Same id, but a file lost its mode or bytes: install rewrites it."""
    creds = _set("1")
    install.install(FS, cert_dir, creds, EXPORT_MODES)
    key = os.path.join(cert_dir, ".qemuca", "sets", creds.set_id, SERVER_KEY)
    os.chmod(key, 0o644)
    assert install.install(FS, cert_dir, creds, EXPORT_MODES).changed
    assert _mode(key) == 0o600 and _visible(cert_dir) == creds.files


def test_a_new_set_switches_and_keeps_the_old_for_rollback(cert_dir):
    one, two, three = _set("1"), _set("2"), _set("3")
    install.install(FS, cert_dir, one, EXPORT_MODES)
    plan = install.plan(FS, cert_dir, two, EXPORT_MODES)
    assert plan.changed and f"replace {SERVER_CERT} (mode 0644)" in plan.actions
    assert _visible(cert_dir) == one.files  # plan wrote nothing
    result = install.install(FS, cert_dir, two, EXPORT_MODES)
    assert result.previous_id == one.set_id
    assert _visible(cert_dir) == two.files
    install.install(FS, cert_dir, three, EXPORT_MODES)
    # Only current and previous are kept.
    assert sorted(os.listdir(os.path.join(cert_dir, ".qemuca", "sets"))) == sorted([two.set_id, three.set_id])
    back = install.rollback(FS, cert_dir)
    assert back.set_id == two.set_id and _visible(cert_dir) == two.files
    forth = install.rollback(FS, cert_dir)  # rollback of a rollback goes forward again
    assert forth.set_id == three.set_id and _visible(cert_dir) == three.files


def test_rollback_without_a_previous_set(cert_dir):
    with pytest.raises(NotFound):
        install.rollback(FS, cert_dir)
    install.install(FS, cert_dir, _set("1"), EXPORT_MODES)
    with pytest.raises(NotFound, match="no previous"):
        install.rollback(FS, cert_dir)


def test_the_crl_link_appears_and_disappears(cert_dir):
    plain, with_crl = _set("1"), _set("2", crl=True)
    install.install(FS, cert_dir, plain, EXPORT_MODES)
    assert not os.path.lexists(os.path.join(cert_dir, CRL))
    install.install(FS, cert_dir, with_crl, EXPORT_MODES)
    assert os.readlink(os.path.join(cert_dir, CRL)) == f".qemuca/current/{CRL}"
    assert _visible(cert_dir) == with_crl.files
    install.install(FS, cert_dir, plain, EXPORT_MODES)
    assert not os.path.lexists(os.path.join(cert_dir, CRL))
    install.rollback(FS, cert_dir)
    assert _visible(cert_dir) == with_crl.files


def test_foreign_files_are_refused_without_force(cert_dir):
    os.makedirs(cert_dir)
    with open(os.path.join(cert_dir, CA_BUNDLE), "wb") as f:
        f.write(b"someone else's CA\n")
    os.symlink(SERVER_CERT, os.path.join(cert_dir, CLIENT_CERT))  # oVirt-style link: foreign too
    before = snapshot_dir(cert_dir)
    with pytest.raises(Conflict, match=f"{CA_BUNDLE}, {CLIENT_CERT}"):
        install.install(FS, cert_dir, _set("1"), EXPORT_MODES)
    assert snapshot_dir(cert_dir) == before


def test_foreign_files_are_adopted_with_force_and_restored_by_rollback(cert_dir):
    os.makedirs(cert_dir)
    foreign = {CA_BUNDLE: b"old CA\n", SERVER_CERT: b"old cert\n", SERVER_KEY: b"old key\n"}
    for name, data in foreign.items():
        with open(os.path.join(cert_dir, name), "wb") as f:
            f.write(data)
    os.chmod(os.path.join(cert_dir, SERVER_KEY), 0o640)
    creds = _set("1")
    result = install.install(FS, cert_dir, creds, EXPORT_MODES, force=True)
    assert sorted(result.adopted) == sorted(foreign)
    assert result.previous_id.startswith("adopted-")
    adopted = os.path.join(cert_dir, ".qemuca", "sets", result.previous_id)
    assert {n: open(os.path.join(adopted, n), "rb").read() for n in foreign} == foreign
    assert _mode(os.path.join(adopted, SERVER_KEY)) == 0o640
    assert _visible(cert_dir) == creds.files
    install.rollback(FS, cert_dir)
    assert _visible(cert_dir) == foreign
    assert _mode(os.path.join(cert_dir, SERVER_KEY)) == 0o640


def test_adopting_into_a_qemuca_dir_keeps_the_whole_mix(cert_dir):
    """A file replaced by hand among qemuca's links: rollback gives back exactly that mix."""
    one = _set("1")
    install.install(FS, cert_dir, one, EXPORT_MODES)
    os.remove(os.path.join(cert_dir, CA_BUNDLE))
    with open(os.path.join(cert_dir, CA_BUNDLE), "wb") as f:
        f.write(b"hand-made CA bundle\n")
    mix = _visible(cert_dir)
    with pytest.raises(Conflict):
        install.install(FS, cert_dir, _set("2"), EXPORT_MODES)
    install.install(FS, cert_dir, _set("2"), EXPORT_MODES, force=True)
    install.rollback(FS, cert_dir)
    assert _visible(cert_dir) == mix


def test_host_modes_set_owner_group_and_key_mode(cert_dir):
    if os.geteuid() != 0:
        pytest.skip("chown to another group needs root")
    gid = grp.getgrnam("daemon").gr_gid if "daemon" in [g.gr_name for g in grp.getgrall()] else 1
    modes = Modes(cert=0o644, key=0o640, directory=0o755, uid=0, gid=gid)
    creds = _set("1")
    install.install(FS, cert_dir, creds, modes)
    for name in BASE_NAMES:
        st = os.stat(os.path.join(cert_dir, name))
        assert (st.st_uid, st.st_gid) == (0, gid)
        assert stat.S_IMODE(st.st_mode) == (0o640 if name in (SERVER_KEY, CLIENT_KEY) else 0o644)
    assert not install.install(FS, cert_dir, creds, modes).changed
    # The same set with other modes is not "the same placement": it is rewritten.
    assert install.install(FS, cert_dir, creds, EXPORT_MODES).changed
    assert _mode(os.path.join(cert_dir, SERVER_KEY)) == 0o600


def test_a_file_in_the_way_of_the_dir_is_a_conflict(tmp_path):
    path = tmp_path / "file"
    path.write_bytes(b"x")
    with pytest.raises(Conflict, match="not a directory"):
        install.install(FS, str(path), _set("1"), EXPORT_MODES)


def test_no_temp_files_are_left_behind(cert_dir):
    for tag in ("1", "2", "1"):
        install.install(FS, cert_dir, _set(tag, crl=tag == "2"), EXPORT_MODES)
    leftovers = [p for p in snapshot_dir(cert_dir) if "qemuca-tmp" in p]
    assert leftovers == []


@pytest.mark.parametrize("again", [False, True])  # a new set, and the same set again
def test_staging_dirs_of_interrupted_enrolls_are_removed_after_a_day(cert_dir, again):
    """An enroll cut off after making its key leaves sets/staging-*/ with a private key:
    a later install removes it once it is a day old; a fresh one may be in use."""
    install.install(FS, cert_dir, _set("1"), EXPORT_MODES)
    old = install.make_staging(FS, cert_dir, EXPORT_MODES)
    fresh = install.make_staging(FS, cert_dir, EXPORT_MODES)
    with open(os.path.join(old, "server-key.pem"), "wb") as f:
        f.write(b"KEY left behind\n")
    day_ago = os.stat(old).st_mtime - install.STAGING_MAX_AGE_S - 60
    os.utime(old, (day_ago, day_ago))
    install.install(FS, cert_dir, _set("1" if again else "2"), EXPORT_MODES)
    assert not os.path.exists(old)
    assert os.path.isdir(fresh)
