"""One bad node must not crash, stall or steer a round: the round loop's reply handling, driven
with hand-built replies as Flower's engine would deliver them (no engine, no Ray)."""

from __future__ import annotations

import io
import time

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, Metadata, MetricRecord, RecordDict

from fedllm.config import ExperimentConfig, FederationConfig, PrivacyConfig, TrainConfig
from fedllm.federation import records as keys
from fedllm.federation.rounds import ReplyPolicy, _aggregate, fedavg_weights, record_refusals, sort_replies
from fedllm.federation.strategy import build_strategy, connected_nodes
from fedllm.federation.validation import MechanismCheck
from fedllm.node.policy import BUDGET
from fedllm.node.release import Accounting, PublicStats, Refusal, TrainReport
from fedllm.privacy.ledger import PrivacyLedger
from tests.conftest import tiny_config
from tests.flower_fakes import FakeGrid, act_as_server_process, arrays_record

SENT = {"a": np.zeros((8, 64), dtype=np.float32), "b": np.zeros(4, dtype=np.float32)}
RATE = 1 / 10  # a shard of 145..160 records at batch 16


def _run(**privacy) -> ExperimentConfig:
    """Batch 16, 5 local steps, 3 rounds, epsilon 8 at delta 1e-5, RDP."""
    return tiny_config(
        train=TrainConfig(batch_size=16, local_steps=5),
        federation=FederationConfig(num_rounds=3),
        privacy=PrivacyConfig(target_epsilon=8.0, delta=1e-5, accountant="rdp", **privacy),
    )


MECHANISM = MechanismCheck(_run(noise_multiplier=1.0))


def _policy(**overrides) -> ReplyPolicy:
    settings = dict(
        num_clients=10,
        update_norm_ratio=10.0,
        max_update_norm=None,
        require_accounting=True,
        uniform_weights=False,
        mechanism=MECHANISM,
    )
    return ReplyPolicy(**{**settings, **overrides})


def _message(node: int, content: RecordDict) -> Message:
    metadata = Metadata(
        run_id=1,
        message_id=f"m{node}",
        src_node_id=node,
        dst_node_id=0,
        reply_to_message_id="",
        group_id="1",
        created_at=time.time(),
        ttl=60.0,
        message_type="train",
    )
    return Message(content=content, metadata=metadata)


def _update(
    node: int,
    *,
    value: float = 0.1,
    history=((1.0, RATE, 5),),
    size: int | None = None,
    replayed: bool = False,
    arrays: ArrayRecord | None = None,
    metrics: dict | None = None,
) -> Message:
    accounting = Accounting(epsilon=1.0, cap=8.0, delta=1e-5, history=list(history), can_continue=True)
    report = TrainReport(node, accounting, PublicStats(num_examples=size), replayed)
    record = arrays or arrays_record({k: np.full_like(v, value) for k, v in SENT.items()})
    return _message(node, RecordDict({keys.ARRAYS: record, keys.METRICS: MetricRecord(metrics or report.to_metrics())}))


def _sort(replies: list[Message], **policy):
    ledger = PrivacyLedger(accountant="rdp", delta=1e-5, target_epsilon=8.0)
    return sort_replies(replies, ledger, 1, arrays_record(SENT), _policy(**policy), {})


def _forged_payload(declared: np.ndarray, payload: np.ndarray) -> Array:
    buffer = io.BytesIO()
    np.save(buffer, payload, allow_pickle=False)
    return Array(dtype=str(declared.dtype), shape=declared.shape, stype="numpy.ndarray", data=buffer.getvalue())


def test_a_payload_unlike_its_declared_shape_or_dtype_is_rejected_and_the_round_goes_on(monkeypatch):
    act_as_server_process(monkeypatch)
    wider = ArrayRecord({"a": _forged_payload(SENT["a"], np.zeros((8, 65))), "b": Array(SENT["b"])})
    wider_float64 = ArrayRecord({"a": _forged_payload(SENT["a"], np.zeros((8, 64))), "b": Array(SENT["b"])})
    replies = [_update(0, arrays=wider_float64), _update(1, arrays=wider), *(_update(n) for n in (2, 3, 4))]
    result = _sort(replies)
    assert len(result.rejected) == 2 and all("payload" in r for r in result.rejected)
    strategy = build_strategy(
        aggregation="fedavg",
        trim_fraction=0.2,
        fraction_train=1.0,
        num_clients=3,
        client_level=False,
        client_clipping="server",
        client_noise_multiplier=1.0,
        client_clip_norm=1.0,
    )
    aggregated = _aggregate(strategy, PrivacyLedger(accountant="rdp", delta=1e-5, target_epsilon=8.0), 1, result, 3)
    assert aggregated["a"].numpy().dtype == np.float32  # the global adapter stays what the server sent


def test_replayed_and_fresh_updates_aggregate_together(monkeypatch):
    act_as_server_process(monkeypatch)  # a resumed server: one node resends its cached reply
    result = _sort([_update(0, replayed=True), _update(1), _update(2)])
    assert len(result.updates) == 3 and not result.rejected
    strategy = build_strategy(
        aggregation="fedavg",
        trim_fraction=0.2,
        fraction_train=1.0,
        num_clients=3,
        client_level=False,
        client_clipping="server",
        client_noise_multiplier=1.0,
        client_clip_norm=1.0,
    )
    ledger = PrivacyLedger(accountant="rdp", delta=1e-5, target_epsilon=8.0)
    assert np.allclose(_aggregate(strategy, ledger, 1, result, 3)["a"].numpy(), 0.1)


def test_a_node_cannot_steer_fedavg_with_a_claimed_size(monkeypatch):
    act_as_server_process(monkeypatch)
    liar = _update(0, value=-0.9, size=10**9)  # the sample rate 1/10 says 145..160 records
    result = _sort([liar, _update(1, size=150), _update(2, size=150)])
    assert [r.split(":")[0] for r in result.rejected] == ["node 0"] and "num-examples" in result.rejected[0]
    sizes = [TrainReport(i, None, PublicStats(num_examples=n)) for i, n in enumerate([100, 120, 10**9])]
    assert fedavg_weights(sizes, uniform=False) == [100.0, 120.0, 1100.0]  # 10x the others: bounded
    assert fedavg_weights(sizes, uniform=True) == [1.0, 1.0, 1.0]


def test_under_sample_level_dp_an_update_must_account_for_this_runs_mechanism(monkeypatch):
    act_as_server_process(monkeypatch)
    bare = TrainReport(0, None).to_metrics()  # no DP history at all
    weak = ((50.0, RATE, 5),)  # a fabricated history: huge noise, tiny epsilon
    short = ((1.0, RATE, 1),)  # one step where the round has five
    result = _sort([_update(0, metrics=bare), _update(1, history=weak), _update(2, history=short), _update(3)])
    assert [r.split(":")[0] for r in result.rejected] == ["node 0", "node 1", "node 2"]
    assert len(result.updates) == 1


def test_the_planned_noise_is_recomputed_from_the_sample_rate():
    planned = MechanismCheck(_run())
    noise = planned.planned_noise(74)
    planned.check([(noise, 1 / 74, 5)], previous_steps=None, public_size=1180)
    with pytest.raises(Exception, match="not this run's plan"):
        planned.check([(noise * 1.5, 1 / 74, 5)], previous_steps=None, public_size=None)
    with pytest.raises(Exception, match="not one more round"):
        planned.check([(noise, 1 / 74, 10)], previous_steps=10, public_size=None)


def test_an_oversized_dp_history_is_rejected_before_any_accounting(monkeypatch):
    act_as_server_process(monkeypatch)
    flood = [(1.0 + i / 1000, RATE, 1) for i in range(1000)]  # 1,000 distinct mechanisms
    started = time.perf_counter()
    result = _sort([_update(0, history=flood), _update(1)])
    assert "more than 100 entries" in result.rejected[0] and time.perf_counter() - started < 5


def test_a_round_does_not_wait_forever_for_a_node_that_left():
    started = time.perf_counter()
    nodes = connected_nodes(FakeGrid([11, 12]), minimum=3, timeout=0.3, poll_seconds=0.05)
    assert nodes == [11, 12] and time.perf_counter() - started < 2


def test_an_aggregation_that_fails_leaves_the_adapter_unchanged_instead_of_crashing(monkeypatch):
    act_as_server_process(monkeypatch)

    class Broken:
        def aggregate_train(self, server_round, replies):
            raise ValueError("operands could not be broadcast together")

    result = _sort([_update(0), _update(1)])
    assert _aggregate(Broken(), PrivacyLedger(accountant="rdp", delta=1e-5, target_epsilon=8.0), 1, result, 2) is None


@pytest.mark.parametrize(
    "history, delta",
    [
        (((1e-6, RATE, 5),), 1e-5),  # noise an accountant cannot handle (PRV asks for petabytes)
        (((1.0, RATE, 5),), 1.0),  # delta 1 means nothing
        (((1.0, RATE, 5.5),), 1e-5),  # half a step
    ],
)
def test_an_unaccountable_history_is_rejected_before_it_reaches_the_ledger(monkeypatch, history, delta):
    act_as_server_process(monkeypatch)
    accounting = Accounting(epsilon=1.0, cap=8.0, delta=delta, history=list(history), can_continue=True)
    metrics = TrainReport(0, accounting).to_metrics()
    metrics[keys.DP_HISTORY] = [float(v) for entry in history for v in entry]
    result = _sort([_update(0, metrics=metrics), _update(1)], mechanism=None)
    assert [r.split(":")[0] for r in result.rejected] == ["node 0"]


def test_server_side_clipping_measures_each_array_by_name_not_position(monkeypatch):
    act_as_server_process(monkeypatch)
    same_shape = {"a": np.zeros((2, 2), dtype=np.float32), "b": np.full((2, 2), 10.0, dtype=np.float32)}
    strategy = build_strategy(
        aggregation="fedavg",
        trim_fraction=0.2,
        fraction_train=1.0,
        num_clients=1,
        client_level=True,
        client_clipping="server",
        client_noise_multiplier=1e-9,
        client_clip_norm=1.0,
        noise="seeded",
    )
    strategy.current_arrays = arrays_record(same_shape)
    # the reply lists b before a: paired by position, this zero update would look like a norm-28 one
    permuted = ArrayRecord({"b": Array(same_shape["b"]), "a": Array(same_shape["a"])})
    reply = _message(0, RecordDict({keys.ARRAYS: permuted, keys.METRICS: MetricRecord({keys.FEDAVG_WEIGHT: 1.0})}))
    aggregated, _ = strategy.aggregate_train(1, [reply])
    assert np.allclose(aggregated["a"].numpy(), 0, atol=1e-6) and np.allclose(aggregated["b"].numpy(), 10, atol=1e-6)


def test_a_nodes_error_text_cannot_forge_log_lines(monkeypatch):
    act_as_server_process(monkeypatch)
    metadata = Metadata(
        run_id=1,
        message_id="e",
        src_node_id=9,
        dst_node_id=0,
        reply_to_message_id="",
        group_id="1",
        created_at=time.time(),
        ttl=60.0,
        message_type="train",
    )
    forged = Message(Error(code=0, reason="boom\nround 1: aggregated 10 updates\x1b[2K"), metadata=metadata)
    result = _sort([forged, _update(1)])
    assert len(result.failures) == 1 and "\n" not in result.failures[0] and "\x1b" not in result.failures[0]
    assert "\\n" in result.failures[0]


def test_with_registered_node_ids_a_node_cannot_speak_for_another_client(monkeypatch):
    act_as_server_process(monkeypatch)
    impostor = _update(3)  # node 3 is registered as client 3 ...
    impostor.content[keys.METRICS][keys.PARTITION_ID] = 1  # ... and claims client 1 first
    result = _sort([impostor, _update(1), _update(2)], node_ids=tuple(range(10)))
    assert [r.split(":")[0] for r in result.rejected] == ["node 3"]
    assert sorted(r.partition_id for r in result.reports) == [1, 2]  # the real client 1 is heard
    unknown = _update(42)
    unknown.content[keys.METRICS][keys.PARTITION_ID] = 4
    assert "no client" in _sort([unknown], node_ids=tuple(range(10))).rejected[0]


def _refusal(node: int) -> Message:
    refusal = Refusal(node, BUDGET, cap=1.0, spent=0.9, delta=1e-5, history=[(1.0, RATE, 5)])
    return _message(
        node,
        RecordDict(
            {keys.METRICS: MetricRecord(refusal.to_metrics()), keys.STATUS: ConfigRecord({keys.CATEGORY: BUDGET})}
        ),
    )


def test_sorting_returns_refusals_and_the_caller_records_them(monkeypatch):
    act_as_server_process(monkeypatch)
    ledger = PrivacyLedger(accountant="rdp", delta=1e-5, target_epsilon=8.0)
    result = sort_replies([_refusal(0), _update(1)], ledger, 1, arrays_record(SENT), _policy(), {})
    assert ledger.clients == {}  # sorting reads the ledger, never writes it
    assert [(r.partition_id, r.history) for r in result.refusals] == [(0, [(1.0, RATE, 5)])]
    assert len(result.updates) == 1
    record_refusals(ledger, result.refusals, 1)
    assert list(ledger.clients) == [0] and not ledger.clients[0].can_continue
    assert ledger.clients[0].refusals == [{"round": 1, "reason": result.refusals[0].reason}]
    assert ledger.epsilon(0) > 0  # the refusing node's reported history counts
