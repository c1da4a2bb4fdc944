"""Host names and SAN values: what becomes a file name, a CN and the name QEMU checks."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qemuca.errors import EXIT_INVALID_INPUT, InvalidInput
from qemuca.names import MAX_NAME, host_name, san_value


@pytest.mark.parametrize("given_, expected", [
    ("a.qemu.test", "a.qemu.test"),
    ("A.QEMU.Test", "a.qemu.test"),          # certificates carry lower case
    ("a.qemu.test.", "a.qemu.test"),         # an absolute name loses its dot
    ("host-1.example", "host-1.example"),
    ("1host.example", "1host.example"),      # a leading digit is fine (RFC 1123)
    ("localhost", "localhost"),
    ("bücher.example", "xn--bcher-kva.example"),   # IDN -> A-label
    ("BÜCHER.example", "xn--bcher-kva.example"),
    ("xn--bcher-kva.example", "xn--bcher-kva.example"),
])
def test_accepted_names_are_normalised(given_, expected):
    assert host_name(given_) == expected


@pytest.mark.parametrize("bad, reason", [
    ("", "empty"),
    (".", "empty"),
    ("a..b", "empty label"),
    (".a.b", "empty label"),
    ("a/b", "path"),
    ("../etc", "path"),
    ("a\\b", "path"),
    ("-a.example", "hyphens"),
    ("a-.example", "hyphens"),
    ("*.example", "wildcard"),
    ("a.*.example", "wildcard"),
    ("a b.example", "letters"),
    ("a_b.example", "letters"),
    ("a\nb.example", "control"),
    ("a\x00b", "control"),
    ("a\x7fb", "control"),
    ("10.0.0.1", "IP address"),
    ("::1", "IP address"),
    ("fe80::1", "IP address"),
    ("host.123", "numeric"),
    ("a" * 64 + ".example", "63"),
    ("☃.example", "not allowed"),            # disallowed code point (IDNA 2008)
    ("a\u0085b.example", "not allowed"),     # C1 control character
])
def test_bad_names_are_refused_with_the_reason(bad, reason):
    with pytest.raises(InvalidInput) as e:
        host_name(bad)
    message = str(e.value)
    assert reason.lower() in message.lower()
    assert "\n" not in message and "\x00" not in message  # one printable line
    assert e.value.exit_code == EXIT_INVALID_INPUT


def test_length_limits():
    label63 = "a" * 63
    name253 = ".".join([label63, label63, label63, "b" * 61])
    assert len(name253) == MAX_NAME == 253
    assert host_name(name253) == name253
    with pytest.raises(InvalidInput, match="longer than 253"):
        host_name(name253 + "b")
    with pytest.raises(InvalidInput, match="longer than 253"):
        host_name("a." * 200 + "test")


def test_a_long_name_is_shortened_in_the_message():
    """Error lines stay one short line even for absurd input."""
    with pytest.raises(InvalidInput) as e:
        host_name("a/" * 500)
    assert len(str(e.value)) < 200


def test_san_values_are_ips_or_host_names():
    assert san_value("10.0.0.1") == ipaddress.ip_address("10.0.0.1")
    assert san_value("2001:db8::1") == ipaddress.ip_address("2001:db8::1")
    assert san_value("[2001:db8::1]") == ipaddress.ip_address("2001:db8::1")
    assert san_value("Mig.Example.") == "mig.example"
    for bad in ("*.example", "a/b", ""):
        with pytest.raises(InvalidInput):
            san_value(bad)


_label = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-", min_size=1, max_size=63)


@settings(max_examples=200, deadline=None)
@given(st.lists(_label, min_size=1, max_size=5))
def test_any_accepted_name_is_canonical(labels):
    """Whatever host_name accepts is lower-case ASCII, short enough, and a fixed point."""
    candidate = ".".join(labels)
    try:
        name = host_name(candidate)
    except InvalidInput:
        return
    assert name.isascii() and name == name.lower()
    assert len(name) <= MAX_NAME
    assert all(0 < len(label) <= 63 and not label.startswith("-") and not label.endswith("-")
               for label in name.split("."))
    assert host_name(name) == name
