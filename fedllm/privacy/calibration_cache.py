"""Noise calibrations remembered across processes, under the cache root (``$FEDLLM_CACHE``).

Finding the noise for a target epsilon runs Opacus's bisection: tens of accountant calls, about a
second each search under PRV, and every process of a run (the driver, each Ray actor, each node)
plans the same mechanism again. The answer depends only on the mechanism, the target, the
accountant and Opacus's version, so it is kept in one JSON file and reused.

A cached noise is never trusted as it stands: the lookup recomputes the epsilon it gives with
the real accountant (:meth:`Calibration.accepts`), and accepts it only where the search itself
could have stopped (at most the target, and within the search's tolerance below it). An edited
or stale entry is searched again and overwritten. A missing, unreadable, oversized or malformed file
(nested too deeply included) is an empty cache.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from fedllm.config import AccountantName
from fedllm.privacy.accounting import epsilon
from fedllm.resources import cache_root

log = logging.getLogger(__name__)

CACHE_FILE = "noise_calibrations.json"
# A node plans whatever target, rounds and batch the coordinator's task config names, so the questions
# come from outside: the file keeps the newest entries only (a run asks a handful), so that a coordinator
# varying its requests cannot grow it, or the cost of reading and rewriting it, without end.
MAX_ENTRIES = 256
MAX_FILE_BYTES = MAX_ENTRIES * 1024  # an entry is ~150 bytes: a larger file is treated as empty


def cache_file() -> Path:
    """The cache's file under the cache root."""
    return cache_root() / CACHE_FILE


@dataclass(frozen=True)
class Calibration:
    """One search's question: the mechanism, the target, and the search's tolerance."""

    target_epsilon: float
    delta: float
    sample_rate: float
    steps: int
    accountant: AccountantName
    tolerance: float

    def key(self) -> str:
        """The cache key: every field, and Opacus's version (a new accountant may answer
        differently). ``repr`` keeps every float exact."""
        return (
            f"{self.accountant}|eps={self.target_epsilon!r}|delta={self.delta!r}|q={self.sample_rate!r}"
            f"|T={self.steps}|tol={self.tolerance!r}|opacus={metadata.version('opacus')}"
        )

    def accepts(self, noise: float) -> bool:
        """Whether ``noise`` is an answer the search could have returned: the real accountant gives
        it an epsilon at most the target and within the tolerance of it."""
        reached = epsilon([(noise, self.sample_rate, self.steps)], delta=self.delta, accountant=self.accountant)
        return self.target_epsilon - self.tolerance <= reached <= self.target_epsilon


def lookup(question: Calibration) -> float | None:
    """The stored answer to ``question``, if there is one the accountant accepts."""
    value = _read().get(question.key())
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0:
        return float(value) if question.accepts(float(value)) else None
    return None


def store(question: Calibration, noise: float) -> None:
    """Remember ``noise`` as the answer to ``question`` (atomically; a cache that cannot be
    written is skipped)."""
    path = cache_file()
    entries = _read()
    entries.pop(question.key(), None)
    entries[question.key()] = noise  # the newest last: the file keeps its entries in order of storing
    for oldest in list(entries)[: max(0, len(entries) - MAX_ENTRIES)]:
        del entries[oldest]
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=".calibrations-", suffix=".tmp")
        with os.fdopen(handle, "w", encoding="utf-8") as out:
            json.dump(entries, out, indent=0)
        os.replace(tmp, path)  # concurrent writers: the last one wins, nothing is ever half-written
    except OSError as exc:
        log.debug("noise calibration not cached (%s): %s", path, exc)


def _read() -> dict[str, object]:
    path = cache_file()
    try:
        if path.stat().st_size > MAX_FILE_BYTES:  # not one this module wrote: never read it whole
            return {}
        entries = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):  # RecursionError: JSON nested too deeply
        return {}
    return entries if isinstance(entries, dict) else {}
