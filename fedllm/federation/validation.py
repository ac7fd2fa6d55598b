"""Every client reply is untrusted input: check it before anything aggregates it.

A reply carrying an update must hold exactly the adapter tensors the server sent (names,
shapes, dtypes), every value finite, and the metrics we read, typed and in range. A
refusal carries no tensors and the same metric checks. Anything else raises
:class:`~fedllm.errors.UpdateRejected` with the reason; the round loop excludes, counts and
logs it. An update far larger than the round's others (a scaled or poisoned update) is
rejected by :func:`norm_outliers`.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from flwr.app import ArrayRecord, MetricRecord, RecordDict

from fedllm.errors import UpdateRejected
from fedllm.federation import records as keys

# metric -> (type, minimum, maximum); None = unbounded. Type int accepts only whole numbers.
UPDATE_METRICS: dict[str, tuple[type, float | None, float | None]] = {
    keys.PARTITION_ID: (int, 0, None),
    keys.NUM_EXAMPLES: (int, 1, None),
    keys.TRAIN_LOSS: (float, 0, None),
    keys.TRAIN_SECONDS: (float, 0, None),
    keys.REFUSED: (int, 0, 0),
}
REFUSAL_METRICS: dict[str, tuple[type, float | None, float | None]] = {
    keys.PARTITION_ID: (int, 0, None),
    keys.REFUSED: (int, 1, 1),
}
OPTIONAL_METRICS: dict[str, tuple[type, float | None, float | None]] = {
    keys.EPSILON: (float, 0, None),
    keys.EPSILON_CAP: (float, 0, None),
    keys.DELTA: (float, 0, 1),
    keys.NOISE_MULTIPLIER: (float, 0, None),
    keys.SAMPLE_RATE: (float, 0, 1),
    keys.TOTAL_STEPS: (int, 0, None),
    keys.EXAMPLES_SEEN: (int, 0, None),
    keys.UNIT_WEIGHT: (int, 1, 1),
    keys.CAN_CONTINUE: (int, 0, 1),
    keys.REPLAYED: (int, 0, 1),
}


@dataclass(frozen=True)
class TensorSpec:
    """Name, shape and dtype of one adapter tensor the server sent."""

    shape: tuple[int, ...]
    dtype: str


def expected_update(arrays: ArrayRecord) -> dict[str, TensorSpec]:
    """What a reply to ``arrays`` must contain."""
    return {name: TensorSpec(tuple(array.shape), str(array.dtype)) for name, array in arrays.items()}


def _number(name: str, value: object, kind: type, low: float | None, high: float | None,
            num_clients: int) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise UpdateRejected(f"metric {name!r} is not a number ({type(value).__name__})")
    if not math.isfinite(value):
        raise UpdateRejected(f"metric {name!r} is not finite ({value})")
    if kind is int and float(value) != int(value):
        raise UpdateRejected(f"metric {name!r} must be a whole number, got {value}")
    if (low is not None and value < low) or (high is not None and value > high):
        raise UpdateRejected(f"metric {name!r}={value} out of range [{low}, {high}]")
    if name == keys.PARTITION_ID and value >= num_clients:
        raise UpdateRejected(f"metric {name!r}={value}: there are only {num_clients} clients")
    return float(value)


def _history(metrics: MetricRecord) -> None:
    flat = metrics.get(keys.DP_HISTORY)
    if flat is None:
        return
    if not isinstance(flat, list) or len(flat) % 3 or not all(
            isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in flat):
        raise UpdateRejected("metric 'dp-history' must be a flat list of finite (noise, rate, steps) triples")
    for noise, rate, steps in zip(flat[0::3], flat[1::3], flat[2::3], strict=True):
        if noise <= 0 or not 0 < rate <= 1 or steps < 0 or steps != int(steps):
            raise UpdateRejected(f"metric 'dp-history' holds an impossible mechanism ({noise}, {rate}, {steps})")


def validate_metrics(content: RecordDict, num_clients: int) -> MetricRecord:
    """The reply's metrics, checked against the schema for an update or a refusal.

    Raises:
        UpdateRejected: a metric is missing, of the wrong type, not finite or out of range.
    """
    metric_records = content.metric_records
    if list(metric_records) != [keys.METRICS]:
        raise UpdateRejected(f"expected exactly one metric record {keys.METRICS!r}, got {list(metric_records)}")
    metrics = metric_records[keys.METRICS]
    refused = metrics.get(keys.REFUSED) == 1
    schema = REFUSAL_METRICS if refused else UPDATE_METRICS
    for name, (kind, low, high) in schema.items():
        if name not in metrics:
            raise UpdateRejected(f"metric {name!r} is missing")
        _number(name, metrics[name], kind, low, high, num_clients)
    for name, (kind, low, high) in OPTIONAL_METRICS.items():
        if name in metrics:
            _number(name, metrics[name], kind, low, high, num_clients)
    _history(metrics)
    return metrics


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
            raise UpdateRejected(f"{name}: shape {tuple(array.shape)} {array.dtype}, expected {spec.shape} {spec.dtype}")
        if not np.isfinite(array.numpy()).all():
            raise UpdateRejected(f"{name}: holds NaN or infinite values")
    return arrays


def validate_reply(content: RecordDict, expected: Mapping[str, TensorSpec], num_clients: int) -> MetricRecord:
    """Check a whole reply (see the module docstring); returns its metrics.

    Raises:
        UpdateRejected: the reply must not be used.
    """
    metrics = validate_metrics(content, num_clients)
    if metrics[keys.REFUSED] == 1:
        if content.array_records:
            raise UpdateRejected("a refusal must not carry tensors")
    else:
        validate_arrays(content, expected)
    return metrics


def update_norm(arrays: ArrayRecord, reference: ArrayRecord) -> float:
    """L2 norm of ``arrays - reference`` over all tensors."""
    total = 0.0
    for name, array in arrays.items():
        diff = array.numpy().astype(np.float64) - reference[name].numpy().astype(np.float64)
        total += float(np.square(diff).sum())
    return math.sqrt(total)


def norm_outliers(norms: Mapping[int, float], ratio: float, max_norm: float | None) -> dict[int, str]:
    """Updates to reject for their size: above ``max_norm``, or above ``ratio`` x the round's
    median norm (only with 3 or more updates, where the median is an honest majority's)."""
    rejected = {}
    median = statistics.median(norms.values()) if len(norms) >= 3 else None
    for index, norm in norms.items():
        if max_norm is not None and norm > max_norm:
            rejected[index] = f"update norm {norm:.4g} above federation.max_update_norm={max_norm:g}"
        elif median is not None and median > 0 and norm > ratio * median:
            rejected[index] = (f"update norm {norm:.4g} is {norm / median:.0f}x the round's median {median:.4g} "
                               f"(limit federation.update_norm_ratio={ratio:g})")
    return rejected
