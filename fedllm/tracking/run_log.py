"""Per-round results: ``metrics.jsonl`` (one JSON object per round), console progress, summary."""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

log = logging.getLogger(__name__)


def _finite_or_none(value: float | None) -> float | None:
    return None if value is None or not math.isfinite(value) else float(value)


class RunLog:
    """Appends one record per round to ``metrics.jsonl`` and shows progress on the console."""

    def __init__(self, run_dir: Path, num_rounds: int, show_progress: bool,
                 previous: list[dict[str, Any]] | None = None):
        """Start ``metrics.jsonl`` afresh, or (resuming) with the rounds a checkpoint holds."""
        self.path = run_dir / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.rounds: list[dict[str, Any]] = list(previous or [])
        # a resumed run drops any round logged after its last checkpoint: it runs again
        self.path.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in self.rounds))
        self.started = time.perf_counter() - (self.rounds[-1]["wall_seconds"] if self.rounds else 0.0)
        self.bar = tqdm(total=num_rounds, desc="rounds", unit="round", disable=not show_progress,
                        dynamic_ncols=True, initial=max(0, len(self.rounds) - 1))

    def log_round(self, server_round: int, *, train_loss: float | None, eval_loss: float,
                  eval_accuracy: float | None, epsilons: dict[int, float] | None,
                  num_clients: int, slowest_client_seconds: float | None = None,
                  refused: list[int] | None = None, failed: list[str] | None = None,
                  rejected: list[str] | None = None,
                  client_level_epsilon: float | None = None, eval_seconds: float | None = None) -> dict[str, Any]:
        """Record one round (round 0 is the evaluation before any training)."""
        record = {
            "round": server_round,
            "train_loss": _finite_or_none(train_loss),
            "eval_loss": _finite_or_none(eval_loss),
            "eval_accuracy": eval_accuracy,
            "epsilon": {str(k): v for k, v in sorted(epsilons.items())} if epsilons is not None else None,
            "max_epsilon": max(epsilons.values(), default=0.0) if epsilons is not None else None,
            "num_clients": num_clients,
            "refused": sorted(refused or []),
            "failed": list(failed or []),
            "rejected_updates": len(rejected or []),
            "rejections": list(rejected or []),
            "client_level_epsilon": client_level_epsilon,
            # local training time of the slowest client: the rest of a round is framework and evaluation
            "slowest_client_seconds": _finite_or_none(slowest_client_seconds),
            "eval_seconds": _finite_or_none(eval_seconds),
            "wall_seconds": round(time.perf_counter() - self.started, 3),
        }
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(record, sort_keys=True) + "\n")
        self.rounds.append(record)
        self._show(record)
        return record

    def _show(self, record: dict[str, Any]) -> None:
        parts = [f"round {record['round']}"]
        if record["train_loss"] is not None:
            parts.append(f"train loss {record['train_loss']:.4f}")
        parts.append(f"eval loss {record['eval_loss']:.4f}")
        if record["eval_accuracy"] is not None:
            parts.append(f"accuracy {100 * record['eval_accuracy']:.1f}%")
        if record["max_epsilon"] is not None:
            parts.append(f"max epsilon {record['max_epsilon']:.3f}")
        if record["client_level_epsilon"] is not None:
            parts.append(f"client-level epsilon {record['client_level_epsilon']:.3f}")
        if record["refused"]:
            parts.append(f"refused {record['refused']}")
        if record["rejected_updates"]:
            parts.append(f"rejected {record['rejected_updates']}")
        if record["failed"]:
            parts.append(f"failed {len(record['failed'])}")
        line = " | ".join(parts)
        if record["round"] > 0:
            self.bar.update(1)
        self.bar.set_postfix_str(line.split(" | ", 1)[-1])
        log.info(line)

    def close(self) -> None:
        """Close the progress display."""
        self.bar.close()

    def wall_seconds(self) -> float:
        """Seconds since the log was opened."""
        return time.perf_counter() - self.started
