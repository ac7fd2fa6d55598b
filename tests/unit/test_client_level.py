"""Client-level DP (DP-FedAvg): the accountant against independent computations, and the round
loop's side of the guarantee (no norm filter across clients, amplification only for rounds in
which every client sent a message contributed)."""

from __future__ import annotations

import dataclasses
import json
import math
import time

import dp_accounting
import numpy as np
import pytest
from dp_accounting.pld import privacy_loss_distribution
from dp_accounting.rdp import RdpAccountant
from flwr.app import ConfigRecord, Message, Metadata, MetricRecord, RecordDict
from scipy.special import ndtr

from fedllm.cli.plan import plan_cli
from fedllm.config import FederationConfig, PrivacyConfig, TrainConfig, compose_experiment
from fedllm.errors import PrivacyPlanError
from fedllm.federation import records as keys
from fedllm.federation.inprocess import run_inprocess
from fedllm.federation.rounds import LoopSettings, ReplyPolicy, run_rounds, sort_replies
from fedllm.federation.server_app import loop_settings, prepare_run
from fedllm.federation.strategy import build_strategy
from fedllm.node.release import TrainReport
from fedllm.privacy import client_level
from fedllm.privacy.client_level import (
    CLIENT_TOLERANCE,
    ZERO_OUT,
    ClientLevelAccountant,
    ClientLevelRound,
    calibrate_client_noise,
    planned_epsilons,
)
from fedllm.privacy.ledger import PrivacyLedger
from tests.conftest import tiny_config
from tests.flower_fakes import FakeGrid, act_as_server_process, arrays_record

DELTA = 1e-3
# dp-accounting's RDP orders (the conversion below must search the same ones to agree to 1e-6)
ORDERS = [1 + i / 10 for i in range(1, 100)] + list(range(11, 64)) + [128, 256, 512, 1024]


def _accountant(
    z: float, population: int, sampled: int, rounds: int, contributed: int | None = None, uniformly: bool = True
) -> ClientLevelAccountant:
    accountant = ClientLevelAccountant(noise_multiplier=z, clip_norm=0.5, delta=DELTA, sampled_uniformly=uniformly)
    for r in range(1, rounds + 1):
        accountant.record(
            ClientLevelRound(
                server_round=r,
                population=population,
                sampled=sampled,
                contributed=sampled if contributed is None else contributed,
            )
        )
    return accountant


def _gaussian_rdp_epsilon(z: float, rounds: int, delta: float) -> float:
    """Closed form: a Gaussian of multiplier z composed ``rounds`` times has RDP rounds * a / (2 z^2)
    at order a; converted by Canonne, Kamath and Steinke (2020), Proposition 12."""
    return min(rounds * a / (2 * z * z) + math.log1p(-1 / a) - math.log(delta * a) / (a - 1) for a in ORDERS)


def _gaussian_exact_epsilon(z: float, rounds: int, delta: float) -> float:
    """The tight epsilon of the same composition (Balle and Wang, 2018): one Gaussian with
    mu = sqrt(rounds) / z; delta(eps) = Phi(mu/2 - eps/mu) - e^eps Phi(-mu/2 - eps/mu)."""
    mu = math.sqrt(rounds) / z
    lo, hi = 0.0, 100.0
    for _ in range(200):
        eps = (lo + hi) / 2
        if ndtr(mu / 2 - eps / mu) - math.exp(eps) * ndtr(-mu / 2 - eps / mu) > delta:
            lo = eps
        else:
            hi = eps
    return hi


def _worst_pair_epsilon(z: float, q: float, rounds: int, delta: float) -> float:
    """A lower bound on any valid epsilon for zero-out with m of N sampled without replacement
    (q = m / N): every other client's clipped update is -w, this client's is w (|w| = C = 1).
    Shifted by m w, the released sum is (1-q) N(0, z^2) + q N(2w, z^2) with this client's update
    and (1-q) N(0, z^2) + q N(w, z^2) with it zeroed (the zeroed client still fills a slot).
    Computed on a fine binning of the line (a post-processing: it can only lower the epsilon),
    with dp-accounting's privacy loss distributions."""
    edges = np.concatenate([[-np.inf], np.arange(-12 * z, 2 + 12 * z, 0.005 * z), [np.inf]])
    mass = {shift: np.diff(ndtr((edges - shift) / z)) for shift in (0.0, 1.0, 2.0)}
    real, zeroed = (1 - q) * mass[0.0] + q * mass[2.0], (1 - q) * mass[0.0] + q * mass[1.0]
    pld = privacy_loss_distribution.from_two_probability_mass_functions(
        {i: math.log(p) for i, p in enumerate(zeroed) if p > 0},
        {i: math.log(p) for i, p in enumerate(real) if p > 0},
        value_discretization_interval=1e-4,
    )
    return pld.self_compose(rounds).get_epsilon_for_delta(delta) if rounds > 1 else pld.get_epsilon_for_delta(delta)


@pytest.mark.parametrize("z, rounds", [(1.0, 3), (1.2, 3), (0.8, 10), (2.0, 50)])
def test_without_amplification_epsilon_is_the_gaussian_closed_form(z, rounds):
    ours = _accountant(z, population=10, sampled=10, rounds=rounds).epsilon()
    assert ours == pytest.approx(_gaussian_rdp_epsilon(z, rounds, DELTA), abs=1e-6)
    exact = _gaussian_exact_epsilon(z, rounds, DELTA)
    assert exact < ours < 1.3 * exact  # RDP is a valid, slightly loose, bound


def test_the_default_example_figures():
    # z = 1, 10 clients, 3 rounds, delta 1e-3: every client every round, or half of them sampled
    every = _accountant(1.0, population=10, sampled=10, rounds=3)
    half = _accountant(1.0, population=10, sampled=5, rounds=3)
    assert every.epsilon() == pytest.approx(6.999106, abs=1e-5)
    # zero-out bounds both; at this rate sampling buys nothing (it reported 15.55 under replace-one)
    assert half.epsilon() == every.epsilon()
    assert every.adjacency == half.adjacency == ZERO_OUT


@pytest.mark.parametrize("z", [0.5, 1.0, 2.0, 4.0])
@pytest.mark.parametrize("population, sampled", [(10, 1), (10, 5), (10, 9), (100, 10), (1000, 10)])
@pytest.mark.parametrize("rounds", [1, 3, 30])
def test_sampling_a_fraction_never_reports_more_than_every_client(z, population, sampled, rounds):
    every = _accountant(z, population, population, rounds).epsilon()
    assert _accountant(z, population, sampled, rounds).epsilon() <= every
    assert _accountant(z, population, sampled, rounds, contributed=sampled - 1).epsilon() == every


@pytest.mark.parametrize(
    "z, population, sampled, rounds",
    [
        (1.0, 10, 5, 1),
        (1.0, 10, 5, 3),  # no amplification: the Gaussian bound
        (1.0, 10, 1, 30),  # amplified: the sampled bound is below the Gaussian one
        (2.0, 10, 1, 100),
    ],
)
def test_epsilon_covers_a_worst_case_pair_of_neighbouring_federations(z, population, sampled, rounds):
    accountant = _accountant(z, population, sampled, rounds)
    assert accountant.epsilon() >= _worst_pair_epsilon(z, sampled / population, rounds, DELTA)


def test_the_poisson_subsampled_gaussian_does_not_bound_zero_out_without_replacement():
    # why sampled rounds are not accounted as Poisson sampling at rate m / N: it reports less
    # than a concrete pair of neighbouring federations needs
    poisson = RdpAccountant()
    poisson.compose(dp_accounting.PoissonSampledDpEvent(0.5, dp_accounting.GaussianDpEvent(1.0)), 3)
    worst = _worst_pair_epsilon(1.0, 0.5, 3, DELTA)
    assert worst == pytest.approx(5.04, abs=0.01)
    assert poisson.get_epsilon(DELTA) < worst <= _accountant(1.0, 10, 5, 3).epsilon()


def test_amplification_needs_a_uniform_sample_of_part_of_the_population_all_contributing():
    accountant = _accountant(1.0, population=100, sampled=10, rounds=1)
    assert accountant.amplified(ClientLevelRound(1, 100, 10, 10))
    assert not accountant.amplified(ClientLevelRound(1, 100, 10, 9))  # a sampled client did not contribute
    assert not accountant.amplified(ClientLevelRound(1, 10, 10, 10))  # everyone
    assert not _accountant(1.0, 100, 10, 1, uniformly=False).amplified(ClientLevelRound(1, 100, 10, 10))


def test_a_checkpointed_accountant_of_an_earlier_version_still_loads():
    old = {
        "noise_multiplier": 1.0,
        "clip_norm": 0.5,
        "delta": DELTA,
        "sampled_uniformly": False,
        "rounds": [{"server_round": 1, "population": 3, "sampled": 3, "contributed": 3}],
    }
    accountant = ClientLevelAccountant(noise_multiplier=1.0, clip_norm=0.5, delta=DELTA, sampled_uniformly=False)
    accountant.load_state_dict(old)
    assert accountant.rounds == [ClientLevelRound(1, 3, 3, 3)]
    assert accountant.epsilon() == pytest.approx(_gaussian_rdp_epsilon(1.0, 1, DELTA), abs=1e-6)
    assert accountant.to_report()["adjacency"] == ZERO_OUT and accountant.to_report()["amplified_rounds"] == []


# --- the round loop ---------------------------------------------------------------------------

SENT = {"a": np.zeros((4, 8), dtype=np.float32), "b": np.zeros(4, dtype=np.float32)}


def _reply(node: int, partition: int, value: float, server_round: int = 1) -> Message:
    metadata = Metadata(
        run_id=1,
        message_id=f"m{node}",
        src_node_id=node,
        dst_node_id=0,
        reply_to_message_id="",
        group_id=str(server_round),
        created_at=time.time(),
        ttl=60.0,
        message_type="train",
    )
    content = RecordDict(
        {
            keys.ARRAYS: arrays_record({k: np.full_like(v, value) for k, v in SENT.items()}),
            keys.METRICS: MetricRecord(TrainReport(partition, None).to_metrics()),
        }
    )
    return Message(content=content, metadata=metadata)


def _client_policy(clipping: str = "server") -> ReplyPolicy:
    """The reply policy of a privacy=client run, as the server builds it."""
    cfg = tiny_config(
        privacy=PrivacyConfig(mode="client", client_clipping=clipping, client_clip_norm=0.5),
        federation=FederationConfig(num_clients=4, num_rounds=1),
    )
    return loop_settings(cfg, "run").policy


def _accepted(replies: list[Message], policy: ReplyPolicy) -> list[int]:
    ledger = PrivacyLedger(accountant="rdp", delta=1e-5, target_epsilon=None, mode="client")
    result = sort_replies(replies, ledger, 1, arrays_record(SENT), policy, {})
    return sorted(update.metadata.src_node_id - 10 for update in result.updates)  # node 10 + i is client i


def test_under_client_level_dp_one_clients_update_cannot_get_another_rejected(monkeypatch):
    act_as_server_process(monkeypatch)
    quiet, loud = 0.001, 0.2  # client B (partition 1) trained a large update; C and D small ones
    policy = _client_policy()
    assert policy.client_level and policy.uniform_weights

    def round_with(a: float) -> list[int]:
        return _accepted([_reply(10, 0, a), _reply(11, 1, loud), _reply(12, 2, quiet), _reply(13, 3, quiet)], policy)

    # client A (partition 0) small: the median is small and B would be 10x it; A large: it is not.
    # Whether B's update is used must not depend on A's data: every update is used either way
    assert round_with(quiet) == round_with(loud) == [0, 1, 2, 3]
    # the same round under sample-level rules: A's update decides B's fate (why the filter is off above)
    sample = ReplyPolicy(
        num_clients=4, update_norm_ratio=10.0, max_update_norm=None, require_accounting=False, uniform_weights=False
    )
    assert _accepted([_reply(10, 0, quiet), _reply(11, 1, loud), _reply(12, 2, quiet)], sample) == [0, 2]
    assert _accepted([_reply(10, 0, loud), _reply(11, 1, loud), _reply(12, 2, quiet)], sample) == [0, 1, 2]


def test_with_client_side_clipping_an_unclipped_update_is_rejected_on_its_own_norm(monkeypatch):
    act_as_server_process(monkeypatch)
    policy = _client_policy("client")
    norm_of = math.sqrt(sum(v.size for v in SENT.values()))  # an update of value x has norm x * this
    at_clip, above = 0.5 / norm_of, 2 * 0.5 / norm_of

    def replies() -> list[Message]:
        return [_reply(10, 0, at_clip), _reply(11, 1, above), _reply(12, 2, -at_clip)]

    assert _accepted(replies(), policy) == [0, 2]
    assert _accepted(replies(), _client_policy("server")) == [0, 1, 2]  # the server clips it


class _Grid(FakeGrid):
    """Ten connected nodes (100..109, client i on node 100 + i), of which only ``answering`` reply."""

    def __init__(self, answering: set[int]):
        super().__init__(list(range(100, 110)))
        self.answering = answering

    def send_and_receive(self, messages, *, timeout=None):
        return [
            _reply(m.metadata.dst_node_id, m.metadata.dst_node_id - 100, 0.01)
            for m in messages
            if m.metadata.dst_node_id in self.answering
        ]


def _strategy():
    # 3 of 10 sampled; seeded, so the sample of round 1 is the same for every instance
    return build_strategy(
        aggregation="fedavg",
        trim_fraction=0.2,
        fraction_train=0.3,
        num_clients=10,
        client_level=True,
        client_clipping="server",
        client_noise_multiplier=1.0,
        client_clip_norm=0.5,
        noise="seeded",
    )


def _one_client_level_round(grid, strategy) -> PrivacyLedger:
    """Round 1 of a 10-client client-level run (sampled uniformly) through the real round loop."""
    ledger = PrivacyLedger(
        accountant="rdp",
        delta=1e-5,
        target_epsilon=None,
        mode="client",
        client_level=ClientLevelAccountant(noise_multiplier=1.0, clip_norm=0.5, delta=DELTA, sampled_uniformly=True),
    )
    policy = ReplyPolicy(
        num_clients=10,
        update_norm_ratio=10.0,
        max_update_norm=None,
        require_accounting=False,
        uniform_weights=True,
        client_level=True,
    )
    settings = LoopSettings(
        num_rounds=1, num_clients=10, min_train_clients=1, timeout=1.0, train_config=ConfigRecord({}), policy=policy
    )
    [result] = run_rounds(grid, strategy, ledger, settings, arrays_record(SENT), 1)
    assert result.server_round == 1 and result.stop_reason is None
    return ledger


def _recorded_round(answering: set[int]) -> tuple[ClientLevelRound, bool]:
    """Round 1 of a client-level run in which only ``answering`` reply: what its accountant
    recorded, and whether the round got amplification credit."""
    ledger = _one_client_level_round(_Grid(answering), _strategy())
    [entry] = ledger.client_level.rounds
    return entry, ledger.client_level.amplified(entry)


def test_a_sampled_node_that_never_replied_voids_the_rounds_amplification(monkeypatch):
    act_as_server_process(monkeypatch)
    sampled = [
        m.metadata.dst_node_id
        for m in _strategy().configure_train(1, arrays_record(SENT), ConfigRecord({}), _Grid(set()))
    ]
    assert len(sampled) == 3
    entry, amplified = _recorded_round(set(sampled))
    assert (entry.population, entry.sampled, entry.contributed, amplified) == (10, 3, 3, True)
    # the third sampled node was sent a message and never answered: 3 sent, 2 contributed, no credit
    entry, amplified = _recorded_round(set(sampled[:2]))
    assert (entry.population, entry.sampled, entry.contributed, amplified) == (10, 3, 2, False)


def test_the_sampling_ratio_is_over_the_nodes_connected_when_the_sample_is_drawn(monkeypatch):
    act_as_server_process(monkeypatch)
    grid = _Grid(set(range(100, 110)))
    grid.nodes = grid.nodes[:5]  # five of ten connected; the wait for the others times out
    strategy = build_strategy(
        aggregation="fedavg",
        trim_fraction=0.2,
        fraction_train=0.3,
        num_clients=10,
        client_level=True,
        client_clipping="server",
        client_noise_multiplier=1.0,
        client_clip_norm=0.5,
        noise="seeded",
        node_wait=0.01,
    )
    ledger = _one_client_level_round(grid, strategy)
    assert ledger.client_level.rounds == [ClientLevelRound(1, population=5, sampled=3, contributed=3)]  # q = 3/5


def _sampled_rdp_epsilon(z: float, population: int, per_round: int, rounds: int, delta: float) -> float:
    """Straight from dp-accounting: replace-one, m of N without replacement, Gaussian at z / 2."""
    accountant = RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)
    event = dp_accounting.SampledWithoutReplacementDpEvent(population, per_round, dp_accounting.GaussianDpEvent(z / 2))
    accountant.compose(event, rounds)
    return accountant.get_epsilon(delta)


# every client every round; sampled, where the sampled bound wins from round 5; sampled, winning at once
@pytest.mark.slow  # seconds each: kept out of the fast tier (make test runs it)
@pytest.mark.parametrize("z, population, per_round, rounds", [(1.0, 3, 3, 3), (1.0, 10, 1, 5), (2.0, 100, 10, 4)])
def test_the_client_level_plan_is_the_accountants_epsilon_round_by_round(z, population, per_round, rounds):
    curve = planned_epsilons(noise_multiplier=z, delta=DELTA, population=population, per_round=per_round, rounds=rounds)
    assert len(curve) == rounds
    for done, planned in enumerate(curve, start=1):
        expected = _gaussian_rdp_epsilon(z, done, DELTA)
        if per_round < population:
            expected = min(expected, _sampled_rdp_epsilon(z, population, per_round, done, DELTA))
        assert planned == pytest.approx(expected, abs=1e-6)


def test_fedllm_plan_plans_client_level_dp_and_says_when_there_is_nothing_to_plan(capsys):
    assert plan_cli(["debug=smoke", "privacy=client", "federation.num_rounds=3"]) == 0
    out = capsys.readouterr().out
    expected = " ".join(f"{_gaussian_rdp_epsilon(1.0, r, DELTA):.3f}" for r in (1, 2, 3))
    assert f"epsilon after each round: {expected}" in out and "all 3 clients every round" in out
    assert "noise multiplier 1 (std 0.1667 on the mean of 3)" in out and "zero-out one client" in out
    assert plan_cli(["debug=smoke", "privacy=none"]) == 1
    assert "no differential privacy in this run, so nothing to plan" in capsys.readouterr().err


@pytest.mark.slow  # seconds each: kept out of the fast tier (make test runs it)
def test_the_client_level_plan_is_what_the_run_then_reports(tmp_path):
    cfg = tiny_config(federation=FederationConfig(num_clients=3, num_rounds=2), train=TrainConfig(local_steps=1))
    cfg = dataclasses.replace(
        cfg,
        privacy=PrivacyConfig(mode="client", client_delta=DELTA, state_dir=str(tmp_path / "nodes")),
        tracking=dataclasses.replace(cfg.tracking, progress=False),
    )
    prepare_run(cfg, tmp_path / "run")
    summary = run_inprocess(cfg, tmp_path / "run")
    assert summary.rounds_completed == 2
    ledger = json.loads((tmp_path / "run" / "privacy_ledger.json").read_text())
    plan = planned_epsilons(noise_multiplier=1.0, delta=DELTA, population=3, per_round=3, rounds=2)
    assert ledger["client_level"]["epsilon"] == plan[-1]


def _independent_final_epsilon(z, population, per_round, rounds):
    """The planned client-level epsilon after ``rounds``, from dp-accounting directly."""
    expected = _gaussian_rdp_epsilon(z, rounds, DELTA)
    if per_round < population:
        expected = min(expected, _sampled_rdp_epsilon(z, population, per_round, rounds, DELTA))
    return expected


# every client every round (3 and 5 rounds); one of ten sampled, where the sampled bound decides
@pytest.mark.parametrize(
    "target, population, per_round, rounds, pinned",
    [
        (3.0, 10, 10, 3, 1.98765),
        (1.0, 10, 10, 5, 6.523),
        pytest.param(3.0, 10, 1, 5, 1.747, marks=pytest.mark.slow),  # ~25 sampled-bound evaluations: 6 s
    ],
)
def test_the_client_noise_planned_for_a_target_meets_it_within_the_tolerance(
    target, population, per_round, rounds, pinned
):
    z = calibrate_client_noise(
        target_epsilon=target, delta=DELTA, population=population, per_round=per_round, rounds=rounds
    )
    assert target - CLIENT_TOLERANCE <= _independent_final_epsilon(z, population, per_round, rounds) <= target
    assert z == pytest.approx(pinned, rel=5e-3)


def test_a_client_level_target_no_noise_can_meet_is_refused(monkeypatch):
    # dp-accounting's epsilon reaches 0 for very large z, so narrow the range to reach the refusal
    monkeypatch.setattr(client_level, "CLIENT_NOISE_RANGE", (1e-3, 2.0))
    with pytest.raises(PrivacyPlanError, match="client_target_epsilon=1 cannot be met over 6 rounds"):
        calibrate_client_noise(target_epsilon=1.0, delta=DELTA, population=10, per_round=10, rounds=6)


def test_the_composed_experiment_carries_the_planned_client_noise_and_the_plan_says_so(capsys):
    overrides = ["debug=smoke", "privacy=client", "federation.num_rounds=3", "privacy.client_target_epsilon=3"]
    cfg = compose_experiment(overrides)
    z = cfg.privacy.client_noise_multiplier
    assert cfg.privacy.client_target_epsilon == 3.0
    assert 3.0 - CLIENT_TOLERANCE <= _independent_final_epsilon(z, 3, 3, 3) <= 3.0
    # the saved / sent config keeps that noise: a node, or a resumed run, does not plan it again
    assert type(cfg).from_json(cfg.to_json()).privacy.client_noise_multiplier == z
    assert plan_cli(overrides) == 0
    out = capsys.readouterr().out
    assert (
        f"noise multiplier {z:.4g} (planned: the smallest meeting client_target_epsilon 3 after round 3, within it)"
        in out
    )
    # sample-level runs have no client-level noise to plan: the key changes nothing there
    sample = compose_experiment(["debug=smoke", "privacy.client_target_epsilon=3"])
    assert sample.privacy.client_noise_multiplier == 1.0
