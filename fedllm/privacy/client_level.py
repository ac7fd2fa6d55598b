"""Client-level DP (DP-FedAvg) accounting: each round's noised aggregate of clipped client updates.

Each round releases the uniform mean of the clipped updates of the ``k`` clients that
contributed, plus Gaussian noise of standard deviation ``z * C / k``: a Gaussian mechanism
with noise multiplier ``z`` on the sum.

- Every client every round (``fraction_train=1``): add/remove-one-client adjacency, no
  amplification: ``z``-Gaussian composed over rounds.
- A fixed fraction sampled uniformly at random from the whole population: sampling
  without replacement with the population size public, which is the replace-one-client
  adjacency (the sum's sensitivity is ``2C``, so the Gaussian's multiplier is ``z / 2``),
  amplified by the sampling ratio ``m / N`` (Wang, Balle and Kasiviswanathan, 2019).
  A round in which not every sampled client contributed gets no amplification credit.

Epsilon comes from Google's ``dp-accounting`` RDP accountant over these events.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import dp_accounting
from dp_accounting.rdp import RdpAccountant

ADD_REMOVE = "add/remove one client"
REPLACE_ONE = "replace one client"


@dataclass(frozen=True)
class ClientLevelRound:
    """One noised aggregate: how many clients were sampled out of how many, and contributed."""

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
        return REPLACE_ONE if self.sampled_uniformly else ADD_REMOVE

    def record(self, entry: ClientLevelRound) -> None:
        """Account one released aggregate."""
        self.rounds.append(entry)

    def _event(self, entry: ClientLevelRound) -> dp_accounting.DpEvent:
        if not self.sampled_uniformly:
            return dp_accounting.GaussianDpEvent(self.noise_multiplier)
        gaussian = dp_accounting.GaussianDpEvent(self.noise_multiplier / 2.0)
        if entry.contributed == entry.sampled and entry.sampled < entry.population:
            return dp_accounting.SampledWithoutReplacementDpEvent(entry.population, entry.sampled, gaussian)
        return gaussian

    def epsilon(self) -> float:
        """Epsilon at :attr:`delta` after every recorded round (0 before the first)."""
        if not self.rounds:
            return 0.0
        relation = (dp_accounting.NeighboringRelation.REPLACE_ONE if self.sampled_uniformly
                    else dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE)
        accountant = RdpAccountant(neighboring_relation=relation)
        for entry in self.rounds:
            accountant.compose(self._event(entry))
        return float(accountant.get_epsilon(self.delta))

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue after a restart."""
        return {"noise_multiplier": self.noise_multiplier, "clip_norm": self.clip_norm, "delta": self.delta,
                "sampled_uniformly": self.sampled_uniformly, "rounds": [asdict(r) for r in self.rounds]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the rounds recorded by :meth:`state_dict`."""
        self.rounds = [ClientLevelRound(**entry) for entry in state["rounds"]]

    def to_report(self) -> dict[str, Any]:
        """The ``client_level`` section of ``privacy_ledger.json``."""
        return {**self.state_dict(), "adjacency": self.adjacency, "epsilon": self.epsilon(),
                "protects": "all of one client's records together (its whole contribution)"}
