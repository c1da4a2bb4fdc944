"""Tables for people: every value shown as plain text, identifiers never cut.

Values in a table come from certificates, the index and hosts, any of which may be
hostile: rich markup and emoji are off, each cell is a `Text`, and control characters
are escaped, so a CN like `[link=...]bank[/link]` or an ESC sequence from a host shows
as the characters it is. At the terminal's width (80 columns is the rule), the columns
marked `whole` (host names, serials: what a person copies) are never cut or wrapped;
other text wraps. The `essential` columns (and the first) are always shown; the other
default columns join them left to right while they fit; columns marked `wide` appear
with `--wide`, or when the terminal has room for them. When even the essential columns
cannot fit, each row is printed as a record.
Piped output is laid out for 200 columns (or $COLUMNS), so logs keep whole lines.
"""

from __future__ import annotations

import os
import sys
import textwrap
from dataclasses import dataclass
from typing import List, Optional, Sequence, Union

from qemuca.text import printable

PIPED_WIDTH = 200
PLAIN_TABLE_ROWS = 30  # longer tables are laid out by hand: rich costs ~1.2 ms a row
MIN_TEXT_WIDTH = 10  # a wrapping column narrower than this reads badly
_PER_COLUMN = 3  # one space of padding each side and a rule between columns (no outer edge)


@dataclass(frozen=True)
class Column:
    header: str
    whole: bool = False  # an identifier: never cut, never wrapped
    essential: bool = False  # shown whatever the width (the first column always is)
    wide: bool = False  # only with --wide, or on a terminal with room to spare
    justify: str = "left"


ColumnSpec = Union[str, Column]


def console(stderr: bool = False, width: Optional[int] = None):
    """A rich Console that prints text as text: no markup, no emoji, no highlighting."""
    from rich.console import Console

    stream = sys.stderr if stderr else sys.stdout
    if width is None and not stream.isatty() and not os.environ.get("COLUMNS"):
        width = PIPED_WIDTH
    return Console(stderr=stderr, markup=False, emoji=False, highlight=False, soft_wrap=False,
                   width=width)


def cell(value) -> str:
    """A value as table text: None is empty, control characters are escaped."""
    return "" if value is None else printable(str(value))


def _needed(header: str, values: Sequence[str]) -> int:
    return max([len(header)] + [len(v) for v in values])


def _columns(specs: Sequence[ColumnSpec]) -> List[Column]:
    return [Column(s) if isinstance(s, str) else s for s in specs]


def _room(columns: Sequence[Column], widths: Sequence[int]) -> int:
    """Columns needed to show these columns: whole ones at full width, others at least
    MIN_TEXT_WIDTH (or their full width when shorter)."""
    inner = sum(w if c.whole else min(w, MIN_TEXT_WIDTH) for c, w in zip(columns, widths))
    return inner + _PER_COLUMN * len(columns) - 1


def choose_columns(columns: Sequence[Column], widths: Sequence[int], width: int,
                   wide: bool) -> Optional[List[int]]:
    """Indexes of the columns to show at `width`, or None when the essential ones do not
    fit (the caller prints records)."""
    def fits(indexes: List[int]) -> bool:
        return _room([columns[j] for j in indexes], [widths[j] for j in indexes]) <= width

    everything = list(range(len(columns)))
    if wide and fits(everything):
        return everything
    chosen = [i for i, c in enumerate(columns) if i == 0 or c.essential]
    if not fits(chosen):
        return None
    for tier in (False, True):  # the default columns, then the wide ones
        for i, c in enumerate(columns):
            if c.wide is tier and i not in chosen and fits(sorted(chosen + [i])):
                chosen = sorted(chosen + [i])
    return chosen


def print_table(title: str, columns: Sequence[ColumnSpec], rows, wide: bool = False,
                out=None) -> None:
    """Print rows under `title` so that they fit the terminal (see the module's rules)."""
    out = out or console()
    cols = _columns(columns)
    cells = [[cell(v) for v in row] for row in rows]
    widths = [_needed(c.header, [row[i] for row in cells]) for i, c in enumerate(cols)]
    chosen = choose_columns(cols, widths, out.width, wide)
    if chosen is None:
        _print_records(out, title, cols, cells)
        return
    shown_cols = [cols[i] for i in chosen]
    shown_cells = [[row[i] for i in chosen] for row in cells]
    if len(shown_cells) > PLAIN_TABLE_ROWS:
        out.print(plain_table(title, shown_cols, shown_cells, [widths[i] for i in chosen], out.width),
                  overflow="ignore", crop=False)
        return
    from rich.table import Table
    from rich.text import Text

    table = Table(title=Text(cell(title)), title_justify="left", show_edge=False)
    for c, w in zip(shown_cols, (widths[i] for i in chosen)):
        if c.whole:
            table.add_column(c.header, justify=c.justify, no_wrap=True, min_width=w)  # type: ignore[arg-type]
        else:
            table.add_column(c.header, justify=c.justify, overflow="fold")  # type: ignore[arg-type]
    for row in shown_cells:
        table.add_row(*(Text(v) for v in row))
    out.print(table)


def plain_table(title: str, columns: Sequence[Column], cells: Sequence[Sequence[str]],
                widths: Sequence[int], width: int) -> str:
    """Aligned columns without rich; text columns wrap to share what the whole ones leave."""
    fixed = sum(w for c, w in zip(columns, widths) if c.whole) + 2 * (len(columns) - 1)
    flexible = [i for i, c in enumerate(columns) if not c.whole]
    spare = max(width - fixed, MIN_TEXT_WIDTH * len(flexible))
    total = sum(widths[i] for i in flexible) or 1
    limits = list(widths)
    for i in flexible:
        limits[i] = max(min(widths[i], spare * widths[i] // total), min(widths[i], MIN_TEXT_WIDTH),
                        len(columns[i].header))
    lines = textwrap.wrap(cell(title), width, break_long_words=False, break_on_hyphens=False) or [""]
    lines.append(_line([c.header for c in columns], columns, limits))
    for row in cells:
        parts = [[v] if c.whole else (textwrap.wrap(v, limits[i], break_on_hyphens=False) or [""])
                 for i, (c, v) in enumerate(zip(columns, row))]
        for k in range(max(len(p) for p in parts)):
            lines.append(_line([p[k] if k < len(p) else "" for p in parts], columns, limits))
    return "\n".join(lines)


def _line(values: Sequence[str], columns: Sequence[Column], limits: Sequence[int]) -> str:
    out = [v.rjust(w) if c.justify == "right" else v.ljust(w) for v, c, w in zip(values, columns, limits)]
    return "  ".join(out).rstrip()


def _print_records(out, title: str, columns: Sequence[Column], cells: Sequence[Sequence[str]]) -> None:
    """One block per row, `header: value` a line: for names longer than the terminal."""
    lines = textwrap.wrap(cell(title), out.width, break_long_words=False, break_on_hyphens=False)
    for row in cells:
        lines.append("")
        for c, v in zip(columns, row):
            lines.append(f"{c.header}: {v}")
    out.print("\n".join(lines), overflow="ignore", crop=False)
