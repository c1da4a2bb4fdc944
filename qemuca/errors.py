"""Typed errors of the core, each carrying the exit code the CLI maps it to.

The core raises these and never prints; `qemuca.cli` turns them into one line on
stderr and the exit code below (documented in docs/exit-codes.md).
"""

from __future__ import annotations

# Exit codes. 0 is success, 2 is click's usage error; 1 means "a check or a host
# failed" and is returned by fleet and verify commands, never raised.
EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INVALID_INPUT = 3
EXIT_NOT_FOUND = 4
EXIT_CONFLICT = 5
EXIT_PASSPHRASE = 6
EXIT_STORE = 7
EXIT_REMOTE = 8
EXIT_HOST_KEY = 9
EXIT_IO = 10
EXIT_INTERNAL = 70
EXIT_INTERRUPTED = 130


class QemucaError(Exception):
    """Base of every error the CLI reports as one line with an exit code."""

    exit_code = EXIT_FAILED


class InvalidInput(QemucaError):
    """A value, name or file given by the user is not acceptable."""

    exit_code = EXIT_INVALID_INPUT


class ConfigSyntaxError(InvalidInput):
    """A configuration file (qemu.conf, inventory) cannot be parsed."""

    def __init__(self, path: str, line: int, column: int, message: str):
        self.path, self.line, self.column = path, line, column
        super().__init__(f"{path}:{line}:{column}: {message}")


class NotFound(QemucaError):
    """A host, serial, CA or file that should exist does not."""

    exit_code = EXIT_NOT_FOUND


class Conflict(QemucaError):
    """The action would overwrite or duplicate something without --force."""

    exit_code = EXIT_CONFLICT


class PassphraseError(QemucaError):
    """The CA key's passphrase is missing, wrong, or comes from an unsafe file."""

    exit_code = EXIT_PASSPHRASE


class StoreError(QemucaError):
    """The CA store is unreadable, corrupt, or cannot be written."""

    exit_code = EXIT_STORE


class RemoteError(QemucaError):
    """A host could not be reached or a remote operation failed."""

    exit_code = EXIT_REMOTE


class HostKeyError(RemoteError):
    """The host's SSH key is unknown or changed (refused like OpenSSH does)."""

    exit_code = EXIT_HOST_KEY
