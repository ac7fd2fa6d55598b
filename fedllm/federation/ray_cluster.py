"""Joining a running Ray cluster (``federation.ray_address``) instead of starting a local Ray.

A cluster started with ``ray start`` belongs to whoever started it. fedllm connects this
process to it as a Ray driver, lets the cluster's resources decide where clients run, and on
the way out only disconnects: ``ray.shutdown()`` in a driver that connected ends this run's
job (the cluster then stops the job's actors) and leaves the cluster running. The driver
starts no local process when it connects, so there is nothing else of ours to stop.

The cluster's workers are started by each node's raylet and inherit the environment of
``ray start`` on that node, not this process's: what a client needs from the driver's
environment travels in the job's runtime environment (:func:`connect`), and the files a
simulated node reads and writes (its node config in the run directory, its privacy ledger in
its state directory) must be the same files on every node (:func:`check_nodes`).
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from fedllm.errors import FedLLMError

# Ray itself is imported inside the functions that use it (or passed in): only a run on a joined
# cluster needs it, and every simulation imports this module

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 5.0  # a cluster's GCS answers a TCP connect at once; Ray itself retries for minutes
NODE_CHECK_TIMEOUT_S = 300.0  # a node may have to start a worker (Python, Ray, runtime env) to answer
MARKER_PREFIX = ".fedllm-visible-"
# Ray's names for the resources Flower's client_resources ask for
RAY_RESOURCE = {"num_cpus": "CPU", "num_gpus": "GPU"}


class ClusterError(FedLLMError):
    """The Ray cluster ``federation.ray_address`` names cannot run this federation."""


def one_line(exc: BaseException) -> str:
    """An exception as one line (Ray's messages span several)."""
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def resolve(address: str) -> str:
    """The ``host:port`` of the cluster ``address`` names.

    ``auto`` is resolved as Ray resolves it (``RAY_ADDRESS``, else the cluster the last
    ``ray start`` on this machine created, else a single running one), so that the address can
    be checked before Ray's own connection attempts, which retry for many minutes.

    Raises:
        ClusterError: ``auto`` finds no cluster.
    """
    if address != "auto":
        return address
    # Ray's own lookup for "auto" (private: a Ray upgrade that moves it fails the unit test of this)
    from ray._private.services import canonicalize_bootstrap_address_or_die

    try:
        return canonicalize_bootstrap_address_or_die("auto")
    except (ConnectionError, ValueError) as exc:
        raise ClusterError(
            f"federation.ray_address=auto: no running Ray cluster found ({one_line(exc)}); "
            "start one with `ray start --head`, or give its <host>:<port>"
        ) from exc


def check_reachable(target: str, address: str, timeout: float = CONNECT_TIMEOUT_S) -> None:
    """Fail at once, naming the address, unless something listens at ``target`` (``host:port``).

    Raises:
        ClusterError: nothing answers (refused, unresolvable host, timeout).
    """
    host, _, port = target.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            pass
    except OSError as exc:
        shown = address if address == target else f"{address} ({target})"
        reason = exc.strerror or str(exc) or type(exc).__name__
        raise ClusterError(
            f"federation.ray_address={shown}: no Ray cluster answers there ({reason}); start "
            "it with `ray start --head --port=...`, check the address, or set "
            "federation.ray_address=null to start a local Ray"
        ) from exc


def connect(ray, address: str, env_vars: Mapping[str, str]) -> str:
    """Connect this process to the running cluster ``address`` names, as a Ray driver.

    Ray is initialised here rather than by Flower's backend, which then skips ``ray.init``:
    Flower would pass its own ``runtime_env`` next to ours, and could not report an
    unreachable cluster in one line.

    Args:
        ray: the ``ray`` module.
        address: ``auto`` or ``host:port`` (validated by the config).
        env_vars: the driver's environment variables that this job's workers need.

    Returns:
        The cluster's ``host:port``.

    Raises:
        ClusterError: no cluster found or answering, or Ray refused to connect (e.g. another Ray
            or Python version on the cluster).
    """
    target = resolve(address)
    check_reachable(target, address)
    try:
        ray.init(
            address=target,
            runtime_env={"env_vars": dict(env_vars)},
            include_dashboard=False,
            logging_level=logging.WARNING,
            log_to_driver=True,
        )
    except Exception as exc:
        raise ClusterError(
            f"federation.ray_address={address}: cannot join the Ray cluster at {target}: {one_line(exc)}"[:600]
        ) from exc
    log.info("joined the Ray cluster at %s: %s", target, ray.cluster_resources())
    return target


def cluster_gpus(ray) -> float:
    """How many GPUs the connected cluster offers in all."""
    return float(ray.cluster_resources().get("GPU", 0))


def fits(node_resources: Mapping[str, float], client_resources: Mapping[str, float]) -> bool:
    """Whether a node with ``node_resources`` (Ray's names) can host one client asking for
    ``client_resources`` (Flower's ``num_cpus`` / ``num_gpus``)."""
    return all(
        node_resources.get(RAY_RESOURCE.get(key, key), 0) >= amount
        for key, amount in client_resources.items()
        if amount > 0
    )


def sees_markers(markers: Sequence[str], token: str) -> list[bool]:
    """For each marker path, whether it exists here and holds ``token`` (runs on a cluster node)."""
    seen = []
    for marker in markers:
        try:
            seen.append(Path(marker).read_text(encoding="utf-8") == token)
        except OSError:
            seen.append(False)
    return seen


def check_nodes(
    ray,
    client_resources: Mapping[str, float],
    shared: Sequence[Path],
    address: str,
    timeout: float = NODE_CHECK_TIMEOUT_S,
) -> None:
    """Check that the cluster can host clients, and that every node that can sees ``shared``.

    Any node may run any simulated node in any round, so a node's config and its privacy ledger
    must be the same files wherever it runs: a ledger split across machines would under-count
    what the node has spent. A fresh marker file is written in each ``shared`` directory and
    read back by a task pinned to each such node.

    Raises:
        ClusterError: no node fits one client, or a node does not see a shared directory.
    """
    nodes = [node for node in ray.nodes() if node["Alive"] and fits(node["Resources"], client_resources)]
    if not nodes:
        asked = ", ".join(f"{RAY_RESOURCE.get(k, k)}={v:g}" for k, v in client_resources.items())
        raise ClusterError(
            f"federation.ray_address={address}: no node of the cluster can host a client asking "
            f"for {asked} (federation.client_cpus / client_gpus); the cluster has "
            f"{ray.cluster_resources()}"
        )
    token = secrets.token_hex(16)
    markers = []
    for directory in shared:
        directory.mkdir(parents=True, exist_ok=True)
        marker = directory / f"{MARKER_PREFIX}{token}"
        marker.write_text(token, encoding="utf-8")
        markers.append(marker)
    try:
        _check_markers(ray, nodes, markers, token, address, timeout)
    finally:
        for marker in markers:
            marker.unlink(missing_ok=True)


def _check_markers(ray, nodes: list[dict], markers: list[Path], token: str, address: str, timeout: float) -> None:
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    task = ray.remote(num_cpus=0)(sees_markers)
    pending = {
        node["NodeManagerAddress"] + " " + node["NodeID"][:8]: task.options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False)
        ).remote([str(m) for m in markers], token)
        for node in nodes
    }
    try:
        answers = dict(zip(pending, ray.get(list(pending.values()), timeout=timeout), strict=True))
    except Exception as exc:
        raise ClusterError(
            f"federation.ray_address={address}: the cluster's nodes did not answer a file check "
            f"within {timeout:.0f} s: {one_line(exc)}"[:600]
        ) from exc
    for node, seen in answers.items():
        unseen = [str(m.parent) for m, ok in zip(markers, seen, strict=True) if not ok]
        if unseen:
            raise ClusterError(
                f"federation.ray_address={address}: Ray node {node} does not see {', '.join(unseen)} as this "
                "driver does; the run directory and privacy.state_dir must be on a filesystem every Ray node "
                "mounts at the same path (e.g. NFS), or a simulated node's config and privacy ledger would "
                "differ between machines"
            )


def disconnect(ray) -> None:
    """End this driver's connection (and with it this run's job and actors); the cluster runs on."""
    if ray.is_initialized():
        ray.shutdown()


def job_env(names: Sequence[str]) -> dict[str, str]:
    """The variables among ``names`` that this process sets, plus a ``PYTHONPATH`` that lets the
    job's workers import what this driver imports (as Flower's backend does for a local Ray)."""
    env = {name: os.environ[name] for name in names if name in os.environ}
    paths = [p for p in sys.path if p]
    if os.environ.get("PYTHONPATH"):
        paths.append(os.environ["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(paths)
    return env
