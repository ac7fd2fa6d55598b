"""Run folders of a free-form (perplexity) sweep, written as fedllm writes them, manifest last:
for the report and the run-analysis notebook, without training three models."""

from __future__ import annotations

import json
from pathlib import Path

from fedllm.tracking.run_manifest import write_run_manifest

# (folder, privacy mode, spent epsilon, final perplexity, clients, rounds)
FREE_FORM_SWEEP = (
    ("eps1", "sample", 0.99, 68.8, 4, 2),
    ("eps8", "sample", 7.98, 62.0, 4, 2),
    ("nodp", "none", None, 50.3, 4, 2),
    ("eps8-longer", "sample", 7.99, 58.1, 4, 3),  # another shape: another line, never joined to the others
)


def write_free_form_run(path: Path, mode: str, spent: float | None, perplexity: float, clients: int, rounds: int):
    path.mkdir(parents=True)
    config = {
        "model": {"source": "tiny", "name_or_path": None},
        "data": {"name": "jsonl", "path": "chats.jsonl"},
        "train": {"lr": 0.01},
        "privacy": {"mode": mode},
        "federation": {"num_clients": clients, "num_rounds": rounds},
    }
    (path / "config.json").write_text(json.dumps(config))
    summary = {
        "status": "completed",
        "privacy_mode": mode,
        "target_epsilon": 8.0 if mode == "sample" else None,
        "final_max_epsilon": spent,
        "zero_shot_eval_loss": 4.344,
        "final_eval_loss": 4.0,
        "zero_shot_eval_perplexity": 77.0,
        "final_eval_perplexity": perplexity,
        "rounds_completed": rounds,
        "num_clients": clients,
    }
    (path / "summary.json").write_text(json.dumps(summary))
    sample = {"prompt": "user: What is 3 + 4?", "generated": "7.", "reference": "7.", "base": "The answer"}
    lines = [{"round": 0, "eval_loss": 4.344, "eval_perplexity": 77.0, "exact_match": 0.0}]
    for r in range(1, rounds + 1):
        epsilon = {str(c): spent * r / rounds for c in range(clients)} if spent is not None else None
        lines.append(
            {
                "round": r,
                "eval_loss": 4.0,
                "eval_perplexity": perplexity,
                "epsilon": epsilon,
                "max_epsilon": spent * r / rounds if spent is not None else None,
                "exact_match": 1 / 3,
                "samples": [sample],
            }
        )
    (path / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    ledger = {"accountant": "prv", "clients": {str(c): {"noise_multiplier": 0.9} for c in range(clients)}}
    (path / "privacy_ledger.json").write_text(json.dumps(ledger))
    write_run_manifest(path, None)


def write_free_form_sweep(root: Path) -> Path:
    for name, *spec in FREE_FORM_SWEEP:
        write_free_form_run(root / name, *spec)
    return root
