"""LocalRunner (verify --local) bounds what a command prints as an SSH host's output is
bounded, feeds large input without deadlocking, and gives up at the timeout."""

from __future__ import annotations

import os
import time

import pytest

from qemuca.errors import InvalidInput, RemoteError
from qemuca.hosts.runner import LocalRunner
from qemuca.hosts.ssh import MAX_STDERR, MAX_STDOUT


def test_output_past_the_cap_is_refused():
    with pytest.raises(RemoteError, match=f"cat printed more than {MAX_STDOUT} bytes of output"):
        LocalRunner().run(["cat", "/dev/zero"])


def test_error_output_past_its_cap_is_refused():
    missing = ["/nonexistent/" + "x" * 200] * (MAX_STDERR // 200)  # one complaint each
    with pytest.raises(RemoteError, match=f"cat printed more than {MAX_STDERR} bytes of error output"):
        LocalRunner().run(["cat", *missing])


def test_large_input_is_fed_while_output_is_read():
    data = os.urandom(MAX_STDOUT - 1)  # far more than a pipe holds, both ways
    result = LocalRunner().run(["cat"], stdin=data)
    assert result.ok and result.stdout == data


def test_a_command_that_never_ends_is_killed_at_the_timeout(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)  # cat blocks opening it: no writer ever comes
    started = time.monotonic()
    with pytest.raises(RemoteError, match="cat: timed out"):
        LocalRunner().run(["cat", str(fifo)], timeout=0.5)
    assert time.monotonic() - started < 5


def test_failures_and_the_allowlist():
    runner = LocalRunner()
    with pytest.raises(RemoteError, match=r"localhost: cat failed \(exit 1\): cat: /nonexistent"):
        runner.run(["cat", "/nonexistent"], check=True)
    assert runner.run(["cat", "/nonexistent"]).rc == 1
    with pytest.raises(InvalidInput, match="not one qemuca runs"):
        runner.run(["sh", "-c", "true"])
