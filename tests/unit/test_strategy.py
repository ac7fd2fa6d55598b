"""The server's strategies: Flower's aggregation over adapter arrays, weighted by the weight the
server sets, and client-level DP clipping; against hand-computed values."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import ConfigRecord
from flwr.serverapp.strategy import FedAvg, FedMedian, FedTrimmedAvg
from flwr.serverapp.strategy.dp_fixed_clipping import DifferentialPrivacyFixedClippingBase

from fedllm.federation.strategy import (
    AdapterFedAvg,
    AdapterFedMedian,
    AdapterFedTrimmedAvg,
    ClientSideClipping,
    ServerSideClipping,
    build_strategy,
)
from tests.flower_fakes import FakeGrid, act_as_server_process, arrays_record, train_reply

NODES = [11, 12, 13, 14, 15]


@pytest.fixture(autouse=True)
def _server_process(monkeypatch):
    act_as_server_process(monkeypatch)


def _strategy(
    aggregation: str = "fedavg",
    *,
    client_level: bool = False,
    client_clipping: str = "server",
    fraction_train: float = 1.0,
    noise_multiplier: float = 0.0,
    clip_norm: float = 1.0,
):
    return build_strategy(
        aggregation=aggregation,
        trim_fraction=0.2,
        fraction_train=fraction_train,
        num_clients=len(NODES),
        client_level=client_level,
        client_clipping=client_clipping,
        client_noise_multiplier=noise_multiplier,
        client_clip_norm=clip_norm,
    )


def _round(strategy, start: np.ndarray, updates: list[np.ndarray], weights: list[float] | None = None) -> np.ndarray:
    """Configure round 1 from ``start``, answer with ``updates`` and return the aggregate."""
    sent = list(strategy.configure_train(1, arrays_record({"w": start}), ConfigRecord(), FakeGrid(NODES)))
    weights = weights or [1.0] * len(updates)
    replies = [
        train_reply(m.metadata.dst_node_id, {"w": u}, 1, w) for m, u, w in zip(sent, updates, weights, strict=True)
    ]
    aggregated, _ = strategy.aggregate_train(1, replies)
    return aggregated["w"].numpy()


@pytest.mark.parametrize(
    ("aggregation", "ours", "flowers"),
    [
        ("fedavg", AdapterFedAvg, FedAvg),
        ("trimmed_mean", AdapterFedTrimmedAvg, FedTrimmedAvg),
        ("median", AdapterFedMedian, FedMedian),
    ],
)
def test_each_aggregation_is_flowers_with_our_sampling(aggregation, ours, flowers):
    strategy = _strategy(aggregation)
    assert type(strategy) is ours and isinstance(strategy, flowers)
    assert strategy.fraction_evaluate == 0.0  # evaluation is centralised on the server


def test_fedavg_weights_updates_by_the_weight_the_server_set():
    values = [np.full(2, v, dtype=np.float32) for v in (1.0, 2.0, 3.0, 4.0, 10.0)]
    result = _round(_strategy(), np.zeros(2, dtype=np.float32), values, weights=[1.0, 1.0, 1.0, 1.0, 6.0])
    np.testing.assert_allclose(result, [(1 + 2 + 3 + 4 + 60) / 10] * 2, rtol=1e-6)


@pytest.mark.parametrize(("aggregation", "expected"), [("trimmed_mean", 3.0), ("median", 3.0)])
def test_robust_aggregations_ignore_one_extreme_update(aggregation, expected):
    values = [np.full(2, v, dtype=np.float32) for v in (1.0, 2.0, 3.0, 4.0, 1000.0)]
    result = _round(_strategy(aggregation), np.zeros(2, dtype=np.float32), values)
    np.testing.assert_allclose(result, [expected] * 2, rtol=1e-6)


@pytest.mark.parametrize(("clipping", "wrapper"), [("server", ServerSideClipping), ("client", ClientSideClipping)])
def test_client_level_dp_wraps_the_strategy_for_the_clients_sampled(clipping, wrapper):
    strategy = _strategy(client_level=True, client_clipping=clipping, fraction_train=0.4, noise_multiplier=1.0)
    assert type(strategy) is wrapper and isinstance(strategy, DifferentialPrivacyFixedClippingBase)
    assert type(strategy.strategy) is AdapterFedAvg
    assert strategy.num_sampled_clients == 2 and strategy.strategy.min_train_nodes == 2


def test_server_side_clipping_bounds_each_update_and_survives_an_unchanged_adapter():
    # z = 0 isolates the clip: one update of norm 10 (clipped to C = 1), one node that sends the
    # global adapter back unchanged (norm 0: Flower's own clip divides by it and ends the run)
    strategy = _strategy(client_level=True, fraction_train=0.4, noise_multiplier=0.0, clip_norm=1.0)
    start = np.ones(4, dtype=np.float32)
    result = _round(strategy, start, [start + np.array([6, 8, 0, 0], dtype=np.float32), start])
    np.testing.assert_allclose(result, [1.3, 1.4, 1.0, 1.0], rtol=1e-6)  # mean of (0.6, 0.8, 0, 0) and 0


def test_updates_within_the_clip_norm_are_unchanged():
    strategy = _strategy(client_level=True, fraction_train=0.4, noise_multiplier=0.0, clip_norm=1.0)
    start = np.zeros(2, dtype=np.float32)
    result = _round(strategy, start, [np.array([0.3, 0.4], dtype=np.float32), np.array([0.0, 0.2], dtype=np.float32)])
    np.testing.assert_allclose(result, [0.15, 0.3], rtol=1e-6)


def test_client_side_clipping_asks_nodes_to_clip_and_trusts_them():
    strategy = _strategy(
        client_level=True, client_clipping="client", fraction_train=0.4, noise_multiplier=0.0, clip_norm=1.0
    )
    config = ConfigRecord()
    strategy.configure_train(1, arrays_record({"w": np.zeros(2, dtype=np.float32)}), config, FakeGrid(NODES))
    assert config["clipping_norm"] == 1.0  # read by Flower's fixedclipping_mod on the node


def test_without_client_level_dp_nothing_is_noised():
    update = np.arange(4, dtype=np.float32)
    result = _round(_strategy(fraction_train=0.4), np.zeros(4, dtype=np.float32), [update, update])
    np.testing.assert_allclose(result, update, atol=1e-6)  # FedAvg's float rounding only
