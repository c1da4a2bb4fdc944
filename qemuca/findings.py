"""One result type for everything qemuca checks: inspect, verify, probe and doctor.

A check yields Findings; a report holding them has one overall result, the worst of
its findings (an error that stopped the report is a failure). `--strict` means the
same on every command: a warning fails too. Monitoring (`qemuca check`) speaks the
monitoring-plugin states OK/WARNING/CRITICAL, derived from these results.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Iterable, Optional


class Result(str, enum.Enum):
    """The outcome of one check; its value is what JSON output shows."""

    PASS = "pass"
    WARN = "warn"
    FAIL = "fail"
    SKIP = "skip"  # not checked (a precondition failed, or it does not apply)

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)

    @property
    def rank(self) -> int:
        return _RANK[self]


_RANK = {Result.SKIP: 0, Result.PASS: 0, Result.WARN: 1, Result.FAIL: 2}
PASS, WARN, FAIL, SKIP = Result.PASS, Result.WARN, Result.FAIL, Result.SKIP


def worst(results: Iterable[Result]) -> Result:
    """The overall result: fail over warn over pass; nothing (or only skips) is a pass."""
    found = max(results, key=_RANK.__getitem__, default=PASS)
    return PASS if found is SKIP else found


@dataclass(frozen=True)
class Finding:
    """One check's outcome. `fix` says what to do about a warning or failure; `label`
    is a few words naming a failure where a whole sentence does not fit (matrix cells)."""

    check: str
    result: Result
    detail: str
    fix: str = ""
    label: str = ""

    def as_dict(self) -> dict:
        return {"check": self.check, "result": self.result.value, "detail": self.detail,
                "fix": self.fix}


class Outcome:
    """`result` and `failed()` of a report that holds `findings` and maybe an `error`."""

    findings: list
    error: Optional[str] = None

    @property
    def result(self) -> Result:
        return FAIL if self.error else worst(f.result for f in self.findings)

    def failed(self, strict: bool = False) -> bool:
        """Whether this report makes the command exit 1: a failure, or with --strict
        a warning too."""
        return self.result is FAIL or (strict and self.result is WARN)
