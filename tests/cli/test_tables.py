"""Tables at a terminal's width: identifiers whole, text as text, wide columns on demand."""

from __future__ import annotations

import io

import pytest
from rich.console import Console

from qemuca.cli.tables import Column, print_table

LONG = "hv-0042.rack07.fra1.cloud.example.org"
COLUMNS = [Column("host", whole=True), "status", Column("serial", whole=True, wide=True),
           Column("fingerprint (SHA-256)", whole=True, wide=True), "error"]


def render(rows, width=80, wide=False, columns=COLUMNS) -> str:
    buf = io.StringIO()
    out = Console(file=buf, width=width, markup=False, emoji=False, highlight=False)
    print_table("title", columns, rows, wide=wide, out=out)
    return buf.getvalue()


def row(host=LONG, error="connection refused by the host after a long and winding explanation"):
    return (host, "failed", "5f1c0ffee0123456789abcdef01234567", "ab" * 32, error)


@pytest.mark.parametrize("count", [1, 40])  # a rich table, and the plain layout of long tables
def test_host_names_stay_whole_at_80_columns_and_text_wraps(count):
    text = render([row(f"{i:02d}-{LONG}") for i in range(count)])
    assert all(len(line) <= 80 for line in text.splitlines()), text
    for i in range(count):
        assert f"{i:02d}-{LONG}" in text
    assert "connection refused" in text and "explanation" in text  # wrapped, not cut


def test_wide_columns_only_with_wide_or_room():
    narrow = render([row()])
    assert "5f1c0ffee0123456789abcdef01234567" not in narrow and "serial" not in narrow
    wide = render([row()], wide=True, width=200)
    assert "5f1c0ffee0123456789abcdef01234567" in wide and "ab" * 32 in wide
    roomy = render([row()], width=200)  # a wide terminal shows them unasked
    assert "5f1c0ffee0123456789abcdef01234567" in roomy


def test_wide_at_80_columns_keeps_names_whole_rather_than_all_columns():
    text = render([row()], wide=True)
    assert LONG in text and all(len(line) <= 80 for line in text.splitlines())


def test_a_name_longer_than_the_terminal_prints_records():
    name = "a" * 60 + "." + "b" * 40 + ".example.org"
    text = render([row(name)])
    assert f"host: {name}" in text and "status: failed" in text


def test_markup_and_control_characters_are_shown_as_text():
    hostile = "[link=https://evil.example]bank.example[/link] [dim]hidden[/dim]\x1b[2J\u202e"
    text = render([row(error=hostile)], width=400)
    assert "[link=https://evil.example]bank.example[/link]" in text and "[dim]hidden[/dim]" in text
    assert "\x1b" not in text and "\\x1b[2J" in text and "\\u202e" in text
