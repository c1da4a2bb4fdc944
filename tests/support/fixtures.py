"""Pytest fixtures for the fake host fleet and the QEMU migration harness.

Import them in tests/conftest.py with `from tests.support.fixtures import *`.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable

import pytest

from tests.support.fakehosts import SFTP_SERVER, SSHD, Fleet, start_fleet
from tests.support.qemu_migration import QEMU, migrate
from tests.support.tools import missing, require_file, require_tool

__all__ = ["fleet_factory", "fleet3", "qemu_migrate", "require_fleet_tools"]


def require_fleet_tools() -> None:
    """Fake hosts need root (mounts, namespaces), sshd, sftp-server, unshare, nsenter."""
    if os.geteuid() != 0:
        missing("root (fake hosts mount an overlay on /etc in a namespace)")
    require_tool("sshd", SSHD)
    require_file(SFTP_SERVER)
    require_tool("unshare")
    require_tool("nsenter")


def _new_fleet(n: int, **kw) -> Fleet:
    # A short base path: unix socket paths under it stay below 108 bytes.
    return start_fleet(n, Path(tempfile.mkdtemp(prefix="qf-")), **kw)


@pytest.fixture
def fleet_factory() -> Callable[..., Fleet]:
    """fleet_factory(n, names=None, distro="debian", extra_groups=(), qemu_conf=..., loglevel=...)
    -> a started Fleet; every fleet made is stopped at teardown, pass or fail."""
    require_fleet_tools()
    fleets: list[Fleet] = []

    def make(n: int = 3, **kw) -> Fleet:
        fleet = _new_fleet(n, **kw)
        fleets.append(fleet)
        return fleet

    yield make
    for fleet in fleets:
        fleet.stop()


@pytest.fixture(scope="module")
def fleet3() -> Fleet:
    """Three hosts shared by a module (host1..host3.qemu.test): for read-mostly tests;
    a test that changes a host must undo it or use fleet_factory."""
    require_fleet_tools()
    fleet = _new_fleet(3)
    yield fleet
    fleet.stop()


@pytest.fixture
def qemu_migrate():
    """The `migrate` function of tests.support.qemu_migration, once QEMU is known present."""
    require_tool(QEMU)
    return migrate
