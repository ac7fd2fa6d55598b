"""Client-level audits (``privacy=client``): the canaries are whole clients.

The federation gets ``m`` extra nodes next to the real ones. Canary client ``i`` answers every
round it is sampled for with the global adapter moved by its designed update (norm exactly
``privacy.client_clip_norm``, the clipping bound) when it is included, and with the global
adapter unchanged (a zero update) when it is not: exactly the zero-out relation the
client-level accountant states. Its update goes through the real round loop, clipping and
server noise, and is counted in the accounting like any client's. The real clients train on
the shards the experiment gives them (written to files their simulated node configs name),
so adding canary clients changes no real client's data.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path

import torch
from flwr.app import Context, Message, MessageType

from fedllm import task
from fedllm.audit.canaries import Canary, CanaryDesign
from fedllm.config import ExperimentConfig
from fedllm.federation import records as keys
from fedllm.federation.protocol import preflight_reply, update_reply
from fedllm.node.policy import DATA_FORMAT, DATA_PATH, DATASET_ID
from fedllm.node.release import PreflightAnswer, TrainReport


def with_canary_clients(cfg: ExperimentConfig, count: int) -> ExperimentConfig:
    """``cfg`` with ``count`` more clients (the canaries), after the real ones."""
    return dataclasses.replace(
        cfg, federation=dataclasses.replace(cfg.federation, num_clients=cfg.federation.num_clients + count)
    )


def place_on_canary_clients(design: CanaryDesign, real_clients: int) -> CanaryDesign:
    """The design with canary ``i`` on client ``real_clients + i`` (its own node)."""
    design.canaries = [dataclasses.replace(c, client=real_clients + c.index) for c in design.canaries]
    return design


def real_client_files(cfg: ExperimentConfig, folder: Path) -> Callable[[int], dict]:
    """Each real client's shard of ``cfg`` as a JSONL file, and the node-config keys that point
    its simulated node at it (a canary client has none: it never reads data)."""
    folder.mkdir(parents=True, exist_ok=True)
    files = {}
    for client, shard in enumerate(task.split_for(cfg).shards):
        path = folder / f"client-{client}.jsonl"
        with path.open("w", encoding="utf-8") as handle:
            for record in shard:
                handle.write(
                    json.dumps({cfg.data.prompt_field: record.prompt, cfg.data.response_field: record.response}) + "\n"
                )
        files[client] = {DATA_PATH: str(path), DATA_FORMAT: "jsonl", DATASET_ID: f"audit-client-{client}"}
    return lambda partition: files.get(partition, {})


def canary_client_app(real_app, real_clients: int, design: CanaryDesign):
    """A ClientApp for the audited federation: the real app for partitions below
    ``real_clients``, a canary client above."""

    def app(message: Message, context: Context) -> Message:
        partition = int(context.node_config[keys.NODE_PARTITION_ID])
        if partition < real_clients:
            return real_app(message, context)
        if message.metadata.message_type == MessageType.QUERY:  # the pre-flight: a canary client has no budget
            return _canary_preflight(message, partition)
        return _canary_reply(message, design.canaries[partition - real_clients], design, partition)

    return app


def _canary_preflight(message: Message, partition: int) -> Message:
    """Every planned round fits: a canary client is the auditor's stand-in, not a node with a
    cap (its updates are what client-level DP must hide, accounted by the server)."""
    config = message.content[keys.CONFIG]
    cfg = ExperimentConfig.from_json(str(config[keys.TASK_CONFIG]))
    planned = cfg.federation.num_rounds - int(str(config[keys.SERVER_ROUND])) + 1
    return preflight_reply(
        message,
        PreflightAnswer(partition, rounds_planned=planned, rounds_affordable=planned, cap=cfg.privacy.target_epsilon),
    )


def _canary_reply(message: Message, canary: Canary, design: CanaryDesign, partition: int) -> Message:
    arrays: dict[str, torch.Tensor] = dict(message.content.array_records[keys.ARRAYS].to_torch_state_dict())
    if canary.included:
        # moved against the canary's direction, as a gradient step along it would move it: the
        # coordinator's and the readers' "descent" then points along the designed vector
        where, values = design.direction(canary.index)
        flat = design.layout.flatten({n: t.numpy() for n, t in arrays.items()})
        flat[where] -= values
        arrays = design.layout.unflatten(flat)
    return update_reply(message, arrays, TrainReport(partition, None).to_metrics())
