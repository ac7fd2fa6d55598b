"""Run a federation on one machine with Flower's simulation engine (Ray actors as nodes)."""

from __future__ import annotations

import logging
import os
import uuid
from pathlib import Path

from fedllm.config import ExperimentConfig, ModelConfig
from fedllm.errors import ConfigError
from fedllm.node.policy import SIMULATED_NODES_ENV, write_simulated_nodes

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


def set_quiet_env() -> None:
    """Apply :data:`QUIET_ENV` without overriding what the user set."""
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)


def route_flower_logs() -> None:
    """Send Flower's log records through the root logger (Hydra's console and run log file)
    instead of Flower's own console handler, which would print every line twice."""
    flwr_logger = logging.getLogger("flwr")
    for handler in list(flwr_logger.handlers):
        if type(handler) is logging.StreamHandler:
            flwr_logger.removeHandler(handler)
    flwr_logger.setLevel(logging.INFO)
    flwr_logger.propagate = True


def run_simulation(cfg: ExperimentConfig, run_dir: Path, resume: bool = False) -> None:
    """Start ``num_clients`` virtual nodes and the ServerApp, and wait for the run to end.

    Ray is shut down afterwards, so no Flower or Ray process outlives the call.
    """
    set_quiet_env()
    import ray
    from flwr.simulation import run_simulation as flwr_run_simulation

    from fedllm.federation.server_app import build_server_app

    route_flower_logs()
    client_app = load_object(cfg.federation.client_app)

    backend_config = {
        "client_resources": {"num_cpus": cfg.federation.client_cpus,
                             "num_gpus": gpu_share(cfg.federation.client_gpus, cfg.model)},
        "init_args": {"num_cpus": os.cpu_count() or 1, "include_dashboard": False,
                      "logging_level": logging.WARNING},
    }
    # every process Ray starts inherits this tag: how stop_ray finds workers it has orphaned
    os.environ[RAY_TAG] = uuid.uuid4().hex
    # each virtual node's own config (state, cap, policy), from the researcher's experiment; Ray's
    # workers inherit the variable naming it, and nothing of it travels in a server message
    write_simulated_nodes(cfg, run_dir / "simulated_nodes.json")
    try:
        flwr_run_simulation(
            server_app=build_server_app(cfg, run_dir, resume=resume), client_app=client_app,
            num_supernodes=cfg.federation.num_clients, backend_config=backend_config,
        )
    finally:
        stop_ray(ray)
        os.environ.pop(SIMULATED_NODES_ENV, None)


def gpu_share(client_gpus: float, model: ModelConfig) -> float:
    """Each virtual client's GPU share for Ray.

    Ray hides every GPU from an actor that asks for none, so a GPU setting without a share
    would fail on every client (or, with ``model.device=auto``, train them on the CPU while the
    server uses the GPU); a share without a GPU would make Ray wait forever.

    Raises:
        ConfigError: a share without CUDA, or a GPU-only model setting without a share.
    """
    import torch

    gpus = torch.cuda.device_count()
    if client_gpus > 0 and gpus == 0:
        raise ConfigError(f"federation.client_gpus={client_gpus}: no CUDA GPU is visible; set it to 0 on CPU")
    if client_gpus == 0 and (model.device.startswith("cuda") or model.quantization != "none"):
        raise ConfigError("federation.client_gpus=0 hides the GPU from simulated clients, but model.device="
                          f"{model.device} / model.quantization={model.quantization} needs it: set "
                          "federation.client_gpus (e.g. 0.5), or use the presets gpu=bf16 / gpu=qlora")
    if client_gpus == 0 and gpus > 0 and model.device == "auto":
        log.warning("a GPU is visible but federation.client_gpus=0: simulated clients train on the CPU "
                    "(set federation.client_gpus, e.g. 0.5, to train them on the GPU)")
    return client_gpus


def load_object(spec: str):
    """The object a ``module:attribute`` string names (Flower's own notation for apps).

    Raises:
        ConfigError: the module or attribute does not exist.
    """
    import importlib

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
    import psutil

    from fedllm.processes import tagged_processes

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
