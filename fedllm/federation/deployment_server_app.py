"""The ServerApp for Flower's own CLI: ``flwr run . <connection>`` on a SuperLink (the
Deployment Engine), or ``flwr run .`` on Flower's local simulation SuperLink.

The server composes the same Hydra config as ``fedllm simulate``: its overrides come in
through the run config (``--run-config 'overrides="privacy.target_epsilon=3"'``), so one
config system serves every engine. Node-side settings (data, caps, state) come only from
each SuperNode's own node config; nothing here can point a node at other data or raise its cap.
In Flower's simulation runtime the experiment's clients are the federation's virtual nodes
(:mod:`fedllm.federation.flower_runtime`), whose state goes to ``<run dir>/nodes`` as under
``fedllm simulate``.
"""

from __future__ import annotations

import shlex
import time
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedllm.config import ExperimentConfig, compose_experiment, with_state_dir
from fedllm.federation.flower_runtime import count_virtual_nodes, is_simulation_grid, simulation_overrides
from fedllm.federation.server_app import prepare_run, run_federation
from fedllm.federation.simulation import route_flower_logs
from fedllm.library_noise import quiet_libraries

app = ServerApp()
quiet_libraries()  # Flower's ServerApp process imports this module first


def compose_config(overrides: str) -> ExperimentConfig:
    """The experiment config for a space-separated string of Hydra overrides.

    Raises:
        ConfigError: an override is unknown or invalid.
    """
    return compose_experiment(shlex.split(overrides))


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run the federation the run config describes; outputs go to ``output-dir``."""
    started = time.perf_counter()  # the summary's wall time counts the preparation too
    route_flower_logs()
    overrides = shlex.split(str(context.run_config.get("overrides", "")))
    simulation = is_simulation_grid(grid)
    if simulation and (nodes := count_virtual_nodes(grid)):
        overrides = simulation_overrides(overrides, nodes)
    cfg = compose_experiment(overrides)
    output = str(context.run_config.get("output-dir", "")) or f"outputs/deployment/{time.strftime('%Y-%m-%d/%H-%M-%S')}"
    run_dir = Path(output).resolve()
    if simulation:
        cfg = with_state_dir(cfg, run_dir)
    prepare_run(cfg, run_dir)
    run_federation(grid, cfg, run_dir, started=started)
