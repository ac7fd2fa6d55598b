"""The run directory's result files, typed: the one place that says what they hold.

* ``metrics.jsonl``: one :class:`RoundRecord` per line (round 0 is the zero-shot evaluation).
* ``summary.json``: one :class:`RunSummary` (the outcome, each privacy guarantee, what the run
  achieved and how long it took).

The ServerApp writes both through this module; ``fedllm report``, the notebooks, wandb, the
plots and ``fedllm audit`` read them through it, so writer and readers cannot drift (as
Hugging Face's ``TrainerState`` does for ``trainer_state.json``). The JSON keys are the field
names. Readers are lenient: a key an older run did not write reads as its default, and a key
this version does not know is passed over.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from fedllm.errors import DataError
from fedllm.storage import write_json

METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"

_Record = TypeVar("_Record")


def finite_or_none(value: float | None) -> float | None:
    """``value`` as a float, or None when it is missing, NaN or infinite (JSON has no such numbers)."""
    return None if value is None or not math.isfinite(value) else float(value)


def _known_fields(cls: type[_Record], raw: dict[str, Any]) -> _Record:
    """``cls`` from the keys of ``raw`` that it has (missing ones take their defaults)."""
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    return cls(**{key: value for key, value in raw.items() if key in names})


@dataclass(frozen=True)
class RoundRecord:
    """One line of ``metrics.jsonl``: the global adapter after ``round``, evaluated on the held-out split.

    Round 0 is the evaluation before any training. ``train_loss`` and ``slowest_client_seconds``
    are None unless nodes declared them public (no DP covers them).
    """

    round: int
    eval_loss: float | None = None
    eval_accuracy: float | None = None  # tasks with fixed answers only
    eval_perplexity: float | None = None  # exp(eval_loss), tasks without fixed answers only
    train_loss: float | None = None
    epsilon: dict[str, float] | None = None  # sample-level epsilon by client id; None without it
    max_epsilon: float | None = None
    num_clients: int = 0  # updates aggregated this round
    refused: list[int] = field(default_factory=list)  # clients that declined the round (caps, policy)
    failed: list[str] = field(default_factory=list)  # "node N: why" for errors and missing replies
    rejected_updates: int = 0
    rejections: list[str] = field(default_factory=list)  # why each rejected update was rejected
    client_level_epsilon: float | None = None
    slowest_client_seconds: float | None = None  # local training only: the rest of a round is framework and evaluation
    eval_seconds: float | None = None
    wall_seconds: float | None = None  # since the run's first round log was opened (resumes continue it)
    # free-form tasks (tracking.samples): greedy answers to a few fixed held-out prompts, each with the
    # reference and the base model's answer (round 0's: the initial adapter changes nothing), and the
    # share of them that match the reference exactly
    exact_match: float | None = None
    samples: list[dict[str, str]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """The JSON object of this record."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> RoundRecord:
        """A record from its JSON object (lenient, see the module docstring)."""
        return _known_fields(cls, raw)

    def to_line(self) -> str:
        """This record as a ``metrics.jsonl`` line (keys sorted, newline included)."""
        return json.dumps(self.to_dict(), sort_keys=True) + "\n"


@dataclass(frozen=True)
class Guarantee:
    """One differential-privacy guarantee a run gives: what it protects, against whom, at what cost."""

    level: str  # "sample" (DP-SGD on each node) or "client" (noise on the aggregate)
    protects: str
    against: str
    epsilon: float | None
    delta: float | None
    accounts: str | None = None  # sample level: what the epsilon accounts for
    adjacency: str | None = None  # client level: the neighbouring relation
    noise_multiplier: float | None = None  # client level
    clip_norm: float | None = None  # client level

    def to_dict(self) -> dict[str, Any]:
        """The JSON object (a level's own fields only)."""
        optional = ("accounts", "adjacency", "noise_multiplier", "clip_norm")
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None or k not in optional}

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Guarantee:
        """A guarantee from its JSON object."""
        return _known_fields(cls, {"epsilon": None, "delta": None, **raw})


# written only when set (so a run without them has no such key, as before these were typed)
_ONLY_WHEN_SET = ("failure", "warning", "client_level_epsilon", "audit", "preflight")


@dataclass(frozen=True)
class RunSummary:
    """``summary.json``: the run's outcome first, then its privacy and what it achieved.

    ``status`` is ``completed``, ``stopped`` (the privacy stop rule ended it early: ``stop_reason``)
    or ``failed`` (``failure`` says why); analysis also uses ``unfinished`` for a job folder
    without a summary. Accuracy is for tasks with fixed answers, perplexity for the others.
    """

    status: str | None = None  # None in summaries written before it was recorded
    failure: str | None = None
    run_id: str | None = None
    rounds_completed: int | None = None  # None: unknown (a job folder without a summary)
    rounds_planned: int | None = None
    stop_reason: str | None = None
    rounds_without_updates: list[int] = field(default_factory=list)
    num_clients: int | None = None
    privacy_mode: str | None = None
    target_epsilon: float | None = None
    delta: float | None = None
    accountant: str | None = None
    noise: str | None = None
    final_max_epsilon: float | None = None
    client_epsilons: dict[str, float] | None = None
    guarantees: list[Guarantee] = field(default_factory=list)
    warning: str | None = None  # the seeded research mode: the guarantees do not hold against the seed's holders
    client_level_epsilon: float | None = None
    zero_shot_accuracy: float | None = None
    final_accuracy: float | None = None
    zero_shot_eval_loss: float | None = None
    final_eval_loss: float | None = None
    zero_shot_eval_perplexity: float | None = None
    final_eval_perplexity: float | None = None
    test_examples: int | None = None
    federation_seconds: float | None = None  # the rounds: zero-shot evaluation to the last checkpoint
    wall_seconds: float | None = None  # the whole run in its process, outputs included
    audit: dict[str, Any] | None = None  # `fedllm audit`'s lower bounds (see fedllm.audit.run)
    # what each node answered before round 1: rounds it can afford under its own cap, refusals, no answers
    # (fedllm.federation.preflight.PreflightReport.to_dict)
    preflight: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        """The JSON object of this summary."""
        raw = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        raw["guarantees"] = [g.to_dict() for g in self.guarantees]
        raw["rounds_without_updates"] = list(self.rounds_without_updates)
        return {k: v for k, v in raw.items() if v is not None or k not in _ONLY_WHEN_SET}

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> RunSummary:
        """A summary from its JSON object (lenient, see the module docstring)."""
        guarantees = [Guarantee.from_dict(g) for g in raw.get("guarantees") or []]
        return _known_fields(
            cls, {**raw, "guarantees": guarantees, "rounds_without_updates": raw.get("rounds_without_updates") or []}
        )


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise DataError(f"{path}: missing; is {path.parent} a finished fedllm run directory?") from exc


def read_json(path: Path) -> Any:
    """A JSON file's content.

    Raises:
        DataError: the file is missing or not valid JSON (the message names it).
    """
    text = _read_text(path)
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg})") from exc


def read_rounds(run_dir: Path) -> list[RoundRecord]:
    """The rounds of ``run_dir/metrics.jsonl``, in order.

    Raises:
        DataError: the file is missing or a line is not JSON (the message names file and line).
    """
    path = run_dir / METRICS_FILE
    rows = []
    for line_no, line in enumerate(_read_text(path).splitlines(), start=1):
        if line.strip():
            try:
                rows.append(RoundRecord.from_dict(json.loads(line)))
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{line_no}: not valid JSON ({exc.msg})") from exc
    return rows


def epsilon_curves(rounds: list[RoundRecord]) -> list[tuple[str, list[tuple[int, float]]]]:
    """Each client's sample-level epsilon by round as ``(label, [(round, epsilon), ...])``, with
    clients whose curves are identical merged under one label ("clients 0, 1, 2"): drawn one by
    one, equal shards' curves lie on top of each other and all but the last disappear."""
    by_client: dict[str, list[tuple[int, float]]] = {}
    for record in rounds:
        for client, value in (record.epsilon or {}).items():
            by_client.setdefault(client, []).append((record.round, value))
    merged: dict[tuple[tuple[int, float], ...], list[str]] = {}
    for client in sorted(by_client, key=int):
        merged.setdefault(tuple(by_client[client]), []).append(client)
    return [
        (f"client {clients[0]}" if len(clients) == 1 else f"clients {', '.join(clients)}", list(curve))
        for curve, clients in merged.items()
    ]


def read_summary(run_dir: Path) -> RunSummary:
    """``run_dir/summary.json``.

    Raises:
        DataError: it is missing, not JSON, or not a JSON object.
    """
    path = run_dir / SUMMARY_FILE
    raw = read_json(path)
    if not isinstance(raw, dict):
        raise DataError(f"{path}: not a run summary (a JSON object)")
    return RunSummary.from_dict(raw)


def write_summary(run_dir: Path, summary: RunSummary) -> Path:
    """Write ``run_dir/summary.json`` atomically; returns its path."""
    path = run_dir / SUMMARY_FILE
    write_json(path, summary.to_dict())
    return path
