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

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        cfg = from_hydra(dict_cfg)
        simulate(cfg, run_dir)
    except FedLLMError as exc:
        log.error("%s", exc)
        raise SystemExit(1) from exc


def simulate(cfg, run_dir: Path) -> dict:
    """Plan, then run the federation described by ``cfg``; outputs go to ``run_dir``.

    Returns:
        The run summary.
    """
    from fedllm import task
    from fedllm.federation.simulation import run_simulation
    from fedllm.privacy.planner import format_plans, plan_federation
    from fedllm.tracking.run_log import write_json

    started = time.perf_counter()
    if cfg.model.kind != "pretrained":
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the default run never touches a hub
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json(run_dir / "config.json", cfg.to_dict())
    # build caches (dequantised model, tokenizer) once here, before actors race for them
    task.model_bundle(cfg.model, cfg.lora, cfg.seed)
    shard_sizes = [len(s) for s in task.split_for(cfg).shards]
    if cfg.privacy.enabled:
        plans = plan_federation(shard_sizes=shard_sizes, batch_size=cfg.train.batch_size,
                                rounds=cfg.federation.num_rounds, local_steps=cfg.train.local_steps,
                                target_epsilon=cfg.privacy.target_epsilon, delta=cfg.privacy.delta,
                                accountant=cfg.privacy.accountant,
                                noise_multiplier=cfg.privacy.noise_multiplier)
        log.info("privacy plan (every client in every round):\n%s", format_plans(plans))
    run_simulation(cfg, run_dir)
    summary = json.loads((run_dir / "summary.json").read_text())
    summary["wall_seconds"] = round(time.perf_counter() - started, 1)
    write_json(run_dir / "summary.json", summary)
    log.info("run finished in %.0f s; outputs in %s", summary["wall_seconds"], run_dir)
    if summary["rounds_completed"] and len(summary["rounds_without_updates"]) == summary["rounds_completed"]:
        raise FedLLMError("no round produced a client update: every client failed (see the log above)")
    return summary
