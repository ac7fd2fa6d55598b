"""An in-process Flower engine: the real ServerApp round loop and the real ClientApp, in one
process, with no Ray and no network.

:class:`InProcessGrid` implements Flower's ``Grid``: each message pushed is delivered (as a
copy, the way a real engine serialises it) to the ClientApp under that node's ``Context``, which
dispatches it by its message type as Flower's engines do (``train`` rounds, the ``query`` of the
pre-flight, :mod:`~fedllm.federation.preflight`), and
the reply (or, if the app raised, an error reply, as Flower's engine sends one) is kept until
pulled. Nodes answer one after another. It serves ``fedllm audit`` (which records every reply,
the coordinator's view, through ``observer``), ``federation.engine=inprocess`` runs, and the
round-loop tests, which then take seconds instead of a Ray start-up.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from flwr.app import Context, Error, Message, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.serverapp import Grid
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

from fedllm.config import ExperimentConfig
from fedllm.federation import records as keys
from fedllm.federation.server_app import run_federation
from fedllm.federation.simulation import load_object, route_flower_logs
from fedllm.model.device import usable_cpus
from fedllm.node.policy import SIMULATED_NODES_ENV, write_simulated_nodes
from fedllm.tracking.run_files import RunSummary

log = logging.getLogger(__name__)

FIRST_NODE_ID = 1001  # node ids as an engine assigns them: opaque numbers, not partition ids
CLIENT_APP_ERROR = 1  # the code an engine gives a ClientApp exception (Flower's ErrorCode.CLIENT_APP_RAISED_EXCEPTION)

Observer = Callable[[Message, Message], None]


class InProcessGrid(Grid):
    """A Flower ``Grid`` whose nodes are a ClientApp called in this process.

    Args:
        client_app: the ClientApp every node runs (``app(message, context)``).
        num_nodes: how many nodes; node ``FIRST_NODE_ID + i`` holds partition ``i``.
        observer: called with ``(message, reply)`` for every reply, before the server sees it.
        unreachable: partitions whose messages are never answered (a node that left).
    """

    def __init__(self, client_app, num_nodes: int, observer: Observer | None = None, unreachable: Iterable[int] = ()):
        self.client_app = client_app
        self.partitions = {FIRST_NODE_ID + i: i for i in range(num_nodes)}
        self.observer = observer
        self.unreachable = set(unreachable)
        self._run = Run.create_empty(run_id=1)
        self._replies: dict[str, Message] = {}
        # each node keeps its Context (and its state record) across rounds, as a SuperNode does
        self._contexts = {
            node: Context(
                run_id=1,
                node_id=node,
                node_config={keys.NODE_PARTITION_ID: part, keys.NODE_NUM_PARTITIONS: num_nodes},
                state=RecordDict(),
                run_config={},
            )
            for node, part in self.partitions.items()
        }

    def set_run(self, run: Run) -> None:
        """Set the run this grid serves."""
        self._run = run

    @property
    def run(self) -> Run:
        """The run this grid serves."""
        return self._run

    def create_message(
        self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str, ttl: float | None = None
    ) -> Message:
        """A new instruction message (Flower deprecates this in favour of ``Message(...)``)."""
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> list[int]:
        """Every node's id."""
        return list(self.partitions)

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        """Deliver each message to its node now; the replies wait for :meth:`pull_messages`."""
        ids = []
        for message in messages:
            message.metadata.__dict__["_message_id"] = uuid.uuid4().hex  # as a SuperLink assigns it
            ids.append(message.metadata.message_id)
            if self.partitions.get(message.metadata.dst_node_id) in self.unreachable:
                continue
            reply = self._deliver(message)
            if reply is not None:
                self._replies[message.metadata.message_id] = reply
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        """The replies to ``message_ids`` that exist (each is handed out once)."""
        return [self._replies.pop(mid) for mid in message_ids if mid in self._replies]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        """Push, then pull: every reachable node has answered by the time push returns."""
        return self.pull_messages(self.push_messages(messages))

    def _deliver(self, message: Message) -> Message | None:
        node = message.metadata.dst_node_id
        if node not in self._contexts:
            log.error("message for unknown node %d dropped", node)
            return None
        delivered = copy.deepcopy(message)  # a node never shares objects with the server
        try:
            reply = self.client_app(delivered, self._contexts[node])
        except Exception as exc:  # noqa: BLE001 - an engine turns any ClientApp exception into an error reply
            reply = Message(Error(code=CLIENT_APP_ERROR, reason=f"{type(exc).__name__}: {exc}"), reply_to=delivered)
        reply = copy.deepcopy(reply)
        reply.metadata.__dict__["_message_id"] = uuid.uuid4().hex
        if self.observer is not None:
            self.observer(message, reply)
        return reply


@contextmanager
def server_identity() -> Iterator[None]:
    """This process acts as the ServerApp's process (Flower stamps new messages with its run and
    node ids), and is restored afterwards."""
    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, SUPERLINK_NODE_ID, 1
    try:
        yield
    finally:
        TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved


@contextmanager
def simulated_nodes(cfg: ExperimentConfig, run_dir: Path, extra: Callable[[int], dict] | None = None) -> Iterator[None]:
    """Every virtual node's own config written where the ClientApp looks for it (the simulation
    driver file), with ``extra(partition)`` added to each; removed from the environment afterwards."""
    previous = os.environ.get(SIMULATED_NODES_ENV)
    write_simulated_nodes(cfg, run_dir / "simulated_nodes.json", extra)
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(SIMULATED_NODES_ENV, None)
        else:
            os.environ[SIMULATED_NODES_ENV] = previous


def run_inprocess(
    cfg: ExperimentConfig,
    run_dir: Path,
    *,
    client_app=None,
    observer: Observer | None = None,
    resume: bool = False,
    extra_node_config: Callable[[int], dict] | None = None,
    unreachable: Iterable[int] = (),
) -> RunSummary:
    """Run (or continue) the federation of ``cfg`` in this process; returns its summary.

    Args:
        cfg: the experiment.
        run_dir: where the outputs go.
        client_app: the ClientApp (default: ``federation.client_app``).
        observer: sees every ``(message, reply)`` pair (the coordinator's view of the nodes).
        resume: continue from the checkpoint in ``run_dir``.
        extra_node_config: more node-config keys per partition (simulation driver only).
        unreachable: partitions that never answer (a node that left: the round times out on it).
    """
    route_flower_logs()
    # nodes answer one after another here, so each may use every core (Ray runs them side by side)
    cores = usable_cpus()
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, threads_per_client=cores))
    app = client_app if client_app is not None else load_object(cfg.federation.client_app)
    grid = InProcessGrid(app, cfg.federation.num_clients, observer=observer, unreachable=unreachable)
    with simulated_nodes(cfg, run_dir, extra_node_config), server_identity():
        return run_federation(grid, cfg, run_dir, resume=resume)
