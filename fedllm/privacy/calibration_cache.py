"""Noise calibrations remembered across processes, under the cache root (``$FEDLLM_CACHE``).

Finding the noise for a target epsilon runs Opacus's bisection: tens of accountant calls, about a
second each search under PRV, and every process of a run (the driver, each Ray actor, each node)
plans the same mechanism again. The answer depends only on the mechanism, the target, the
accountant and Opacus's version, so it is kept in one JSON file and reused.

A cached noise is never trusted as it stands: :func:`checked` recomputes the epsilon it gives with
the real accountant, and accepts it only where the search itself could have stopped (at most the
target, and within the search's tolerance below it). An edited or stale entry is searched again
and overwritten. A missing, unreadable or malformed file is an empty cache.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
from importlib import metadata
from pathlib import Path

from fedllm.config import AccountantName
from fedllm.privacy.accounting import epsilon
from fedllm.resources import cache_root

log = logging.getLogger(__name__)

CACHE_FILE = "noise_calibrations.json"


def cache_file() -> Path:
    """The cache's file under the cache root."""
    return cache_root() / CACHE_FILE


def cache_key(
    *, target_epsilon: float, delta: float, sample_rate: float, steps: int, accountant: AccountantName, tolerance: float
) -> str:
    """One calibration's key: the mechanism, the target, the search's tolerance and Opacus's version
    (a new accountant may answer differently). ``repr`` keeps every float exact."""
    version = metadata.version("opacus")
    return (
        f"{accountant}|eps={target_epsilon!r}|delta={delta!r}|q={sample_rate!r}|T={steps}|tol={tolerance!r}"
        f"|opacus={version}"
    )


def lookup(key: str) -> float | None:
    """The noise stored under ``key``, or None (absent, or the file or entry is unusable)."""
    value = _read().get(key)
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0:
        return float(value)
    return None


def checked(
    noise: float,
    *,
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    accountant: AccountantName,
    tolerance: float,
) -> bool:
    """Whether ``noise`` is an answer the search could have returned: the real accountant gives it
    an epsilon at most the target and within ``tolerance`` of it."""
    reached = epsilon([(noise, sample_rate, steps)], delta=delta, accountant=accountant)
    return target_epsilon - tolerance <= reached <= target_epsilon


def store(key: str, noise: float) -> None:
    """Remember ``noise`` under ``key`` (atomically; a cache that cannot be written is skipped)."""
    path = cache_file()
    entries = _read()
    entries[key] = noise
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=".calibrations-", suffix=".tmp")
        with os.fdopen(handle, "w", encoding="utf-8") as out:
            json.dump(entries, out, indent=0, sort_keys=True)
        os.replace(tmp, path)  # concurrent writers: the last one wins, nothing is ever half-written
    except OSError as exc:
        log.debug("noise calibration not cached (%s): %s", path, exc)


def _read() -> dict[str, object]:
    try:
        entries = json.loads(cache_file().read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return entries if isinstance(entries, dict) else {}
