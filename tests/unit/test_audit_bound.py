"""The one-run audit's bound against independent computations, its ceiling, and a simulated audit."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest

from fedllm.audit.bound import (
    AuditResult,
    Guesses,
    audit_bound,
    epsilon_lower_bound,
    guess_from_scores,
    max_lower_bound,
    p_value,
    rules_count,
)


def _exact_tail(r: int, v: int, q: Fraction) -> Fraction:
    # P[Binomial(r, q) >= v], exactly, straight from the definition
    return sum((math.comb(r, k) * q**k * (1 - q) ** (r - k) for k in range(v, r + 1)), Fraction(0))


def _exact_p_value(m: int, r: int, v: int, q: Fraction, delta: Fraction) -> Fraction:
    # Theorem 5.2 written out term by term: beta + 2 m delta max_i P[v-i <= B < v] / i
    beta = _exact_tail(r, v, q)
    alpha = max((_exact_tail(r, v - i, q) - beta) / i for i in range(1, v + 1))
    return min(beta + 2 * m * delta * alpha, Fraction(1))


def _brute_force_bound(r: int, v: int, significance: Fraction) -> float:
    # delta = 0: bisect on q itself (dyadic rationals, exact tails), then eps = logit(q)
    if _exact_tail(r, v, Fraction(1, 2)) > significance:
        return 0.0
    lo, hi = Fraction(1, 2), Fraction(1)
    for _ in range(34):
        mid = (lo + hi) / 2
        if _exact_tail(r, v, mid) <= significance:
            lo = mid
        else:
            hi = mid
    return math.log(lo / (1 - lo))


@pytest.mark.parametrize(("r", "v"), [(10, 10), (20, 17), (40, 30), (60, 41), (25, 13)])
def test_delta_zero_bound_matches_exact_brute_force(r: int, v: int) -> None:
    expected = _brute_force_bound(r, v, Fraction(1, 20))
    got = epsilon_lower_bound(canaries=2 * r, guesses=r, correct=v, delta=0.0, confidence=0.95)
    assert got == pytest.approx(expected, abs=2e-4)
    if (r, v) != (25, 13):
        assert got > 0.1  # the cases are not all trivially zero


@pytest.mark.parametrize(
    ("m", "r", "v", "q", "delta"),
    [
        (50, 30, 25, Fraction(3, 4), Fraction(1, 1000)),
        (200, 40, 36, Fraction(9, 10), Fraction(1, 10**5)),
        (20, 12, 7, Fraction(3, 5), Fraction(1, 50)),
    ],
)
def test_p_value_with_delta_matches_exact_formula(m: int, r: int, v: int, q: Fraction, delta: Fraction) -> None:
    eps = math.log(q / (1 - q))
    expected = float(_exact_p_value(m, r, v, q, delta))
    got = p_value(canaries=m, guesses=r, correct=v, eps=eps, delta=float(delta))
    assert got == pytest.approx(expected, rel=1e-9)
    # and the delta term is really there
    assert got > float(_exact_tail(r, v, q)) * (1 + 1e-6)


@pytest.mark.parametrize("r", [1, 7, 100, 1000, 5000])
def test_ceiling_without_delta_is_closed_form(r: int) -> None:
    # all r right, delta = 0: q^r <= 0.05, so the bound is logit(0.05^(1/r)), or 0 when that is negative
    q = 0.05 ** (1 / r)
    expected = max(0.0, math.log(q / (1 - q)))
    assert max_lower_bound(canaries=r, guesses=r, delta=0.0, confidence=0.95) == pytest.approx(expected, abs=2e-4)


@pytest.mark.parametrize(("r", "expected"), [(100, 3.5), (1000, 5.8), (5000, 7.4)])
def test_ceiling_figures(r: int, expected: float) -> None:
    # The one-run ceilings at 95%: delta = 1e-5 with every canary guessed (m = r).
    got = max_lower_bound(canaries=r, guesses=r, delta=1e-5, confidence=0.95)
    assert got == pytest.approx(expected, abs=0.15)
    # delta only lowers it, and more canaries (a larger 2 m delta term) lower it further
    assert got <= max_lower_bound(canaries=r, guesses=r, delta=0.0, confidence=0.95)
    assert max_lower_bound(canaries=20 * r, guesses=r, delta=1e-5, confidence=0.95) < got


def test_more_correct_never_lowers_the_bound_and_chance_gives_zero() -> None:
    for delta in (0.0, 1e-5):
        bounds = [
            epsilon_lower_bound(canaries=500, guesses=200, correct=v, delta=delta, confidence=0.95)
            for v in range(0, 201, 5)
        ]
        assert all(a <= b for a, b in zip(bounds, bounds[1:], strict=False))
        assert bounds[-1] == max_lower_bound(canaries=500, guesses=200, delta=delta, confidence=0.95)
        assert bounds[-1] > 3.0
    for v in (0, 90, 100, 105):  # at or around chance (100 of 200): nothing rejected
        assert epsilon_lower_bound(canaries=500, guesses=200, correct=v, delta=0.0, confidence=0.95) == 0.0
    # a higher confidence demands more, never less
    assert epsilon_lower_bound(
        canaries=500, guesses=200, correct=170, delta=0.0, confidence=0.99
    ) < epsilon_lower_bound(canaries=500, guesses=200, correct=170, delta=0.0, confidence=0.95)


@pytest.mark.parametrize(
    ("m", "r", "v", "delta"), [(1000, 100, 90, 1e-5), (10**5, 1000, 990, 1e-5), (100, 50, 30, 1e-3), (50, 50, 50, 1e-2)]
)
def test_p_value_grows_with_eps(m: int, r: int, v: int, delta: float) -> None:
    # bisection relies on it
    ps = [p_value(canaries=m, guesses=r, correct=v, eps=e, delta=delta) for e in np.linspace(0, 12, 241)]
    assert all(a <= b + 1e-12 for a, b in zip(ps, ps[1:], strict=False))


def _randomized_response_audit(rng: np.random.Generator, eps: float, m: int) -> AuditResult:
    # An exactly eps-DP mechanism per canary: it reports the canary's bit, flipped with probability
    # 1 / (1 + e^eps). The reported bit is the score (ties broken by index, independent of the bits).
    included = rng.random(m) < 0.5
    truthful = rng.random(m) < math.exp(eps) / (1 + math.exp(eps))
    scores = np.where(truthful == included, 1.0, 0.0)
    return audit_bound(scores, included, delta=0.0, confidence=0.95)


@pytest.mark.slow  # seconds each: kept out of the fast tier (make test runs it)
def test_simulated_randomized_response_audit_is_valid_and_informative() -> None:
    rng = np.random.default_rng(20230513)
    bounds = np.array([_randomized_response_audit(rng, 1.0, 1000).epsilon_lower_bound for _ in range(200)])
    # valid: exceeds the true eps = 1 in at most 5% of audits in expectation
    assert np.mean(bounds > 1.0) <= 0.10
    # informative: typically not far below it
    assert np.median(bounds) > 0.6


def test_audit_bound_reports_a_bonferroni_corrected_grid_point() -> None:
    rng = np.random.default_rng(7)
    m = 400
    included = rng.random(m) < 0.5
    scores = included * 2.0 + rng.normal(size=m)  # a strong, noisy signal
    res = audit_bound(scores, included, delta=1e-5, confidence=0.95, guess_fractions=(0.05, 0.1, 0.5, 1.0))
    assert res.hypotheses == 8  # 4 counts x (half in / half out, all in)
    assert res.test_confidence == pytest.approx(1 - 0.05 / 8)
    assert res.guesses in {20, 40, 200, 400} and res.k_plus + res.k_minus == res.guesses
    assert res.k_plus in (res.guesses // 2, res.guesses)
    assert res.correct == guess_from_scores(scores, included, res.k_plus, res.k_minus).correct
    assert res.epsilon_lower_bound == epsilon_lower_bound(
        canaries=m, guesses=res.guesses, correct=res.correct, delta=1e-5, confidence=res.test_confidence
    )
    assert 0 < res.epsilon_lower_bound <= res.ceiling
    assert res.ceiling == max_lower_bound(canaries=m, guesses=res.guesses, delta=1e-5, confidence=res.test_confidence)
    # no other grid point beats it even uncorrected at the same level
    for r in (20, 40, 200, 400):
        for k_plus in (r // 2, r):
            g = guess_from_scores(scores, included, k_plus, r - k_plus)
            assert (
                epsilon_lower_bound(
                    canaries=m, guesses=r, correct=g.correct, delta=1e-5, confidence=res.test_confidence
                )
                <= res.epsilon_lower_bound
            )
    d = res.to_dict()
    assert d["epsilon_lower_bound"] == res.epsilon_lower_bound and d["confidence"] == 0.95
    # duplicate rules (tiny m) count once in the correction: r=1 gives (0 in, 1 out) and (1 in), r=2 (1, 1) and (2, 0)
    grid = (0.1, 0.2, 1.0)
    assert audit_bound([0.0, 1.0], [False, True], delta=0.0, confidence=0.95, guess_fractions=grid).hypotheses == 4


def test_guess_from_scores_hand_example() -> None:
    scores = [0.9, 0.1, 0.5, 0.5, 0.7, 0.1]
    included = [True, False, True, False, False, True]
    # ranked by (score, index): 1, 5, 2, 3, 4, 0 -> out: 1, 5; in: 4, 0
    assert guess_from_scores(scores, included, 2, 2) == Guesses(guesses=4, correct=2, k_plus=2, k_minus=2)
    # ties by index: in = 3, 4, 0 (3 wins the 0.5 tie over 2); out = 1 (1 wins the 0.1 tie over 5)
    assert guess_from_scores(scores, included, 3, 1) == Guesses(guesses=4, correct=2, k_plus=3, k_minus=1)
    assert guess_from_scores(scores, included, 0, 0) == Guesses(guesses=0, correct=0, k_plus=0, k_minus=0)
    assert guess_from_scores(scores, included, 6, 0).correct == 3
    with pytest.raises(ValueError):
        guess_from_scores(scores, included, 4, 3)
    with pytest.raises(ValueError):
        guess_from_scores([0.1, float("nan")], [True, False], 1, 0)


def test_rejects_invalid_inputs() -> None:
    with pytest.raises(ValueError):
        epsilon_lower_bound(canaries=10, guesses=11, correct=5, delta=0.0, confidence=0.95)
    with pytest.raises(ValueError):
        epsilon_lower_bound(canaries=10, guesses=10, correct=5, delta=0.0, confidence=1.0)
    with pytest.raises(ValueError):
        max_lower_bound(canaries=10, guesses=10, delta=-1e-5, confidence=0.95)


def test_two_sided_audit_catches_a_reversed_signal_and_pays_for_it_in_the_family() -> None:
    rng = np.random.default_rng(3)
    m = 400
    included = rng.random(m) < 0.5
    scores = -(included * 3.0 + rng.normal(size=m))  # lower: more likely in
    one_sided = audit_bound(scores, included, delta=1e-5, confidence=0.95)
    two_sided = audit_bound(scores, included, delta=1e-5, confidence=0.95, two_sided=True)
    assert one_sided.epsilon_lower_bound == 0.0 and not one_sided.reversed
    assert two_sided.reversed and two_sided.epsilon_lower_bound > 1.0
    assert two_sided.hypotheses == 2 * one_sided.hypotheses == 2 * rules_count(m)
    assert rules_count(m, two_sided=True) == two_sided.hypotheses
    # the same guesses tested in a larger family (five adversaries) give a smaller bound, never a larger one
    family = 5 * two_sided.hypotheses
    wider = audit_bound(scores, included, delta=1e-5, confidence=0.95, two_sided=True, family=family)
    assert wider.test_confidence == pytest.approx(1 - 0.05 / family)
    assert wider.epsilon_lower_bound < two_sided.epsilon_lower_bound
    with pytest.raises(ValueError, match="family"):
        audit_bound(scores, included, delta=1e-5, confidence=0.95, two_sided=True, family=3)
