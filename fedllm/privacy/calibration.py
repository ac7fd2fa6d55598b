"""Calibrate the DP-SGD noise multiplier to a target epsilon before any training (one client's plan)."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from functools import lru_cache

from opacus.accountants.utils import get_noise_multiplier

from fedllm.config import AccountantName
from fedllm.errors import PrivacyPlanError
from fedllm.privacy import calibration_cache
from fedllm.privacy.accounting import epsilon


@dataclass(frozen=True)
class DPPlan:
    """What one client will run: Poisson rate, noise, steps, and the epsilon it reaches."""

    sample_rate: float
    noise_multiplier: float
    total_steps: int
    delta: float
    accountant: AccountantName
    planned_epsilon: float


def sample_rate_for(batch_size: int, shard_size: int) -> float:
    """The Poisson sampling rate Opacus will run at this sampling size and batch size.

    Opacus derives it as ``1 / len(data_loader)`` = ``1 / ceil(N / batch_size)``, which is
    slightly above ``batch_size / N`` when N is not a multiple of the batch; we plan with
    exactly the rate that will run, so planned and spent epsilon agree. ``shard_size`` is N,
    the record count the sampling is fixed from: a deployed node's public ``sampling-size``
    (never the number of records it holds, which would then leak through the rate), a
    simulated node's shard size.

    Raises:
        PrivacyPlanError: N is smaller than one batch.
    """
    if shard_size < batch_size:
        raise PrivacyPlanError(
            f"a sampling size of {shard_size} records cannot give batches of {batch_size}; "
            "lower train.batch_size (or raise the node's sampling-size / lower federation.num_clients)"
        )
    return 1.0 / math.ceil(shard_size / batch_size)


@lru_cache(maxsize=256)  # pure and called by every client every round: plan once per process
def plan_client(
    *,
    shard_size: int,
    batch_size: int,
    rounds: int,
    local_steps: int,
    target_epsilon: float,
    delta: float,
    accountant: AccountantName,
    noise_multiplier: float | None = None,
) -> DPPlan:
    """Noise for one client that takes part in every round, so its final epsilon <= target.

    Args:
        shard_size: N, the record count the sampling rate is fixed from (a node's public
            ``sampling-size``; see :func:`sample_rate_for`).
        batch_size: expected Poisson batch size at N records.
        rounds: planned federated rounds.
        local_steps: DP-SGD steps per round.
        target_epsilon: epsilon to meet after all rounds.
        delta: the DP delta; must be below 1/N (N, not the records held: the check is a release too).
        accountant: ``rdp`` or ``prv``.
        noise_multiplier: use this fixed noise instead of planning one (the plan then
            reports the epsilon it reaches, which may exceed the target).

    Raises:
        PrivacyPlanError: the target cannot be met, or delta is too large for the shard.
    """
    if delta >= 1.0 / shard_size:
        raise PrivacyPlanError(
            f"privacy.delta={delta} is not below 1/N for a sampling size of {shard_size} records; "
            f"use a delta under {1.0 / shard_size:.1e}"
        )
    rate = sample_rate_for(batch_size, shard_size)
    steps = rounds * local_steps
    if noise_multiplier is None:
        noise_multiplier = calibrate_noise(
            target_epsilon=target_epsilon, delta=delta, sample_rate=rate, steps=steps, accountant=accountant
        )
    reached = epsilon([(noise_multiplier, rate, steps)], delta=delta, accountant=accountant)
    return DPPlan(
        sample_rate=rate,
        noise_multiplier=float(noise_multiplier),
        total_steps=steps,
        delta=delta,
        accountant=accountant,
        planned_epsilon=reached,
    )


TOLERANCE = 0.01  # the search stops within this much epsilon below the target


# Keyed on the mechanism alone: shards of different sizes often run the same sample rate; and
# remembered across processes (calibration_cache): every process of a run plans the same mechanism.
@lru_cache(maxsize=256)
def calibrate_noise(
    *, target_epsilon: float, delta: float, sample_rate: float, steps: int, accountant: AccountantName
) -> float:
    """The noise multiplier Opacus's search finds for ``steps`` steps at ``sample_rate`` to reach
    ``target_epsilon`` at ``delta`` (within :data:`TOLERANCE` below it) under ``accountant``.

    A calibration cached by an earlier process is used only after the real accountant confirms it
    (:meth:`fedllm.privacy.calibration_cache.Calibration.accepts`).

    Raises:
        PrivacyPlanError: no useful noise level reaches the target.
    """
    question = calibration_cache.Calibration(target_epsilon, delta, sample_rate, steps, accountant, TOLERANCE)
    cached = calibration_cache.lookup(question)
    if cached is not None:
        return cached
    noise = search_noise(
        target_epsilon=target_epsilon, delta=delta, sample_rate=sample_rate, steps=steps, accountant=accountant
    )
    calibration_cache.store(question, noise)
    return noise


def search_noise(
    *, target_epsilon: float, delta: float, sample_rate: float, steps: int, accountant: AccountantName
) -> float:
    """Opacus's search itself (no cache): see :func:`calibrate_noise`.

    Raises:
        PrivacyPlanError: no useful noise level reaches the target.
    """
    _check_reachable(target_epsilon, delta, sample_rate, steps, accountant)
    try:
        with warnings.catch_warnings():
            # the bisection probes noise levels far from the answer, where Opacus warns that
            # its RDP orders could be widened; the plan's epsilon is computed unfiltered
            warnings.filterwarnings("ignore", message="Optimal order is the", category=UserWarning)
            return float(
                get_noise_multiplier(
                    target_epsilon=target_epsilon,
                    target_delta=delta,
                    sample_rate=sample_rate,
                    steps=steps,
                    accountant=accountant,
                    epsilon_tolerance=TOLERANCE,
                )
            )
    except ValueError as exc:
        raise PrivacyPlanError(
            f"no noise level reaches epsilon {target_epsilon} after {steps} steps at sample rate "
            f"{sample_rate:.4f}: raise privacy.target_epsilon, or lower federation.num_rounds / "
            f"train.local_steps / train.batch_size ({exc})"
        ) from exc


# Noise beyond this leaves no useful model; an epsilon the accountant cannot certify even here
# is refused at once instead of after Opacus's doubling search up to noise 1e6 (tens of seconds).
MAX_USEFUL_NOISE = 1000.0


def _check_reachable(target_epsilon: float, delta: float, rate: float, steps: int, accountant: AccountantName) -> None:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Optimal order is the", category=UserWarning)
        floor = epsilon([(MAX_USEFUL_NOISE, rate, steps)], delta=delta, accountant=accountant)
    if floor > target_epsilon:
        raise PrivacyPlanError(
            f"no noise level reaches epsilon {target_epsilon} after {steps} steps at sample rate {rate:.4f}: even "
            f"noise multiplier {MAX_USEFUL_NOISE:g} gives epsilon {floor:.3g} with the {accountant} accountant at "
            f"delta {delta:g}; raise privacy.target_epsilon, or lower federation.num_rounds / train.local_steps / "
            "train.batch_size"
        )


def epsilon_by_round(
    *,
    noise_multiplier: float,
    sample_rate: float,
    local_steps: int,
    rounds: int,
    delta: float,
    accountant: AccountantName,
) -> list[float]:
    """Epsilon after each of ``rounds`` rounds of ``local_steps`` DP-SGD steps (index 0 = round 1)."""
    return [
        epsilon([(noise_multiplier, sample_rate, r * local_steps)], delta=delta, accountant=accountant)
        for r in range(1, rounds + 1)
    ]


def rounds_within_cap(
    *,
    noise_multiplier: float,
    sample_rate: float,
    local_steps: int,
    max_rounds: int,
    cap: float,
    delta: float,
    accountant: AccountantName,
) -> int:
    """How many rounds a node can join before its epsilon would pass its own ``cap``."""
    curve = epsilon_by_round(
        noise_multiplier=noise_multiplier,
        sample_rate=sample_rate,
        local_steps=local_steps,
        rounds=max_rounds,
        delta=delta,
        accountant=accountant,
    )
    return sum(1 for value in curve if value <= cap)
