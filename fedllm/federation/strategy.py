"""The aggregation strategy (Flower's, over adapter arrays) and the client reports it reads."""

from __future__ import annotations

from dataclasses import dataclass

from flwr.app import MetricRecord, RecordDict
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideFixedClipping,
    FedAvg,
    FedMedian,
    FedTrimmedAvg,
    Strategy,
)

from fedllm.federation import records as keys
from fedllm.privacy.accounting import History


@dataclass(frozen=True)
class ClientReport:
    """What one client said about its round (metrics only; adapters go to the strategy)."""

    partition_id: int
    num_examples: int
    train_loss: float
    train_seconds: float
    history: History
    delta: float | None
    cap: float | None = None
    can_continue: bool = True
    replayed: bool = False

    @classmethod
    def from_metrics(cls, metrics: MetricRecord) -> ClientReport:
        """Parse a client's MetricRecord (keys from :mod:`fedllm.federation.records`)."""
        optional = {key: metrics.get(key) for key in (keys.DELTA, keys.EPSILON_CAP)}
        return cls(partition_id=int(metrics[keys.PARTITION_ID]), num_examples=int(metrics[keys.NUM_EXAMPLES]),
                   train_loss=float(metrics.get(keys.TRAIN_LOSS, float("nan"))),
                   train_seconds=float(metrics.get(keys.TRAIN_SECONDS, 0.0)), history=parse_history(metrics),
                   delta=None if optional[keys.DELTA] is None else float(optional[keys.DELTA]),
                   cap=None if optional[keys.EPSILON_CAP] is None else float(optional[keys.EPSILON_CAP]),
                   can_continue=bool(metrics.get(keys.CAN_CONTINUE, 1)),
                   replayed=bool(metrics.get(keys.REPLAYED, 0)))


def parse_history(metrics: MetricRecord) -> History:
    """The flat ``dp-history`` list as ``(noise, rate, steps)`` entries (empty without DP)."""
    flat = [float(v) for v in metrics.get(keys.DP_HISTORY, [])]
    return [(flat[i], flat[i + 1], int(flat[i + 2])) for i in range(0, len(flat) - 2, 3)]


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


def adapter_strategy(*, aggregation: str, trim_fraction: float, fraction_train: float, min_train_nodes: int,
                     min_available_nodes: int, weighted_by_key: str) -> FedAvg:
    """Flower's FedAvg, FedTrimmedAvg or FedMedian over adapter arrays with our wire keys.

    Evaluation is centralised on the server's held-out split, so no evaluate messages are sent.
    """
    common = dict(fraction_train=fraction_train, fraction_evaluate=0.0, min_train_nodes=min_train_nodes,
                  min_evaluate_nodes=0, min_available_nodes=min_available_nodes, weighted_by_key=weighted_by_key,
                  arrayrecord_key=keys.ARRAYS, configrecord_key=keys.CONFIG,
                  train_metrics_aggr_fn=aggregate_train_metrics)
    if aggregation == "trimmed_mean":
        return FedTrimmedAvg(beta=trim_fraction, **common)
    if aggregation == "median":
        return FedMedian(**common)
    return FedAvg(**common)


def build_strategy(*, aggregation: str, trim_fraction: float, fraction_train: float, num_clients: int,
                   client_level: bool, client_clipping: str, client_noise_multiplier: float,
                   client_clip_norm: float) -> Strategy:
    """The run's strategy; with client-level DP, wrapped in Flower's fixed-clipping DP strategy.

    Client-level DP clips each client's whole update (on the server, or on the node with
    Flower's ``fixedclipping_mod``) and adds Gaussian noise to the uniform mean.
    """
    sampled = max(1, round(fraction_train * num_clients))
    inner = adapter_strategy(aggregation=aggregation, trim_fraction=trim_fraction, fraction_train=fraction_train,
                             min_train_nodes=sampled, min_available_nodes=num_clients,
                             weighted_by_key=keys.UNIT_WEIGHT if client_level else keys.NUM_EXAMPLES)
    if not client_level:
        return inner
    wrapper = (DifferentialPrivacyServerSideFixedClipping if client_clipping == "server"
               else DifferentialPrivacyClientSideFixedClipping)
    return wrapper(inner, noise_multiplier=client_noise_multiplier, clipping_norm=client_clip_norm,
                   num_sampled_clients=sampled)
