"""DP-SGD overhead of one local training step: non-DP vs DP-SGD (each Opacus grad-sample mode),
on the default model (SmolLM2-135M + LoRA) and on model=tiny, at several batch sizes and
sequence lengths. Timings are interleaved in one process (every configuration once per
repeat, in shuffled order) so drift hits all alike; peak memory is measured per configuration
in a fresh process (the process's peak RSS above its level after loading the model).

    .venv/bin/python scripts/bench_dp_step.py [--models embedded,tiny] [--batches 8,16]
        [--seqs 64,128] [--modes none,hooks,ew,functorch] [--repeats 3] [--steps 3] [--out FILE]
        [--device cuda --dtype bf16 | --quantization 4bit]     # on a GPU (peak = CUDA memory)

Prints a table (seconds per step, peak MB, and the DP / non-DP ratio of each) and writes JSON.
The step is fedllm's real training path (`train_local`: Poisson sampling, per-sample
clipping, noise, length-sorted micro-batches) on random token sequences of exactly the given
length, with the fixed-answer objective.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from fedllm.config import LoraSettings, ModelConfig
from fedllm.data.formatting import IGNORE_INDEX, TokenizedDataset, make_collate
from fedllm.task import model_bundle
from fedllm.training.local import DPSpec, LocalSpec, train_local

CHOICE_IDS = [17, 42]
RECORDS = 512


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="embedded,tiny")
    parser.add_argument("--batches", default="8,16")
    parser.add_argument("--seqs", default="64,128")
    parser.add_argument("--modes", default="none,hooks,ew,functorch")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps per timing")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--out", type=Path, default=Path("outputs/bench/dp_step.json"))
    parser.add_argument("--device", default="cpu", help="model.device: cpu, cuda, cuda:N, auto")
    parser.add_argument("--dtype", default="fp32", help="model.dtype of the frozen base (bf16 also autocasts)")
    parser.add_argument("--quantization", default="none", help="model.quantization: none, 4bit, 8bit")
    parser.add_argument("--probe", default=None, help=argparse.SUPPRESS)  # model,batch,seq,mode: memory only
    return parser.parse_args(argv)


def dataset(vocab: int, seq: int) -> TokenizedDataset:
    """Random prompts of exactly ``seq`` tokens with a random fixed answer each."""
    gen = torch.Generator().manual_seed(seq)
    items = []
    for _ in range(RECORDS):
        ids = torch.randint(100, vocab, (seq,), generator=gen)
        items.append((ids, torch.full((seq,), IGNORE_INDEX), torch.randint(0, 2, (), generator=gen)))
    return TokenizedDataset(items, truncated=0)


# where and how the base model runs (--device, --dtype, --quantization), the same for every configuration
PLACEMENT: dict[str, str] = {"device": "cpu", "dtype": "fp32", "quantization": "none"}


def model_config(model_name: str) -> ModelConfig:
    """The benchmarked model with this run's placement."""
    return ModelConfig(source=model_name, **PLACEMENT)


def step_seconds(model_name: str, batch: int, seq: int, mode: str, steps: int, seed: int) -> float:
    """Seconds per optimizer step of ``steps`` steps (after the caches are warm)."""
    bundle = model_bundle(model_config(model_name), LoraSettings(), 0)
    data = dataset(len(bundle.tokenizer), seq)
    bf16 = PLACEMENT["dtype"] == "bf16" or PLACEMENT["quantization"] != "none"
    # the seeded research mode: every configuration of one repeat draws the same Poisson batches
    spec = LocalSpec(steps=steps, batch_size=batch, lr=1e-3, weight_decay=0.0, objective="choices", bf16=bf16,
                     seed=seed, micro_batches=2)
    dp = None if mode == "none" else DPSpec(noise_multiplier=1.0, max_grad_norm=1.0, accountant="rdp",
                                            grad_sample_mode=mode)
    result = train_local(bundle.model, data, make_collate(bundle.pad_id, prompt_only=True), spec, CHOICE_IDS, dp, [])
    return result.seconds / steps


def peak_mb() -> float:
    """Peak memory so far, in MB: CUDA memory allocated on a GPU, else the process's peak RSS."""
    if PLACEMENT["device"] != "cpu" and torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def probe(spec: str, steps: int) -> dict:
    """Memory of one configuration, in this (fresh) process."""
    model_name, batch, seq, mode = spec.split(",")
    model_bundle(model_config(model_name), LoraSettings(), 0)
    base = peak_mb()
    step_seconds(model_name, int(batch), int(seq), mode, steps, seed=0)
    return {"peak_mb": peak_mb() - base}


def measure_memory(config: tuple, steps: int) -> float | None:
    placement = [f"--{key}={value}" for key, value in PLACEMENT.items()]
    result = subprocess.run([sys.executable, __file__, "--probe", ",".join(map(str, config)), "--steps", str(steps),
                             *placement], capture_output=True, text=True, timeout=900)
    if result.returncode != 0:
        return None
    return json.loads(result.stdout.strip().splitlines()[-1])["peak_mb"]


def run(args: argparse.Namespace) -> list[dict]:
    torch.set_num_threads(args.threads)
    configs = [(m, int(b), int(s), mode) for m in args.models.split(",") for b in args.batches.split(",")
               for s in args.seqs.split(",") for mode in args.modes.split(",")]
    times: dict[tuple, list[float]] = {c: [] for c in configs}
    errors: dict[tuple, str] = {}
    for model_name in args.models.split(","):
        step_seconds(model_name, 8, 64, "none", 1, seed=0)  # warm-up: load model, build caches
    for repeat in range(args.repeats):
        order = [c for c in configs if c not in errors]
        random.Random(repeat).shuffle(order)
        for config in order:
            try:
                times[config].append(step_seconds(*config, steps=args.steps, seed=repeat))
            except Exception as exc:  # a grad-sample mode that cannot handle this model: report it
                errors[config] = f"{type(exc).__name__}: {str(exc)[:120]}"
    rows = []
    for config in configs:
        model_name, batch, seq, mode = config
        rows.append({"model": model_name, "batch": batch, "seq": seq, "mode": mode,
                     "step_seconds": statistics.median(times[config]) if times[config] else None,
                     "peak_mb": None if config in errors else measure_memory(config, args.steps),
                     "error": errors.get(config)})
    baseline = {(r["model"], r["batch"], r["seq"]): r for r in rows if r["mode"] == "none"}
    for row in rows:
        base = baseline.get((row["model"], row["batch"], row["seq"]))
        for key in ("step_seconds", "peak_mb"):
            ok = base and row[key] is not None and base[key]
            row[f"{key}_ratio"] = round(row[key] / base[key], 3) if ok else None
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| model | batch | seq | mode | s/step | x non-DP | peak MB | x non-DP |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["error"]:
            lines.append(f"| {r['model']} | {r['batch']} | {r['seq']} | {r['mode']} | n/a: {r['error']} |  |  |  |")
            continue
        peak = f"{r['peak_mb']:.0f}" if r["peak_mb"] is not None else "n/a"
        lines.append(f"| {r['model']} | {r['batch']} | {r['seq']} | {r['mode']} | {r['step_seconds']:.3f} | "
                     f"{r['step_seconds_ratio']} | {peak} | {r['peak_mb_ratio']} |")
    return "\n".join(lines)


def main() -> None:
    args = parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    PLACEMENT.update(device=args.device, dtype=args.dtype, quantization=args.quantization)
    if args.probe:
        print(json.dumps(probe(args.probe, args.steps)))
        return
    started = time.time()
    rows = run(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "date": time.strftime("%Y-%m-%d"), "machine": f"{platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores, torch {torch.__version__}, {args.threads} threads",
        "placement": PLACEMENT, "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "repeats": args.repeats, "steps_per_timing": args.steps, "seconds": round(time.time() - started),
        "rows": rows}, indent=2))
    print(table(rows))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
