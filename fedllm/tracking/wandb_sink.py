"""Weights & Biases logging of the per-round metrics, per-client epsilon and resolved config.

Offline by default (``WANDB_MODE`` is respected when set), so a run with no network is
never blocked: the wandb run directory is written under the run directory and can be
synced later with ``wandb sync``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from fedllm.tracking.run_files import RoundRecord, RunSummary

WandbMode = Literal["online", "offline", "disabled", "shared"]
# wandb.init's modes by name; any other WANDB_MODE (e.g. the legacy "dryrun") is passed as None,
# and wandb reads (and judges) the variable itself
_INIT_MODES: dict[str, WandbMode] = {
    "online": "online",
    "offline": "offline",
    "disabled": "disabled",
    "shared": "shared",
}


class WandbSink:
    """One wandb run per fedllm run."""

    def __init__(self, *, project: str, run_dir: Path, config: dict[str, Any]):
        import wandb  # only when tracking.wandb=true: a heavy import most runs never need

        self._wandb = wandb
        self.run = wandb.init(
            project=project,
            dir=str(run_dir),
            config=config,
            name=run_dir.name,
            mode=_INIT_MODES.get(os.environ.get("WANDB_MODE", "offline")),
            settings=wandb.Settings(console="off", silent=True),
        )

    def log_round(self, record: RoundRecord) -> None:
        """Log one ``metrics.jsonl`` record at step = round."""
        flat = {k: v for k, v in record.to_dict().items() if k not in ("epsilon", "round") and v is not None}
        for client, value in (record.epsilon or {}).items():
            flat[f"epsilon/client_{client}"] = value
        self.run.log(flat, step=record.round)

    def finish(self, summary: RunSummary) -> None:
        """Attach the run summary (its numbers and words) and close the wandb run."""
        for key, value in summary.to_dict().items():
            if isinstance(value, (int, float, str)) and value is not None:
                self.run.summary[key] = value
        self.run.finish()
