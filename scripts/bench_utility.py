"""Privacy-utility table: held-out accuracy of zero-shot, non-private federated, DP federated at
several epsilons, FFA-LoRA under DP, and a centralised non-private LoRA reference.

    .venv/bin/python scripts/bench_utility.py [--task sentiment|reviews] [--model embedded|tiny]
        [--presets a,b,...] [--clients 10] [--rounds 3] [--steps 5] [--samples 4] [--reuse]
        [--workdir DIR] [--out FILE]

`--task sentiment` (default) is the 2-way classification task (data=rotten_tomatoes, accuracy).
`--task reviews` is the generative task on the same corpus (data=rt_reviews: write a positive or
negative review of a movie; token loss): each row reports held-out answer-token perplexity with
its standard error over records, re-measured on the run's final adapter (and checked against the
run's own last evaluation), and greedy generations for a few fixed held-out instructions.

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
from fedllm.library_noise import quiet_libraries  # noqa: E402


@dataclass(frozen=True)
class Preset:
    """One row of the table: a label and the overrides that differ from the shared settings."""

    label: str
    lora: str
    overrides: tuple[str, ...]
    centralised: bool = False


PRESETS = {
    "nonprivate": Preset("federated, non-private", "LoRA", ("privacy=none",)),
    # learning-rate trials for the non-private row (the shared lr is train.lr, or --extra train.lr=...)
    "nonprivate_lr3e-4": Preset("federated, non-private, lr 3e-4", "LoRA", ("privacy=none", "train.lr=0.0003")),
    "nonprivate_lr1e-3": Preset("federated, non-private, lr 1e-3", "LoRA", ("privacy=none", "train.lr=0.001")),
    "nonprivate_lr3e-3": Preset("federated, non-private, lr 3e-3", "LoRA", ("privacy=none", "train.lr=0.003")),
    "nonprivate_lr3e-2": Preset("federated, non-private, lr 3e-2", "LoRA", ("privacy=none", "train.lr=0.03")),
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
COLUMNS = (
    "setting",
    "lora",
    "target_epsilon",
    "spent_epsilon",
    "accuracy_by_round",
    "final_accuracy",
    "gain_over_zero_shot",
    "wall_seconds",
)
REVIEW_COLUMNS = (
    "setting",
    "lora",
    "lr",
    "target_epsilon",
    "spent_epsilon",
    "perplexity_by_round",
    "final_perplexity",
    "perplexity_se",
    "final_loss",
    "loss_se",
    "wall_seconds",
)


@dataclass(frozen=True)
class Task:
    """What every run of a table adds to its overrides, and the table's default rows."""

    overrides: tuple[str, ...]
    presets: str
    generative: bool


TASKS = {
    "sentiment": Task((), DEFAULT_PRESETS, generative=False),
    # data=rt_reviews selects train=token itself (conf/data/rt_reviews.yaml)
    "reviews": Task(
        ("data=rt_reviews",), "nonprivate,dp_eps8,dp_eps3,dp_eps1,ffa_dp_eps8,ffa_dp_eps3,ffa_dp_eps1", generative=True
    ),
}
# the server's and the bench's evaluation of the same adapter must agree (same code, same split);
# bf16 autocast in another process may reorder sums: far below the standard errors reported
LOSS_AGREEMENT = 1e-3


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", choices=sorted(TASKS), default="sentiment")
    parser.add_argument("--model", choices=sorted(SHAPES), default="embedded")
    parser.add_argument(
        "--presets", default=None, help=f"comma-separated, from {', '.join(PRESETS)} (default: the task's table)"
    )
    parser.add_argument("--clients", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None, help="local DP-SGD steps per client per round")
    parser.add_argument("--extra", default="", help="space-separated overrides added to every run")
    parser.add_argument("--samples", type=int, default=4, help="--task reviews: greedy generations per row")
    parser.add_argument("--reuse", action="store_true", help="keep finished runs found in --workdir")
    parser.add_argument("--workdir", type=Path, default=Path("outputs/bench/utility"))
    parser.add_argument("--out", type=Path, default=Path("outputs/bench/utility.json"))
    args = parser.parse_args(argv)
    args.presets = args.presets or TASKS[args.task].presets
    unknown = set(args.presets.split(",")) - set(PRESETS)
    if unknown:
        parser.error(f"unknown presets {sorted(unknown)}; choose from {', '.join(PRESETS)}")
    return args


def overrides_for(
    preset: Preset, model: str, clients: int, rounds: int, steps: int, extra: list[str], task: tuple[str, ...] = ()
) -> list[str]:
    """The full override list of one preset's run (``task``: the task's own overrides)."""
    base = [*SHAPES[model][3], *task, f"federation.num_rounds={rounds}"]
    if preset.centralised:
        base += ["federation.num_clients=1", "federation.min_updates=1", f"train.local_steps={clients * steps}"]
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
        code = subprocess.run(
            args, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONWARNINGS": "ignore"}
        ).returncode
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
        "preset": name,
        "setting": preset.label,
        "lora": preset.lora,
        "target_epsilon": summary["target_epsilon"],
        "spent_epsilon": summary["final_max_epsilon"],
        "zero_shot_accuracy": accuracies[0],
        "accuracy_by_round": " / ".join(f"{a:.3f}" for a in accuracies[1:]),
        "final_accuracy": summary["final_accuracy"],
        "gain_over_zero_shot": summary["final_accuracy"] - accuracies[0],
        "wall_seconds": float(wall.read_text()) if wall.is_file() else None,
        "command": "fedllm simulate " + " ".join(overrides),
        "run_dir": str(run_dir),
    }


def zero_shot_row(rows: list[dict]) -> dict:
    """The shared round-0 evaluation; every run must agree on it (same base model, same split)."""
    values = {round(r["zero_shot_accuracy"], 6) for r in rows}
    if len(values) != 1:
        raise SystemExit(f"runs disagree on the zero-shot accuracy: {sorted(values)}")
    value = rows[0]["zero_shot_accuracy"]
    return {
        "preset": "zero_shot",
        "setting": "zero-shot (base model)",
        "lora": "-",
        "final_accuracy": value,
        "gain_over_zero_shot": 0.0,
        "command": "round 0 of every run below",
    }


def adapter_figures(cfg, bundle, samples: int) -> dict:
    """Held-out perplexity with its standard error, and greedy generations, of ``bundle``'s live adapter."""
    from fedllm import task
    from fedllm.evaluation.generation import generate_samples, sample_records
    from fedllm.evaluation.metrics import evaluate
    from fedllm.training.precision import use_bf16

    bf16 = use_bf16(cfg.train.precision)
    result = evaluate(bundle.model, task.tokenized_test(cfg), bundle.pad_id, [], cfg.train.eval_batch_size, bf16)
    held_out = task.data_split(cfg.data, 1, 1, cfg.seed).test  # the split the server evaluated on
    generations = generate_samples(
        bundle.model, bundle.tokenizer, sample_records(held_out, samples), task.prompt_format(cfg.data), bf16=bf16
    )
    return {
        "loss": result.loss,
        "loss_se": result.loss_stderr,
        "perplexity": result.perplexity,
        "perplexity_se": result.perplexity_stderr,
        "tokens": result.tokens,
        "examples": result.examples,
        "samples": [g.to_dict() for g in generations],
    }


def final_adapter_figures(run_dir: Path, samples: int, reuse: bool) -> dict:
    """:func:`adapter_figures` of a finished run's final adapter (cached in the run folder for --reuse)."""
    cache = run_dir / "bench_generative.json"
    if reuse and cache.is_file():
        return json.loads(cache.read_text())
    from fedllm.finished_run import load_finished_run

    run = load_finished_run(run_dir, None)
    figures = adapter_figures(run.config, run.bundle, samples)
    cache.write_text(json.dumps(figures, indent=2))
    return figures


def zero_shot_figures(run_dir: Path, samples: int) -> dict:
    """:func:`adapter_figures` of the initial adapter (LoRA's B is zero: the base model) of ``run_dir``'s run."""
    from fedllm import task
    from fedllm.config import ExperimentConfig
    from fedllm.model.adapters import load_adapter_state

    cfg = ExperimentConfig.from_json((run_dir / "config.json").read_text())
    bundle = task.model_bundle(cfg.model, cfg.lora, cfg.seed)
    load_adapter_state(bundle.model, bundle.initial_adapter)
    return adapter_figures(cfg, bundle, samples)


def review_row(name: str, preset: Preset, run_dir: Path, overrides: list[str], figures: dict) -> dict:
    """One row of the generative table: the run's per-round perplexity and its final adapter's figures."""
    summary = json.loads((run_dir / "summary.json").read_text())
    rounds = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    config = json.loads((run_dir / "config.json").read_text())
    if abs(figures["loss"] - summary["final_eval_loss"]) > LOSS_AGREEMENT:
        raise SystemExit(
            f"[{name}] the final adapter scores {figures['loss']:.5f} here but the run's last "
            f"evaluation says {summary['final_eval_loss']:.5f}: is {run_dir} another run's adapter?"
        )
    wall = run_dir / "bench_wall_seconds.txt"
    return {
        "preset": name,
        "setting": preset.label,
        "lora": preset.lora,
        "lr": config["train"]["lr"],
        "target_epsilon": summary["target_epsilon"],
        "spent_epsilon": summary["final_max_epsilon"],
        "zero_shot_perplexity": rounds[0]["eval_perplexity"],
        "perplexity_by_round": " / ".join(f"{r['eval_perplexity']:.2f}" for r in rounds[1:]),
        "final_perplexity": figures["perplexity"],
        "perplexity_se": figures["perplexity_se"],
        "final_loss": figures["loss"],
        "loss_se": figures["loss_se"],
        "tokens": figures["tokens"],
        "examples": figures["examples"],
        "samples": figures["samples"],
        "wall_seconds": float(wall.read_text()) if wall.is_file() else None,
        "command": "fedllm simulate " + " ".join(overrides),
        "run_dir": str(run_dir),
    }


def zero_shot_review_row(rows: list[dict], figures: dict) -> dict:
    """The shared round-0 evaluation of the generative table; every run and the bench must agree on it."""
    values = {round(r["zero_shot_perplexity"], 4) for r in rows}
    if len(values) != 1:
        raise SystemExit(f"runs disagree on the zero-shot perplexity: {sorted(values)}")
    if abs(figures["perplexity"] - rows[0]["zero_shot_perplexity"]) > LOSS_AGREEMENT * figures["perplexity"]:
        raise SystemExit(
            f"the base model scores perplexity {figures['perplexity']:.4f} here but the runs' round 0 "
            f"says {rows[0]['zero_shot_perplexity']:.4f}"
        )
    return {
        "preset": "zero_shot",
        "setting": "zero-shot (base model)",
        "lora": "-",
        "final_perplexity": figures["perplexity"],
        "perplexity_se": figures["perplexity_se"],
        "final_loss": figures["loss"],
        "loss_se": figures["loss_se"],
        "tokens": figures["tokens"],
        "examples": figures["examples"],
        "samples": figures["samples"],
        "command": "round 0 of every run below",
    }


def samples_markdown(rows: list[dict]) -> str:
    """Each row's greedy generations, as Markdown (the instruction, then what the adapter wrote)."""
    parts = ["Greedy generations for fixed held-out instructions:\n"]
    for row in rows:
        spent = row.get("spent_epsilon")  # None without sample-level DP (and for zero-shot)
        epsilon = f", spent epsilon {spent:.2f}" if spent is not None else ""
        parts.append(f"**{row['setting']} ({row['lora']}{epsilon})**\n")
        parts += [f"- {s['prompt']} -> {' '.join(s['generated'].split()) or '(nothing)'}" for s in row["samples"]]
        parts.append("")
    return "\n".join(parts)


def run_rows(args: argparse.Namespace, clients: int, rounds: int, steps: int, extra: list[str]) -> list[dict]:
    """Run (or reuse) every preset of the table; one row each, the zero-shot row first."""
    spec = TASKS[args.task]
    rows, run_dirs = [], []
    for name in args.presets.split(","):
        overrides = overrides_for(PRESETS[name], args.model, clients, rounds, steps, extra, spec.overrides)
        run_dir = run_preset(name, overrides, args.workdir, args.reuse)
        run_dirs.append(run_dir)
        if spec.generative:
            figures = final_adapter_figures(run_dir, args.samples, args.reuse)
            rows.append(review_row(name, PRESETS[name], run_dir, overrides, figures))
        else:
            rows.append(row_for(name, PRESETS[name], run_dir, overrides))
    if spec.generative:
        rows.insert(0, zero_shot_review_row(rows, zero_shot_figures(run_dirs[0], args.samples)))
    else:
        rows.insert(0, zero_shot_row(rows))
    return rows


def main() -> None:
    quiet_libraries()  # the libraries' expected notices, as in `fedllm` itself
    args = parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    clients, rounds, steps, _ = SHAPES[args.model]
    clients, rounds, steps = args.clients or clients, args.rounds or rounds, args.steps or steps
    extra = args.extra.split()
    args.workdir.mkdir(parents=True, exist_ok=True)
    rows = run_rows(args, clients, rounds, steps, extra)
    generative = TASKS[args.task].generative
    table = to_markdown(rows, REVIEW_COLUMNS if generative else COLUMNS)
    if generative:
        table += "\n" + samples_markdown(rows)
    print("\n" + table)
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{os.cpu_count()} cores",
        "task": args.task,
        "model": args.model,
        "clients": clients,
        "rounds": rounds,
        "local_steps": steps,
        "extra_overrides": extra,
        "rows": rows,
        "markdown": table,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
