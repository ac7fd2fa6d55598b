"""Epsilon from a DP-SGD history, by a real accountant (Opacus RDP or PRV).

A history is a list of ``(noise_multiplier, sample_rate, steps)`` entries: exactly what
Opacus's accountants record and what a client's ledger persists across rounds.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.accountant import IAccountant

from fedllm.config import AccountantName
from fedllm.errors import ConfigError

History = list[tuple[float, float, int]]


def make_accountant(name: AccountantName) -> IAccountant:
    """A fresh Opacus accountant by name (``rdp`` or ``prv``)."""
    if name == "rdp":
        return RDPAccountant()
    if name == "prv":
        return PRVAccountant()
    raise ConfigError(f"privacy.accountant: unknown {name!r}; known: rdp, prv")


def normalise_history(history: Sequence[Sequence[float]]) -> History:
    """Typed copy of a history read from JSON (lists become tuples, steps ints)."""
    return [(float(noise), float(rate), int(steps)) for noise, rate, steps in history]


def epsilon(history: Sequence[Sequence[float]], *, delta: float, accountant: AccountantName) -> float:
    """Epsilon at ``delta`` after every mechanism in ``history`` (0 for an empty history)."""
    entries = normalise_history(history)
    if not entries:
        return 0.0
    return _epsilon(tuple(entries), delta, accountant)


@lru_cache(maxsize=1024)  # pure; the server and the budget check ask for the same history several times
def _epsilon(entries: tuple[tuple[float, float, int], ...], delta: float, accountant: AccountantName) -> float:
    acct = make_accountant(accountant)
    acct.history = list(entries)
    return float(acct.get_epsilon(delta=delta))


def extend_history(
    history: Sequence[Sequence[float]], *, noise_multiplier: float, sample_rate: float, steps: int
) -> History:
    """History after ``steps`` more DP-SGD steps, merged like Opacus merges repeated steps."""
    entries = normalise_history(history)
    if entries and entries[-1][0] == noise_multiplier and entries[-1][1] == sample_rate:
        last = entries.pop()
        entries.append((last[0], last[1], last[2] + steps))
    elif steps > 0:
        entries.append((float(noise_multiplier), float(sample_rate), int(steps)))
    return entries
