"""The node's audit log: what the server asked and exactly what left the node, per round and
per pre-flight query (``kind``: ``train`` or ``query``; entries written before the pre-flight
existed have no ``kind`` and are rounds)."""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Mapping
from pathlib import Path

from flwr.app import RecordDict

from fedllm.federation import records as keys
from fedllm.federation.remote_text import escape_remote_text

log = logging.getLogger(__name__)

AUDIT_FILE = "audit.jsonl"
ROUND, PREFLIGHT = "train", "query"  # the Flower message types a node answers


def audit_round(
    state_dir: Path, received: Mapping, sent: RecordDict, kind: str = ROUND, app: Mapping | None = None
) -> dict:
    """Log and append to ``<state dir>/audit.jsonl`` what the server asked and exactly what left
    the node: the round's config (the task config, its SHA-256 and its privacy section), every
    tensor sent (name, shape, dtype, bytes), every metric (the DP history included) and every
    config record (a refusal's category), for a security team. ``kind`` is the message answered:
    a round (``train``) or the pre-flight (``query``, whose ``round`` is the first round it asked about).
    ``app``: the node's verdict on the coordinator's app bundle when it refused it
    (:class:`fedllm.node.app_check.AppVerdict`: the bundle's hash, the first differing file)."""
    task_json = str(received.get(keys.TASK_CONFIG, ""))
    try:
        task_config = json.loads(task_json) if task_json else {}
    except ValueError:
        task_config = {"unparsable": True}
    privacy = task_config.get("privacy", {}) if isinstance(task_config, dict) else {}
    arrays = sent.array_records.get(keys.ARRAYS)
    sent_arrays = list(arrays.items()) if arrays else []
    tensors = [
        {"name": name, "shape": list(array.shape), "dtype": str(array.dtype), "bytes": len(array.data)}
        for name, array in sent_arrays
    ]
    tensor_bytes = sum(len(array.data) for _, array in sent_arrays)
    metrics = sent.metric_records.get(keys.METRICS)
    sent_metrics = dict(metrics.items()) if metrics else {}
    entry = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "kind": kind,
        "received": {
            "run_id": received.get(keys.RUN_ID),
            "round": received.get(keys.SERVER_ROUND),
            "task_config_sha256": hashlib.sha256(task_json.encode()).hexdigest(),
            "privacy": {
                k: privacy.get(k)
                for k in ("mode", "target_epsilon", "delta", "max_grad_norm", "noise_multiplier", "accountant", "noise")
            },
            # the whole task config: a probe through the data format (choices, templates,
            # max_length) is on record too
            "task_config": task_config,
        },
        "sent": {
            "tensors": tensors,
            "tensor_bytes": tensor_bytes,
            "metrics": sent_metrics,
            "config": {name: dict(record.items()) for name, record in sent.config_records.items()},
            "record_types": sorted(sent.keys()),
        },
    }
    if app is not None:
        entry["app"] = dict(app)
    Path(state_dir).mkdir(parents=True, exist_ok=True)
    with (Path(state_dir) / AUDIT_FILE).open("a", encoding="utf-8") as handle:
        handle.write(json.dumps(entry, sort_keys=True) + "\n")
    what = "pre-flight before round" if kind == PREFLIGHT else "round"
    log.info(
        "audit: %s %s of run %s: sent %d tensors (%d bytes), epsilon %s",
        what,
        escape_remote_text(received.get(keys.SERVER_ROUND)),
        escape_remote_text(received.get(keys.RUN_ID)),
        len(tensors),
        tensor_bytes,
        sent_metrics.get(keys.EPSILON, "n/a"),
    )
    return entry
