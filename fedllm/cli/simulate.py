"""``fedllm simulate``: compose the Hydra config, plan privacy, run the federation.

Hydra stops here: everything below receives a validated :class:`ExperimentConfig`.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path

from fedllm.errors import FedLLMError
from fedllm.federation.simulation import set_quiet_env

log = logging.getLogger("fedllm")


def conf_dir() -> Path:
    """The Hydra config folder: ``$FEDLLM_CONF`` or ``conf/`` at the repository root."""
    path = Path(os.environ.get("FEDLLM_CONF", Path(__file__).resolve().parents[2] / "conf"))
    if not (path / "config.yaml").is_file():
        raise FedLLMError(f"no Hydra config at {path}; install fedllm editable (`make install`) or set FEDLLM_CONF")
    return path


def simulate_cli(argv: list[str]) -> int:
    """Run ``fedllm simulate`` with Hydra overrides (``-m`` for sweeps)."""
    import hydra

    set_quiet_env()
    try:
        config_path = str(conf_dir())
    except FedLLMError as exc:
        print(f"fedllm: {exc}", file=sys.stderr)
        return 2
    sys.argv = ["fedllm-simulate", *argv]
    hydra.main(version_base="1.3", config_path=config_path, config_name="config")(_hydra_entry)()
    return 0


def _hydra_entry(dict_cfg) -> None:
    from hydra.core.hydra_config import HydraConfig

    from fedllm.config import from_hydra

    try:
        if dict_cfg.get("resume"):
            overrides = [o for o in HydraConfig.get().overrides.task if not o.startswith("resume=")]
            cfg, run_dir = resume_target(Path(str(dict_cfg.resume)), overrides)
            simulate(cfg, run_dir, resume=True)
        else:
            cfg = with_state_dir(from_hydra(dict_cfg), Path(HydraConfig.get().runtime.output_dir))
            simulate(cfg, Path(HydraConfig.get().runtime.output_dir))
    except FedLLMError as exc:
        log.error("%s", exc)
        raise SystemExit(1) from exc


def with_state_dir(cfg, run_dir: Path):
    """``cfg`` with the node state folder resolved: ``privacy.state_dir`` or ``<run dir>/nodes``."""
    import dataclasses

    state_dir = Path(cfg.privacy.state_dir) if cfg.privacy.state_dir else run_dir / "nodes"
    return dataclasses.replace(cfg, privacy=dataclasses.replace(cfg.privacy, state_dir=str(state_dir.resolve())))


def resume_target(run_dir: Path, overrides: list[str]):
    """The saved config and folder of an interrupted run.

    Raises:
        FedLLMError: other overrides were given, or the folder holds no resumable run.
    """
    from fedllm.config import ExperimentConfig

    if overrides:
        raise FedLLMError(f"resume continues a run with its saved config; drop the other overrides: {overrides}")
    config_file = run_dir / "config.json"
    if not (config_file.is_file() and (run_dir / "checkpoint" / "state.json").is_file()):
        raise FedLLMError(f"{run_dir} is not a resumable run: it needs config.json and checkpoint/state.json")
    return ExperimentConfig.from_json(config_file.read_text(encoding="utf-8")), run_dir.resolve()


def simulate(cfg, run_dir: Path, resume: bool = False) -> dict:
    """Plan, then run (or continue) the federation described by ``cfg``; outputs go to ``run_dir``.

    Returns:
        The run summary.
    """
    from fedllm.federation.server_app import prepare_run
    from fedllm.federation.simulation import run_simulation
    from fedllm.storage import write_json

    started = time.perf_counter()
    if cfg.model.kind != "pretrained":
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the default run never touches a hub
    if resume:
        from fedllm import task

        task.model_bundle(cfg.model, cfg.lora, cfg.seed)  # build caches once, before actors race for them
    else:
        prepare_run(cfg, run_dir)
    run_simulation(cfg, run_dir, resume=resume)
    summary = json.loads((run_dir / "summary.json").read_text())
    summary["wall_seconds"] = round(time.perf_counter() - started, 1)
    write_json(run_dir / "summary.json", summary)
    log.info("run finished in %.0f s; outputs in %s", summary["wall_seconds"], run_dir)
    if summary["stop_reason"]:
        log.warning("the run ended after round %d of %d: %s", summary["rounds_completed"],
                    summary["rounds_planned"], summary["stop_reason"])
    elif summary["rounds_completed"] and len(summary["rounds_without_updates"]) == summary["rounds_completed"]:
        raise FedLLMError("no round produced a client update: every client failed (see the log above)")
    return summary
