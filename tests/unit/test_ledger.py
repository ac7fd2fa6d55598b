"""Persisted node ledgers, budgets, client-level accounting and server checkpoints."""

from __future__ import annotations

import json

import dp_accounting
import pytest
import torch
from dp_accounting.pld import PLDAccountant
from hypothesis import given, settings
from hypothesis import strategies as st

from fedllm.errors import LedgerError
from fedllm.federation.checkpoint import Checkpointer, ServerState
from fedllm.privacy.accounting import epsilon, extend_history
from fedllm.privacy.budget import Budget, check_round, effective_budget
from fedllm.privacy.calibration import plan_client
from fedllm.privacy.client_level import ZERO_OUT, ClientLevelAccountant, ClientLevelRound
from fedllm.privacy.ledger import PrivacyLedger
from fedllm.privacy.node_ledger import LEDGER_FILE, NodeLedger, Release, ShardContent, fingerprint

# The default run (`make run`): 10 clients, largest sampling rate 1/74 (1,181 records, batch 16),
# 3 rounds x 5 steps, target epsilon 8 at delta 1e-5; noise as planned under each accountant.
DEFAULT_RATE, DEFAULT_STEPS = 1 / 74, 15
DEFAULT_NOISE = {"rdp": 0.46112060546875, "prv": 0.419464111328125}


@pytest.mark.slow  # seconds each: kept out of the fast tier (make test runs it)
def test_default_plan_noise_is_pinned(uncached_calibration):
    plan = plan_client(
        shard_size=1181, batch_size=16, rounds=3, local_steps=5, target_epsilon=8.0, delta=1e-5, accountant="rdp"
    )
    assert (plan.sample_rate, plan.noise_multiplier) == (DEFAULT_RATE, DEFAULT_NOISE["rdp"])


def test_default_schedule_rdp_matches_dp_accounting_to_0_1_percent():
    ours = epsilon([(DEFAULT_NOISE["rdp"], DEFAULT_RATE, DEFAULT_STEPS)], delta=1e-5, accountant="rdp")
    theirs = dp_accounting.rdp.RdpAccountant()
    theirs.compose(
        dp_accounting.PoissonSampledDpEvent(DEFAULT_RATE, dp_accounting.GaussianDpEvent(DEFAULT_NOISE["rdp"])),
        DEFAULT_STEPS,
    )
    assert ours == pytest.approx(7.9918, abs=1e-4)
    assert ours == pytest.approx(theirs.get_epsilon(1e-5), rel=1e-3)


@pytest.mark.slow  # seconds each: kept out of the fast tier (make test runs it)
def test_default_schedule_prv_matches_dp_accounting_pld_to_0_5_percent():
    # Opacus's PRV accountant and dp-accounting's privacy-loss-distribution accountant are
    # two independent numerical computations of the same (tight) epsilon
    ours = epsilon([(DEFAULT_NOISE["prv"], DEFAULT_RATE, DEFAULT_STEPS)], delta=1e-5, accountant="prv")
    theirs = PLDAccountant(value_discretization_interval=1e-4)
    theirs.compose(
        dp_accounting.PoissonSampledDpEvent(DEFAULT_RATE, dp_accounting.GaussianDpEvent(DEFAULT_NOISE["prv"])),
        DEFAULT_STEPS,
    )
    assert ours == pytest.approx(7.9949, abs=1e-3)
    assert ours == pytest.approx(theirs.get_epsilon(1e-5), rel=5e-3)


def _release(run: str, rnd: int, steps: int = 5, fp: str = "fp-1") -> Release:
    return Release(run_id=run, server_round=rnd, noise_multiplier=0.8, sample_rate=0.02, steps=steps, fingerprint=fp)


def test_node_ledger_persists_and_a_restarted_node_continues(tmp_path):
    with NodeLedger(tmp_path, "dataset-a").locked() as ledger:
        ledger.record(_release("run-1", 1))
        ledger.record(_release("run-1", 2))
    reopened = NodeLedger(tmp_path, "dataset-a")  # a new process on the same state directory
    assert reopened.history() == [(0.8, 0.02, 10)]
    assert reopened.find("run-1", 2) == _release("run-1", 2) and reopened.find("run-1", 3) is None
    assert reopened.epsilon(delta=1e-5, accountant="rdp") == epsilon([(0.8, 0.02, 10)], delta=1e-5, accountant="rdp")


def test_a_node_ledger_composes_every_run_of_the_nodes_lifetime(tmp_path):
    with NodeLedger(tmp_path, "dataset-a").locked() as ledger:
        ledger.record(_release("run-1", 1))
        ledger.record(_release("run-2", 1, steps=3))
    assert NodeLedger(tmp_path, "dataset-a").history() == [(0.8, 0.02, 8)]  # no per-run view to start at zero


def test_a_release_is_charged_to_records_not_to_a_dataset_id(tmp_path):
    reviews, others = ShardContent.of([("a", "b")]), ShardContent.of([("c", "d")])
    with NodeLedger(tmp_path, "dataset-a", reviews).locked() as ledger:
        ledger.record(_release("r", 1, fp=reviews.fingerprint))
    other = NodeLedger(tmp_path, "dataset-b", others)
    assert other.history() == [] and other.epsilon(delta=1e-5, accountant="rdp") == 0  # other records: fresh
    same = NodeLedger(tmp_path, "dataset-b", reviews)  # the same records under another name
    assert same.history() == [(0.8, 0.02, 5)]
    with same.locked():
        same.record(_release("r", 1, steps=2, fp=reviews.fingerprint))
    saved = json.loads((tmp_path / LEDGER_FILE).read_text())
    assert sorted(saved["datasets"]) == ["dataset-a", "dataset-b"] and len(saved["record_sets"]) == 1
    assert NodeLedger(tmp_path, "dataset-a", reviews).history() == [(0.8, 0.02, 7)]
    assert NodeLedger(tmp_path, "dataset-a", others).epsilon(delta=1e-5, accountant="rdp") == 0
    assert fingerprint([("ab", "")]) != fingerprint([("a", "b")])  # no ambiguous concatenation


def test_a_corrupt_ledger_is_an_error_never_a_reset(tmp_path):
    ledger = NodeLedger(tmp_path, "dataset")
    with ledger.locked():
        ledger.record(_release("r", 1))
    (tmp_path / LEDGER_FILE).write_text('{"format": 2, "datasets": {"dataset": {"releases": [')
    with pytest.raises(LedgerError, match="never reset"):
        NodeLedger(tmp_path, "dataset")
    with pytest.raises(LedgerError, match="never reset"):  # an open view re-reads under the lock, and fails
        with ledger.locked():
            pass
    assert (tmp_path / LEDGER_FILE).read_text().endswith("[")  # left as it was, for the operator


def test_the_server_cannot_raise_a_node_cap():
    assert effective_budget(run_target=8, run_delta=1e-5, node_max_epsilon=3, node_delta=None) == Budget(3, 1e-5)
    assert effective_budget(run_target=2, run_delta=1e-5, node_max_epsilon=3, node_delta=1e-6) == Budget(2, 1e-6)
    assert effective_budget(run_target=8, run_delta=1e-5, node_max_epsilon=None, node_delta=1e-3) == Budget(8, 1e-5)


def test_a_round_past_the_cap_is_refused_with_the_numbers():
    history = [(1.0, 0.05, 50)]
    spent = epsilon(history, delta=1e-5, accountant="rdp")
    decision = check_round(
        history, noise_multiplier=1.0, sample_rate=0.05, steps=50, budget=Budget(spent + 0.01, 1e-5), accountant="rdp"
    )
    assert not decision.allowed and decision.spent == spent and decision.projected > decision.cap
    assert f"{spent:.4f}" in decision.reason and "cap" in decision.reason


@settings(max_examples=25, deadline=None)
@given(
    noise=st.floats(0.3, 3.0),
    rate=st.floats(0.001, 0.3),
    steps=st.integers(1, 40),
    rounds=st.integers(1, 8),
    cap=st.floats(0.1, 15.0),
    delta=st.sampled_from([1e-4, 1e-5, 1e-6]),
    accountant=st.sampled_from(["rdp"]),
    prior=st.integers(0, 100),
)
@pytest.mark.slow  # seconds each: kept out of the fast tier (make test runs it)
def test_no_schedule_ends_a_node_above_its_cap(noise, rate, steps, rounds, cap, delta, accountant, prior):
    history = extend_history([], noise_multiplier=noise, sample_rate=rate, steps=prior)  # an earlier run
    budget = Budget(cap, delta)
    for _ in range(rounds):
        decision = check_round(
            history, noise_multiplier=noise, sample_rate=rate, steps=steps, budget=budget, accountant=accountant
        )
        if decision.allowed:
            history = extend_history(history, noise_multiplier=noise, sample_rate=rate, steps=steps)
            assert epsilon(history, delta=delta, accountant=accountant) == decision.projected
    trained = sum(s for _, _, s in history) - prior
    if trained:
        assert epsilon(history, delta=delta, accountant=accountant) <= cap


def test_client_level_without_sampling_is_the_plain_gaussian_composition():
    accountant = ClientLevelAccountant(noise_multiplier=1.2, clip_norm=0.5, delta=1e-3, sampled_uniformly=False)
    for r in range(1, 4):
        accountant.record(ClientLevelRound(server_round=r, population=10, sampled=10, contributed=10))
    # Opacus's RDP accountant with sample rate 1 is an independent computation of the same thing
    assert accountant.epsilon() == pytest.approx(epsilon([(1.2, 1.0, 3)], delta=1e-3, accountant="rdp"), rel=1e-6)
    assert accountant.adjacency == ZERO_OUT


def test_client_sampling_amplifies_only_rounds_where_every_sampled_client_contributed():
    def eps(contributed: int) -> float:
        accountant = ClientLevelAccountant(noise_multiplier=1.0, clip_norm=0.5, delta=1e-3, sampled_uniformly=True)
        for r in range(1, 101):
            accountant.record(ClientLevelRound(server_round=r, population=100, sampled=10, contributed=contributed))
        assert accountant.adjacency == ZERO_OUT
        return accountant.epsilon()

    assert eps(10) < eps(9)  # a round with a dropout gets no amplification credit


def test_server_ledger_round_trips_refusals_caps_and_client_level():
    ledger = PrivacyLedger(
        accountant="rdp",
        delta=1e-5,
        target_epsilon=8.0,
        mode="both",
        client_level=ClientLevelAccountant(noise_multiplier=1.0, clip_norm=0.5, delta=1e-3, sampled_uniformly=False),
    )
    ledger.record(0, [(0.5, 0.02, 10)], 1, delta=1e-6, cap=5.0, can_continue=True)
    ledger.record_refusal(1, 2, "refused: cap", cap=3.0, history=[(0.5, 0.02, 5)], delta=1e-5)
    ledger.client_level.record(ClientLevelRound(1, 2, 2, 1))
    assert ledger.epsilon(0) == epsilon([(0.5, 0.02, 10)], delta=1e-6, accountant="rdp")  # the node's own delta
    assert ledger.exhausted() == [1]
    restored = PrivacyLedger(
        accountant="rdp",
        delta=1e-5,
        target_epsilon=8.0,
        mode="both",
        client_level=ClientLevelAccountant(noise_multiplier=1.0, clip_norm=0.5, delta=1e-3, sampled_uniformly=False),
    )
    restored.load_state_dict(json.loads(json.dumps(ledger.state_dict())))
    assert restored.to_report() == ledger.to_report()
    assert restored.to_report()["clients"]["1"]["refusals"] == [{"round": 2, "reason": "refused: cap"}]


def test_checkpoint_round_trips_state(tmp_path):
    state = ServerState(
        run_id="r",
        server_round=3,
        arrays={"a": torch.arange(4.0)},
        ledger={"x": 1},
        rounds=[{"round": 0}],
        config={"seed": 0},
        stop_reason=None,
    )
    checkpoints = Checkpointer(tmp_path / "checkpoint")
    checkpoints.save(state)
    loaded = checkpoints.load()
    assert torch.equal(loaded.arrays["a"], state.arrays["a"]) and loaded.server_round == 3
    state.server_round = 4
    checkpoints.save(state)
    assert sorted(p.name for p in (tmp_path / "checkpoint").iterdir()) == ["adapter-round-4.sealed", "state.json"]


def test_a_corrupt_checkpoint_is_a_clear_error(tmp_path):
    checkpoints = Checkpointer(tmp_path)
    with pytest.raises(LedgerError, match="no checkpoint"):
        checkpoints.load()
    checkpoints.save(
        ServerState(run_id="r", server_round=1, arrays={"a": torch.ones(2)}, ledger={}, rounds=[], config={})
    )
    (tmp_path / "adapter-round-1.sealed").write_bytes(b"garbage")
    with pytest.raises(LedgerError, match="not a fedllm sealed file"):
        checkpoints.load()
