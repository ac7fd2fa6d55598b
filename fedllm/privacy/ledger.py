"""The server's view of the run's privacy: every client's sample-level spend, caps and
refusals, and the client-level DP accountant.

Sample-level epsilon is recomputed here from the DP-SGD history each client reports
(noise, sample rate, steps) at the client's delta, by the configured accountant: the number
we print is computed over the mechanism that ran, not copied from a client's claim. The
authoritative sample-level record is each node's own persisted ledger
(:mod:`fedllm.privacy.node_ledger`); this one is checkpointed with the server.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from fedllm.config import AccountantName, PrivacyMode
from fedllm.errors import LedgerError
from fedllm.privacy.accounting import History, epsilon, normalise_history
from fedllm.privacy.client_level import ClientLevelAccountant


@dataclass
class ClientLedger:
    """One client's DP-SGD history, its cap and delta, and refusals."""

    history: History = field(default_factory=list)
    last_round: int = 0
    delta: float | None = None
    cap: float | None = None
    can_continue: bool = True
    refusals: list[dict[str, Any]] = field(default_factory=list)
    # rounds whose reply the server rejected after the node trained: its spending still counts
    rejected: list[dict[str, Any]] = field(default_factory=list)


class PrivacyLedger:
    """Per-client DP-SGD histories with epsilon by a real accountant, plus client-level DP."""

    def __init__(
        self,
        *,
        accountant: AccountantName,
        delta: float,
        target_epsilon: float | None,
        mode: PrivacyMode = "sample",
        client_level: ClientLevelAccountant | None = None,
    ):
        self.mode = mode  # privacy.mode: sample, client, both or none
        self.accountant = accountant
        self.delta = delta
        self.target_epsilon = target_epsilon
        self.client_level = client_level
        self.clients: dict[int, ClientLedger] = {}

    def _entry(self, client: int) -> ClientLedger:
        return self.clients.setdefault(client, ClientLedger())

    def record(
        self,
        client: int,
        history: History,
        server_round: int,
        *,
        delta: float | None = None,
        cap: float | None = None,
        can_continue: bool = True,
        rejected: str | None = None,
    ) -> None:
        """Replace a client's history with the one it reported after ``server_round``;
        ``rejected``: why the server rejected that reply (the node trained, so it still spent)."""
        entry = self._entry(client)
        entry.history, entry.last_round = normalise_history(history), server_round
        entry.delta, entry.cap, entry.can_continue = delta, cap, can_continue
        if rejected is not None:
            entry.rejected.append({"round": server_round, "reason": rejected})

    def record_refusal(
        self,
        client: int,
        server_round: int,
        reason: str,
        *,
        cap: float | None,
        history: History | None = None,
        delta: float | None = None,
    ) -> None:
        """Note that a client refused ``server_round`` (it trained nothing) and why."""
        entry = self._entry(client)
        entry.refusals.append({"round": server_round, "reason": reason})
        entry.cap, entry.can_continue = cap, False
        if history is not None:
            entry.history, entry.delta = normalise_history(history), delta

    def epsilon(self, client: int) -> float:
        """The client's epsilon at its delta (0 for a client that never trained)."""
        entry = self.clients.get(client)
        if entry is None:
            return 0.0
        return epsilon(entry.history, delta=entry.delta or self.delta, accountant=self.accountant)

    def epsilons(self) -> dict[int, float]:
        """Epsilon of every client seen so far."""
        return {client: self.epsilon(client) for client in sorted(self.clients)}

    def max_epsilon(self) -> float:
        """The largest epsilon of any client (0 before any DP step)."""
        return max(self.epsilons().values(), default=0.0)

    def exhausted(self) -> list[int]:
        """Clients that refused a round or said one more round would pass their cap."""
        return sorted(c for c, e in self.clients.items() if not e.can_continue)

    def to_report(self) -> dict[str, Any]:
        """The ``privacy_ledger.json`` content: per client, the mechanism and its epsilon."""
        clients = {}
        for client, entry in sorted(self.clients.items()):
            last = entry.history[-1] if entry.history else (0.0, 0.0, 0)
            clients[str(client)] = {
                "accountant": self.accountant,
                "delta": entry.delta or self.delta,
                "cap": entry.cap,
                "noise_multiplier": last[0],
                "sample_rate": last[1],
                "steps": sum(s for _, _, s in entry.history),
                "epsilon": self.epsilon(client),
                "last_round": entry.last_round,
                "history": [list(h) for h in entry.history],
                "refusals": entry.refusals,
                "rejected": entry.rejected,
            }
        report = {
            "privacy_mode": self.mode,
            "accountant": self.accountant,
            "delta": self.delta,
            "target_epsilon": self.target_epsilon,
            "max_epsilon": self.max_epsilon(),
            "clients": clients,
        }
        if self.client_level is not None:
            report["client_level"] = self.client_level.to_report()
        return report

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue the ledger after a restart."""
        return {
            "accountant": self.accountant,
            "delta": self.delta,
            "target_epsilon": self.target_epsilon,
            "clients": {
                str(c): {**asdict(e), "history": [list(h) for h in e.history]} for c, e in self.clients.items()
            },
            "client_level": self.client_level.state_dict() if self.client_level else None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from :meth:`state_dict`; refuses a ledger kept with another accountant.

        Raises:
            LedgerError: the saved accountant differs from this ledger's.
        """
        if state["accountant"] != self.accountant:
            raise LedgerError(f"ledger was kept with {state['accountant']!r}, not {self.accountant!r}")
        self.delta = float(state["delta"])
        self.target_epsilon = state["target_epsilon"]
        self.clients = {
            int(c): ClientLedger(**{**e, "history": normalise_history(e["history"])})
            for c, e in state["clients"].items()
        }
        if self.client_level is not None and state.get("client_level"):
            self.client_level.load_state_dict(state["client_level"])
