"""The pre-flight before round 1: every node says, from its own policy and ledger, how many of the
planned rounds it can train under its own cap, and the server logs it, validates it and writes it
to summary.json, then runs the rounds as planned. The real ServerApp and ClientApp in one process
(no Ray); the server's side also with hand-built answers (no model), as a hostile node sends them."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import re
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from fedllm import task
from fedllm.cli.node_status import node_status
from fedllm.config import ClientCap, ExperimentConfig, FederationConfig, ModelConfig, PrivacyConfig, TrainConfig
from fedllm.errors import UpdateRejected
from fedllm.federation import records as keys
from fedllm.federation.audit import AUDIT_FILE
from fedllm.federation.client_app import app
from fedllm.federation.inprocess import FIRST_NODE_ID, InProcessGrid, run_inprocess, server_identity
from fedllm.federation.preflight import PREFLIGHT_WAIT_S, preflight_wait, run_preflight
from fedllm.federation.protocol import parse_preflight, parse_reply
from fedllm.federation.server_app import prepare_run, task_record
from fedllm.node import guard
from fedllm.node.policy import policy_from_node_config
from fedllm.node.release import PreflightAnswer, Refusal
from fedllm.planning import plan_for
from fedllm.privacy.accounting import epsilon, extend_history
from fedllm.privacy.node_ledger import LEDGER_FILE, NodeLedger, Release
from fedllm.tracking.run_files import read_summary
from tests.conftest import tiny_config
from tests.node_driver import node_context, query_message

PRIOR = Release(
    run_id="an-earlier-run", server_round=1, noise_multiplier=2.0, sample_rate=0.1, steps=10, fingerprint=""
)  # what client 1's records already went through before this run


def _cfg(tmp_path: Path, **federation) -> ExperimentConfig:
    cfg = tiny_config(
        train=TrainConfig(local_steps=1, eval_batch_size=50),
        federation=FederationConfig(**{"num_clients": 3, "num_rounds": 3, **federation}),
    )
    return dataclasses.replace(
        cfg,
        privacy=dataclasses.replace(cfg.privacy, state_dir=str(tmp_path / "nodes")),
        tracking=dataclasses.replace(cfg.tracking, progress=False),
    )


def _spent_before(cfg: ExperimentConfig, tmp_path: Path, client: int) -> NodeLedger:
    """Client ``client``'s ledger with :data:`PRIOR` in it (its records, an earlier run)."""
    content = task.shard_content(cfg, client)
    release = dataclasses.replace(PRIOR, fingerprint=content.fingerprint)
    ledger = NodeLedger(tmp_path / "nodes" / f"client-{client}", f"simulated-shard-{client}", content)
    with ledger.locked() as book:
        book.record(release)
    return ledger


def _independent_outlook(cfg: ExperimentConfig, history, cap: float) -> tuple[int, float, float]:
    """(rounds affordable, epsilon now, epsilon after them), round by round, straight from the
    accountant: no guard, no bisection."""
    plan = plan_for(cfg, len(task.tokenized_shard(cfg, 1)))
    accountant, delta = cfg.privacy.accountant, cfg.privacy.delta
    now = after = epsilon(history, delta=delta, accountant=accountant)
    for rounds in range(cfg.federation.num_rounds):
        history = extend_history(
            history, noise_multiplier=plan.noise_multiplier, sample_rate=plan.sample_rate, steps=cfg.train.local_steps
        )
        projected = epsilon(history, delta=delta, accountant=accountant)
        if projected > cap:
            return rounds, now, after
        after = projected
    return cfg.federation.num_rounds, now, after


@pytest.mark.slow  # seconds each: kept out of the fast tier (make test runs it)
def test_a_capped_node_is_reported_before_round_1_without_touching_its_ledger(tmp_path, caplog):
    # client 2 refuses every round and client 1 from part-way: down to 1 update a round, knowingly
    cfg = _cfg(tmp_path, min_updates=1)
    cfg = dataclasses.replace(cfg, privacy=dataclasses.replace(cfg.privacy, client_caps=(ClientCap(1, 7.0),)))
    ledger = _spent_before(cfg, tmp_path, 1)
    before = ledger.path.read_bytes()
    expected = _independent_outlook(cfg, ledger.history(), 7.0)
    assert 0 < expected[0] < 3  # the cap binds part-way: the case the operator was blind to
    order: list[str] = []

    def watch(message, reply):
        order.append(message.metadata.message_type)
        if message.metadata.message_type == "query":  # the pre-flight spends nothing, writes nothing
            assert ledger.path.read_bytes() == before

    prepare_run(cfg, tmp_path / "run")
    with caplog.at_level(logging.INFO, logger="fedllm"):
        summary = run_inprocess(
            cfg,
            tmp_path / "run",
            observer=watch,
            extra_node_config=lambda p: {"allowed-models": "embedded"} if p == 2 else {},
        )
    assert order[:3] == ["query"] * 3 and set(order[3:]) == {"train"}  # every node asked, before round 1
    preflight = read_summary(tmp_path / "run").preflight
    assert preflight is not None and preflight == summary.preflight
    nodes = {n["client"]: n for n in preflight["nodes"]}
    affordable, now, after = expected
    assert nodes[1]["rounds_affordable"] == affordable and nodes[1]["rounds_planned"] == 3
    assert math.isclose(nodes[1]["epsilon_spent"], now, rel_tol=1e-9) and now > 0
    assert math.isclose(nodes[1]["epsilon_after"], after, rel_tol=1e-9) and after <= 7.0
    assert (nodes[1]["cap"], nodes[1]["delta"]) == (7.0, cfg.privacy.delta)
    assert nodes[0]["rounds_affordable"] == 3 and nodes[0]["epsilon_spent"] == 0 and nodes[0]["epsilon_after"] <= 8
    assert preflight["short"] == [1] and preflight["first_round"] == 1
    assert preflight["refused"] == [{"client": 2, "node": FIRST_NODE_ID + 2, "category": "policy"}]
    assert preflight["rejected"] == preflight["failed"] == preflight["no_answer"] == []
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("pre-flight: client")]
    assert f"pre-flight: client 1 will refuse from round {affordable + 1}: cap 7 reached" in "\n".join(lines)
    assert "pre-flight: client 2 refuses this run (policy)" in "\n".join(lines)
    # the plan did not adapt: the rounds ran, and the capped node refused where it said it would
    assert summary.rounds_completed == 3
    after_run = NodeLedger(ledger.state_dir, ledger.dataset_id).releases
    assert {r.server_round for r in after_run if r.run_id != PRIOR.run_id} == set(range(1, affordable + 1))


def _hostile_app(bad: dict):
    """The real ClientApp, except that client 0's pre-flight answer has ``bad`` metrics."""

    def hostile(message: Message, context: Context) -> Message:
        reply = app(message, context)
        if message.metadata.message_type != "query" or context.node_config[keys.NODE_PARTITION_ID] != 0:
            return reply
        metrics = {**dict(reply.content[keys.METRICS]), **bad}
        return Message(content=RecordDict({keys.METRICS: MetricRecord(metrics)}), reply_to=message)

    return hostile


@pytest.mark.slow  # seconds each: kept out of the fast tier (make test runs it)
def test_a_malformed_answer_is_rejected_and_counted_and_the_run_goes_on(tmp_path):
    cfg = _cfg(tmp_path, num_rounds=1, min_updates=1)  # one honest node answers: its update alone, knowingly
    prepare_run(cfg, tmp_path / "run")
    summary = run_inprocess(
        cfg, tmp_path / "run", client_app=_hostile_app({keys.EPSILON: float("nan")}), unreachable=[2]
    )
    assert summary.preflight is not None
    assert len(summary.preflight["rejected"]) == 1 and "not finite" in summary.preflight["rejected"][0]
    assert summary.preflight["no_answer"] == [FIRST_NODE_ID + 2]  # a silent node stalls nothing
    assert [n["client"] for n in summary.preflight["nodes"]] == [1]
    assert summary.status == "completed" and summary.rounds_completed == 1


# ---- the server's side, with hand-built answers (no model) ---------------------------------------------

GOOD = {
    keys.PARTITION_ID: 0,
    keys.REFUSED: 0,
    keys.ROUNDS_PLANNED: 3,
    keys.ROUNDS_AFFORDABLE: 2,
    keys.EPSILON: 0.5,
    keys.EPSILON_AFTER: 3.5,
    keys.EPSILON_CAP: 4.0,
    keys.DELTA: 1e-5,
}


def _content(metrics: dict, status: str | None = None, arrays: bool = False) -> RecordDict:
    records: dict = {keys.METRICS: MetricRecord(metrics)}
    if status is not None:
        records[keys.STATUS] = ConfigRecord({keys.CATEGORY: status})
    if arrays:
        records[keys.ARRAYS] = ArrayRecord({"w": Array(np.zeros(2, dtype="float32"))})
    return RecordDict(records)


def test_a_well_formed_answer_reads_back_as_the_node_sent_it():
    answer = PreflightAnswer(0, rounds_planned=3, rounds_affordable=2, cap=4.0, spent=0.5, after=3.5, delta=1e-5)
    assert answer.to_metrics() == GOOD
    assert parse_preflight(_content(GOOD), 3, rounds_planned=3, sample_level=True) == answer
    plain = PreflightAnswer(0, rounds_planned=3, rounds_affordable=3, cap=4.0)
    assert parse_preflight(_content(plain.to_metrics()), 3, rounds_planned=3, sample_level=False) == plain


@pytest.mark.parametrize(
    "change, status, why",
    [
        ({keys.ROUNDS_AFFORDABLE: [1, 2]}, None, "not a number"),  # a list where a number belongs
        ({keys.ROUNDS_AFFORDABLE: 1.5}, None, "whole number"),
        ({keys.EPSILON: -0.5}, None, "out of range"),
        ({keys.EPSILON: float("nan")}, None, "not finite"),
        ({keys.EPSILON_AFTER: float("inf")}, None, "not finite"),
        ({keys.ROUNDS_AFFORDABLE: 4}, None, "more than rounds-planned"),
        ({keys.ROUNDS_PLANNED: 5, keys.ROUNDS_AFFORDABLE: 5}, None, "the query planned 3"),
        ({keys.EPSILON_AFTER: 0.25}, None, "does not follow"),
        ({keys.ROUNDS_AFFORDABLE: 0}, None, "does not follow"),  # no round, yet epsilon grew
        ({keys.EPSILON_AFTER: 4.5}, None, "above the node's own cap"),
        ({keys.DELTA: 0.5}, None, "out of range"),
        ({keys.PARTITION_ID: 3}, None, "only 3 clients"),
        ({keys.PARTITION_ID: None}, None, "partition-id' is missing"),
        ({keys.EPSILON_AFTER: None}, None, "without ['epsilon-after']"),
        ({"train-loss": 0.1}, None, "unexpected metric"),
        ({keys.REFUSED: 1}, "budget", "policy, data, error or declined"),
        ({keys.REFUSED: 1}, "curious", "needs a category"),
    ],
)
def test_a_hostile_answer_is_rejected_with_the_reason(change, status, why):
    metrics = {k: v for k, v in {**GOOD, **change}.items() if v is not None}
    with pytest.raises(UpdateRejected, match=re.escape(why)):
        parse_preflight(_content(metrics, status), 3, rounds_planned=3, sample_level=True)


def test_an_answer_must_match_the_runs_privacy_mode_and_carry_no_tensors():
    with pytest.raises(UpdateRejected, match="must not carry tensors"):
        parse_preflight(_content(GOOD, arrays=True), 3, rounds_planned=3, sample_level=True)
    with pytest.raises(UpdateRejected, match="without DP-SGD no node budget applies"):
        parse_preflight(_content(GOOD), 3, rounds_planned=3, sample_level=False)
    bare = {k: v for k, v in GOOD.items() if k not in (keys.EPSILON, keys.EPSILON_AFTER, keys.DELTA)}
    with pytest.raises(UpdateRejected, match="under DP-SGD without"):
        parse_preflight(_content(bare), 3, rounds_planned=3, sample_level=True)


def _scripted(answers: dict[int, object]):
    """A ClientApp with no model: partition -> metrics dict to answer, an exception to raise, or
    (metrics, category) for a refusal."""

    def answer(message: Message, context: Context) -> Message:
        assert message.metadata.message_type == "query" and not message.content.array_records
        script = answers[context.node_config[keys.NODE_PARTITION_ID]]
        if isinstance(script, Exception):
            raise script
        metrics, status = script if isinstance(script, tuple) else (script, None)
        return Message(content=_content(metrics, status), reply_to=message)

    return answer


def _preflight(cfg: ExperimentConfig, answers: dict[int, object], unreachable=()):
    grid = InProcessGrid(_scripted(answers), cfg.federation.num_clients, unreachable=unreachable)
    with server_identity():
        return run_preflight(grid, cfg, task_record(cfg, "run"), first_round=1)


def test_the_server_sorts_answers_refusals_impostors_errors_and_silence(tmp_path, caplog):
    cfg = _cfg(tmp_path, num_clients=6)
    answers = {
        0: {**GOOD, keys.ROUNDS_AFFORDABLE: 3, keys.EPSILON_AFTER: 3.9},
        1: ({keys.PARTITION_ID: 1, keys.REFUSED: 1, keys.CAN_CONTINUE: 0, keys.EPSILON_CAP: 4.0}, "data"),
        2: {**GOOD, keys.PARTITION_ID: 0},  # speaks for client 0, which already answered
        3: RuntimeError("out of memory"),
        5: ({keys.PARTITION_ID: 5, keys.REFUSED: 1, keys.CAN_CONTINUE: 0}, "declined"),
    }
    with caplog.at_level(logging.INFO, logger="fedllm"):
        report = _preflight(cfg, answers, unreachable=[4])
    assert report.asked == 6 and [a.partition_id for _, a in report.answers] == [0]
    assert report.declined == [(FIRST_NODE_ID + 5, 5)] and report.to_dict()["declined"] == [
        {"client": 5, "node": FIRST_NODE_ID + 5}
    ]  # not counted as refusing the run: it decides each round as it comes
    assert [(r.partition_id, r.category) for _, r in report.refusals] == [(1, "data")]
    assert len(report.rejected) == 1 and "claims to be client 0" in report.rejected[0]
    assert len(report.failed) == 1 and "out of memory" in report.failed[0]
    assert report.unanswered == [FIRST_NODE_ID + 4] and report.short == []
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "pre-flight: client 0 can train 3 of 3 planned rounds (epsilon 3.90 of cap 4)" in text
    assert f"pre-flight: node {FIRST_NODE_ID + 4}: no answer within 120 s" in text
    assert "pre-flight: client 5 declines pre-flights (its node config)" in text
    assert json.loads(json.dumps(report.to_dict())) == report.to_dict()  # summary.json can hold it


def test_the_wait_is_bounded_by_the_round_timeout_and_two_minutes():
    assert preflight_wait(3600.0) == PREFLIGHT_WAIT_S == 120.0
    assert preflight_wait(30.0) == 30.0


# ---- the node's side: a deployed node, its own config, its own console -----------------------------------


def _records(path: Path, count: int = 120) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        "".join(
            json.dumps(
                {
                    "prompt": f"review number {i} was {'great' if i % 2 else 'dull'}",
                    "response": "positive" if i % 2 else "negative",
                }
            )
            + "\n"
            for i in range(count)
        ),
        encoding="utf-8",
    )
    return path


def _deployed(tmp_path: Path, **extra) -> dict:
    config = {
        keys.NODE_PARTITION_ID: 0,
        "state-dir": str(tmp_path / "node-state"),
        "data-path": str(_records(tmp_path / "node-data.jsonl")),
        "max-epsilon": 4.0,
        "delta": 1e-5,
        "allowed-models": "tiny",  # these tests' runs use the random test model
        "sampling-size": 120,  # the file's 120 records
    }
    return {**config, **{k.replace("_", "-"): v for k, v in extra.items()}}


def _query(cfg: ExperimentConfig, first_round: int = 1) -> Message:
    return query_message(cfg, "run", first_round)


def _node_cfg(**privacy) -> ExperimentConfig:
    return tiny_config(privacy=PrivacyConfig(**privacy), federation=FederationConfig(num_clients=3, num_rounds=5))


@pytest.mark.slow  # seconds each: kept out of the fast tier (make test runs it)
def test_the_operator_sees_the_answer_on_the_nodes_console_and_in_its_audit_log(tmp_path, capsys):
    node = _deployed(tmp_path)  # cap 4 under a plan that needs 8
    reply = app(_query(_node_cfg()), node_context(node))
    metrics = dict(reply.content[keys.METRICS])
    assert set(metrics) == {
        keys.PARTITION_ID,
        keys.REFUSED,
        keys.ROUNDS_PLANNED,
        keys.ROUNDS_AFFORDABLE,
        keys.EPSILON,
        keys.EPSILON_AFTER,
        keys.EPSILON_CAP,
        keys.DELTA,
    }
    assert metrics[keys.ROUNDS_PLANNED] == 5 and metrics[keys.ROUNDS_AFFORDABLE] < 5
    assert metrics[keys.EPSILON_CAP] == 4.0 and metrics[keys.EPSILON_AFTER] <= 4.0
    console = [line for line in capsys.readouterr().err.splitlines() if "fedllm node:" in line]
    affordable = metrics[keys.ROUNDS_AFFORDABLE]
    assert any(
        "pre-flight of run run" in line
        and f"train {affordable} of the 5 planned" in line
        and f"refuse from round {affordable + 1}" in line
        for line in console
    ), console
    entry = json.loads((tmp_path / "node-state" / AUDIT_FILE).read_text().splitlines()[-1])
    assert entry["kind"] == "query" and entry["sent"]["metrics"] == json.loads(json.dumps(metrics))
    assert entry["sent"]["tensors"] == [] and entry["received"]["round"] == 1
    assert not (tmp_path / "node-state" / LEDGER_FILE).exists()  # read under its lock, never written
    status = node_status(policy_from_node_config(node))  # `fedllm node-status`: a question, not a release
    assert f"pre-flight before round 1: can train {affordable} of 5 rounds" in status, status


@pytest.mark.parametrize(
    "privacy, node, expected",
    [
        (dict(mode="none"), {}, "policy"),  # no DP-SGD, and the node does not allow training without it
        (dict(mode="client"), {}, "policy"),
        (dict(mode="none"), {"allow_nonprivate": True}, 5),  # allowed: no sample-level budget applies
        (dict(mode="client"), {"allow_nonprivate": True}, 5),
    ],
)
def test_without_sample_level_dp_a_node_answers_by_its_policy(tmp_path, privacy, node, expected):
    reply = app(_query(_node_cfg(**privacy)), node_context(_deployed(tmp_path, **node)))
    metrics = dict(reply.content[keys.METRICS])
    if expected == "policy":
        assert metrics[keys.REFUSED] == 1 and dict(reply.content[keys.STATUS]) == {keys.CATEGORY: "policy"}
    else:
        assert metrics[keys.ROUNDS_AFFORDABLE] == metrics[keys.ROUNDS_PLANNED] == expected
        assert keys.EPSILON not in metrics
    assert parse_preflight(reply.content, 3, rounds_planned=5, sample_level=False) is not None


def test_a_node_refuses_the_preflight_of_a_model_it_does_not_allow(tmp_path):
    cfg = tiny_config(model=ModelConfig(name_or_path="/srv/coordinator/backdoored-model"))
    reply = app(_query(cfg), node_context(_deployed(tmp_path)))
    assert dict(reply.content[keys.STATUS]) == {keys.CATEGORY: "policy"}  # the detail stays on the node
    assert not (tmp_path / "node-state" / LEDGER_FILE).exists()


def test_a_node_may_decline_every_preflight_and_then_reads_nothing(tmp_path, monkeypatch):
    # the pre-flight costs a node no budget, so a coordinator may ask it as often as it likes (e.g. one
    # batch size after another, to read 1/ceil(n/B)); an operator who wants no such free probe turns it off
    def touched(*args, **kwargs):
        raise AssertionError("a declining node looked at its data or plan")

    monkeypatch.setattr(guard.task, "node_shard", touched)
    monkeypatch.setattr(guard, "plan_for", touched)
    reply = app(_query(_node_cfg()), node_context(_deployed(tmp_path, answer_preflight=False)))
    assert dict(reply.content[keys.STATUS]) == {keys.CATEGORY: "declined"}
    assert set(reply.content[keys.METRICS].keys()) == {keys.PARTITION_ID, keys.REFUSED, keys.CAN_CONTINUE}
    assert not (tmp_path / "node-state" / LEDGER_FILE).exists()
    status = node_status(policy_from_node_config(_deployed(tmp_path, answer_preflight=False)))
    assert "pre-flight before round 1: declined (answer-preflight=false)" in status, status
    declined = parse_preflight(reply.content, 3, rounds_planned=5, sample_level=True)
    assert isinstance(declined, Refusal) and declined.category == "declined"
    # "declined" answers a pre-flight only: a train reply saying it is malformed
    with pytest.raises(UpdateRejected, match="needs a category"):
        parse_reply(reply.content, {}, 3, require_accounting=True)


def test_a_preflight_for_a_round_outside_the_run_is_malformed(tmp_path):
    from fedllm.errors import ConfigError
    from fedllm.federation.client_app import query

    with pytest.raises(ConfigError, match="pre-flight for round 6 of a run of 5 rounds"):
        query(_query(_node_cfg(), first_round=6), node_context(_deployed(tmp_path)))
