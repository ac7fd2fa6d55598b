"""Privacy-utility table: held-out accuracy of zero-shot, non-private federated, DP federated at
several epsilons, FFA-LoRA under DP, and a centralised non-private LoRA reference.

    .venv/bin/python scripts/bench_utility.py [--model embedded|tiny] [--presets a,b,...]
        [--clients 10] [--rounds 3] [--steps 5] [--reuse] [--workdir DIR] [--out FILE]

Every setting is one real `fedllm simulate` run (the same command a user types) with the same
clients, rounds, local steps, batch size, learning rate, seed and held-out split; only what the
preset names changes. Zero-shot is the round-0 evaluation those runs share (LoRA's B starts at
zero, so the initial adapter is the base model). The centralised reference is one node holding
all the training data, non-private, taking as many steps per round as all federated clients
together (clients x steps), so it sees the same number of examples.
`--reuse` keeps a preset's finished run (its summary.json) instead of running it again.
Prints a Markdown table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fedllm.analysis.report import to_markdown  # noqa: E402


@dataclass(frozen=True)
class Preset:
    """One row of the table: a label and the overrides that differ from the shared settings."""

    label: str
    lora: str
    overrides: tuple[str, ...]
    centralised: bool = False


PRESETS = {
    "nonprivate": Preset("federated, non-private", "LoRA", ("privacy=none",)),
    "dp_eps8": Preset("federated, DP-SGD", "LoRA", ("privacy.target_epsilon=8",)),
    "dp_eps3": Preset("federated, DP-SGD", "LoRA", ("privacy.target_epsilon=3",)),
    "dp_eps1": Preset("federated, DP-SGD", "LoRA", ("privacy.target_epsilon=1",)),
    "ffa_dp_eps8": Preset("federated, DP-SGD", "FFA-LoRA", ("lora.freeze_a=true", "privacy.target_epsilon=8")),
    "ffa_dp_eps3": Preset("federated, DP-SGD", "FFA-LoRA", ("lora.freeze_a=true", "privacy.target_epsilon=3")),
    "ffa_dp_eps1": Preset("federated, DP-SGD", "FFA-LoRA", ("lora.freeze_a=true", "privacy.target_epsilon=1")),
    "centralised": Preset("centralised, non-private", "LoRA", ("privacy=none",), centralised=True),
}
DEFAULT_PRESETS = "nonprivate,dp_eps8,dp_eps3,dp_eps1,ffa_dp_eps8,centralised"
# The defaults of each model's usual run: the default model as `make run`, tiny as debug=smoke.
SHAPES = {"embedded": (10, 3, 5, ()), "tiny": (3, 2, 3, ("debug=smoke",))}
COLUMNS = ("setting", "lora", "target_epsilon", "spent_epsilon", "accuracy_by_round", "final_accuracy",
           "gain_over_zero_shot", "wall_seconds")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=sorted(SHAPES), default="embedded")
    parser.add_argument("--presets", default=DEFAULT_PRESETS, help=f"comma-separated, from {', '.join(PRESETS)}")
    parser.add_argument("--clients", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None, help="local DP-SGD steps per client per round")
    parser.add_argument("--extra", default="", help="space-separated overrides added to every run")
    parser.add_argument("--reuse", action="store_true", help="keep finished runs found in --workdir")
    parser.add_argument("--workdir", type=Path, default=Path("outputs/bench/utility"))
    parser.add_argument("--out", type=Path, default=Path("outputs/bench/utility.json"))
    args = parser.parse_args(argv)
    unknown = set(args.presets.split(",")) - set(PRESETS)
    if unknown:
        parser.error(f"unknown presets {sorted(unknown)}; choose from {', '.join(PRESETS)}")
    return args


def overrides_for(preset: Preset, model: str, clients: int, rounds: int, steps: int, extra: list[str]) -> list[str]:
    """The full override list of one preset's run."""
    base = [*SHAPES[model][3], f"federation.num_rounds={rounds}"]
    if preset.centralised:
        base += ["federation.num_clients=1", f"train.local_steps={clients * steps}"]
    else:
        base += [f"federation.num_clients={clients}", f"train.local_steps={steps}"]
    return [*base, *preset.overrides, *extra, "tracking.progress=false"]


def run_preset(name: str, overrides: list[str], workdir: Path, reuse: bool) -> Path:
    """Run `fedllm simulate` for one preset (unless reusing a finished run); its run directory."""
    run_dir = workdir / name
    if reuse and (run_dir / "summary.json").is_file():
        print(f"[{name}] reusing {run_dir}", flush=True)
        return run_dir
    args = [sys.executable, "-m", "fedllm.cli.main", "simulate", *overrides, f"hydra.run.dir={run_dir}"]
    print(f"[{name}] fedllm simulate {' '.join(overrides)}", flush=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with (workdir / f"{name}.log").open("w") as log:
        code = subprocess.run(args, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                              env={**os.environ, "PYTHONWARNINGS": "ignore"}).returncode
    if code != 0:
        raise SystemExit(f"[{name}] fedllm simulate failed with exit code {code}; see {workdir / (name + '.log')}")
    (run_dir / "bench_wall_seconds.txt").write_text(f"{time.perf_counter() - started:.1f}\n")
    return run_dir


def row_for(name: str, preset: Preset, run_dir: Path, overrides: list[str]) -> dict:
    """One table row from a finished run's summary and per-round metrics."""
    summary = json.loads((run_dir / "summary.json").read_text())
    rounds = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    accuracies = [r["eval_accuracy"] for r in rounds]
    wall = run_dir / "bench_wall_seconds.txt"
    return {
        "preset": name, "setting": preset.label, "lora": preset.lora,
        "target_epsilon": summary["target_epsilon"], "spent_epsilon": summary["final_max_epsilon"],
        "zero_shot_accuracy": accuracies[0], "accuracy_by_round": " / ".join(f"{a:.3f}" for a in accuracies[1:]),
        "final_accuracy": summary["final_accuracy"], "gain_over_zero_shot": summary["final_accuracy"] - accuracies[0],
        "wall_seconds": float(wall.read_text()) if wall.is_file() else None,
        "command": "fedllm simulate " + " ".join(overrides), "run_dir": str(run_dir),
    }


def zero_shot_row(rows: list[dict]) -> dict:
    """The shared round-0 evaluation; every run must agree on it (same base model, same split)."""
    values = {round(r["zero_shot_accuracy"], 6) for r in rows}
    if len(values) != 1:
        raise SystemExit(f"runs disagree on the zero-shot accuracy: {sorted(values)}")
    value = rows[0]["zero_shot_accuracy"]
    return {"preset": "zero_shot", "setting": "zero-shot (base model)", "lora": "-", "final_accuracy": value,
            "gain_over_zero_shot": 0.0, "command": "round 0 of every run below"}


def main() -> None:
    args = parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    clients, rounds, steps, _ = SHAPES[args.model]
    clients, rounds, steps = args.clients or clients, args.rounds or rounds, args.steps or steps
    extra = args.extra.split()
    args.workdir.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in args.presets.split(","):
        overrides = overrides_for(PRESETS[name], args.model, clients, rounds, steps, extra)
        run_dir = run_preset(name, overrides, args.workdir, args.reuse)
        rows.append(row_for(name, PRESETS[name], run_dir, overrides))
    rows.insert(0, zero_shot_row(rows))
    table = to_markdown(rows, COLUMNS)
    print("\n" + table)
    result = {"date": time.strftime("%Y-%m-%d"), "machine": f"{os.cpu_count()} cores", "model": args.model,
              "clients": clients, "rounds": rounds, "local_steps": steps, "extra_overrides": extra, "rows": rows,
              "markdown": table}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
