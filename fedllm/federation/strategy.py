"""FedAvg over adapter arrays, keeping each client's per-round report for the ledger and metrics."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg

from fedllm.federation import records as keys
from fedllm.privacy.accounting import History


@dataclass(frozen=True)
class ClientReport:
    """What one client said about its round (metrics only; adapters go to FedAvg)."""

    partition_id: int
    num_examples: int
    train_loss: float
    train_seconds: float
    history: History
    delta: float | None

    @classmethod
    def from_metrics(cls, metrics: MetricRecord) -> ClientReport:
        """Parse a client's MetricRecord (keys from :mod:`fedllm.federation.records`)."""
        flat = [float(v) for v in metrics.get(keys.DP_HISTORY, [])]
        history = [(flat[i], flat[i + 1], int(flat[i + 2])) for i in range(0, len(flat), 3)]
        delta = metrics.get(keys.DELTA)
        return cls(partition_id=int(metrics[keys.PARTITION_ID]), num_examples=int(metrics[keys.NUM_EXAMPLES]),
                   train_loss=float(metrics[keys.TRAIN_LOSS]),
                   train_seconds=float(metrics[keys.TRAIN_SECONDS]), history=history,
                   delta=None if delta is None else float(delta))


def mean_train_loss(reports: list[ClientReport]) -> float | None:
    """Example-weighted mean of the clients' train losses (None when no client reported)."""
    examples = sum(r.num_examples for r in reports)
    return sum(r.train_loss * r.num_examples for r in reports) / examples if reports else None


def aggregate_train_metrics(replies: list[RecordDict], weight_key: str) -> MetricRecord:
    """Example-weighted mean train loss and total examples (histories are not averaged).

    ``weight_key`` is Flower's argument; :class:`AdapterFedAvg` always weights by
    ``num-examples``, the field :class:`ClientReport` reads.
    """
    reports = [ClientReport.from_metrics(next(iter(r.metric_records.values()))) for r in replies]
    return MetricRecord({keys.TRAIN_LOSS: mean_train_loss(reports),
                         keys.NUM_EXAMPLES: sum(r.num_examples for r in reports)})


class AdapterFedAvg(FedAvg):
    """Flower's FedAvg (weighted by shard size) that also records every client's report.

    Evaluation is centralised on the server's held-out split, so no evaluate messages
    are sent to clients.
    """

    def __init__(self, *, fraction_train: float, min_train_nodes: int, min_available_nodes: int):
        super().__init__(
            fraction_train=fraction_train, fraction_evaluate=0.0, min_train_nodes=min_train_nodes,
            min_evaluate_nodes=0, min_available_nodes=min_available_nodes,
            weighted_by_key=keys.NUM_EXAMPLES, arrayrecord_key=keys.ARRAYS,
            configrecord_key=keys.CONFIG, train_metrics_aggr_fn=aggregate_train_metrics,
        )
        self.reports: dict[int, list[ClientReport]] = {}

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Record each successful client's report, then aggregate with FedAvg."""
        replies = list(replies)
        self.reports[server_round] = [
            ClientReport.from_metrics(next(iter(m.content.metric_records.values())))
            for m in replies if not m.has_error()
        ]
        return super().aggregate_train(server_round, replies)
