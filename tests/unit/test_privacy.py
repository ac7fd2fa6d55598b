"""Accounting and planning: exact values against independent computations."""

from __future__ import annotations

import math

import dp_accounting
import pytest
from dp_accounting import rdp

from fedllm.errors import PrivacyPlanError
from fedllm.privacy.accounting import epsilon, extend_history
from fedllm.privacy.ledger import PrivacyLedger
from fedllm.privacy.planner import (
    epsilon_by_round,
    plan_client,
    rounds_within_cap,
    sample_rate_for,
)


def _dp_accounting_rdp(noise: float, rate: float, steps: int, delta: float) -> float:
    """Google's dp-accounting, an implementation independent of Opacus."""
    accountant = rdp.RdpAccountant()
    event = dp_accounting.PoissonSampledDpEvent(rate, dp_accounting.GaussianDpEvent(noise))
    accountant.compose(event, steps)
    return accountant.get_epsilon(delta)


def test_opacus_golden_value():
    # Opacus's own reference: RDP, sigma 1.5, q 0.04, 2250 steps, delta 1e-5 -> 7.3291
    assert epsilon([(1.5, 0.04, 2250)], delta=1e-5, accountant="rdp") == pytest.approx(7.3291, abs=1e-4)


@pytest.mark.parametrize(("noise", "rate", "steps"), [
    (1.5, 0.04, 2250),
    (0.490, 1 / 68, 30),   # the default run: 10 clients x ~980 reviews, 6 rounds x 5 steps
    (1.0, 0.01, 1000),
])
def test_rdp_matches_google_dp_accounting(noise, rate, steps):
    ours = epsilon([(noise, rate, steps)], delta=1e-5, accountant="rdp")
    theirs = _dp_accounting_rdp(noise, rate, steps, 1e-5)
    # the two libraries search different RDP orders; they agree to within 1%
    assert ours == pytest.approx(theirs, rel=0.01)


def test_prv_is_close_to_and_not_above_rdp_for_the_default_schedule():
    rdp_eps = epsilon([(0.490, 1 / 68, 30)], delta=1e-5, accountant="rdp")
    prv_eps = epsilon([(0.490, 1 / 68, 30)], delta=1e-5, accountant="prv")
    assert 0.5 * rdp_eps < prv_eps <= rdp_eps * 1.01


def test_rounds_compose_to_the_one_shot_value():
    history: list = []
    for _ in range(6):
        history = extend_history(history, noise_multiplier=0.7, sample_rate=0.02, steps=5)
    assert history == [(0.7, 0.02, 30)]
    assert epsilon(history, delta=1e-5, accountant="rdp") == epsilon([(0.7, 0.02, 30)], delta=1e-5,
                                                                      accountant="rdp")


def test_mixed_histories_compose_additively_in_rdp():
    a = [(0.8, 0.02, 10)]
    b = [(1.2, 0.05, 20)]
    both = epsilon(a + b, delta=1e-5, accountant="rdp")
    assert both > max(epsilon(a, delta=1e-5, accountant="rdp"), epsilon(b, delta=1e-5, accountant="rdp"))


def test_empty_history_spends_nothing():
    assert epsilon([], delta=1e-5, accountant="rdp") == 0.0


def test_sample_rate_is_the_one_opacus_runs():
    assert sample_rate_for(16, 1080) == 1 / 68  # 1 / ceil(1080 / 16), not 16 / 1080
    assert sample_rate_for(16, 160) == 0.1


@pytest.mark.parametrize("target", [1.0, 3.0, 8.0])
def test_planned_noise_meets_the_target_tightly(target):
    plan = plan_client(shard_size=980, batch_size=16, rounds=6, local_steps=5, target_epsilon=target,
                       delta=1e-5, accountant="rdp")
    assert plan.planned_epsilon <= target
    assert plan.planned_epsilon >= target - 0.02
    reached = epsilon([(plan.noise_multiplier, plan.sample_rate, 30)], delta=1e-5, accountant="rdp")
    assert reached == pytest.approx(plan.planned_epsilon)


def test_impossible_plans_fail_fast_with_what_to_change():
    with pytest.raises(PrivacyPlanError, match="lower train.batch_size"):
        plan_client(shard_size=10, batch_size=16, rounds=1, local_steps=1, target_epsilon=8,
                    delta=1e-5, accountant="rdp")
    with pytest.raises(PrivacyPlanError, match="privacy.delta"):
        plan_client(shard_size=1000, batch_size=16, rounds=1, local_steps=1, target_epsilon=8,
                    delta=0.01, accountant="rdp")
    with pytest.raises(PrivacyPlanError, match="raise privacy.target_epsilon"):
        plan_client(shard_size=100, batch_size=50, rounds=100, local_steps=100, target_epsilon=1e-9,
                    delta=1e-5, accountant="rdp")


def test_fixed_noise_reports_the_epsilon_it_reaches():
    plan = plan_client(shard_size=1000, batch_size=10, rounds=2, local_steps=5, target_epsilon=8,
                       delta=1e-5, accountant="rdp", noise_multiplier=1.0)
    assert plan.noise_multiplier == 1.0
    assert plan.planned_epsilon == epsilon([(1.0, 0.01, 10)], delta=1e-5, accountant="rdp")


def test_higher_sampling_rate_needs_more_noise():
    plans = [plan_client(shard_size=n, batch_size=16, rounds=3, local_steps=5, target_epsilon=8, delta=1e-5,
                         accountant="rdp") for n in (500, 1000)]
    assert [p.sample_rate for p in plans] == [1 / 32, 1 / 63]
    assert plans[0].noise_multiplier > plans[1].noise_multiplier


def test_ledger_recomputes_epsilon_and_round_trips():
    ledger = PrivacyLedger(accountant="rdp", delta=1e-5, target_epsilon=8.0)
    ledger.record(0, [(0.5, 0.02, 10)], server_round=2)
    ledger.record(1, [(0.5, 0.02, 5)], server_round=1)
    assert ledger.epsilon(0) == epsilon([(0.5, 0.02, 10)], delta=1e-5, accountant="rdp")
    assert ledger.max_epsilon() == ledger.epsilon(0)
    restored = PrivacyLedger(accountant="rdp", delta=1e-5, target_epsilon=8.0)
    restored.load_state_dict(ledger.state_dict())
    assert restored.epsilons() == ledger.epsilons()
    report = restored.to_report()["clients"]["0"]
    assert (report["noise_multiplier"], report["sample_rate"], report["steps"]) == (0.5, 0.02, 10)
    with pytest.raises(ValueError, match="prv"):
        PrivacyLedger(accountant="prv", delta=1e-5, target_epsilon=8.0).load_state_dict(ledger.state_dict())
    assert math.isfinite(report["epsilon"])


def test_epsilon_by_round_grows_and_ends_at_the_plan():
    plan = plan_client(shard_size=1000, batch_size=16, rounds=4, local_steps=5, target_epsilon=4,
                       delta=1e-5, accountant="rdp")
    curve = epsilon_by_round(noise_multiplier=plan.noise_multiplier, sample_rate=plan.sample_rate,
                             local_steps=5, rounds=4, delta=1e-5, accountant="rdp")
    assert curve == sorted(curve) and len(set(curve)) == 4
    assert curve[-1] == pytest.approx(plan.planned_epsilon)


def test_a_lower_cap_allows_fewer_rounds():
    kwargs = dict(noise_multiplier=1.0, sample_rate=0.02, local_steps=10, delta=1e-5, accountant="rdp")
    curve = epsilon_by_round(rounds=6, **kwargs)
    assert rounds_within_cap(max_rounds=6, cap=curve[1], **kwargs) == 2
    assert rounds_within_cap(max_rounds=6, cap=curve[1] - 1e-9, **kwargs) == 1
    assert rounds_within_cap(max_rounds=6, cap=100.0, **kwargs) == 6
