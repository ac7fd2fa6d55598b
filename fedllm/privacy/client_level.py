"""Client-level DP (DP-FedAvg) accounting: each round's noised aggregate of clipped client updates.

Each round releases the uniform mean of the clipped updates (norm at most ``C``) of the ``k``
clients that contributed, plus Gaussian noise of standard deviation ``z * C / k``: the noised
sum ``sum + N(0, z^2 C^2)`` divided by ``k``. The count ``k`` is published (it is the divisor,
and ``num_clients`` in ``metrics.jsonl``).

**One neighbouring relation for every run: zero-out one client** (:data:`ZERO_OUT`): the
neighbouring federation is the same one with one client's update replaced by the zero update.
The client still takes part, so ``k`` and the sample are unchanged, and the sum moves by at most
``C``. Add/remove-one-client does not fit: removing a client changes the published ``k``.

- **Every round, without amplification** (every client every round, or a round in which a
  sampled client did not contribute): a Gaussian mechanism with multiplier ``z`` (sensitivity
  ``C``), composed over the rounds.
- **A fixed number ``m`` sampled uniformly without replacement from the ``N`` clients**
  (``fraction_train < 1``), in a round where every sampled client contributed: the round is
  also bounded by subsampling without replacement under *replace-one* adjacency (Wang, Balle
  and Kasiviswanathan, 2019), with the base Gaussian's multiplier ``z / 2``: a replace-one
  statement covers zero-out (zero is a clipped update), but the bound holds only for the sum's
  replace-one sensitivity, ``2C`` (an update ``w`` against another client's ``-w``).

  The Poisson-subsampled Gaussian at rate ``m / N`` does **not** bound such a round under
  zero-out: the zeroed client still fills one of the ``m`` slots, so it displaces another
  client either way. With every other client's update ``-w`` and this one's ``w`` (shifting by
  ``m w``), the two federations release ``(1-q) N(0) + q N(2w)`` and ``(1-q) N(0) + q N(w)``,
  ``q = m / N``, whose privacy loss has a heavier tail than the Poisson pair's
  (``tests/unit/test_client_level.py`` computes it exactly: 5.04 against the Poisson
  accountant's 4.58 for ``z = 1``, ``q = 1/2``, 3 rounds, ``delta = 1e-3``).

Both bounds are valid (epsilon, delta) statements for zero-out at the same delta, so the
reported epsilon is the smaller: sampling can lower it (for small ``m / N`` over many rounds),
never raise it above every-client-every-round at the same ``z``. Amplification credit needs
the sample to be uniform (:attr:`ClientLevelAccountant.sampled_uniformly`) and every client
sent a train message (``sampled``: messages sent, not replies received) to have contributed.

Epsilon comes from Google's ``dp-accounting`` RDP accountant over these events.
"""

from __future__ import annotations

import functools
from collections import Counter
from dataclasses import asdict, dataclass, fields
from typing import Any

import dp_accounting
from dp_accounting.rdp import RdpAccountant

from fedllm.errors import PrivacyPlanError

ZERO_OUT = "zero-out one client (its update replaced by zero; the count of contributing clients is public)"


@dataclass(frozen=True)
class ClientLevelRound:
    """One noised aggregate: how many clients were sent a train message (``sampled``) out of
    how many (``population``), and how many updates it averaged (``contributed``).

    Checkpoints written before ``sampled`` counted messages sent hold the replies received there.
    """

    server_round: int
    population: int
    sampled: int
    contributed: int


class ClientLevelAccountant:
    """Client-level epsilon of every released aggregate of a run."""

    def __init__(self, *, noise_multiplier: float, clip_norm: float, delta: float, sampled_uniformly: bool):
        self.noise_multiplier = noise_multiplier
        self.clip_norm = clip_norm
        self.delta = delta
        self.sampled_uniformly = sampled_uniformly
        self.rounds: list[ClientLevelRound] = []

    @property
    def adjacency(self) -> str:
        """The neighbouring relation the guarantee is stated for."""
        return ZERO_OUT

    def record(self, entry: ClientLevelRound) -> None:
        """Account one released aggregate."""
        self.rounds.append(entry)

    def amplified(self, entry: ClientLevelRound) -> bool:
        """Whether ``entry`` gets credit for sampling: a uniform sample of part of the population,
        every client sent a train message contributing."""
        return self.sampled_uniformly and entry.contributed == entry.sampled < entry.population

    def epsilon(self) -> float:
        """Epsilon at :attr:`delta` after every recorded round (0 before the first)."""
        if not self.rounds:
            return 0.0
        # zero-out, every round a Gaussian of sensitivity C (dp-accounting's "replace with a special element")
        plain = RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_SPECIAL)
        plain.compose(dp_accounting.GaussianDpEvent(self.noise_multiplier), len(self.rounds))
        best = plain.get_epsilon(self.delta)
        if any(self.amplified(entry) for entry in self.rounds):
            # replace-one (implies zero-out): sensitivity 2C, amplified where the sample allows
            sampled = RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)
            gaussian = dp_accounting.GaussianDpEvent(self.noise_multiplier / 2.0)
            # RDP composes by adding: each distinct round is computed once, times its count
            events = Counter(
                (entry.population, entry.sampled) if self.amplified(entry) else None for entry in self.rounds
            )
            for key, count in events.items():
                sampled.compose(
                    gaussian if key is None else dp_accounting.SampledWithoutReplacementDpEvent(*key, gaussian), count
                )
            best = min(best, sampled.get_epsilon(self.delta))
        return float(best)

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue after a restart."""
        return {
            "noise_multiplier": self.noise_multiplier,
            "clip_norm": self.clip_norm,
            "delta": self.delta,
            "sampled_uniformly": self.sampled_uniformly,
            "rounds": [asdict(r) for r in self.rounds],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the rounds recorded by :meth:`state_dict` (of this version or an earlier one)."""
        names = {f.name for f in fields(ClientLevelRound)}
        self.rounds = [ClientLevelRound(**{k: v for k, v in entry.items() if k in names}) for entry in state["rounds"]]

    def to_report(self) -> dict[str, Any]:
        """The ``client_level`` section of ``privacy_ledger.json``."""
        return {
            **self.state_dict(),
            "adjacency": self.adjacency,
            "epsilon": self.epsilon(),
            "amplified_rounds": [r.server_round for r in self.rounds if self.amplified(r)],
            "protects": "all of one client's records together (its whole contribution)",
        }


def clients_per_round(population: int, fraction_train: float, min_train_clients: int) -> int:
    """How many clients the server samples each round: ``fraction_train`` of the connected
    ``population``, at least ``min_train_clients``, at most all of them."""
    return min(max(int(population * fraction_train), min_train_clients), population)


def planned_epsilons(
    *, noise_multiplier: float, delta: float, population: int, per_round: int, rounds: int
) -> list[float]:
    """Client-level epsilon after each of ``rounds`` rounds (index 0 = round 1), if every sampled
    client contributes every round: the accountant the server runs, fed the rounds it would record.

    A round in which a sampled client sends nothing gets no sampling credit, so the epsilon a run
    reports can be above this curve (never below it when the run is the one planned).
    """
    accountant = ClientLevelAccountant(
        noise_multiplier=noise_multiplier, clip_norm=1.0, delta=delta, sampled_uniformly=per_round < population
    )
    curve = []
    for server_round in range(1, rounds + 1):
        accountant.record(ClientLevelRound(server_round, population, per_round, per_round))
        curve.append(accountant.epsilon())
    return curve


# the noise multipliers a client-level plan may take (beyond the top, the average is noise)
CLIENT_NOISE_RANGE = (1e-3, 1e4)
CLIENT_TOLERANCE = 0.01  # the search stops within this much epsilon below the target


@functools.lru_cache(maxsize=64)
def calibrate_client_noise(
    *, target_epsilon: float, delta: float, population: int, per_round: int, rounds: int
) -> float:
    """The smallest noise multiplier ``z`` whose planned client-level epsilon after ``rounds``
    rounds (:func:`planned_epsilons`: the server's own accountant, every sampled client
    contributing) is at most ``target_epsilon``, found by bisection (on ``log z``) to within
    :data:`CLIENT_TOLERANCE` below the target (epsilon falls as ``z`` grows).

    Raises:
        PrivacyPlanError: even the largest multiplier in :data:`CLIENT_NOISE_RANGE` overspends.
    """

    def final(z: float) -> float:  # the last point of planned_epsilons, without the curve before it
        accountant = ClientLevelAccountant(
            noise_multiplier=z, clip_norm=1.0, delta=delta, sampled_uniformly=per_round < population
        )
        for server_round in range(1, rounds + 1):
            accountant.record(ClientLevelRound(server_round, population, per_round, per_round))
        return accountant.epsilon()

    low, high = CLIENT_NOISE_RANGE
    if final(high) > target_epsilon:
        raise PrivacyPlanError(
            f"privacy.client_target_epsilon={target_epsilon:g} cannot be met over {rounds} rounds at client_delta "
            f"{delta:g} with a noise multiplier up to {high:g}: raise the target or lower federation.num_rounds"
        )
    if final(low) <= target_epsilon:
        return low
    while True:  # invariant: final(low) > target >= final(high)
        middle = (low * high) ** 0.5  # halves the ratio high / low: the range spans seven decades
        if final(middle) > target_epsilon:
            low = middle
        else:
            high = middle
        if target_epsilon - final(high) <= CLIENT_TOLERANCE or high - low <= 1e-9 * high:
            return high
