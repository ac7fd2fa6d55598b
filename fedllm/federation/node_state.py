"""What a node keeps for itself: its own settings and its last reply.

Node settings come from the node config (``flower-supernode --node-config``) where the
operator sets them; in simulation, where there is no operator, from the experiment's
defaults (``<state_dir>/client-<id>`` and ``privacy.client_caps``). Whatever the server
sends can lower a node's budget, never raise it (:mod:`fedllm.privacy.budget`).

The reply cache makes a repeated round free of privacy cost: a server that crashed after
a node replied resends the same round with the same global adapter, and the node answers
with the update it already released instead of touching its data again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from flwr.app import RecordDict
from safetensors import SafetensorError
from safetensors.torch import load, save

from fedllm.config import ExperimentConfig
from fedllm.federation import records as keys
from fedllm.errors import IntegrityError
from fedllm.storage import atomic_write_bytes, seal, unseal

log = logging.getLogger(__name__)

# node_config keys an operator may set
NODE_STATE_DIR = "state-dir"
NODE_MAX_EPSILON = "max-epsilon"
NODE_DELTA = "delta"
NODE_DATA_PATH = "data-path"
NODE_DATA_FORMAT = "data-format"
DEFAULT_NODE_STATE = Path.home() / ".fedllm" / "node-state"
REPLY_FILE = "last_reply.sealed"


@dataclass(frozen=True)
class NodeSettings:
    """Where a node keeps its state and the budget it set for itself."""

    partition_id: int
    state_dir: Path
    max_epsilon: float | None
    delta: float | None
    data_path: str | None = None  # the node's own records; None = its shard of the experiment's data
    data_format: str = "auto"


def node_settings(node_config: Mapping, partition_id: int, cfg: ExperimentConfig) -> NodeSettings:
    """Settings from the node config, falling back to the simulation defaults in ``cfg``."""
    cap = cfg.privacy.cap_for(partition_id)
    state_dir = node_config.get(NODE_STATE_DIR)
    if state_dir is None:
        root = Path(cfg.privacy.state_dir) if cfg.privacy.state_dir else DEFAULT_NODE_STATE
        state_dir = root / f"client-{partition_id}"
    max_epsilon = node_config.get(NODE_MAX_EPSILON, cap.max_epsilon if cap else None)
    delta = node_config.get(NODE_DELTA, cap.delta if cap else None)
    data_path = node_config.get(NODE_DATA_PATH)
    return NodeSettings(partition_id=partition_id, state_dir=Path(str(state_dir)).expanduser(),
                        max_epsilon=None if max_epsilon is None else float(max_epsilon),
                        delta=None if delta is None else float(delta),
                        data_path=None if data_path is None else str(data_path),
                        data_format=str(node_config.get(NODE_DATA_FORMAT, "auto")))


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

    def __init__(self, state_dir: Path):
        self.path = Path(state_dir) / REPLY_FILE

    def save(self, key: tuple[str, int, str], arrays: Mapping[str, torch.Tensor], metrics: dict) -> None:
        """Persist the reply (atomically) before it is sent."""
        run_id, server_round, digest = key
        meta = {"run_id": run_id, "server_round": str(server_round), "input_digest": digest,
                "metrics": json.dumps(metrics)}
        tensors = {name: tensor.detach().cpu().contiguous() for name, tensor in arrays.items()}
        atomic_write_bytes(self.path, seal(save(tensors, metadata=meta), None))

    def find(self, key: tuple[str, int, str]) -> CachedReply | None:
        """The cached reply for exactly ``key``; None when absent, different or unreadable."""
        if not self.path.exists():
            return None
        try:
            data = unseal(self.path.read_bytes(), None, str(self.path))
            header_len = int.from_bytes(data[:8], "little")
            meta = json.loads(data[8:8 + header_len]).get("__metadata__", {})
            if (meta.get("run_id"), meta.get("server_round"), meta.get("input_digest")) != (
                    key[0], str(key[1]), key[2]):
                return None
            return CachedReply(arrays=load(data), metrics=json.loads(meta["metrics"]))
        except (OSError, ValueError, KeyError, SafetensorError, IntegrityError):
            return None  # an unreadable cache only costs a retrain, which the ledger accounts


AUDIT_FILE = "audit.jsonl"


def audit_round(state_dir: Path, received: Mapping, sent: RecordDict) -> dict:
    """Log and append to ``<state dir>/audit.jsonl`` what the server asked and what left the node:
    the round's config (the task config as its SHA-256 and its privacy section), and every
    tensor sent (name, shape, dtype, bytes) with the scalar metrics, for a security team."""
    task_json = str(received.get(keys.TASK_CONFIG, ""))
    privacy = json.loads(task_json).get("privacy", {}) if task_json else {}
    arrays = sent.array_records.get(keys.ARRAYS)
    tensors = [{"name": name, "shape": list(array.shape), "dtype": str(array.dtype), "bytes": len(array.data)}
               for name, array in (arrays.items() if arrays else [])]
    metrics = sent.metric_records.get(keys.METRICS)
    entry = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "received": {"run_id": received.get(keys.RUN_ID), "round": received.get(keys.SERVER_ROUND),
                     "task_config_sha256": hashlib.sha256(task_json.encode()).hexdigest(),
                     "privacy": {k: privacy.get(k) for k in ("mode", "target_epsilon", "delta", "max_grad_norm",
                                                              "noise_multiplier", "accountant")}},
        "sent": {"tensors": tensors, "tensor_bytes": sum(t["bytes"] for t in tensors),
                 "metrics": {k: v for k, v in (metrics.items() if metrics else []) if not isinstance(v, list)},
                 "record_types": sorted(sent.keys())},
    }
    Path(state_dir).mkdir(parents=True, exist_ok=True)
    with (Path(state_dir) / AUDIT_FILE).open("a", encoding="utf-8") as handle:
        handle.write(json.dumps(entry, sort_keys=True) + "\n")
    log.info("audit: round %s of run %s: sent %d tensors (%d bytes), epsilon %s", entry["received"]["round"],
             entry["received"]["run_id"], len(tensors), entry["sent"]["tensor_bytes"],
             entry["sent"]["metrics"].get(keys.EPSILON, "n/a"))
    return entry
