"""What a node may release, Flower-free: the schema of every answer it sends.

A node's answer to the server is a release, and this module is its complete list (the Flower
codec is :mod:`fedllm.federation.protocol`; the wire key names are :mod:`fedllm.federation.records`):

* **an update** (:class:`TrainReport` beside the adapter tensors): the adapter, a DP output, and
  the accounting (:class:`Accounting`): epsilon, the node's cap and delta, whether one more round
  fits, and the DP history (noise multiplier, sample rate, steps per entry) the server recomputes
  epsilon from. These are functions of the node's ledger and of public settings only: the sample
  rate and noise follow from the run's schedule and the node's declared sampling size, never from
  its records (the neighbouring relation accounted is add/remove-one record, with the record count
  private: see ``docs/threat-model.md``);
* **what the node's config declares public** (:class:`PublicStats`): with ``public-size`` its
  size (the FedAvg weight), with ``public-metrics`` its train loss, examples seen and seconds.
  Nothing else data-dependent outside DP ever leaves;
* **a refusal** (:class:`Refusal`): one category (``budget``, ``data``, ``policy``, ``error``),
  the node's cap, and for ``budget`` and ``error`` the epsilon it has spent with its history; the
  reason stays in the node's log;
* **a pre-flight answer** (:class:`PreflightAnswer`): rounds planned and affordable within the
  cap, the epsilon now and after them, and delta: nothing that the train replies and refusals of
  those rounds would not tell (:mod:`fedllm.federation.preflight`), or a refusal (``data``,
  ``policy``, ``error``, ``declined``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from fedllm.federation import records as keys
from fedllm.privacy.accounting import History


@dataclass(frozen=True)
class Accounting:
    """What the server needs to recompute a node's sample-level epsilon, and the node's answer."""

    epsilon: float
    cap: float
    delta: float
    history: History
    can_continue: bool

    def to_metrics(self) -> dict:
        """The accounting fields as wire metrics."""
        last = self.history[-1] if self.history else (0.0, 0.0, 0)
        return {
            keys.EPSILON: float(self.epsilon),
            keys.EPSILON_CAP: float(self.cap),
            keys.DELTA: float(self.delta),
            keys.NOISE_MULTIPLIER: float(last[0]),
            keys.SAMPLE_RATE: float(last[1]),
            keys.TOTAL_STEPS: int(sum(s for _, _, s in self.history)),
            keys.DP_HISTORY: [float(v) for entry in self.history for v in entry],
            keys.CAN_CONTINUE: int(self.can_continue),
        }


@dataclass(frozen=True)
class PublicStats:
    """Values no DP covers; sent only when the node's config declares them public."""

    num_examples: int | None = None
    train_loss: float | None = None
    train_seconds: float | None = None
    examples_seen: int | None = None

    def to_metrics(self) -> dict:
        """The declared-public fields as wire metrics (absent ones are not sent)."""
        values = {
            keys.NUM_EXAMPLES: self.num_examples,
            keys.TRAIN_LOSS: self.train_loss,
            keys.TRAIN_SECONDS: self.train_seconds,
            keys.EXAMPLES_SEEN: self.examples_seen,
        }
        return {k: v for k, v in values.items() if v is not None and not (isinstance(v, float) and math.isnan(v))}


@dataclass(frozen=True)
class TrainReport:
    """A node's reply with an update (the adapter tensors travel beside it)."""

    partition_id: int
    accounting: Accounting | None  # None: the node trained without DP-SGD (its policy allowed it)
    public: PublicStats = PublicStats()
    replayed: bool = False

    @property
    def history(self) -> History:
        """The node's DP history (empty without DP-SGD)."""
        return self.accounting.history if self.accounting else []

    def to_metrics(self) -> dict:
        """The whole MetricRecord content of this report."""
        metrics = {keys.PARTITION_ID: self.partition_id, keys.REFUSED: 0, **self.public.to_metrics()}
        if self.accounting is not None:
            metrics.update(self.accounting.to_metrics())
        if self.replayed:
            metrics[keys.REPLAYED] = 1
        return metrics

    @staticmethod
    def replay_metrics(metrics: dict) -> dict:
        """The metrics of an update already released, marked as resent (no new privacy cost)."""
        return {**metrics, keys.REPLAYED: 1}


@dataclass(frozen=True)
class Refusal:
    """A node that trained nothing this round: the category, and its epsilon where known."""

    partition_id: int
    category: str
    cap: float | None = None
    spent: float | None = None
    delta: float | None = None
    history: History | None = None

    def to_metrics(self) -> dict:
        """The MetricRecord content of this refusal."""
        metrics: dict = {keys.PARTITION_ID: self.partition_id, keys.REFUSED: 1, keys.CAN_CONTINUE: 0}
        if self.cap is not None:
            metrics[keys.EPSILON_CAP] = float(self.cap)
        if self.history is not None and self.spent is not None and self.delta is not None:
            metrics[keys.EPSILON] = float(self.spent)
            metrics[keys.DELTA] = float(self.delta)
            metrics[keys.DP_HISTORY] = [float(v) for entry in self.history for v in entry]
        return metrics

    @property
    def reason(self) -> str:
        """A one-line description for the server's logs."""
        text = f"refused ({self.category})"
        if self.spent is not None and self.cap is not None:
            text += f": epsilon spent {self.spent:.4f}, cap {self.cap:g}"
        return text + "; the node's own log has the detail"


@dataclass(frozen=True)
class PreflightAnswer:
    """A node's pre-flight answer: how many of the rounds still planned fit its own cap.

    ``spent`` (epsilon now, over the node's lifetime ledger), ``after`` (epsilon after the
    affordable rounds) and ``delta`` exist under sample-level DP only: without DP-SGD no node
    budget applies, and every planned round fits.
    """

    partition_id: int
    rounds_planned: int
    rounds_affordable: int
    cap: float
    spent: float | None = None
    after: float | None = None
    delta: float | None = None

    def to_metrics(self) -> dict:
        """The MetricRecord content of this answer."""
        metrics: dict = {
            keys.PARTITION_ID: self.partition_id,
            keys.REFUSED: 0,
            keys.ROUNDS_PLANNED: int(self.rounds_planned),
            keys.ROUNDS_AFFORDABLE: int(self.rounds_affordable),
            keys.EPSILON_CAP: float(self.cap),
        }
        if self.spent is not None and self.after is not None and self.delta is not None:
            metrics.update(
                {keys.EPSILON: float(self.spent), keys.EPSILON_AFTER: float(self.after), keys.DELTA: float(self.delta)}
            )
        return metrics
