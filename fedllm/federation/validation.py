"""Every client update is untrusted input: check its tensors before anything aggregates them.

An update must hold exactly the adapter tensors the server sent (names, shapes, dtypes),
every value finite; anything else raises :class:`~fedllm.errors.UpdateRejected` with the
reason (the metrics are parsed by :mod:`fedllm.federation.protocol`). An update far larger
than the round's others (a scaled or poisoned update) is rejected by :func:`norm_outliers`.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from flwr.app import ArrayRecord, RecordDict

from fedllm.errors import UpdateRejected
from fedllm.federation import records as keys

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
            raise UpdateRejected(f"{name}: shape {tuple(array.shape)} {array.dtype}, expected {spec.shape} {spec.dtype}")
        if not np.isfinite(array.numpy()).all():
            raise UpdateRejected(f"{name}: holds NaN or infinite values")
    return arrays


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
