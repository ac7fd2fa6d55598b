"""The server's checkpoint after every round: enough to continue an interrupted run exactly.

``<run dir>/checkpoint/`` holds the global adapter of the last finished round (safetensors,
sealed: checksummed and, with a key, AES-256-GCM encrypted) and ``state.json`` (checksummed):
round number, run id, server privacy ledger, per-round metrics and the resolved config. The
adapter is written first and ``state.json`` (which names it) last, both atomically, so a crash
at any point leaves the previous complete checkpoint.

No random state is saved: client sampling and client-level noise draw fresh OS entropy, or in
the seeded research mode derive each round's draws from the seed and the round number
(:mod:`fedllm.privacy.server_noise`), so a resumed run needs none. Checkpoints written before
that carry an ``rng`` field, which is read past.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save

from fedllm.errors import LedgerError
from fedllm.storage import atomic_write_bytes, seal, unseal, verify_checksum, with_checksum, write_json

STATE_FILE = "state.json"


@dataclass
class ServerState:
    """Everything the server carries from one round to the next."""

    run_id: str
    server_round: int
    arrays: dict[str, torch.Tensor]
    ledger: dict[str, Any]
    rounds: list[dict[str, Any]]
    config: dict[str, Any]
    stop_reason: str | None = None


class Checkpointer:
    """Writes and reads the checkpoint folder of one run (``key``: encrypt the adapter)."""

    def __init__(self, folder: Path, key: bytes | None = None):
        self.folder = Path(folder)
        self.key = key

    def exists(self) -> bool:
        """Whether a complete checkpoint is present."""
        return (self.folder / STATE_FILE).is_file()

    def save(self, state: ServerState) -> None:
        """Persist ``state`` (adapter first, then the state file that names it)."""
        adapter_name = f"adapter-round-{state.server_round}.sealed"
        tensors = {k: v.detach().cpu().contiguous() for k, v in state.arrays.items()}
        atomic_write_bytes(self.folder / adapter_name, seal(save(tensors), self.key))
        write_json(self.folder / STATE_FILE, with_checksum({
            "run_id": state.run_id, "server_round": state.server_round, "adapter": adapter_name,
            "ledger": state.ledger, "rounds": state.rounds, "config": state.config,
            "stop_reason": state.stop_reason,
        }))
        for old in self.folder.glob("adapter-round-*.sealed"):
            if old.name != adapter_name:
                old.unlink()

    def load(self) -> ServerState:
        """The last complete checkpoint.

        Raises:
            LedgerError: no checkpoint, or one that cannot be read.
            IntegrityError: a checksum does not match, or the key is missing or wrong.
        """
        path = self.folder / STATE_FILE
        if not path.is_file():
            raise LedgerError(f"no checkpoint in {self.folder}: this run cannot be resumed")
        try:
            raw = verify_checksum(json.loads(path.read_text(encoding="utf-8")), str(path))
            adapter = self.folder / raw["adapter"]
            arrays = load(unseal(adapter.read_bytes(), self.key, str(adapter)))
        except (OSError, ValueError, KeyError, SafetensorError) as exc:
            raise LedgerError(f"{self.folder}: the checkpoint cannot be read ({exc})") from exc
        return ServerState(run_id=raw["run_id"], server_round=int(raw["server_round"]), arrays=arrays,
                           ledger=raw["ledger"], rounds=raw["rounds"], config=raw["config"],
                           stop_reason=raw.get("stop_reason"))
