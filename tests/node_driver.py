"""Drive the real ClientApp round by round, as Flower's engine does, without a server.

Used by the node-ledger tests and runnable as a script (``python -m tests.node_driver``)
so that a test can kill a node process part-way and start it again.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, Metadata, RecordDict

from fedllm import task
from fedllm.config import ExperimentConfig
from fedllm.federation import records as keys
from fedllm.federation.client_app import app
from fedllm.node.policy import SIMULATED, SIMULATED_NODES_ENV, simulated_node_config


def train_message(cfg: ExperimentConfig, run_id: str, server_round: int, arrays: dict[str, torch.Tensor]) -> Message:
    """The message the server sends a node for ``server_round``."""
    content = RecordDict(
        {
            keys.ARRAYS: ArrayRecord(torch_state_dict=arrays),
            keys.CONFIG: ConfigRecord(
                {keys.TASK_CONFIG: cfg.to_json(), keys.RUN_ID: run_id, keys.SERVER_ROUND: server_round}
            ),
        }
    )
    metadata = Metadata(
        run_id=1,
        message_id=f"{run_id}-{server_round}",
        src_node_id=0,
        dst_node_id=1,
        reply_to_message_id="",
        group_id=str(server_round),
        created_at=time.time(),
        ttl=3600.0,
        message_type="train",
    )
    return Message(content=content, metadata=metadata)


def query_message(cfg: ExperimentConfig, run_id: str = "run", first_round: int = 1) -> Message:
    """The pre-flight query the server sends a node before ``first_round``."""
    config = ConfigRecord({keys.TASK_CONFIG: cfg.to_json(), keys.RUN_ID: run_id, keys.SERVER_ROUND: first_round})
    metadata = Metadata(
        run_id=1,
        message_id="preflight",
        src_node_id=0,
        dst_node_id=1,
        reply_to_message_id="",
        group_id="",
        created_at=time.time(),
        ttl=120.0,
        message_type="query",
    )
    return Message(content=RecordDict({keys.CONFIG: config}), metadata=metadata)


def node_context(node_config: dict) -> Context:
    """A fresh node context, as a (re)started SuperNode with ``node_config`` would have."""
    return Context(run_id=1, node_id=1, node_config=node_config, state=RecordDict(), run_config={})


def simulated_node(cfg: ExperimentConfig, partition_id: int = 0, **overrides) -> dict:
    """The node config the simulation driver would give node ``partition_id`` of ``cfg``, with
    ``overrides`` (keys with ``_`` for ``-``; a value of None removes the key)."""
    config = {**simulated_node_config(cfg, partition_id), keys.NODE_NUM_PARTITIONS: cfg.federation.num_clients}
    for key, value in overrides.items():
        config.pop(key.replace("_", "-"), None) if value is None else config.update({key.replace("_", "-"): value})
    return config


@contextmanager
def as_simulation_driver(config: dict):
    """Hand ``config`` to the node as the simulation driver does (a file named by
    :data:`SIMULATED_NODES_ENV`); a deployed node's config is passed as it is."""
    if not config.get(SIMULATED):
        yield config
        return
    previous = os.environ.get(SIMULATED_NODES_ENV)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "simulated_nodes.json"
        path.write_text(json.dumps({str(config[keys.NODE_PARTITION_ID]): config}), encoding="utf-8")
        os.environ[SIMULATED_NODES_ENV] = str(path)
        try:
            yield {keys.NODE_PARTITION_ID: config[keys.NODE_PARTITION_ID]}  # all the engine itself gives
        finally:
            if previous is None:
                os.environ.pop(SIMULATED_NODES_ENV, None)
            else:
                os.environ[SIMULATED_NODES_ENV] = previous


def run_round(
    cfg: ExperimentConfig,
    run_id: str,
    server_round: int,
    partition_id: int = 0,
    node_config: dict | None = None,
    arrays: dict | None = None,
) -> Message:
    """One round on a node (by default the simulated node ``partition_id`` of ``cfg``), starting
    from ``arrays`` (default: the initial adapter, the server's global state)."""
    initial = arrays if arrays is not None else task.model_bundle(cfg.model, cfg.lora, cfg.seed).initial_adapter
    config = node_config if node_config is not None else simulated_node(cfg, partition_id)
    with as_simulation_driver(config) as engine_config:
        return app(train_message(cfg, run_id, server_round, initial), node_context(engine_config))


if __name__ == "__main__":  # python -m tests.node_driver <config.json> <run_id> <round> [<round> ...]
    config = ExperimentConfig.from_json(open(sys.argv[1], encoding="utf-8").read())
    for number in sys.argv[3:]:
        print(json.dumps({"round": int(number), "started": True}), flush=True)
        reply = run_round(config, sys.argv[2], int(number))
        print(json.dumps({"round": int(number), "metrics": dict(reply.content[keys.METRICS])}), flush=True)
