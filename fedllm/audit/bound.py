"""The one-run audit's statistics: from canary scores to an empirical lower bound on epsilon.

Steinke, Nasr and Jagielski, "Privacy auditing with one (1) training run" (NeurIPS 2023,
arXiv:2305.08846). Each of ``m`` canaries is included independently with probability 1/2. The
auditor scores every canary, guesses "in" for the ``k+`` highest scores and "out" for the ``k-``
lowest (``r = k+ + k-`` guesses; it abstains on the rest) and counts ``v`` correct guesses.

If the training run is (eps, delta)-DP with respect to one canary, the paper's Theorem 5.2 (its
Algorithm 2 computes it) bounds the chance of ``v`` or more correct guesses: with
``q = e^eps / (1 + e^eps)`` and ``B ~ Binomial(r, q)``,

    P[W >= v] <= p(eps, delta) = P[B >= v] + 2 m delta * max_{i=1..v} P[v - i <= B < v] / i

(capped at 1). ``p`` is a p-value for the hypothesis "the run is (eps, delta)-DP": the empirical
lower bound at confidence ``1 - beta`` is the largest eps whose ``p`` is at most ``beta``. The same
formula is in google-deepmind/jax_privacy, ``jax_privacy/auditing.py`` (``_one_run_p_value``); this
is an independent numpy implementation (scipy is only a transitive dependency here).

Everything here is pure arithmetic on counts and scores: no torch, no run state.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

EPS_MAX = 50.0  # search ceiling: e^50 odds are beyond anything m canaries could ever show
EPS_TOL = 1e-4  # bisection tolerance on eps
# Guess counts tried by `audit_bound`, as fractions of the canaries (split evenly in/out).
DEFAULT_GUESS_FRACTIONS = (0.02, 0.05, 0.1, 0.2, 0.5, 1.0)


@dataclass(frozen=True)
class Guesses:
    """The outcome of one guessing rule: how many guesses were made and how many were right."""

    guesses: int
    correct: int
    k_plus: int
    k_minus: int


@dataclass(frozen=True)
class AuditResult:
    """The reported audit: the best Bonferroni-corrected bound over a fixed grid of guess counts.

    ``confidence`` is the overall (family-wise) confidence; every rule of every adversary was
    tested at ``test_confidence = 1 - (1 - confidence) / hypotheses``. ``ceiling`` is the largest bound this
    number of guesses could have given at that corrected confidence (every guess right), so
    ``epsilon_lower_bound`` close to ``ceiling`` means the audit, not the run, is the limit.
    """

    epsilon_lower_bound: float
    canaries: int
    guesses: int
    correct: int
    k_plus: int
    k_minus: int
    confidence: float
    delta: float
    ceiling: float
    hypotheses: int
    test_confidence: float
    reversed: bool = False  # the guesses were made on the reversed scores (two-sided audits only)

    def to_dict(self) -> dict[str, float | int]:
        """Plain JSON-ready fields."""
        return asdict(self)


def guess_from_scores(scores: Sequence[float], included: Sequence[bool], k_plus: int, k_minus: int) -> Guesses:
    """Guess "in" for the ``k_plus`` highest scores and "out" for the ``k_minus`` lowest; count hits.

    A higher score must mean "more likely included". Canaries are ranked by ``(score, index)``
    ascending: the first ``k_minus`` are guessed out and the last ``k_plus`` in, so ties are broken
    by index (among equal scores a lower index is guessed out first, a higher index in first). The
    index is public and chosen before training, so this deterministic rule keeps the guesses a
    function of the scores alone, as the theorem requires; the two sets never overlap.
    """
    s = np.asarray(scores, dtype=float)
    inc = np.asarray(included, dtype=bool)
    m = s.shape[0]
    if s.ndim != 1 or inc.shape != (m,):
        raise ValueError(f"scores and included must be 1-D of equal length, got {s.shape} and {inc.shape}")
    if not np.all(np.isfinite(s)):
        raise ValueError("scores must be finite (a NaN has no rank)")
    if k_plus < 0 or k_minus < 0 or k_plus + k_minus > m:
        raise ValueError(f"need 0 <= k_plus, k_minus and k_plus + k_minus <= {m}, got {k_plus}, {k_minus}")
    # lexsort sorts by the last key first: score, then index for ties
    order = np.lexsort((np.arange(m), s))
    out_idx = order[:k_minus]
    in_idx = order[m - k_plus :]
    correct = int(inc[in_idx].sum()) + int((~inc[out_idx]).sum())
    return Guesses(guesses=k_plus + k_minus, correct=correct, k_plus=k_plus, k_minus=k_minus)


@functools.lru_cache(maxsize=128)
def _log_binom_coefficients(n: int) -> np.ndarray:
    # log C(n, k), k = 0..n, from lgamma: exact to float precision even for large n, and cached
    # because the bisection evaluates the same r dozens of times.
    log_fact = np.fromiter((math.lgamma(k + 1) for k in range(n + 1)), dtype=float, count=n + 1)
    out = log_fact[n] - log_fact - log_fact[::-1]
    out.flags.writeable = False
    return out


def _binomial_pmf(n: int, eps: float) -> np.ndarray:
    # pmf of Binomial(n, q), q = e^eps / (1 + e^eps), in log space so that neither q nor 1 - q is
    # ever rounded to 1 or 0 (1 - q = e^-eps q underflows nothing for eps <= EPS_MAX).
    log_q = -math.log1p(math.exp(-eps))
    log_1mq = log_q - eps
    k = np.arange(n + 1, dtype=float)
    return np.exp(_log_binom_coefficients(n) + k * log_q + (n - k) * log_1mq)


def p_value(*, canaries: int, guesses: int, correct: int, eps: float, delta: float) -> float:
    """Theorem 5.2's bound on P[``correct`` or more right of ``guesses``] under (eps, delta)-DP.

    ``beta + 2 m delta alpha`` with ``beta = P[B >= v]``, ``alpha = max_i P[v-i <= B < v] / i``,
    ``B ~ Binomial(r, e^eps / (1 + e^eps))``, capped at 1.
    """
    _check_counts(canaries, guesses, correct)
    if correct == 0:
        return 1.0  # "at least 0 right" is certain
    pmf = _binomial_pmf(guesses, eps)
    beta = float(pmf[correct:].sum())
    if delta == 0:
        return min(beta, 1.0)
    # P[v-i <= B < v] for i = 1..v: cumulative sums of pmf[v-1], pmf[v-2], ..., pmf[0]
    below = np.cumsum(pmf[correct - 1 :: -1])
    alpha = float(np.max(below / np.arange(1, correct + 1)))
    return min(beta + 2.0 * canaries * delta * alpha, 1.0)


def epsilon_lower_bound(*, canaries: int, guesses: int, correct: int, delta: float, confidence: float) -> float:
    """The largest eps at which (eps, delta)-DP is rejected at ``confidence``; 0.0 if none is.

    Bisection on [0, EPS_MAX] to ``EPS_TOL`` for the point where ``p_value`` crosses
    ``1 - confidence``; the returned value is always one where the p-value was checked to be at
    most ``1 - confidence`` (the lower end of the last bracket), so the tolerance only ever makes
    the bound smaller. ``p_value`` grows with eps (the binomial tail dominates it); and since an
    eps-DP run is also eps'-DP for every eps' > eps, rejecting any eps' rejects every smaller eps,
    so whichever crossing bisection lands on is a valid lower bound.
    """
    _check_counts(canaries, guesses, correct)
    _check_privacy(delta, confidence)
    significance = 1.0 - confidence

    def rejected(eps: float, d: float) -> bool:
        return p_value(canaries=canaries, guesses=guesses, correct=correct, eps=eps, delta=d) <= significance

    # Fail fast, as the delta term only adds: if eps = 0 survives at delta = 0 it survives here.
    if not rejected(0.0, 0.0) or not rejected(0.0, delta):
        return 0.0
    if rejected(EPS_MAX, delta):
        return EPS_MAX
    lo, hi = 0.0, EPS_MAX
    while hi - lo > EPS_TOL:
        mid = 0.5 * (lo + hi)
        if rejected(mid, delta):
            lo = mid
        else:
            hi = mid
    return lo


def max_lower_bound(*, canaries: int, guesses: int, delta: float, confidence: float) -> float:
    """The ceiling of the one-run audit: the bound when every one of ``guesses`` guesses is right.

    No run, however leaky, can be shown to have a larger eps with this many guesses (about 3.5 at
    100 guesses, 5.8 at 1,000 and 7.4 at 5,000, at 95% and small delta).
    """
    return epsilon_lower_bound(canaries=canaries, guesses=guesses, correct=guesses, delta=delta, confidence=confidence)


def guess_grid(canaries: int, guess_fractions: Sequence[float] = DEFAULT_GUESS_FRACTIONS) -> list[tuple[int, int]]:
    """The fixed grid of guessing rules ``(k+, k-)``: ``r = round(f m)`` guesses for each fraction
    ``f``, either split evenly (``k+ = r // 2`` in, ``k- = r - k+`` out) or all "in" (``k+ = r``),
    duplicates dropped. It depends on ``m`` and ``guess_fractions`` only, never on the scores.

    Raises:
        ValueError: no canaries, or a guess fraction outside (0, 1].
    """
    if canaries < 1:
        raise ValueError("no canaries")
    grid: list[tuple[int, int]] = []
    for f in guess_fractions:
        if not 0 < f <= 1:
            raise ValueError(f"guess fractions must be in (0, 1], got {f}")
        r = min(canaries, max(1, round(f * canaries)))
        # two rules per count: half "in" and half "out", or all "in" (a canary included but never
        # sampled looks left out, so under DP-SGD's subsampling the lowest scores are the weaker guesses)
        for split in ((r // 2, r - r // 2), (r, 0)):
            if split not in grid:
                grid.append(split)
    return grid


def rules_count(
    canaries: int, *, two_sided: bool = False, guess_fractions: Sequence[float] = DEFAULT_GUESS_FRACTIONS
) -> int:
    """How many tests :func:`audit_bound` runs for one adversary (its share of a Bonferroni family)."""
    return len(guess_grid(canaries, guess_fractions)) * (2 if two_sided else 1)


def audit_bound(
    scores: Sequence[float],
    included: Sequence[bool],
    *,
    delta: float,
    confidence: float,
    guess_fractions: Sequence[float] = DEFAULT_GUESS_FRACTIONS,
    two_sided: bool = False,
    family: int | None = None,
) -> AuditResult:
    """Audit one run: the best bound over a fixed grid of guessing rules, Bonferroni-corrected.

    Picking the number of guesses after looking at which count gives the largest bound on the same
    canaries would overstate the bound. Instead the grid is fixed in advance (:func:`guess_grid`).
    Each of the ``H`` tests is run at confidence ``1 - (1 - confidence) / H``, so by the union
    bound the largest of them is a valid lower bound at ``confidence``. Ties between equal bounds go
    to the earlier rule.

    Args:
        scores: each canary's score (higher: more likely in).
        included: the truth the guesses are checked against.
        delta: the run's delta.
        confidence: the family-wise confidence.
        guess_fractions: the grid's guess counts as fractions of the canaries.
        two_sided: also guess on the reversed scores (lower: more likely in), each rule then counted
            twice in ``H``: for a channel whose direction is not known in advance.
        family: ``H`` when several adversaries score the same canaries and the audit reports the
            largest of their bounds: the sum of their :func:`rules_count` (default: this adversary's
            own), so that maximum, too, holds at ``confidence``.

    Raises:
        ValueError: no canaries, a guess fraction outside (0, 1], a family smaller than this
            adversary's rules, or delta or confidence out of range.
    """
    _check_privacy(delta, confidence)
    m = len(scores)
    grid = guess_grid(m, guess_fractions)
    signs = (1.0, -1.0) if two_sided else (1.0,)
    rules = len(grid) * len(signs)
    hypotheses = rules if family is None else family
    if hypotheses < rules:
        raise ValueError(f"a family of {hypotheses} tests cannot hold this adversary's {rules}")
    test_confidence = 1.0 - (1.0 - confidence) / hypotheses
    best: AuditResult | None = None
    for sign in signs:
        oriented = [sign * float(v) for v in scores]
        for k_plus, k_minus in grid:
            g = guess_from_scores(oriented, included, k_plus, k_minus)
            eps = epsilon_lower_bound(
                canaries=m, guesses=g.guesses, correct=g.correct, delta=delta, confidence=test_confidence
            )
            if best is None or eps > best.epsilon_lower_bound:
                best = AuditResult(
                    epsilon_lower_bound=eps,
                    canaries=m,
                    guesses=g.guesses,
                    correct=g.correct,
                    k_plus=g.k_plus,
                    k_minus=g.k_minus,
                    confidence=confidence,
                    delta=delta,
                    ceiling=max_lower_bound(canaries=m, guesses=g.guesses, delta=delta, confidence=test_confidence),
                    hypotheses=hypotheses,
                    test_confidence=test_confidence,
                    reversed=sign < 0,
                )
    assert best is not None  # the grid is never empty: every fraction gives r >= 1
    return best


def _check_counts(canaries: int, guesses: int, correct: int) -> None:
    if not 0 <= correct <= guesses <= canaries:
        raise ValueError(f"need 0 <= correct <= guesses <= canaries, got {correct}, {guesses}, {canaries}")


def _check_privacy(delta: float, confidence: float) -> None:
    if not 0 <= delta < 1:
        raise ValueError(f"delta must be in [0, 1), got {delta}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
