"""Rendering helpers: JSON for scripts, rich tables for people, notes on stderr.

rich is imported only when a table is actually printed.
"""

from __future__ import annotations

import json
import sys

import click

json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")


def emit_json(data) -> None:
    click.echo(json.dumps(data, indent=2, default=str))


def note(message: str) -> None:
    """Informational line for people; stderr, so stdout stays parseable."""
    click.echo(message, err=True)


def console(stderr: bool = False):
    from rich.console import Console

    stream = sys.stderr if stderr else sys.stdout
    # Piped output is not cut to 80 columns: logs and pagers get whole values.
    width = None if stream.isatty() else 200
    return Console(stderr=stderr, highlight=False, soft_wrap=False, width=width)


PLAIN_TABLE_ROWS = 30


def print_table(title, columns, rows) -> None:
    """A rich table; plain aligned columns for long tables (rich costs ~1.2 ms a row)."""
    cells = [["" if v is None else str(v) for v in row] for row in rows]
    if len(cells) > PLAIN_TABLE_ROWS:
        click.echo(plain_table(title, columns, cells))
        return
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    for col in columns:
        table.add_column(col)
    for row in cells:
        table.add_row(*row)
    console().print(table)


def plain_table(title, columns, cells) -> str:
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    lines = [title, "  ".join(c.ljust(w) for c, w in zip(columns, widths)).rstrip()]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip() for row in cells]
    return "\n".join(lines)


def print_fields(title, pairs) -> None:
    """A two-column key/value view (show, inspect)."""
    from rich.table import Table

    table = Table(title=title, title_justify="left", show_header=False, box=None, pad_edge=False)
    table.add_column(style="bold")
    table.add_column()
    for key, value in pairs:
        table.add_row(key, "" if value is None else str(value))
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
        detail = Text(c.detail)
        if c.fix:
            detail.append(f"\nfix: {c.fix}", style="italic")
        table.add_row(Text(c.check), Text(c.result, style=RESULT_STYLE[c.result]), detail)
    console().print(table)
