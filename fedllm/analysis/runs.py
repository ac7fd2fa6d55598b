"""Load run directories written by ``fedllm simulate`` (plain files, no live objects)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedllm.errors import DataError

RUN_MARKER = "summary.json"
AUDIT_FILE = "audit.json"  # written by `fedllm audit` only


@dataclass(frozen=True)
class Run:
    """One finished run: its config, per-round metrics, privacy ledger and summary."""

    path: Path
    config: dict[str, Any]
    rounds: list[dict[str, Any]]
    ledger: dict[str, Any]
    summary: dict[str, Any]
    audit: dict[str, Any] | None = None  # the run's privacy audit, when `fedllm audit` ran it

    def epsilon_table(self) -> dict[int, dict[str, float]]:
        """Per round, each client's epsilon (``{round: {client: epsilon}}``); empty without DP."""
        return {r["round"]: r["epsilon"] for r in self.rounds if r.get("epsilon")}


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise DataError(f"{path}: missing; is {path.parent} a finished fedllm run directory?") from exc
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg})") from exc


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    for line_no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{line_no}: not valid JSON ({exc.msg})") from exc
    return rows


def load_run(path: str | Path) -> Run:
    """Read one run directory.

    Raises:
        DataError: a file is missing or malformed (the message names it).
    """
    path = Path(path)
    audit = _read_json(path / AUDIT_FILE) if (path / AUDIT_FILE).is_file() else None
    return Run(path=path, config=_read_json(path / "config.json"),
               rounds=_read_jsonl(path / "metrics.jsonl"),
               ledger=_read_json(path / "privacy_ledger.json"), summary=_read_json(path / RUN_MARKER), audit=audit)


def find_runs(path: str | Path) -> list[Run]:
    """The run at ``path``, or every run below it (a Hydra sweep directory), in path order.

    Raises:
        DataError: no finished run is found.
    """
    path = Path(path)
    if (path / RUN_MARKER).is_file():
        return [load_run(path)]
    runs = [load_run(marker.parent) for marker in sorted(path.rglob(RUN_MARKER))]
    if not runs:
        raise DataError(f"{path}: no finished fedllm run (no {RUN_MARKER}) in it or below it")
    return runs
