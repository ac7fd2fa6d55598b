"""fedllm under Flower's own CLI in simulation (``flwr run .`` on the local SuperLink).

There Flower's simulation runtime, not ``fedllm simulate``, starts the virtual nodes: each
gets only ``partition-id`` and ``num-partitions`` as node config, and no fedllm driver writes
node configs for them. A virtual node belongs to the researcher who launched the run, who is
operator and coordinator at once, so its policy is built from the experiment the ServerApp
sends, as ``fedllm simulate``'s driver builds it (:func:`~fedllm.node.policy.simulated_node_config`).

Who can put a node on that path matters (a node that took the coordinator's experiment as its
policy would let the coordinator set its cap and its ledger): only a ClientApp running inside
the Ray actor Flower's simulation engine creates for ClientApps, with exactly those two node-config
keys. A deployed SuperNode runs its ClientApp in its own process or in ``flwr-clientapp``, never
in a Ray actor, and nothing in a message or a run config changes that; a SuperNode started with
only those two keys still refuses for want of its own ``state-dir``.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Mapping

from fedllm.config import ExperimentConfig
from fedllm.errors import ConfigError
from fedllm.node.policy import PARTITION_ID, NodePolicy, policy_from_node_config, simulated_node_config

log = logging.getLogger(__name__)

# where Flower's simulation engine runs a virtual node's ClientApp (flwr 1.42)
FLOWER_CLIENT_ACTOR = ("flwr.simulation.ray_transport.ray_actor", "ClientAppActor")
VIRTUAL_NODE_KEYS = frozenset({PARTITION_ID, "num-partitions"})
NUM_CLIENTS = "federation.num_clients"


def in_flower_client_actor() -> bool:
    """Whether this process is the Ray actor Flower's simulation engine runs ClientApps in.

    Read from Ray's own record of the running actor's class (module and name). Any doubt (Ray
    not imported, not an actor, a Ray without that record) answers False: the node is then
    treated as deployed, which is the safe side.
    """
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return False
    try:
        context = ray.get_runtime_context()
        if context.get_actor_id() is None:
            return False
        descriptor = context.current_actor._ray_actor_creation_function_descriptor
        return (descriptor.module_name, descriptor.class_name) == FLOWER_CLIENT_ACTOR
    except Exception:  # noqa: BLE001 - Ray internals moved: not provably a virtual node
        return False


def is_flower_virtual_node(node_config: Mapping) -> bool:
    """A virtual node of Flower's simulation runtime (see the module docstring)."""
    return set(node_config) == VIRTUAL_NODE_KEYS and in_flower_client_actor()


def virtual_node_policy(cfg: ExperimentConfig, node_config: Mapping) -> NodePolicy:
    """The policy of a virtual node of Flower's simulation runtime: the experiment's, as
    ``fedllm simulate``'s driver would have written it for this partition.

    Raises:
        ConfigError: the partition id is not one of the experiment's clients.
    """
    try:
        partition = int(node_config[PARTITION_ID])
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"node config {PARTITION_ID}: not an integer ({node_config[PARTITION_ID]!r})") from exc
    if not 0 <= partition < cfg.federation.num_clients:
        raise ConfigError(
            f"virtual node {partition}: the experiment has {cfg.federation.num_clients} clients "
            f"({NUM_CLIENTS}); size Flower's simulation federation to match"
        )
    return policy_from_node_config(simulated_node_config(cfg, partition), simulated=True)


def is_simulation_grid(grid: object) -> bool:
    """Whether the ServerApp runs in Flower's simulation runtime (its in-memory grid)."""
    from flwr.superlink.grid.inmemory_grid import InMemoryGrid

    return isinstance(grid, InMemoryGrid)


def count_virtual_nodes(grid, timeout: float = 60.0, settle: float = 1.0) -> int:
    """The simulation federation's size: Flower starts the ServerApp before it registers the
    virtual nodes (all at once), so wait for the first and read again once they settle."""
    deadline = time.monotonic() + timeout
    while not grid.get_node_ids():
        if time.monotonic() > deadline:
            return 0
        time.sleep(0.1)
    time.sleep(settle)
    return len(grid.get_node_ids())


def simulation_overrides(overrides: list[str], nodes: int) -> list[str]:
    """The run's overrides for a simulation federation of ``nodes`` virtual SuperNodes.

    The experiment's clients are the federation's nodes: unless the overrides name
    ``federation.num_clients`` themselves, it becomes ``nodes`` (Flower's local federation
    has 2 by default, the default experiment 10), and the log says so.

    Raises:
        ConfigError: the overrides set another number of clients than there are nodes.
    """
    named = [o for o in overrides if o.lstrip("+~").split("=", 1)[0] == NUM_CLIENTS]
    resize = f"flwr federation simulation-config --num-supernodes N (or {NUM_CLIENTS}=N in overrides)"
    if named:
        wanted = named[-1].split("=", 1)[1] if "=" in named[-1] else ""
        if wanted != str(nodes):
            raise ConfigError(
                f"{named[-1]}, but Flower's simulation federation has {nodes} virtual SuperNodes; "
                f"make them agree: {resize}"
            )
        return overrides
    log.warning(
        "Flower's simulation federation has %d virtual SuperNodes: running %d clients (%s=%d); resize with %s",
        nodes,
        nodes,
        NUM_CLIENTS,
        nodes,
        resize,
    )
    return [*overrides, f"{NUM_CLIENTS}={nodes}"]
