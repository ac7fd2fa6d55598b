"""A node's own, persisted record of every DP-SGD mechanism that touched its data.

One JSON file per node state directory holds, per dataset fingerprint (a hash of the
node's training records), every release: noise multiplier, sample rate, steps, run id and
round. Epsilon is always recomputed from this history by a real accountant, so a node that
crashes, restarts, or joins a second run on the same records continues from what it has
spent; it never starts again at zero. Writes are atomic (temp file, fsync, rename), the
file carries a checksum verified on load, and a file that cannot be read is an error,
never a silent reset.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from fedllm.errors import IntegrityError, LedgerError
from fedllm.privacy.accounting import History, epsilon, extend_history
from fedllm.storage import verify_checksum, with_checksum, write_json

LEDGER_FILE = "privacy_ledger.json"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class Release:
    """One round of DP-SGD on the node's records whose result left (or may leave) the node."""

    run_id: str
    server_round: int
    noise_multiplier: float
    sample_rate: float
    steps: int


def fingerprint(records: Iterable[tuple[str, str]]) -> str:
    """SHA-256 over the node's training records (prompt, response), in order."""
    digest = hashlib.sha256()
    for prompt, response in records:
        for text in (prompt, response):
            data = text.encode("utf-8")
            digest.update(len(data).to_bytes(8, "little"))  # length-prefixed: no ambiguous joins
            digest.update(data)
    return digest.hexdigest()


class NodeLedger:
    """The releases recorded for one dataset fingerprint in a node's state directory."""

    def __init__(self, state_dir: Path, dataset_fingerprint: str):
        self.path = Path(state_dir) / LEDGER_FILE
        self.fingerprint = dataset_fingerprint
        self._datasets = self._read()
        self.releases: list[Release] = [
            Release(**entry) for entry in self._datasets.get(dataset_fingerprint, {}).get("releases", [])
        ]

    def _read(self) -> dict[str, Any]:
        if not self.path.exists():
            return {}
        try:
            payload = verify_checksum(json.loads(self.path.read_text(encoding="utf-8")), str(self.path))
            if payload.get("format") != FORMAT_VERSION:
                raise ValueError(f"format {payload.get('format')!r}, expected {FORMAT_VERSION}")
            return dict(payload["datasets"])
        except IntegrityError as exc:
            raise LedgerError(f"{exc}; the privacy ledger is never reset automatically: restore it from a "
                              "backup or, knowing the privacy it recorded is lost, move it away") from exc
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise LedgerError(
                f"{self.path}: the privacy ledger cannot be read ({exc}); it is never reset "
                "automatically: restore it from a backup or, knowing the privacy it recorded is lost, move it away"
            ) from exc

    def history(self, scope: str, run_id: str) -> History:
        """The DP-SGD history to account: every release (``node``) or this run's (``run``)."""
        history: History = []
        for release in self.releases:
            if scope == "node" or release.run_id == run_id:
                history = extend_history(history, noise_multiplier=release.noise_multiplier,
                                         sample_rate=release.sample_rate, steps=release.steps)
        return history

    def epsilon(self, *, scope: str, run_id: str, delta: float, accountant: str) -> float:
        """Epsilon spent so far within ``scope``."""
        return epsilon(self.history(scope, run_id), delta=delta, accountant=accountant)

    def find(self, run_id: str, server_round: int) -> Release | None:
        """The last release recorded for ``(run_id, server_round)``, if any."""
        matches = [r for r in self.releases if r.run_id == run_id and r.server_round == server_round]
        return matches[-1] if matches else None

    def record(self, release: Release) -> None:
        """Append ``release`` and persist the ledger before anything leaves the node."""
        self.releases.append(release)
        self._datasets[self.fingerprint] = {"releases": [asdict(r) for r in self.releases]}
        write_json(self.path, with_checksum({"format": FORMAT_VERSION, "datasets": self._datasets}))

    def state_dict(self) -> dict[str, Any]:
        """The releases of this fingerprint, JSON-able."""
        return {"fingerprint": self.fingerprint, "releases": [asdict(r) for r in self.releases]}
