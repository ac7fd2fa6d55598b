"""The node's audit log: what the server asked and exactly what left the node, per round and
per pre-flight query (``kind``: ``train`` or ``query``; entries written before the pre-flight
existed have no ``kind`` and are rounds)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import stat
import time
from collections.abc import Mapping
from pathlib import Path

from flwr.app import RecordDict

from fedllm.errors import FedLLMError
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
    except (ValueError, RecursionError):
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
    append_entry(Path(state_dir) / AUDIT_FILE, entry)
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


def append_entry(path: Path, entry: Mapping) -> None:
    """Append ``entry`` as one JSON line to the audit log at ``path`` (created 0600).

    The log is opened without following a symbolic link and must be a regular file: a link
    planted in the state directory must not make the node append (coordinator-chosen text)
    to a file elsewhere, and a FIFO must not block the round.

    Raises:
        FedLLMError: ``path`` is a symbolic link or not a regular file.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = _open_log(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, "does not write through it")
    with os.fdopen(fd, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(entry, sort_keys=True) + "\n")


def read_entries(path: Path) -> tuple[list[dict], int]:
    """The audit log's entries, and how many of its lines could not be read (a line torn by a
    crash mid-write, or edited): those are skipped, never fatal.

    Raises:
        FedLLMError: ``path`` is a symbolic link or not a regular file.
        OSError: the file cannot be read.
    """
    fd = _open_log(path, os.O_RDONLY, "does not read it")
    with os.fdopen(fd, encoding="utf-8", errors="replace") as handle:
        lines = [line for line in handle.read().splitlines() if line.strip()]
    entries = []
    for line in lines:
        try:
            entry = json.loads(line)
        except (ValueError, RecursionError):
            continue
        if isinstance(entry, dict):
            entries.append(entry)
    return entries, len(lines) - len(entries)


def _open_log(path: Path, flags: int, refusal: str) -> int:
    """A descriptor of the audit log at ``path``, never through a symbolic link, never blocking
    (a FIFO), and only for a regular file (``refusal``: what the node does not do with a link).

    Raises:
        FedLLMError: ``path`` is a symbolic link or not a regular file.
        OSError: the file cannot be opened.
    """
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        if path.is_symlink():
            raise FedLLMError(f"{path}: the audit log is a symbolic link; the node {refusal}") from exc
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise FedLLMError(f"{path}: the audit log is not a regular file")
    return fd
