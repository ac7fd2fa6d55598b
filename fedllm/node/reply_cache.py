"""The node's last reply: a repeated round is answered without touching the data again.

A server that crashed after a node replied resends the same round with the same global
adapter; the node answers with the update it already released (and accounted) instead of
training again, so a resumed server costs no privacy. The file is sealed: checksummed, and
AES-256-GCM encrypted (bound to its role and name) when the node has a storage key, which it
then needs to replay it. With a key, a plaintext cache (one an intruder wrote, to have the
node send a forged update as its own) is never replayed. An unreadable cache only costs a
retrain, which the ledger accounts.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save

from fedllm.errors import IntegrityError
from fedllm.storage import ROLE_NODE_REPLY, atomic_write_bytes, seal, unseal

log = logging.getLogger(__name__)

REPLY_FILE = "last_reply.sealed"


def arrays_digest(state: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 over names, shapes, dtypes and bytes of an adapter state (order-independent)."""
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}|".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


@dataclass(frozen=True)
class CachedReply:
    """An update this node already released, and the metrics sent with it."""

    arrays: dict[str, torch.Tensor]
    metrics: dict


class ReplyCache:
    """The node's last reply, keyed by run, round and the global adapter it answered."""

    def __init__(self, state_dir: Path, key: bytes | None = None):
        """The cache of the node state directory ``state_dir``.

        Args:
            state_dir: the node's state directory.
            key: the node's storage key (encrypts the cache), or None.
        """
        self.path = Path(state_dir) / REPLY_FILE
        self.key = key

    def save(self, key: tuple[str, int, str], arrays: Mapping[str, torch.Tensor], metrics: dict) -> None:
        """Persist the reply (atomically) before it is sent."""
        run_id, server_round, digest = key
        meta = {
            "run_id": run_id,
            "server_round": str(server_round),
            "input_digest": digest,
            "metrics": json.dumps(metrics),
        }
        tensors = {name: tensor.detach().cpu().contiguous() for name, tensor in arrays.items()}
        sealed = seal(save(tensors, metadata=meta), self.key, role=ROLE_NODE_REPLY, name=REPLY_FILE)
        atomic_write_bytes(self.path, sealed)

    def find(self, key: tuple[str, int, str]) -> CachedReply | None:
        """The cached reply for exactly ``key``; None when absent, different or unreadable."""
        if not self.path.exists():
            return None
        try:
            data = unseal(self.path.read_bytes(), self.key, role=ROLE_NODE_REPLY, name=REPLY_FILE, what=str(self.path))
            header_len = int.from_bytes(data[:8], "little")
            meta = json.loads(data[8 : 8 + header_len]).get("__metadata__", {})
            if (meta.get("run_id"), meta.get("server_round"), meta.get("input_digest")) != (
                key[0],
                str(key[1]),
                key[2],
            ):
                return None
            return CachedReply(arrays=load(data), metrics=json.loads(meta["metrics"]))
        except IntegrityError as exc:
            log.warning("%s; training again instead of replaying it", exc)
            return None  # an unreadable cache only costs a retrain, which the ledger accounts
        except (OSError, ValueError, KeyError, TypeError, AttributeError, SafetensorError):
            return None
