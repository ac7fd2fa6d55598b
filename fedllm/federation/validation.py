"""Every client update is untrusted input: check its tensors before anything aggregates them.

An update must hold exactly the adapter tensors the server sent (names, shapes, dtypes),
every value finite; anything else raises :class:`~fedllm.errors.UpdateRejected` with the
reason (the metrics are parsed by :mod:`fedllm.federation.protocol`). An update far larger
than the round's others (a scaled or poisoned update) is rejected by :func:`norm_outliers`,
except under client-level DP, where clipping bounds every update instead; every update kept is
then clipped (:func:`clip_bounds`) so that it moves the weighted average no further than the
median of the round's other updates does.

A DP history is untrusted too, and an accountant's work grows with it (Opacus's PRV accountant
needs gigabytes for one entry of 10^7 steps): :func:`bounded_history` bounds every entry before
any accountant sees it.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from flwr.app import ArrayRecord, RecordDict

from fedllm.config import ExperimentConfig
from fedllm.errors import PrivacyPlanError, UpdateRejected
from fedllm.federation import records as keys
from fedllm.planning import plan_for


@dataclass(frozen=True)
class TensorSpec:
    """Name, shape and dtype of one adapter tensor the server sent."""

    shape: tuple[int, ...]
    dtype: str


def expected_update(arrays: ArrayRecord) -> dict[str, TensorSpec]:
    """What a reply to ``arrays`` must contain."""
    return {name: TensorSpec(tuple(array.shape), str(array.dtype)) for name, array in arrays.items()}


def validate_arrays(content: RecordDict, expected: Mapping[str, TensorSpec]) -> ArrayRecord:
    """The reply's adapter tensors: exactly the expected names, shapes and dtypes, all finite.

    Raises:
        UpdateRejected: anything else.
    """
    array_records = content.array_records
    if list(array_records) != [keys.ARRAYS]:
        raise UpdateRejected(f"expected exactly one array record {keys.ARRAYS!r}, got {list(array_records)}")
    arrays = array_records[keys.ARRAYS]
    missing, extra = sorted(set(expected) - set(arrays)), sorted(set(arrays) - set(expected))
    if missing or extra:
        raise UpdateRejected(f"adapter tensors differ from those sent: missing {missing[:3]}, unexpected {extra[:3]}")
    for name, array in arrays.items():
        spec = expected[name]
        if (tuple(array.shape), str(array.dtype)) != (spec.shape, spec.dtype):
            raise UpdateRejected(
                f"{name}: shape {tuple(array.shape)} {array.dtype}, expected {spec.shape} {spec.dtype}"
            )
        values = decoded(name, array)
        # the payload itself, not only the metadata declared beside it: a (8, 65) float64 payload
        # declared (8, 64) float32 would otherwise crash the norm or turn the global adapter float64
        if (values.shape, str(values.dtype)) != (spec.shape, spec.dtype):
            raise UpdateRejected(
                f"{name}: payload holds {values.shape} {values.dtype}, declared and expected {spec.shape} {spec.dtype}"
            )
        if not np.isfinite(values).all():
            raise UpdateRejected(f"{name}: holds NaN or infinite values")
    return arrays


def decoded(name: str, array) -> np.ndarray:
    """The numpy payload of a Flower ``Array``.

    Raises:
        UpdateRejected: the bytes are not a numpy array.
    """
    try:
        values = array.numpy()
    except Exception as exc:  # noqa: BLE001 - any decoding failure of untrusted bytes is a rejection
        raise UpdateRejected(f"{name}: payload cannot be decoded ({type(exc).__name__})") from exc
    if not isinstance(values, np.ndarray) or values.dtype == object:
        raise UpdateRejected(f"{name}: payload is not a numeric array")
    return values


def update_norm(arrays: ArrayRecord, reference: ArrayRecord) -> float:
    """L2 norm of ``arrays - reference`` over all tensors."""
    total = 0.0
    for name, array in arrays.items():
        diff = array.numpy().astype(np.float64) - reference[name].numpy().astype(np.float64)
        total += float(np.square(diff).sum())
    return math.sqrt(total)


def norm_outliers(norms: Mapping[int, float], ratio: float, max_norm: float | None) -> dict[int, str]:
    """Updates to reject for their size: above ``max_norm``, or above ``ratio`` x the round's
    median norm (only with 3 or more updates, where the median is an honest majority's).

    Not for client-level DP: whether an update is kept then depends on the other clients'
    updates (one client's data can get another's dropped), which its accounting does not cover.
    """
    rejected = {}
    median = statistics.median(norms.values()) if len(norms) >= 3 else None
    for index, norm in norms.items():
        if max_norm is not None and norm > max_norm:
            rejected[index] = f"update norm {norm:.4g} above federation.max_update_norm={max_norm:g}"
        elif median is not None and median > 0 and norm > ratio * median:
            rejected[index] = (
                f"update norm {norm:.4g} is {norm / median:.0f}x the round's median {median:.4g} "
                f"(limit federation.update_norm_ratio={ratio:g})"
            )
    return rejected


def clip_bounds(norms: list[float], weights: list[float]) -> list[float | None]:
    """The norm each update is clipped to, so that no update moves the weighted average more than
    the median of the *other* updates does: update ``i`` is clipped to
    ``median(w_j * norm_j, j != i) / w_i`` (with equal weights, the median of the others' norms).
    No update raises its own bound, and with an honest majority among the others the bound is an
    honest one. None (no clip) for a lone update: no peer exists to measure it by.

    Args:
        norms: the update norms of the round's accepted updates, in order.
        weights: their FedAvg weights, in the same order (all positive).

    Returns:
        One bound per update, in the same order.
    """
    if len(norms) < 2:
        return [None] * len(norms)
    pulls = [weight * norm for weight, norm in zip(weights, norms, strict=True)]
    return [statistics.median(pulls[:i] + pulls[i + 1 :]) / weights[i] for i in range(len(norms))]


MAX_MECHANISMS = 8  # entries of a node's lifetime history: its runs and re-plans, each a (noise, rate) change
GENERIC_MAX_STEPS = 10**4  # without a plan to measure it by (no sample-level DP in this run)


def bounded_history(history: list[tuple[float, float, int]], max_steps: int) -> None:
    """Check that ``history`` is cheap to account: at most :data:`MAX_MECHANISMS` entries, each
    at sample rate ``1/k`` for a whole ``k`` (a node's rate is its Poisson batches per pass), at
    most ``max_steps`` steps in all. Costs nothing: no accountant runs.

    Raises:
        UpdateRejected: the history is longer or larger than any node of this run could hold.
    """
    if len(history) > MAX_MECHANISMS:
        raise UpdateRejected(f"dp-history: {len(history)} mechanisms, more than {MAX_MECHANISMS} in a node's lifetime")
    for _, rate, _ in history:
        batches = round(1.0 / rate)
        if batches < 1 or 1.0 / batches != rate:
            raise UpdateRejected(f"dp-history: sample rate {rate!r} is not 1/k for a whole number of batches k")
    total = sum(steps for _, _, steps in history)
    if total > max_steps:
        raise UpdateRejected(f"dp-history: {total} steps in all, more than the {max_steps} this run allows a node")


@dataclass(frozen=True)
class MechanismCheck:
    """What the run's plan lets a node's DP history say about the round it answers.

    A node plans its noise from the run's settings and its own sample rate ``1/k`` (``k`` Poisson
    batches per pass), so the server can recompute the noise for any ``k`` and check that the
    history's last mechanism is the one this run asked for, and that the node's total steps grew
    by at least one round's worth since its last report (its lifetime ledger may also hold
    other runs). A public shard size must fit the sample rate: ``(k - 1) * b < n <= k * b``.
    """

    cfg: ExperimentConfig  # the run whose plan the nodes follow

    @property
    def max_steps(self) -> int:
        """The most steps a node's lifetime history may hold: :data:`MAX_MECHANISMS` runs of this
        run's length (a node whose cap is the run's target can afford about one such run)."""
        return MAX_MECHANISMS * self.cfg.federation.num_rounds * self.cfg.train.local_steps

    def check_bounds(self, history: list[tuple[float, float, int]]) -> None:
        """Every entry of ``history`` within what a node of this run could hold
        (:func:`bounded_history`); for refusals and updates alike, before any accounting.

        Raises:
            UpdateRejected: it is not.
        """
        bounded_history(history, self.max_steps)

    def check(
        self, history: list[tuple[float, float, int]], previous_steps: int | None, public_size: int | None
    ) -> None:
        """Raises:
        UpdateRejected: the history does not describe this run's mechanism.
        """
        self.check_bounds(history)
        noise, rate, steps = history[-1]
        batches = round(1.0 / rate)
        if batches < 1 or 1.0 / batches != rate:
            raise UpdateRejected(f"dp-history: sample rate {rate!r} is not 1/k for a whole number of batches k")
        if noise != self.planned_noise(batches):
            raise UpdateRejected(
                f"dp-history: noise multiplier {noise!r} is not this run's plan for sample rate 1/"
                f"{batches} ({self.planned_noise(batches)!r})"
            )
        total, local_steps, batch = sum(s for _, _, s in history), self.cfg.train.local_steps, self.cfg.train.batch_size
        if steps < local_steps or (previous_steps is not None and total < previous_steps + local_steps):
            raise UpdateRejected(
                f"dp-history: {total} steps in all, {steps} in the last mechanism: not one more "
                f"round of {local_steps} steps"
            )
        if public_size is not None and not (batches - 1) * batch < public_size <= batches * batch:
            raise UpdateRejected(f"num-examples={public_size} does not fit sample rate 1/{batches} at batch {batch}")

    def planned_noise(self, batches: int) -> float:
        """The noise this run's plan gives a node whose shard makes ``batches`` Poisson batches."""
        if self.cfg.privacy.noise_multiplier is not None:
            return float(self.cfg.privacy.noise_multiplier)
        try:  # any shard of k * b records has the rate 1/k: the plan depends on nothing else
            return plan_for(self.cfg, batches * self.cfg.train.batch_size).noise_multiplier
        except PrivacyPlanError as exc:
            raise UpdateRejected(f"dp-history: no plan exists for sample rate 1/{batches}") from exc
