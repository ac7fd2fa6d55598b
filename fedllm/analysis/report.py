"""Tables of finished runs: one row per run (target and spent epsilon, accuracy, rounds, time)."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

from fedllm.analysis.runs import Run

COLUMNS = ("run", "privacy", "target_epsilon", "spent_epsilon", "audit_coordinator", "audit_output_reader",
           "zero_shot_accuracy", "final_accuracy", "rounds", "clients", "wall_seconds")


def report_rows(runs: list[Run], root: Path) -> list[dict[str, Any]]:
    """One row per run; ``run`` is the path relative to ``root``."""
    rows = []
    for run in runs:
        s = run.summary
        audited = (run.audit or {}).get("epsilon_lower_bound", {})  # `fedllm audit`'s lower bounds, if it ran
        rows.append({
            "run": str(run.path.relative_to(root)) if run.path != root else run.path.name,
            "privacy": s.get("privacy_mode"),
            "target_epsilon": s.get("target_epsilon"),
            "spent_epsilon": s.get("final_max_epsilon"),
            "audit_coordinator": audited.get("coordinator"),
            "audit_output_reader": audited.get("output_reader"),
            "zero_shot_accuracy": s.get("zero_shot_accuracy"),
            "final_accuracy": s.get("final_accuracy"),
            "rounds": s.get("rounds_completed"),
            "clients": s.get("num_clients"),
            "wall_seconds": s.get("wall_seconds"),
        })
    return rows


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def to_markdown(rows: list[dict[str, Any]], columns: tuple[str, ...] = COLUMNS) -> str:
    """A GitHub-flavoured Markdown table of ``columns`` (missing values as "-")."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def write_csv(rows: list[dict[str, Any]], path: Path) -> Path:
    """Write the rows as CSV (empty cells for missing values)."""
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows({k: ("" if v is None else v) for k, v in row.items()} for row in rows)
    return path


def privacy_utility_points(runs: list[Run]) -> list[dict[str, Any]]:
    """(spent epsilon, final accuracy) per run, for the privacy-utility plot."""
    return [{"epsilon": r.summary.get("final_max_epsilon"), "accuracy": r.summary.get("final_accuracy"),
             "zero_shot": r.summary.get("zero_shot_accuracy")}
            for r in runs if r.summary.get("final_accuracy") is not None]
