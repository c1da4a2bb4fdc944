"""Host names and SAN values: the one place that decides what is acceptable.

A host name becomes a file name in the store, a certificate CN and dNSName, and the
name QEMU's migration client compares with the destination: it must be a plain DNS
name (RFC 1123), never a path, a wildcard or an IP address.
"""

from __future__ import annotations

import ipaddress
import re
import unicodedata
from typing import Optional, Union

import idna  # IDNA 2008 + UTS 46: rejects disallowed code points and confusable mixes

from qemuca.errors import InvalidInput

_LABEL = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
MAX_NAME = 253


def _shown(value: str) -> str:
    """A value safe to echo in a one-line error (control characters escaped)."""
    shown = value.encode("unicode_escape").decode("ascii")
    return shown if len(shown) <= 80 else shown[:77] + "..."


def host_name(value: str) -> str:
    """Validate and normalise a host name: lower case, A-labels for non-ASCII.

    Raises InvalidInput with the reason. A single trailing dot (an absolute name)
    is dropped, since certificates carry names without it.
    """
    if not isinstance(value, str) or not value:
        raise InvalidInput("host name is empty")
    name = value[:-1] if value.endswith(".") else value
    if not name:
        raise InvalidInput(f"invalid host name '{_shown(value)}': empty")
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in name):
        raise InvalidInput(f"invalid host name '{_shown(value)}': control characters")
    if "*" in name:
        raise InvalidInput(f"invalid host name '{_shown(value)}': wildcards are not allowed")
    if "/" in name or "\\" in name:
        raise InvalidInput(f"invalid host name '{_shown(value)}': path characters are not allowed")
    if is_ip(name):
        raise InvalidInput(
            f"invalid host name '{_shown(value)}': an IP address; use the host's DNS name "
            "and add the address with --san")
    if not name.isascii():
        name = _to_alabel(name, value)
    name = name.lower()
    for label in name.split("."):
        if label.startswith("xn--"):
            _check_alabel(label, value)
    if len(name) > MAX_NAME:
        raise InvalidInput(f"invalid host name '{_shown(value)}': longer than {MAX_NAME} characters")
    for label in name.split("."):
        if not label:
            raise InvalidInput(f"invalid host name '{_shown(value)}': empty label")
        if len(label) > 63:
            raise InvalidInput(f"invalid host name '{_shown(value)}': label longer than 63 characters")
        if not _LABEL.match(label):
            raise InvalidInput(
                f"invalid host name '{_shown(value)}': labels hold letters, digits and inner "
                "hyphens only")
    if name.split(".")[-1].isdigit():
        raise InvalidInput(f"invalid host name '{_shown(value)}': the last label is numeric")
    return name


def _to_alabel(name: str, original: str) -> str:
    try:
        alabel = idna.encode(name, uts46=True, std3_rules=True).decode("ascii")
        back = idna.decode(alabel)
    except (idna.IDNAError, UnicodeError) as e:
        raise InvalidInput(f"invalid host name '{_shown(original)}': {e}") from None
    # UTS 46 mapping silently drops invisible characters (zero-width space, soft
    # hyphen): a name that does not survive the round trip is not what was typed.
    if back != name.lower():
        raise InvalidInput(f"invalid host name '{_shown(original)}': it holds invisible or "
                           f"mapped characters (it would become '{back}')")
    return alabel


def _check_alabel(label: str, original: str) -> None:
    """An xn-- label typed in ASCII gets the checks its Unicode form would get."""
    try:
        ulabel = idna.decode(label)
        canonical = idna.encode(ulabel, uts46=True, std3_rules=True).decode("ascii") == label
    except (idna.IDNAError, UnicodeError) as e:
        raise InvalidInput(f"invalid host name '{_shown(original)}': bad A-label '{label}': {e}") from None
    if not canonical:
        raise InvalidInput(f"invalid host name '{_shown(original)}': A-label '{label}' is not canonical")
    problem = _confusable(ulabel)
    if problem:
        raise InvalidInput(f"invalid host name '{_shown(original)}': label '{_shown(ulabel)}' {problem}")


# Letters of other scripts that look like Latin ones (after Chromium's IDN spoof checks):
# a label written only with them reads as a Latin word it is not.
_LATIN_LOOKALIKES = set("асԁеһіјӏорԛѕԝхуъьҽпгѵѡ" "αικνορτυχ")
_CJK = ("CJK", "HIRAGANA", "KATAKANA", "KATAKANA-HIRAGANA", "HANGUL", "IDEOGRAPHIC", "BOPOMOFO")


def _script(c: str) -> str:
    word = unicodedata.name(c, "UNKNOWN").split()[0]
    if c.isascii() and not c.isalpha() or word in ("COMBINING", "MODIFIER"):
        return ""  # digits, hyphen, marks: no script of their own
    return "CJK" if word in _CJK else word


def _confusable(ulabel: str) -> str:
    """Why a Unicode label can pass for another name, or ''.

    Refused: a label mixing scripts (Cyrillic 'а' among Latin letters), except CJK
    with Latin; and a label written only with Latin look-alikes of another script.
    """
    scripts = {_script(c) for c in ulabel} - {""}
    if len(scripts - {"CJK"}) > 1 or ("CJK" in scripts and len(scripts - {"CJK", "LATIN"}) > 0):
        return f"mixes scripts ({', '.join(sorted(scripts)).lower()}): it can pass for another name"
    letters = [c for c in ulabel if _script(c)]
    if letters and scripts != {"LATIN"} and all(c in _LATIN_LOOKALIKES for c in letters):
        return "is written only with letters that look Latin: it can pass for another name"
    return ""


def is_ip(value: str) -> bool:
    try:
        ipaddress.ip_address(value)
        return True
    except ValueError:
        return False


def host_port(address: str, port: int) -> str:
    """address:port, with an IPv6 address in brackets (as openssl and QEMU URIs want)."""
    try:
        if isinstance(ipaddress.ip_address(address), ipaddress.IPv6Address):
            return f"[{address}]:{port}"
    except ValueError:
        pass
    return f"{address}:{port}"


SanValue = Union[str, ipaddress.IPv4Address, ipaddress.IPv6Address]


def san_value(value: str) -> SanValue:
    """A --san value: an IP address (for an iPAddress SAN; IPv6 maybe in brackets) or a
    DNS name. Only an address a host can be reached at: no zone index (a certificate
    cannot hold one), no unspecified or multicast address."""
    if not isinstance(value, str):
        return host_name(value)
    bracketed = value.startswith("[") and value.endswith("]")
    address = value[1:-1] if bracketed else value
    if bracketed and not is_ip(address.split("%")[0]):
        raise InvalidInput(f"invalid SAN '{_shown(value)}': brackets hold an IPv6 address only")
    if "%" in address and is_ip(address.split("%")[0]):
        raise InvalidInput(f"invalid SAN '{_shown(value)}': a certificate cannot hold an IPv6 zone "
                           "index (%...)")
    if not is_ip(address):
        return host_name(value)
    ip = ipaddress.ip_address(address)
    if ip.is_unspecified or ip.is_multicast or ip == ipaddress.IPv4Address("255.255.255.255"):
        raise InvalidInput(f"invalid SAN '{_shown(value)}': not an address a host is reached at")
    return ip


MAX_SUBJECT_TEXT = 64  # RFC 5280 upper bound of a CN and of an O


def subject_text(option: str, value: Optional[str]) -> Optional[str]:
    """A CA's --cn / --org: 1 to 64 characters, none of them control or invisible (the
    name is printed by every tool that shows the CA)."""
    if value is None:
        return None
    if not value.strip() or len(value) > MAX_SUBJECT_TEXT:
        raise InvalidInput(f"{option} '{_shown(value)}' must hold 1 to {MAX_SUBJECT_TEXT} characters")
    if any(unicodedata.category(c) in ("Cc", "Cf", "Zl", "Zp", "Cs") for c in value):
        raise InvalidInput(f"{option} '{_shown(value)}' holds control or invisible characters")
    return value
