"""The server's view of every client's sample-level privacy spend.

Epsilon is recomputed here from the DP-SGD history each client reports (noise, sample
rate, steps), by the configured accountant: the number we print is computed over the
mechanism that ran, not copied from a client's claim.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from fedllm.privacy.accounting import History, epsilon, normalise_history


@dataclass
class ClientLedger:
    """One client's DP-SGD history and the round it was last updated."""

    history: History = field(default_factory=list)
    last_round: int = 0


class PrivacyLedger:
    """Per-client DP-SGD histories with epsilon by a real accountant."""

    def __init__(self, *, accountant: str, delta: float, target_epsilon: float | None, level: str = "sample"):
        self.level = level  # "sample" (DP-SGD on clients) or "none" (no DP: nothing is recorded)
        self.accountant = accountant
        self.delta = delta
        self.target_epsilon = target_epsilon
        self.clients: dict[int, ClientLedger] = {}

    def record(self, client: int, history: History, server_round: int) -> None:
        """Replace a client's history with the one it reported after ``server_round``."""
        self.clients[client] = ClientLedger(history=normalise_history(history), last_round=server_round)

    def epsilon(self, client: int) -> float:
        """The client's epsilon at the ledger's delta (0 for a client that never trained)."""
        entry = self.clients.get(client)
        return epsilon(entry.history, delta=self.delta, accountant=self.accountant) if entry else 0.0

    def epsilons(self) -> dict[int, float]:
        """Epsilon of every client seen so far."""
        return {client: self.epsilon(client) for client in sorted(self.clients)}

    def max_epsilon(self) -> float:
        """The largest epsilon of any client (0 before any DP step)."""
        return max(self.epsilons().values(), default=0.0)

    def to_report(self) -> dict[str, Any]:
        """The ``privacy_ledger.json`` content: per client, the mechanism and its epsilon."""
        clients = {}
        for client, entry in sorted(self.clients.items()):
            last = entry.history[-1] if entry.history else (0.0, 0.0, 0)
            clients[str(client)] = {
                "accountant": self.accountant, "delta": self.delta,
                "noise_multiplier": last[0], "sample_rate": last[1],
                "steps": sum(s for _, _, s in entry.history), "epsilon": self.epsilon(client),
                "last_round": entry.last_round, "history": [list(h) for h in entry.history],
            }
        return {"level": self.level, "accountant": self.accountant, "delta": self.delta,
                "target_epsilon": self.target_epsilon, "max_epsilon": self.max_epsilon(), "clients": clients}

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue the ledger after a restart."""
        return {"accountant": self.accountant, "delta": self.delta, "target_epsilon": self.target_epsilon,
                "clients": {str(c): {"history": [list(h) for h in e.history], "last_round": e.last_round}
                            for c, e in self.clients.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from :meth:`state_dict`; refuses a ledger kept with another accountant.

        Raises:
            ValueError: the saved accountant differs from this ledger's.
        """
        if state["accountant"] != self.accountant:
            raise ValueError(f"ledger was kept with {state['accountant']!r}, not {self.accountant!r}")
        self.delta = float(state["delta"])
        self.target_epsilon = state["target_epsilon"]
        self.clients = {int(c): ClientLedger(history=normalise_history(e["history"]), last_round=int(e["last_round"]))
                        for c, e in state["clients"].items()}
