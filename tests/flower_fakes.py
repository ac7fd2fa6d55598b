"""Hand-built Flower pieces for strategy tests: a grid that only lists nodes, and train replies.

Strategies are driven as Flower's engine drives them (``configure_train``, then
``aggregate_train`` on the replies), with no engine and no Ray.
"""

from __future__ import annotations

import time

import numpy as np
from flwr.app import Array, ArrayRecord, Message, Metadata, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fedllm.federation import records as keys


def act_as_server_process(monkeypatch) -> None:
    """Flower stamps every new message with the run, node and task of its process, which a
    ServerApp's process has and a test's does not."""
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)


class FakeGrid:
    """The one Grid method strategies call to sample: the connected node ids."""

    def __init__(self, nodes: list[int]):
        self.nodes = nodes

    def get_node_ids(self) -> list[int]:
        return list(self.nodes)


def arrays_record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    """An ArrayRecord of numpy arrays, in order."""
    return ArrayRecord({name: Array(value) for name, value in arrays.items()})


def train_reply(node: int, arrays: dict[str, np.ndarray], server_round: int, weight: float = 1.0) -> Message:
    """A validated update as the round loop hands it to the strategy: adapter arrays and the
    FedAvg weight the server set."""
    content = RecordDict({keys.ARRAYS: arrays_record(arrays), keys.METRICS: MetricRecord({keys.FEDAVG_WEIGHT: weight})})
    metadata = Metadata(
        run_id=1,
        message_id=f"reply-{node}-{server_round}",
        src_node_id=node,
        dst_node_id=0,
        reply_to_message_id="",
        group_id=str(server_round),
        created_at=time.time(),
        ttl=60.0,
        message_type="train",
    )
    return Message(content=content, metadata=metadata)
