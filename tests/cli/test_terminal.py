"""Tables as a person sees them: an 80-column pseudo-terminal, real host names."""

from __future__ import annotations

from tests.support.pki import issue, make_store
from tests.support.terminal import longest_line, run_in_terminal, whole_on_a_line

NAMES = ["hv-0042.rack07.fra1.cloud.example.org", "hv-0043.rack07.fra1.cloud.example.org",
         "migration-destination-with-a-long-name.ams3.example.org"]


def test_list_fits_80_columns_and_keeps_names_whole(tmp_path):
    home = make_store(tmp_path)
    issue(home, *NAMES)
    text = run_in_terminal(home, "list")
    assert whole_on_a_line(text, NAMES) == [], text
    assert longest_line(text) <= 80, text
    assert "expires" in text and "serial" not in text  # the default view, less what does not fit
    wide = run_in_terminal(home, "list", "--wide", columns=250)
    assert "serial" in wide and "fingerprint" in wide and whole_on_a_line(wide, NAMES) == []
    roomy = run_in_terminal(home, "list", columns=250)  # a wide terminal shows more unasked
    assert "serial" in roomy


def test_a_long_table_fits_too(tmp_path):
    home = make_store(tmp_path)
    names = [f"hv-{i:04d}.rack07.fra1.cloud.example.org" for i in range(40)]  # the plain layout
    issue(home, *names)
    text = run_in_terminal(home, "list")
    assert whole_on_a_line(text, names) == [] and longest_line(text) <= 80, text
