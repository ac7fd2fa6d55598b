"""The server's checkpoint after every round: enough to continue an interrupted run exactly.

``<run dir>/checkpoint/`` holds the global adapter of the last finished round (safetensors,
sealed: checksummed and, with a key, AES-256-GCM encrypted and bound to its role and file
name) and ``state.json``: round number, run id, server privacy ledger, per-round metrics, the
resolved config, and the name and SHA-256 of the sealed adapter file. ``state.json`` carries a
checksum (corruption only) or, with a key, an HMAC: its adapter digest then also ties the
adapter to this exact state, so an older authentic adapter cannot be swapped in. The adapter
is written first and ``state.json`` (which names it) last, both atomically, so a crash at any
point leaves the previous complete checkpoint.

No random state is saved: client sampling and client-level noise draw fresh OS entropy, or in
the seeded research mode derive each round's draws from the seed and the round number
(:mod:`fedllm.privacy.server_noise`), so a resumed run needs none. Checkpoints written before
that carry an ``rng`` field, which is read past.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save

from fedllm.errors import IntegrityError, LedgerError
from fedllm.storage import (
    ROLE_CHECKPOINT_ADAPTER,
    ROLE_CHECKPOINT_STATE,
    atomic_write_bytes,
    protect_json,
    seal,
    unseal,
    verify_json,
    write_json,
)

STATE_FILE = "state.json"
ADAPTER_PREFIX, ADAPTER_SUFFIX = "adapter-round-", ".sealed"


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
        adapter_name = f"{ADAPTER_PREFIX}{state.server_round}{ADAPTER_SUFFIX}"
        tensors = {k: v.detach().cpu().contiguous() for k, v in state.arrays.items()}
        sealed = self._existing(adapter_name, save(tensors))
        if sealed is None:
            sealed = seal(save(tensors), self.key, role=ROLE_CHECKPOINT_ADAPTER, name=adapter_name)
            atomic_write_bytes(self.folder / adapter_name, sealed)
        write_json(
            self.folder / STATE_FILE,
            protect_json(
                {
                    "run_id": state.run_id,
                    "server_round": state.server_round,
                    "adapter": adapter_name,
                    "adapter_sha256": hashlib.sha256(sealed).hexdigest(),  # of the sealed bytes: reveals nothing
                    "ledger": state.ledger,
                    "rounds": state.rounds,
                    "config": state.config,
                    "stop_reason": state.stop_reason,
                },
                self.key,
                role=ROLE_CHECKPOINT_STATE,
                name=STATE_FILE,
            ),
        )
        for old in self.folder.glob(f"{ADAPTER_PREFIX}*{ADAPTER_SUFFIX}"):
            if old.name != adapter_name:
                old.unlink()

    def _existing(self, name: str, plain: bytes) -> bytes | None:
        """The sealed bytes already on disk under ``name`` if they hold ``plain``, else None.

        A round is saved twice (before and after its evaluation). Resealing the same adapter
        would give new bytes (a fresh nonce) under the name the current ``state.json`` vouches
        for by digest, and a crash before the new ``state.json`` would leave a checkpoint that
        fails its own check; so an unchanged adapter is kept as it is.
        """
        path = self.folder / name
        try:
            blob = path.read_bytes()
            same = unseal(blob, self.key, role=ROLE_CHECKPOINT_ADAPTER, name=name, what=str(path)) == plain
        except (OSError, IntegrityError):
            return None
        return blob if same else None

    def load(self) -> ServerState:
        """The last complete checkpoint.

        Raises:
            LedgerError: no checkpoint, or one that cannot be read.
            IntegrityError: a checksum or MAC does not match, the adapter is not the one the
                state names, a plaintext file where a key is configured, or the key is missing
                or wrong.
        """
        path = self.folder / STATE_FILE
        if not path.is_file():
            raise LedgerError(f"no checkpoint in {self.folder}: this run cannot be resumed")
        try:
            raw = verify_json(
                json.loads(path.read_text(encoding="utf-8")),
                self.key,
                role=ROLE_CHECKPOINT_STATE,
                name=STATE_FILE,
                what=str(path),
            )
            arrays = load(self._adapter_bytes(raw))
            return ServerState(
                run_id=raw["run_id"],
                server_round=int(raw["server_round"]),
                arrays=arrays,
                ledger=raw["ledger"],
                rounds=raw["rounds"],
                config=raw["config"],
                stop_reason=raw.get("stop_reason"),
            )
        except IntegrityError:
            raise
        except (OSError, ValueError, KeyError, TypeError, SafetensorError) as exc:
            raise LedgerError(f"{self.folder}: the checkpoint cannot be read ({exc})") from exc

    def _adapter_bytes(self, raw: dict[str, Any]) -> bytes:
        """The plain adapter the state names, checked against the state's digest and unsealed."""
        name = raw["adapter"]
        if not (isinstance(name, str) and Path(name).name == name and name.startswith(ADAPTER_PREFIX)):
            raise IntegrityError(f"{self.folder / STATE_FILE}: names no checkpoint adapter ({name!r})")
        adapter = self.folder / name
        blob = adapter.read_bytes()
        data = unseal(blob, self.key, role=ROLE_CHECKPOINT_ADAPTER, name=name, what=str(adapter))
        expected = raw.get("adapter_sha256")  # absent in checkpoints written before issue 13
        if expected is not None and hashlib.sha256(blob).hexdigest() != expected:
            # e.g. an older, authentic adapter of the same round (a rollback the key alone cannot see)
            raise IntegrityError(
                f"{adapter}: does not match the checkpoint's {STATE_FILE} (swapped or altered "
                "since it was saved); it is not used"
            )
        return data
