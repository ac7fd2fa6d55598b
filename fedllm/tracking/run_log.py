"""Per-round results as they happen: ``metrics.jsonl`` (one :class:`RoundRecord` a line) and
the console progress."""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Sequence
from pathlib import Path

from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from fedllm.tracking.run_files import METRICS_FILE, RoundRecord

log = logging.getLogger(__name__)


class RunLog:
    """Appends one record per round to ``metrics.jsonl`` and shows progress on the console."""

    def __init__(self, run_dir: Path, num_rounds: int, show_progress: bool, previous: Sequence[RoundRecord] = ()):
        """Start ``metrics.jsonl`` afresh, or (resuming) with the rounds a checkpoint holds."""
        self.path = run_dir / METRICS_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.rounds: list[RoundRecord] = list(previous)
        # a resumed run drops any round logged after its last checkpoint: it runs again
        self.path.write_text("".join(r.to_line() for r in self.rounds))
        self.started = time.perf_counter() - ((self.rounds[-1].wall_seconds or 0.0) if self.rounds else 0.0)
        self.bar = tqdm(
            total=num_rounds,
            desc="rounds",
            unit="round",
            # None: only on a terminal (in a file or CI log every redraw would be a line of its own)
            disable=True if not show_progress else None,
            dynamic_ncols=True,
            initial=max(0, len(self.rounds) - 1),
        )
        # while the bar is drawn, log lines are printed above it instead of through it
        self._redirect = logging_redirect_tqdm() if not self.bar.disable else None
        if self._redirect is not None:
            self._redirect.__enter__()

    def log_round(self, record: RoundRecord) -> RoundRecord:
        """Append one round (round 0 is the evaluation before any training), stamped with
        :meth:`wall_seconds`; returns the stamped record."""
        record = dataclasses.replace(record, wall_seconds=round(self.wall_seconds(), 3))
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(record.to_line())
        self.rounds.append(record)
        self._show(record)
        return record

    def _show(self, record: RoundRecord) -> None:
        accuracy = None if record.eval_accuracy is None else 100 * record.eval_accuracy
        shown = [
            ("train loss", record.train_loss, "{:.4f}"),
            ("eval loss", record.eval_loss, "{:.4f}"),
            ("accuracy", accuracy, "{:.1f}%"),
            ("perplexity", record.eval_perplexity, "{:.2f}"),
            ("max epsilon", record.max_epsilon, "{:.3f}"),
            ("client-level epsilon", record.client_level_epsilon, "{:.3f}"),
            ("refused", record.refused or None, "{}"),
            ("rejected", record.rejected_updates or None, "{}"),
            ("failed", len(record.failed) or None, "{}"),
        ]
        parts = [
            f"round {record.round}",
            *(f"{label} {form.format(value)}" for label, value, form in shown if value is not None),
        ]
        line = " | ".join(parts)
        if record.round > 0:
            self.bar.update(1)
        self.bar.set_postfix_str(line.split(" | ", 1)[-1])
        log.info(line)

    def close(self) -> None:
        """Close the progress display (and give the console handlers back to the log)."""
        self.bar.close()
        if self._redirect is not None:
            self._redirect.__exit__(None, None, None)
            self._redirect = None

    def wall_seconds(self) -> float:
        """Seconds since the log was opened (a resumed run continues the count of its checkpoint)."""
        return time.perf_counter() - self.started
