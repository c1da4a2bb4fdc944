"""Text from outside (certificates, hosts, files) made safe to show to a person.

A hostile subject or host output must neither drive the terminal (ESC sequences, bidi
overrides) nor fake a line: control and invisible characters are shown escaped.
"""

from __future__ import annotations

import unicodedata

_HIDDEN = ("Cc", "Cf", "Zl", "Zp", "Cs")  # control, format (bidi, zero-width), separators, surrogates


def _escaped(c: str) -> str:
    if unicodedata.category(c) in _HIDDEN:
        return c.encode("unicode_escape", "backslashreplace").decode("ascii")
    return c


def printable(text: str) -> str:
    """`text` with every control and invisible character escaped (\\x1b, \\u202e, \\n)."""
    return "".join(map(_escaped, text))


def printable_lines(text: str) -> str:
    """Like printable, but line breaks stay (a diff, a multi-line note)."""
    return "\n".join(printable(line) for line in text.split("\n"))


def one_line(text: str) -> str:
    """Like printable, but a newline becomes a space: for one-line messages."""
    return "".join(" " if c == "\n" else _escaped(c) for c in text)
