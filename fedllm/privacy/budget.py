"""A node's budget check: would the next round take its epsilon past its own cap?

The cap is the node's, not the server's: the effective cap is the lower of the run's target
and the node's ``max-epsilon``, and the effective delta the lower of the two deltas. A
server can therefore lower what a node spends, never raise it.
"""

from __future__ import annotations

from dataclasses import dataclass

from fedllm.config import AccountantName
from fedllm.privacy.accounting import History, epsilon, extend_history


@dataclass(frozen=True)
class Budget:
    """The cap a node enforces: epsilon at delta."""

    max_epsilon: float
    delta: float


@dataclass(frozen=True)
class BudgetDecision:
    """Whether a round may run, and the numbers behind the answer."""

    allowed: bool
    spent: float
    projected: float
    cap: float
    reason: str


def effective_budget(
    *, run_target: float, run_delta: float, node_max_epsilon: float | None, node_delta: float | None
) -> Budget:
    """The stricter of the run's budget and the node's own."""
    cap = run_target if node_max_epsilon is None else min(run_target, node_max_epsilon)
    delta = run_delta if node_delta is None else min(run_delta, node_delta)
    return Budget(max_epsilon=float(cap), delta=float(delta))


def check_round(
    history: History,
    *,
    noise_multiplier: float,
    sample_rate: float,
    steps: int,
    budget: Budget,
    accountant: AccountantName,
) -> BudgetDecision:
    """Decide whether ``steps`` more DP-SGD steps keep the node within ``budget``.

    The projection is the exact epsilon the accountant will report after the round (every
    step is accounted, even one on an empty Poisson batch), so allowed rounds can never
    end above the cap.
    """
    spent = epsilon(history, delta=budget.delta, accountant=accountant)
    after = extend_history(history, noise_multiplier=noise_multiplier, sample_rate=sample_rate, steps=steps)
    projected = epsilon(after, delta=budget.delta, accountant=accountant)
    if projected <= budget.max_epsilon:
        return BudgetDecision(True, spent, projected, budget.max_epsilon, "")
    reason = (
        f"refused: this round would take epsilon from {spent:.4f} to {projected:.4f}, "
        f"above this node's cap {budget.max_epsilon:g} at delta {budget.delta:g}"
    )
    return BudgetDecision(False, spent, projected, budget.max_epsilon, reason)
