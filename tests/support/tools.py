"""Finding the real tools the tests run against.

Under CI (CI=true) a missing tool is a failure, never a silent skip: the project's
scripts install everything a fresh Debian machine needs.
"""

from __future__ import annotations

import os
import shutil


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


# The Debian package of each tool the tests call (scripts/install-test-deps.sh installs them).
PACKAGES = {
    "augtool": "augeas-tools", "certtool": "gnutls-bin", "gnutls-cli": "gnutls-bin",
    "nsenter": "util-linux", "unshare": "util-linux", "openssl": "openssl", "sh": "dash",
    "ssh": "openssh-client", "ssh-keygen": "openssh-client", "sshd": "openssh-server",
    "strace": "strace", "systemd-analyze": "systemd", "qemu-system-x86_64": "qemu-system-x86",
    "tcpdump": "tcpdump", "virsh": "libvirt-clients", "libvirtd": "libvirt-daemon",
}


def missing(what: str) -> None:
    """Fail under CI, skip elsewhere; the message names the package that brings it."""
    package = PACKAGES.get(os.path.basename(what))
    hint = f"Debian package {package}; " if package else ""
    message = f"{what} is missing ({hint}run scripts/install-test-deps.sh)"
    import pytest  # here: scripts/demo.py uses these helpers without the test extra

    if in_ci():
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


def require_tool(name: str, path_hint: str = "") -> str:
    """The absolute path of tool `name`; fails (CI) or skips the test when absent."""
    found = shutil.which(name) or (path_hint if path_hint and os.path.exists(path_hint) else None)
    if not found:
        missing(name)
    return found


def require_file(path: str) -> str:
    if not os.path.exists(path):
        missing(path)
    return path
