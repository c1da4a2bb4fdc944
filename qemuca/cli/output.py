"""Rendering helpers: JSON for scripts, rich tables for people, notes on stderr.

rich is imported only when a table is actually printed. Tables follow cli/tables.py:
text only (no markup), identifiers never cut, `--wide` for the extra columns.
"""

from __future__ import annotations

import json
import sys

import click

from qemuca.text import printable, printable_lines

json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
wide_option = click.option("--wide", "-w", is_flag=True,
                           help="Show every column (serials, fingerprints...), however wide; "
                                "a wide terminal shows them anyway.")


def emit_json(data) -> None:
    click.echo(json.dumps(data, indent=2, default=str))


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
