"""One node must not steer or sink the aggregate under the defaults (issue 25, item 4), nor cost
the server unbounded accounting work (item 2), nor lock an honest node out or make the server
under-report what a node spent (item 8). Driven with hand-built replies through the real round
loop, as Flower's engine would deliver them (no engine, no Ray)."""

from __future__ import annotations

import math
import resource
import time

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from fedllm.config import FederationConfig
from fedllm.errors import ConfigError
from fedllm.federation import records as keys
from fedllm.federation.rounds import (
    LoopSettings,
    fedavg_weights,
    play_round,
    record_refusals,
    record_updates,
    sort_replies,
)
from fedllm.federation.strategy import build_strategy
from fedllm.node.policy import BUDGET
from fedllm.node.release import PublicStats, Refusal, TrainReport
from fedllm.privacy.ledger import PrivacyLedger
from tests.flower_fakes import FakeGrid, act_as_server_process, arrays_record
from tests.unit.test_rounds import RATE, SENT, _message, _policy, _update

HONEST_NORM = 1.0


def _ledger() -> PrivacyLedger:
    return PrivacyLedger(accountant="rdp", delta=1e-5, target_epsilon=8.0)


def _direction(seed: int) -> dict[str, np.ndarray]:
    """A random unit-norm update of the shape the server sent."""
    rng = np.random.default_rng(seed)
    raw = {name: rng.standard_normal(value.shape) for name, value in SENT.items()}
    norm = math.sqrt(sum(float(np.square(v).sum()) for v in raw.values()))
    return {name: v / norm for name, v in raw.items()}


def _arrays(update: dict[str, np.ndarray], scale: float) -> ArrayRecord:
    return arrays_record({name: (SENT[name] + scale * v).astype(np.float32) for name, v in update.items()})


def _flat(arrays) -> np.ndarray:
    return np.concatenate([np.asarray(arrays[name].numpy(), dtype=np.float64).ravel() for name in SENT])


class _Grid(FakeGrid):
    """Nodes 0..n-1 connected; each answers with the reply ``replies[node]`` builds."""

    def __init__(self, replies: dict):
        super().__init__(sorted(replies))
        self.replies = replies

    def send_and_receive(self, messages, *, timeout=None):
        return [self.replies[m.metadata.dst_node_id]() for m in messages]


def _strategy(num_clients: int):
    return build_strategy(
        aggregation="fedavg",
        trim_fraction=0.2,
        fraction_train=1.0,
        num_clients=num_clients,
        client_level=False,
        client_clipping="server",
        client_noise_multiplier=1.0,
        client_clip_norm=1.0,
        noise="seeded",
        node_wait=0.01,
    )


def _play(replies: dict, *, min_updates: int, ledger: PrivacyLedger | None = None, **policy):
    n = len(replies)
    settings = LoopSettings(
        num_rounds=2,
        num_clients=n,
        min_train_clients=1,
        timeout=1.0,
        train_config=ConfigRecord({}),
        policy=_policy(num_clients=n, **policy),
        min_updates=min_updates,
    )
    return play_round(_Grid(replies), _strategy(n), ledger or _ledger(), settings, arrays_record(SENT), 1, {})


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


@pytest.mark.parametrize("sizes", [None, (150, 150, 160)])
def test_an_update_nine_times_the_honest_norm_does_not_point_the_aggregate_its_way(monkeypatch, sizes):
    """3 clients, FedAvg: before, the 9x update passed the 10x-median filter and the aggregate's
    cosine with the attacker's direction was +0.987; now it moves the average no more than a peer."""
    act_as_server_process(monkeypatch)
    common = _direction(0)  # the honest nodes learn the same task: their updates agree in part
    honest = [{k: (common[k] + _direction(s)[k]) / math.sqrt(2) for k in SENT} for s in (1, 2)]
    attack = _direction(3)
    size = (lambda i: None) if sizes is None else sizes.__getitem__  # the attacker claims the most rate 1/10 allows
    replies = {
        0: lambda: _update(0, arrays=_arrays(honest[0], HONEST_NORM), size=size(0)),
        1: lambda: _update(1, arrays=_arrays(honest[1], HONEST_NORM), size=size(1)),
        2: lambda: _update(2, arrays=_arrays(attack, 9 * HONEST_NORM), size=size(2)),
    }
    result = _play(replies, min_updates=3)
    assert len(result.replies.updates) == 3 and not result.replies.rejected  # accepted, but bounded
    moved = _flat(result.arrays) - _flat(arrays_record(SENT))
    attacker = np.concatenate([attack[k].ravel() for k in SENT])
    assert _cosine(moved, attacker) < 0.6
    honest_mean = np.mean([np.concatenate([h[k].ravel() for k in SENT]) for h in honest], axis=0) * HONEST_NORM
    assert _cosine(moved, honest_mean) > 0.6
    # the attacker's pull on the average is about the others' (a third of a norm-1 update), not 3
    assert abs(float(moved @ attacker)) < 0.4 * HONEST_NORM


def test_a_nodes_claimed_size_never_counts_toward_its_own_weight_cap():
    def share(sizes: list[int]) -> float:
        reports = [TrainReport(i, None, PublicStats(num_examples=n)) for i, n in enumerate(sizes)]
        weights = fedavg_weights(reports, False)
        return weights[-1] / sum(weights)

    # 2 clients: the attacker's claim was half the median, so its own cap: weight share 1.0
    assert share([150, 10**9]) == pytest.approx(10 / 11)
    # 3 clients: the cap is 10x the median of the others' claims, not of a median the claim is part of
    assert fedavg_weights(
        [TrainReport(i, None, PublicStats(num_examples=n)) for i, n in enumerate([100, 1000, 10**9])], False
    ) == [100.0, 1000.0, 5500.0]


def test_fewer_than_three_updates_a_round_are_refused_at_config_validation_unless_opted_in():
    with pytest.raises(ConfigError, match="federation.min_updates"):
        FederationConfig(num_clients=2)
    with pytest.raises(ConfigError, match="federation.min_updates=2"):
        FederationConfig(num_clients=10, fraction_train=0.2)  # 2 sampled per round
    assert FederationConfig(num_clients=2, min_updates=2).min_updates == 2  # the researcher's opt-in
    assert FederationConfig().min_updates == 3 and FederationConfig().num_clients == 10


def test_a_round_with_fewer_accepted_updates_than_min_updates_leaves_the_adapter_unchanged(monkeypatch):
    act_as_server_process(monkeypatch)
    replies = {0: lambda: _update(0, value=0.1), 1: lambda: _update(1, value=0.2)}
    result = _play(replies, min_updates=3)
    assert np.array_equal(_flat(result.arrays), _flat(arrays_record(SENT)))
    assert result.replies.updates == [] and "fewer than federation.min_updates=3" in result.replies.failures[0]
    # opted in: aggregated, the larger update clipped to the norm of the other
    assert np.allclose(_flat(_play(replies, min_updates=2).arrays), 0.1)


def test_a_3e38_update_with_two_clients_cannot_make_the_global_adapter_nan(monkeypatch):
    """2 clients, opted in: no median filter exists; before, 3e38 values (finite) overflowed the
    sum and round 2 was NaN everywhere."""
    act_as_server_process(monkeypatch)
    huge = arrays_record({k: np.full_like(v, 3e38) for k, v in SENT.items()})
    replies = {0: lambda: _update(0, value=0.01), 1: lambda: _update(1, arrays=huge)}
    result = _play(replies, min_updates=2)
    assert np.isfinite(_flat(result.arrays)).all()
    assert np.abs(_flat(result.arrays)).max() <= 0.01 + 1e-6  # clipped to the honest node's norm


def test_a_non_finite_aggregate_fails_the_round_not_the_run(monkeypatch, caplog):
    act_as_server_process(monkeypatch)

    class Overflowing:
        def configure_train(self, server_round, arrays, config, grid):
            return _strategy(3).configure_train(server_round, arrays, config, grid)

        def aggregate_train(self, server_round, replies):
            return arrays_record({k: np.full_like(v, np.inf) for k, v in SENT.items()}), None

    replies = {n: (lambda n=n: _update(n, value=0.1)) for n in range(3)}
    settings = LoopSettings(
        num_rounds=2,
        num_clients=3,
        min_train_clients=1,
        timeout=1.0,
        train_config=ConfigRecord({}),
        policy=_policy(num_clients=3),
        min_updates=3,
    )
    ledger = _ledger()
    result = play_round(_Grid(replies), Overflowing(), ledger, settings, arrays_record(SENT), 1, {})
    assert np.array_equal(_flat(result.arrays), _flat(arrays_record(SENT)))  # unchanged
    assert result.replies.updates == [] and "failed or was not finite" in result.replies.failures[-1]
    assert "NaN or infinite" in caplog.text
    assert sorted(ledger.clients) == [0, 1, 2]  # the nodes trained: their spending is recorded


def test_a_refusal_with_a_huge_dp_history_is_rejected_at_once_and_the_round_goes_on(monkeypatch):
    """Before: 100 entries of 10^7-step mechanisms sent the PRV accountant past 6 GiB in 63 s."""
    act_as_server_process(monkeypatch)
    flood = [(1.0 + i / 1000, 0.01, 10**7) for i in range(100)]
    refusal = Refusal(0, BUDGET, cap=1.0, spent=0.9, delta=1e-5, history=flood)
    content = RecordDict(
        {keys.METRICS: MetricRecord(refusal.to_metrics()), keys.STATUS: ConfigRecord({keys.CATEGORY: BUDGET})}
    )
    ledger = PrivacyLedger(accountant="prv", delta=1e-5, target_epsilon=8.0)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.perf_counter()
    result = sort_replies([_message(0, content), _update(1), _update(2)], ledger, 1, arrays_record(SENT), _policy(), {})
    assert time.perf_counter() - started < 5
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 200 * 1024  # KiB: no accountant ran
    assert result.refusals == [] and "dp-history" in result.rejected[0] and len(result.updates) == 2


@pytest.mark.parametrize(
    "history, problem",
    [
        ([(1.0, RATE, 5)] * 9, "more than 8"),  # longer than a node's lifetime of mechanisms
        ([(1.0, 0.3, 5)], "not 1/k"),
        ([(1.0, RATE, 10**4), (1.0, RATE, 5)], "steps in all"),  # more than 8 runs of this run's length
    ],
)
def test_every_entry_of_a_train_replys_history_is_bounded_not_only_its_last(monkeypatch, history, problem):
    act_as_server_process(monkeypatch)
    result = sort_replies([_update(0, history=history), _update(1)], _ledger(), 1, arrays_record(SENT), _policy(), {})
    assert [r.split(":")[0] for r in result.rejected] == ["node 0"] and problem in result.rejected[0]


def test_an_honest_history_with_an_earlier_run_is_still_accepted(monkeypatch):
    act_as_server_process(monkeypatch)
    earlier = (2.0, 1 / 12, 10)  # another run, another plan, before this one
    result = sort_replies(
        [_update(0, history=(earlier, (1.0, RATE, 5))), _update(1)], _ledger(), 1, arrays_record(SENT), _policy(), {}
    )
    assert not result.rejected and len(result.updates) == 2


def test_a_rejected_impersonation_does_not_lock_the_real_node_out_next_round(monkeypatch):
    """Simulation (no node_ids): node 9 claims client 1 and is rejected, since client 1 already
    replied; before, the server still remembered the claim, and next round rejected the real one."""
    act_as_server_process(monkeypatch)
    remembered: dict[int, int] = {}

    def impostor():
        reply = _update(9)
        reply.content[keys.METRICS][keys.PARTITION_ID] = 1
        return reply

    def round_of(replies, server_round):
        return sort_replies(replies, _ledger(), server_round, arrays_record(SENT), _policy(), remembered)

    first = round_of([_update(1), impostor(), _update(2)], 1)
    assert [r.split(":")[0] for r in first.rejected] == ["node 9"]
    second = round_of([impostor(), _update(1), _update(2)], 2)  # the impostor is first this time
    assert [r.split(":")[0] for r in second.rejected] == ["node 9"]
    assert sorted(r.partition_id for r in second.reports) == [1, 2]
    assert remembered == {1: 1, 2: 2}


def test_a_train_reply_rejected_after_the_node_trained_is_still_charged_in_the_server_ledger(monkeypatch):
    """Before, a reply rejected for its tensors never reached the server ledger: summary.json
    reported less than the node's own ledger (6.81 against 7.999)."""
    act_as_server_process(monkeypatch)
    nan = arrays_record({k: np.full_like(v, np.nan) for k, v in SENT.items()})
    ledger = _ledger()
    result = sort_replies(
        [_update(0, arrays=nan), _update(1), _update(2)], ledger, 1, arrays_record(SENT), _policy(), {}
    )
    assert "NaN" in result.rejected[0] and [r.partition_id for r, _ in result.rejected_spending] == [0]
    record_updates(ledger, result.reports, 1, result.rejected_spending)
    assert ledger.epsilon(0) == ledger.epsilon(1) > 0  # the same mechanism spent the same epsilon
    report = ledger.to_report()["clients"]["0"]
    assert report["rejected"] == [{"round": 1, "reason": result.rejected_spending[0][1]}] and "NaN" in str(report)
    # a history that fails the mechanism check is not charged (it proves nothing was spent)
    forged = _update(0, arrays=nan, history=((50.0, RATE, 5),))
    assert sort_replies([forged], _ledger(), 1, arrays_record(SENT), _policy(), {}).rejected_spending == []


def test_refusals_are_still_recorded_with_their_history(monkeypatch):
    act_as_server_process(monkeypatch)
    refusal = Refusal(0, BUDGET, cap=1.0, spent=0.9, delta=1e-5, history=[(1.0, RATE, 5)])
    content = RecordDict(
        {keys.METRICS: MetricRecord(refusal.to_metrics()), keys.STATUS: ConfigRecord({keys.CATEGORY: BUDGET})}
    )
    ledger = _ledger()
    result = sort_replies([_message(0, content)], ledger, 1, arrays_record(SENT), _policy(), {})
    record_refusals(ledger, result.refusals, 1)
    assert ledger.epsilon(0) > 0 and ledger.clients[0].refusals[0]["round"] == 1


def test_a_rejected_reply_for_a_client_neither_blocks_nor_overwrites_that_clients_accepted_one(monkeypatch):
    act_as_server_process(monkeypatch)
    nan = arrays_record({k: np.full_like(v, np.nan) for k, v in SENT.items()})
    impostor = _update(9, arrays=nan, history=((1.0, RATE, 5),))
    impostor.content[keys.METRICS][keys.PARTITION_ID] = 1  # first in, rejected for its tensors
    result = sort_replies([impostor, _update(1), _update(2)], _ledger(), 1, arrays_record(SENT), _policy(), {})
    assert [r.split(":")[0] for r in result.rejected] == ["node 9"]
    assert sorted(r.partition_id for r in result.reports) == [1, 2] and result.rejected_spending == []
