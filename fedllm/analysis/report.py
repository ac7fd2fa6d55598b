"""Tables of runs: one row per run (outcome, model, data, privacy, noise, learning rate, target and
spent epsilon, accuracy, rounds, time), grouped by model and data.

Failed and unfinished runs are rows with their status and reason, never privacy-utility points.
Each row says whether the run folder's ``manifest.json`` vouches for its files (``integrity``,
:mod:`fedllm.tracking.run_manifest`): the figures of a run that is unverified or fails verification
(its results, epsilons and audit bounds) are not shown as the run's, and it is never plotted; an
edited ``summary.json`` cannot put its epsilon in a report (issue 25, item 3).
"""

from __future__ import annotations

import csv
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fedllm.analysis.runs import Run, failure_of
from fedllm.tracking.run_manifest import RunIntegrity, run_integrity

# the first four as they always were (scripts and tests read them); rows are sorted by model and data
COLUMNS = (
    "run",
    "privacy",
    "target_epsilon",
    "spent_epsilon",
    "status",
    "integrity",
    "model",
    "data",
    "noise_multiplier",
    "lr",
    "audit_coordinator",
    "audit_output_reader",
    "audit_nonfinite",
    "audit_metadata",
    "audit_reply_time",
    "audit_power",
    "zero_shot_accuracy",
    "final_accuracy",
    "zero_shot_perplexity",
    "final_perplexity",
    "final_exact_match",
    "rounds",
    "clients",
    "wall_seconds",
    "note",
)
NOTE_CHARS = 200  # a failure reason is cut to this in the Markdown table (the CSV keeps it whole)


def model_label(config: dict[str, Any]) -> str | None:
    """The base model as a table shows it: the hub id or folder, ``embedded`` or ``tiny``."""
    model = config.get("model") or {}
    if model.get("name_or_path"):
        return str(model["name_or_path"])
    return model.get("source")


def data_label(config: dict[str, Any]) -> str | None:
    """The data set as a table shows it: its name, and the file name for ``jsonl``."""
    data = config.get("data") or {}
    if not data:
        return None
    if data.get("path"):
        return f"{data.get('name')}:{Path(str(data['path'])).name}"
    return data.get("name")


def noise_label(run: Run) -> float | str | None:
    """The noise multiplier that ran: sample-level DP-SGD's per node (from the ledger; a range when
    nodes differ; else the configured one), or client-level DP's under ``privacy=client``."""
    privacy = run.config.get("privacy") or {}
    mode = privacy.get("mode") or run.summary.privacy_mode
    if mode == "none":
        return None
    if mode == "client":
        return privacy.get("client_noise_multiplier")
    used = sorted(
        {
            round(c["noise_multiplier"], 4)
            for c in (run.ledger.get("clients") or {}).values()
            if c.get("noise_multiplier")
        }
    )
    if not used:
        return privacy.get("noise_multiplier")
    return used[0] if len(used) == 1 else f"{used[0]:g}-{used[-1]:g}"


Integrities = Mapping[Path, RunIntegrity]


def integrities(runs: list[Run], key: bytes | None) -> dict[Path, RunIntegrity]:
    """Each run's :class:`RunIntegrity`, checked with the storage ``key`` (or by checksum without one)."""
    return {run.path: run_integrity(run.path, key) for run in runs}


def report_rows(runs: list[Run], root: Path, checked: Integrities | None = None) -> list[dict[str, Any]]:
    """One row per run, grouped by model and data (then privacy, target epsilon, path); ``run``
    is the path relative to ``root``. A failed or unfinished run keeps its status and reason
    (``note``) and shows no results; nor does a run whose files are unverified or fail verification
    (``integrity``; ``note`` says why).

    Args:
        runs: the runs to tabulate.
        root: the folder the runs were found under.
        checked: each run's integrity (:func:`integrities`); default: checked here without a key.
    """
    checked = integrities(runs, None) if checked is None else checked
    rows = []
    for run in runs:
        s = run.summary
        integrity = checked[run.path]
        # results are shown only for a finished run whose manifest vouches for its files
        finished = run.finished and integrity.trusted
        audit = run.audit or {}
        audited = audit.get("epsilon_lower_bound", {})  # `fedllm audit`'s lower bounds, if it ran
        rows.append(
            {
                "run": str(run.path.relative_to(root)) if run.path != root else run.path.name,
                "status": run.status,
                "integrity": integrity.state,
                "model": model_label(run.config),
                "data": data_label(run.config),
                "privacy": s.privacy_mode or (run.config.get("privacy") or {}).get("mode"),
                "noise_multiplier": noise_label(run),
                "lr": (run.config.get("train") or {}).get("lr"),
                "target_epsilon": s.target_epsilon if s.target_epsilon is not None else _configured_target(run.config),
                "spent_epsilon": s.final_max_epsilon if finished else None,
                "audit_coordinator": audited.get("coordinator") if finished else None,
                "audit_output_reader": audited.get("output_reader") if finished else None,
                # the side channels (issue 23 item 6) and the largest bound the sampled canaries allow
                "audit_nonfinite": audited.get("nonfinite") if finished else None,
                "audit_metadata": audited.get("metadata") if finished else None,
                "audit_reply_time": audited.get("reply_time") if finished else None,
                "audit_power": audit.get("power") if finished else None,
                "zero_shot_accuracy": s.zero_shot_accuracy if integrity.trusted else None,
                "final_accuracy": s.final_accuracy if finished else None,
                # free-form answers: perplexity is the headline, exact match of the round's samples beside it
                "zero_shot_perplexity": s.zero_shot_eval_perplexity if integrity.trusted else None,
                "final_perplexity": s.final_eval_perplexity if finished else None,
                "final_exact_match": run.rounds[-1].exact_match if finished and run.rounds else None,
                "rounds": s.rounds_completed,
                "clients": s.num_clients,
                "wall_seconds": s.wall_seconds,
                "note": _note(run, integrity),
            }
        )
    return sorted(rows, key=_group_key)


def _note(run: Run, integrity: RunIntegrity) -> str | None:
    """Why a run failed or stopped, led by why its figures are not shown when they are not."""
    why = failure_of(run)
    if integrity.trusted or run.status == "unfinished":  # an unfinished run has nothing to vouch for yet
        return why
    hidden = f"{integrity.state}: {integrity.detail}; its results and epsilons are not shown"
    return f"{hidden}; {why}" if why else hidden


def _configured_target(config: dict[str, Any]) -> float | None:
    """The target epsilon a run was configured with (for a run that failed before its summary said it)."""
    privacy = config.get("privacy") or {}
    return privacy.get("target_epsilon") if privacy.get("mode") in ("sample", "both") else None


def _group_key(row: dict[str, Any]) -> tuple:
    def text(value: Any) -> str:
        return "" if value is None else str(value)

    def number(value: Any) -> float:
        return value if isinstance(value, (int, float)) else float("inf")

    return (
        text(row["model"]),
        text(row["data"]),
        text(row["privacy"]),
        number(row["target_epsilon"]),
        text(row["run"]),
    )


def _cell(value: Any, limit: int | None = None) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    text = " ".join(str(value).split()).replace("|", "\\|")
    if limit and len(text) > limit:
        text = text[: limit - 3] + "..."
    return text


def to_markdown(rows: list[dict[str, Any]], columns: tuple[str, ...] = COLUMNS) -> str:
    """A GitHub-flavoured Markdown table of ``columns`` (missing values as "-"; long notes cut)."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += [
        "| " + " | ".join(_cell(row.get(c), NOTE_CHARS if c == "note" else None) for c in columns) + " |"
        for row in rows
    ]
    return "\n".join(lines) + "\n"


def write_csv(rows: list[dict[str, Any]], path: Path) -> Path:
    """Write the rows as CSV (empty cells for missing values)."""
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows({k: ("" if v is None else v) for k, v in row.items()} for row in rows)
    return path


def privacy_utility_points(runs: list[Run], checked: Integrities | None = None) -> list[dict[str, Any]]:
    """(spent epsilon, final utility) per finished run, with its model and data (``group``) for
    the privacy-utility plot: ``metric`` is ``accuracy`` for fixed answers and ``perplexity`` for
    free-form ones (each point holds its value under that name, and ``zero_shot``). Runs of one
    model and data with different client or round counts are different groups (different
    lines). Failed and unfinished runs are never points, nor are runs whose files are unverified
    or fail verification (``checked``: default, checked here without a key)."""
    checked = integrities(runs, None) if checked is None else checked
    shown = [r for r in runs if r.finished and checked[r.path].trusted and _utility(r) is not None]
    shapes: dict[str, set[tuple]] = {}
    for run in shown:
        shapes.setdefault(_group(run), set()).add(_shape(run))
    points = []
    for run in shown:
        metric, value, zero_shot = _utility(run) or ("", None, None)
        group = _group(run)
        if len(shapes[group]) > 1:  # one line per shape: a 2-round run is not a point on a 3-round curve
            clients, rounds = _shape(run)
            group = f"{group} / {clients} clients x {rounds} rounds"
        points.append(
            {
                "epsilon": run.summary.final_max_epsilon,
                "metric": metric,
                metric: value,
                "zero_shot": zero_shot,
                "group": group or None,
            }
        )
    return points


def _utility(run: Run) -> tuple[str, float, float | None] | None:
    s = run.summary
    if s.final_accuracy is not None:
        return "accuracy", s.final_accuracy, s.zero_shot_accuracy
    if s.final_eval_perplexity is not None:
        return "perplexity", s.final_eval_perplexity, s.zero_shot_eval_perplexity
    return None


def _group(run: Run) -> str:
    return " / ".join(x for x in (model_label(run.config), data_label(run.config)) if x)


def _shape(run: Run) -> tuple[Any, Any]:
    federation = run.config.get("federation") or {}
    return federation.get("num_clients"), federation.get("num_rounds")
