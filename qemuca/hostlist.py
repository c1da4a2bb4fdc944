"""Where host names come from besides the command line: hosts files (and inventories)."""

from __future__ import annotations

from typing import List

from qemuca.errors import InvalidInput


def read_hosts_file(path: str) -> List[str]:
    """Host names, one per line; blank lines and # comments skipped."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except UnicodeDecodeError:
        raise InvalidInput(f"hosts file {path} is not UTF-8 text") from None
    except OSError as e:
        raise InvalidInput(f"cannot read hosts file {path}: {e.strerror}") from None
    hosts = []
    for line in lines:
        line = line.split("#", 1)[0].strip()
        if line:
            hosts.append(line)
    return hosts
