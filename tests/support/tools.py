"""Finding the real tools the tests run against.

Under CI (CI=true) a missing tool is a failure, never a silent skip: the project's
scripts install everything a fresh Debian machine needs.
"""

from __future__ import annotations

import os
import shutil

import pytest


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def missing(what: str) -> None:
    """Fail under CI, skip elsewhere."""
    message = f"{what} is missing (run scripts/install-test-deps.sh)"
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
