"""Drive the real ClientApp round by round, as Flower's engine does, without a server.

Used by the node-ledger tests and runnable as a script (``python -m tests.node_driver``)
so that a test can kill a node process part-way and start it again.
"""

from __future__ import annotations

import json
import sys
import time

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, Metadata, RecordDict

from fedllm import task
from fedllm.config import ExperimentConfig
from fedllm.federation import records as keys
from fedllm.federation.client_app import app


def train_message(cfg: ExperimentConfig, run_id: str, server_round: int, arrays: dict[str, torch.Tensor]) -> Message:
    """The message the server sends a node for ``server_round``."""
    content = RecordDict({
        keys.ARRAYS: ArrayRecord(torch_state_dict=arrays),
        keys.CONFIG: ConfigRecord({keys.TASK_CONFIG: cfg.to_json(), keys.RUN_ID: run_id,
                                   keys.SERVER_ROUND: server_round}),
    })
    metadata = Metadata(run_id=1, message_id=f"{run_id}-{server_round}", src_node_id=0, dst_node_id=1,
                        reply_to_message_id="", group_id=str(server_round), created_at=time.time(), ttl=3600.0,
                        message_type="train")
    return Message(content=content, metadata=metadata)


def node_context(partition_id: int, node_config: dict | None = None) -> Context:
    """A fresh node context, as a (re)started SuperNode would have."""
    config = {keys.NODE_PARTITION_ID: partition_id, keys.NODE_NUM_PARTITIONS: 1, **(node_config or {})}
    return Context(run_id=1, node_id=1, node_config=config, state=RecordDict(), run_config={})


def run_round(cfg: ExperimentConfig, run_id: str, server_round: int, partition_id: int = 0,
              node_config: dict | None = None) -> Message:
    """One round on a node, starting from the initial adapter (the server's global state)."""
    initial = task.model_bundle(cfg.model, cfg.lora, cfg.seed).initial_adapter
    return app(train_message(cfg, run_id, server_round, initial), node_context(partition_id, node_config))


if __name__ == "__main__":  # python -m tests.node_driver <config.json> <run_id> <round> [<round> ...]
    config = ExperimentConfig.from_json(open(sys.argv[1], encoding="utf-8").read())
    for number in sys.argv[3:]:
        print(json.dumps({"round": int(number), "started": True}), flush=True)
        reply = run_round(config, sys.argv[2], int(number))
        print(json.dumps({"round": int(number), "metrics": dict(reply.content[keys.METRICS])}), flush=True)
