"""Text that came from another party (a node's refusal or error reason, a key name in a
rejected reply), made safe to put in one of our log lines.

A node chooses every character of what it sends. Logged verbatim, a newline lets it forge
whole log lines ("round 3: client 1 refused ...\\nround 3: aggregation finished"), a carriage
return or an ANSI escape sequence rewrites what an operator sees in a terminal, and Unicode
bidirectional controls reorder text on screen (CVE-2021-42574, "Trojan Source"). Escaping
keeps the text readable and makes it stay on its own line, exactly as it arrived, only
spelled out; a length bound keeps one reply from flooding the log.
"""

from __future__ import annotations

MAX_REMOTE_TEXT = 500  # characters kept from one remote string; the rest is counted, not logged

_NAMED = {"\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape_char(char: str) -> str:
    if char in _NAMED:
        return _NAMED[char]
    # str.isprintable is False for control (Cc), format (Cf: bidi overrides, zero-width
    # characters), surrogate, private-use, unassigned and separator characters other than
    # the plain space: each one is written as its code point instead.
    if char.isprintable():
        return char
    code = ord(char)
    if code <= 0xFF:
        return f"\\x{code:02x}"
    if code <= 0xFFFF:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


def escape_remote_text(text: object, max_chars: int = MAX_REMOTE_TEXT) -> str:
    """One printable line that shows ``text`` unambiguously, for a log line or a report.

    Backslashes, newlines, carriage returns, tabs, every other control or format character
    (ANSI escapes, bidirectional overrides, zero-width characters, line and paragraph
    separators) are written as escape sequences; printable characters, accented letters and
    other scripts included, are kept. Text longer than ``max_chars`` is cut, and the cut
    says how many characters were left out.

    Args:
        text: what the remote party sent; anything that is not a ``str`` is shown through
            ``repr`` (so ``bytes`` and ``None`` are visibly not text).
        max_chars: how many characters of ``text`` to keep (before escaping).

    Returns:
        A string with no control or format characters, at most ``max_chars`` source
        characters long plus the escapes and a ``...[N more characters]`` marker.

    Raises:
        ValueError: when ``max_chars`` is negative.
    """
    if max_chars < 0:
        raise ValueError(f"max_chars must be >= 0, got {max_chars}")
    if not isinstance(text, str):
        text = repr(text)
    kept, dropped = text[:max_chars], len(text) - max_chars
    escaped = "".join(_escape_char(char) for char in kept)
    return escaped + (f"...[{dropped} more characters]" if dropped > 0 else "")
