"""Rendering helpers: JSON for scripts, rich tables for people, notes on stderr.

rich is imported only when a table is actually printed. Tables follow cli/tables.py:
text only (no markup), identifiers never cut, `--wide` for the extra columns.
"""

from __future__ import annotations

import json
import sys
from typing import Callable, Optional

import click

from qemuca.text import printable, printable_lines

json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")


def fleet_json_option(func):
    """--json and --json-lines of the commands that work on many hosts: `as_json` is
    "array", "lines" or None (so `if as_json` reads as before)."""
    func = click.option("--json-lines", "as_json", flag_value="lines",
                        help="Print one JSON object per line for scripts, as each host finishes.")(func)
    return click.option("--json", "as_json", flag_value="array",
                        help="Print JSON for scripts: an array, one object per host in the order "
                             "given, each written as soon as its host (and those before it) finished.")(func)
wide_option = click.option("--wide", "-w", is_flag=True,
                           help="Show every column (serials, fingerprints...), however wide; "
                                "a wide terminal shows them anyway.")


def emit_json(data) -> None:
    click.echo(json.dumps(data, indent=2, default=str))


def emit_one(data, as_json) -> None:
    """One object (a pair's report): indented, or with --json-lines on one line."""
    if as_json == "lines":
        click.echo(json.dumps(data, default=str, separators=(",", ":")))
    else:
        emit_json(data)


def _indented(data, depth: int) -> str:
    text = json.dumps(data, indent=2, default=str)
    return "\n".join(" " * depth + line for line in text.splitlines())


class JsonStream:
    """A fleet command's --json written as its hosts finish, flushed after each object,
    so a script can read results while the run goes on and no output text piles up.

    "array": the text emit_json() prints for the whole list ('[', the objects separated
    by ',', ']'); with `key`, an object whose `key` member is that array, the members of
    close()'s `extra` after it. "lines": one compact object per line, nothing else.
    close() ends the text (also after an error or Ctrl-C: what was written stays valid
    JSON, holding the hosts that finished); `summary()`, when given, supplies `extra`.
    """

    def __init__(self, mode: str, key: str = "", out=None, summary: Optional[Callable[[], dict]] = None):
        self.mode, self.key, self.summary = mode, key, summary
        self.out = out or sys.stdout
        self.count = 0
        self.closed = False

    def write(self, data) -> None:
        if self.mode == "lines":
            text = json.dumps(data, default=str, separators=(",", ":")) + "\n"
        else:
            depth = 4 if self.key else 2
            opening = ("{\n  " + json.dumps(self.key) + ": [\n" if self.key else "[\n") if not self.count else ",\n"
            text = opening + _indented(data, depth)
        self.count += 1
        self.out.write(text)
        self.out.flush()

    def close(self, extra=None) -> None:
        if self.closed:
            return
        self.closed = True
        if self.mode == "lines":
            return
        if extra is None and self.summary is not None:
            extra = self.summary()
        if self.key:
            head = "{\n  " + json.dumps(self.key) + ": [" if not self.count else "\n  ]"
            if not self.count:
                head += "]"
            members = _indented(extra or {}, 0).splitlines()[1:-1]  # the members, indented 2
            text = head + "".join(",\n" + line if i == 0 else "\n" + line for i, line in enumerate(members)) + "\n}\n"
        else:
            text = "\n]\n" if self.count else "[]\n"
        self.out.write(text)
        self.out.flush()


def note(message: str) -> None:
    """Informational line for people; stderr, so stdout stays parseable. It may quote a
    host or a file: control characters are shown escaped."""
    click.echo(printable_lines(message), err=True)


def say(message: str) -> None:
    """A line of a command's output for people (stdout), escaped as note() is."""
    click.echo(printable_lines(message))


def console(stderr: bool = False):
    from qemuca.cli.tables import console as text_console

    return text_console(stderr)


def print_table(title, columns, rows, wide: bool = False) -> None:
    """Rows under a title, fitted to the terminal (see cli/tables.py)."""
    from qemuca.cli.tables import print_table as fitted

    fitted(title, columns, rows, wide=wide, out=console())


def print_fields(title, pairs) -> None:
    """A two-column key/value view (show, inspect); values wrap, never cut."""
    from rich.table import Table
    from rich.text import Text

    from qemuca.cli.tables import cell

    table = Table(title=Text(cell(title)), title_justify="left", show_header=False, box=None,
                  pad_edge=False)
    table.add_column(style="bold", no_wrap=True)
    table.add_column(overflow="fold")
    for key, value in pairs:
        table.add_row(Text(key), Text(cell(value)))
    console().print(table)


def is_tty() -> bool:
    return sys.stdout.isatty()


RESULT_STYLE = {"pass": "green", "warn": "yellow", "fail": "bold red", "skip": "dim"}


def print_checks(title: str, result: str, checks) -> None:
    """One table of checks (each with check, result, detail and fix), titled with the
    overall result: verify's per-host reports and probe's pair reports."""
    from rich.table import Table
    from rich.text import Text

    heading = Text(f"{title}: ")
    heading.append(result.upper(), style=RESULT_STYLE[result])
    table = Table(title=heading, title_justify="left")
    for col in ("check", "result", "detail"):
        table.add_column(col, overflow="fold")
    for c in checks:
        detail = Text(printable(c.detail))
        if c.fix:
            detail.append(f"\nfix: {printable(c.fix)}", style="italic")
        table.add_row(Text(printable(c.check)), Text(c.result, style=RESULT_STYLE[c.result]), detail)
    console().print(table)
