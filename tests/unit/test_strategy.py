"""Server-side aggregation of client metrics, against hand-computed values."""

from __future__ import annotations

from flwr.app import MetricRecord, RecordDict

from fedllm.federation import records as keys
from fedllm.federation.strategy import ClientReport, aggregate_train_metrics, mean_train_loss


def _metrics(client: int, examples: int, loss: float) -> MetricRecord:
    return MetricRecord({keys.PARTITION_ID: client, keys.NUM_EXAMPLES: examples, keys.TRAIN_LOSS: loss,
                         keys.TRAIN_SECONDS: 1.0, keys.DP_HISTORY: [0.5, 0.02, 5.0], keys.DELTA: 1e-5})


def test_train_loss_is_weighted_by_examples():
    reports = [ClientReport.from_metrics(_metrics(0, 1, 1.0)), ClientReport.from_metrics(_metrics(1, 3, 4.0))]
    assert mean_train_loss(reports) == (1.0 * 1 + 4.0 * 3) / 4
    assert mean_train_loss([]) is None
    assert reports[1].history == [(0.5, 0.02, 5)]


def test_flower_aggregation_uses_the_same_weighting():
    replies = [RecordDict({keys.METRICS: _metrics(0, 1, 1.0)}), RecordDict({keys.METRICS: _metrics(1, 3, 4.0)})]
    aggregated = aggregate_train_metrics(replies, keys.NUM_EXAMPLES)
    assert aggregated[keys.TRAIN_LOSS] == 3.25 and aggregated[keys.NUM_EXAMPLES] == 4
