"""Run a federation with Flower's simulation engine (Ray actors as nodes): on a local Ray started
for the run, or on a running Ray cluster it joins (``federation.ray_address``)."""

from __future__ import annotations

import importlib
import logging
import os
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, cast

import psutil
import torch
from flwr.serverapp import Grid, ServerApp

from fedllm.config import ExperimentConfig, ModelConfig
from fedllm.errors import ConfigError, FedLLMError
from fedllm.federation import ray_cluster
from fedllm.federation.server_app import run_federation
from fedllm.model.device import usable_cpus
from fedllm.node.policy import SIMULATED_NODES_ENV, STATE_DIR, simulated_node_config, write_simulated_nodes
from fedllm.processes import tagged_processes

log = logging.getLogger(__name__)

RAY_TAG = "FEDLLM_RAY_TAG"

# Set before Flower / Ray start: no telemetry, no update checks, and never let Flower
# install dependencies at run time (it would resolve torch to a multi-GB CUDA build).
QUIET_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "RAY_DISABLE_USAGE_STATS": "1",
    "RAY_DEDUP_LOGS": "0",
    "TOKENIZERS_PARALLELISM": "false",
}


# What a client on a joined cluster's node needs from the driver's environment (its worker inherits
# `ray start`'s environment there): where its node config is, and the offline / quiet policy. Paths
# that differ per machine (HF_HOME, FEDLLM_CACHE) and secrets (a storage key) are not sent: they
# belong to each node's own `ray start` environment.
CLUSTER_ENV = (SIMULATED_NODES_ENV, *QUIET_ENV, "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")


def set_quiet_env() -> None:
    """Apply :data:`QUIET_ENV` without overriding what the user set."""
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)


def route_flower_logs() -> None:
    """Send Flower's log records through the root logger (Hydra's console and run log file)
    instead of Flower's own console handler, which would print every line twice."""
    flwr_logger = logging.getLogger("flwr")
    for handler in list(flwr_logger.handlers):
        # Flower's ConsoleHandler is a StreamHandler subclass; a file handler is kept
        if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
            flwr_logger.removeHandler(handler)
    flwr_logger.setLevel(logging.INFO)
    flwr_logger.propagate = True


def run_simulation(cfg: ExperimentConfig, run_dir: Path, resume: bool = False) -> None:
    """Start ``num_clients`` virtual nodes and the ServerApp, and wait for the run to end.

    With ``federation.ray_address`` null, a local Ray is started and shut down afterwards, so no
    Flower or Ray process outlives the call. Otherwise the run joins that running cluster and
    only disconnects from it at the end (see :mod:`fedllm.federation.ray_cluster`).

    Raises:
        EngineFailed: the engine or the ServerApp failed.
        ray_cluster.ClusterError: the cluster cannot be joined or cannot run this federation.
    """
    set_quiet_env()
    # Ray and Flower's Ray engine only when this engine runs: the in-process engine and `fedllm
    # audit` import this module for its helpers (load_object, route_flower_logs) and never start Ray
    import ray
    from flwr.simulation import run_simulation as flwr_run_simulation

    route_flower_logs()
    client_app = load_object(cfg.federation.client_app)
    with ray_session(ray, cfg, run_dir) as backend_config:
        watch = EngineWatch()
        try:
            flwr_run_simulation(
                server_app=watched_server_app(cfg, run_dir, watch, resume=resume),
                client_app=client_app,
                num_supernodes=cfg.federation.num_clients,
                backend_config=backend_config,
            )
        except Exception as exc:
            watch.stop(f"the simulation engine failed: {engine_error(exc)}")
            if watch.server_error is not None:  # Flower re-raises what the ServerApp raised
                raise EngineFailed(watch.server_error) from exc
            raise EngineFailed(watch.reason) from exc
        finally:
            # Flower does not wait for the ServerApp thread when its engine fails: stop it (its next
            # grid call raises) and wait, or the process would live on until every round timed out
            watch.stop("the simulation engine ended")
            watch.wait_server(SERVER_STOP_WAIT)
    if watch.server_error is not None:
        raise EngineFailed(watch.server_error)


@contextmanager
def ray_session(ray, cfg: ExperimentConfig, run_dir: Path) -> Iterator[dict[str, dict[str, Any]]]:
    """This run's Ray, as Flower's ``backend_config``; released on exit.

    A local Ray (``federation.ray_address`` null) is started by Flower's backend with the
    returned ``init_args`` and stopped on exit with every process it started. A running
    cluster is joined here and only disconnected from on exit: never stopped, and none of its
    processes killed (they are the raylets', not this run's).
    """
    # each virtual node's own config (state, cap, policy), from the researcher's experiment; Ray's
    # workers find it through this variable, and nothing of it travels in a server message
    write_simulated_nodes(cfg, run_dir / "simulated_nodes.json")
    address = cfg.federation.ray_address
    try:
        if address is None:
            # every process Ray starts inherits this tag: how stop_ray finds workers it has orphaned
            os.environ[RAY_TAG] = uuid.uuid4().hex
            yield local_backend(cfg)
        else:
            yield cluster_backend(ray, cfg, run_dir, address)
    finally:
        if address is None:
            stop_ray(ray)
        else:
            ray_cluster.disconnect(ray)
        os.environ.pop(SIMULATED_NODES_ENV, None)


def local_backend(cfg: ExperimentConfig) -> dict[str, dict[str, Any]]:
    """Flower's backend config for a local Ray sized to this machine."""
    return {
        "client_resources": client_resources(cfg, cluster_gpus=None),
        # address "local": a new Ray even when RAY_ADDRESS is set or `ray start` ran on this
        # machine (ray.init would join that cluster, and then refuse num_cpus)
        "init_args": {
            "address": "local",
            "num_cpus": usable_cpus(),
            "include_dashboard": False,
            "logging_level": logging.WARNING,
        },
    }


def cluster_backend(ray, cfg: ExperimentConfig, run_dir: Path, address: str) -> dict[str, dict[str, Any]]:
    """Join the cluster at ``address``, check it can run this federation, and return Flower's
    backend config for it.

    No ``init_args``: Ray is initialised already, so Flower's backend skips ``ray.init``, and
    the cluster's resources (not ``num_cpus``) size its actor pool; ``client_cpus`` /
    ``client_gpus`` remain what each client asks of a node.
    """
    ray_cluster.connect(ray, address, ray_cluster.job_env(CLUSTER_ENV))
    resources = client_resources(cfg, cluster_gpus=ray_cluster.cluster_gpus(ray))
    state_root = Path(str(simulated_node_config(cfg, 0)[STATE_DIR])).parent
    ray_cluster.check_nodes(ray, resources, [run_dir, state_root], address)
    return {"client_resources": resources}


def client_resources(cfg: ExperimentConfig, cluster_gpus: float | None) -> dict[str, float]:
    """What each virtual client asks of a Ray node (``cluster_gpus``: the joined cluster's GPUs,
    None for this machine's)."""
    return {
        "num_cpus": cfg.federation.client_cpus,
        "num_gpus": gpu_share(cfg.federation.client_gpus, cfg.model, cluster_gpus=cluster_gpus),
    }


SERVER_STOP_WAIT = 120.0  # seconds to let a stopped ServerApp write its failed summary (an evaluation may be running)


class EngineFailed(FedLLMError):
    """The simulation engine, or the ServerApp in it, failed: the run has no result."""


class EngineWatch:
    """Links the ServerApp thread to the engine that runs it: :meth:`stop` makes the ServerApp's
    next grid call raise (:class:`StoppableGrid`), and :meth:`wait_server` waits for it to end."""

    def __init__(self) -> None:
        self.stopped = threading.Event()
        self.server_done = threading.Event()
        self.reason = ""
        self.server_started = False
        self.server_error: str | None = None  # why the ServerApp raised, if it did

    def stop(self, reason: str) -> None:
        """Stop the ServerApp's grid calls (the first reason given is kept)."""
        if not self.stopped.is_set():
            self.reason = reason
            self.stopped.set()

    def wait_server(self, timeout: float) -> bool:
        """Wait until the ServerApp has returned (or never started); False if it is still running."""
        if not self.server_started:
            return True
        finished = self.server_done.wait(timeout)
        if not finished:
            log.error("the ServerApp did not stop within %.0f s of the engine", timeout)
        return finished


class StoppableGrid:
    """A Flower ``Grid`` (by its methods: Flower is imported only once the engine starts) that
    raises :class:`EngineFailed` once its :class:`EngineWatch` is stopped, and whose
    ``send_and_receive`` waits in short steps so it notices."""

    POLL_SECONDS = 0.1

    def __init__(self, grid, watch: EngineWatch):
        self.grid, self.watch = grid, watch

    def _check(self) -> None:
        if self.watch.stopped.is_set():
            raise EngineFailed(self.watch.reason)

    def set_run(self, run) -> None:  # noqa: D102 - Grid's contract
        self.grid.set_run(run)

    @property
    def run(self):  # noqa: D102
        return self.grid.run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):  # noqa: D102
        return self.grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self):  # noqa: D102
        self._check()
        return self.grid.get_node_ids()

    def push_messages(self, messages):  # noqa: D102
        self._check()
        return self.grid.push_messages(messages)

    def pull_messages(self, message_ids):  # noqa: D102
        self._check()
        return self.grid.pull_messages(message_ids)

    def send_and_receive(self, messages, *, timeout: float | None = None):
        """Push, then pull until every reply is in, ``timeout`` passes, or the engine stops."""
        pending = set(self.push_messages(messages))
        deadline = None if timeout is None else time.monotonic() + timeout
        replies = []
        while pending:
            for reply in self.pull_messages(pending):
                replies.append(reply)
                pending.discard(reply.metadata.reply_to_message_id)
            if not pending or (deadline is not None and time.monotonic() >= deadline):
                break
            self.watch.stopped.wait(self.POLL_SECONDS)
        return replies


def watched_server_app(cfg: ExperimentConfig, run_dir: Path, watch: EngineWatch, resume: bool = False):
    """The run's ServerApp, on a :class:`StoppableGrid`, telling ``watch`` when it ends and why."""
    app = ServerApp()

    @app.main()
    def main(grid, context) -> None:
        watch.server_started = True
        try:
            run_federation(cast("Grid", StoppableGrid(grid, watch)), cfg, run_dir, resume=resume)
        except Exception as exc:
            if isinstance(exc, EngineFailed):
                watch.server_error = watch.reason
            else:
                watch.server_error = " ".join(str(exc).split()) if isinstance(exc, FedLLMError) else engine_error(exc)
            raise
        finally:
            watch.server_done.set()

    return app


def engine_error(exc: BaseException) -> str:
    """An engine exception and its causes on one line (Flower wraps the real error twice)."""
    parts, seen = [], set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        text = " ".join(str(current).split())
        parts.append(f"{type(current).__name__}: {text}" if text else type(current).__name__)
        current = current.__cause__ or current.__context__
    return " <- ".join(parts)[:600]


def gpu_share(client_gpus: float, model: ModelConfig, cluster_gpus: float | None = None) -> float:
    """Each virtual client's GPU share for Ray.

    Ray hides every GPU from an actor that asks for none, so a GPU setting without a share
    would fail on every client (or, with ``model.device=auto``, train them on the CPU while the
    server uses the GPU); a share without a GPU would make Ray wait forever.

    Args:
        client_gpus: ``federation.client_gpus``.
        model: the model settings (a CUDA device or quantisation needs a share).
        cluster_gpus: the GPUs of the joined Ray cluster; None counts this machine's.

    Raises:
        ConfigError: a share without a GPU, or a GPU-only model setting without a share.
    """
    gpus = torch.cuda.device_count() if cluster_gpus is None else cluster_gpus
    if client_gpus > 0 and gpus == 0:
        where = "no CUDA GPU is visible" if cluster_gpus is None else "the Ray cluster has no GPU"
        raise ConfigError(f"federation.client_gpus={client_gpus}: {where}; set it to 0 on CPU")
    if client_gpus == 0 and (model.device.startswith("cuda") or model.quantization != "none"):
        raise ConfigError(
            "federation.client_gpus=0 hides the GPU from simulated clients, but model.device="
            f"{model.device} / model.quantization={model.quantization} needs it: set "
            "federation.client_gpus (e.g. 0.5), or use the presets gpu=bf16 / gpu=qlora"
        )
    if client_gpus == 0 and gpus > 0 and model.device == "auto":
        log.warning(
            "a GPU is visible but federation.client_gpus=0: simulated clients train on the CPU "
            "(set federation.client_gpus, e.g. 0.5, to train them on the GPU)"
        )
    return client_gpus


def load_object(spec: str):
    """The object a ``module:attribute`` string names (Flower's own notation for apps).

    Raises:
        ConfigError: the module or attribute does not exist.
    """
    module_name, _, attribute = spec.partition(":")
    try:
        return getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"federation.client_app={spec!r} cannot be loaded: {exc}") from exc


def stop_ray(ray, timeout: float = 20.0) -> None:
    """Shut Ray down and wait until every process it started has exited.

    ``ray.shutdown()`` returns while actor processes are still exiting, and a worker started
    late may already have been re-parented away from us: wait for our children and for every
    process carrying this run's tag, and kill any that linger. A command that returns must
    leave none behind.
    """
    me = psutil.Process()
    started = me.children(recursive=True)
    if ray.is_initialized():
        ray.shutdown()
    tag = os.environ.get(RAY_TAG)
    procs = {p.pid: p for p in [*started, *(tagged_processes(RAY_TAG, tag) if tag else [])] if p.pid != me.pid}
    _, alive = psutil.wait_procs(list(procs.values()), timeout=timeout)
    for proc in alive:
        log.warning("killing leftover Ray process %d", proc.pid)
        proc.kill()
    psutil.wait_procs(alive, timeout=5)
