"""Text a node sends is logged on one line, spelled out, bounded (issue 13, problem 11)."""

from __future__ import annotations

import logging

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fedllm.federation.remote_text import MAX_REMOTE_TEXT, escape_remote_text


def test_a_forged_log_line_stays_on_the_line_it_came_in():
    reason = "refused (budget)\nround 3: aggregation finished, 0 rejected"
    escaped = escape_remote_text(reason)
    assert "\n" not in escaped
    assert escaped == "refused (budget)\\nround 3: aggregation finished, 0 rejected"


def test_a_log_record_with_remote_text_is_one_line(caplog):
    log = logging.getLogger("fedllm.test.remote_text")
    with caplog.at_level(logging.WARNING, logger=log.name):
        log.warning("round %d: client %d %s", 3, 1, escape_remote_text("x\r\nround 3: client 0 ok\x1b[2K"))
    [record] = caplog.records
    assert len(record.getMessage().splitlines()) == 1
    assert "\x1b" not in record.getMessage() and "\r" not in record.getMessage()


@pytest.mark.parametrize(
    ("raw", "shown"),
    [
        ("\x1b[31mred", "\\x1b[31mred"),  # ANSI escape: no terminal rewriting
        ("a\rb", "a\\rb"),
        ("tab\there", "tab\\there"),
        ("\x00nul", "\\x00nul"),
        ("\x85next line", "\\x85next line"),  # C1 control NEL
        ("ok\u202egnp.exe", "ok\\u202egnp.exe"),  # right-to-left override (Trojan Source)
        ("zero\u200bwidth", "zero\\u200bwidth"),
        ("line\u2028sep", "line\\u2028sep"),
        ("a\\nb", "a\\\\nb"),  # a literal backslash-n is not a newline
        ("Zürich – 東京 ok", "Zürich – 東京 ok"),  # printable text in any script is kept
        ("\U000e0041tag", "\\U000e0041tag"),  # invisible tag characters
    ],
)
def test_control_and_format_characters_are_spelled_out(raw, shown):
    assert escape_remote_text(raw) == shown


def test_long_text_is_cut_and_says_by_how_much():
    escaped = escape_remote_text("A" * (MAX_REMOTE_TEXT + 1000))
    assert escaped == "A" * MAX_REMOTE_TEXT + "...[1000 more characters]"
    assert escape_remote_text("abcdef", max_chars=3) == "abc...[3 more characters]"
    assert escape_remote_text("abc", max_chars=3) == "abc"


def test_non_text_is_shown_as_what_it_is():
    assert escape_remote_text(b"\nbytes") == "b'\\\\nbytes'"
    assert escape_remote_text(None) == "None"


def test_a_negative_bound_is_an_error():
    with pytest.raises(ValueError, match="max_chars"):
        escape_remote_text("x", max_chars=-1)


@given(st.text(max_size=300))
def test_any_text_becomes_one_printable_line(text):
    escaped = escape_remote_text(text)
    assert escaped.isprintable()
    assert len(escaped.splitlines()) <= 1


@given(st.text(max_size=200))
def test_escaping_is_reversible_so_nothing_is_hidden(text):
    # two different reasons never look the same in the log
    escaped = escape_remote_text(text)
    assert escaped.encode("ascii", "backslashreplace").decode("unicode_escape") == text
