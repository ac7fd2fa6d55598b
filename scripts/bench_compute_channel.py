"""What closing the compute (response-time) channel of DP-SGD costs (issue 23, item 3): today's
length-trimmed steps against three data-independent alternatives, side by side in one process.

    .venv/bin/python scripts/bench_compute_channel.py [--rounds 4] [--buckets 24,48,96]
        [--threads N] [--out FILE] [OVERRIDE ...]        # Hydra overrides, e.g. model=tiny

Modes, each on the very same Poisson batches:
- ``trim`` (before): length-sorted chunks trimmed to their longest record
  (``training.local.split_by_length``); a step's time follows the records' lengths.
- ``max_length`` (fedllm's DP step now): every record padded to ``data.max_length``, micro-batches
  of ``ceil(batch / micro_batches)`` rows with zero-gradient dummy rows
  (``training.microbatches.fixed_shape_chunks``): a step's time follows its batch size only.
- ``buckets``: widths fixed from the plan (``--buckets``, the last one ``data.max_length``); each
  record goes to the narrowest bucket that holds it, each bucket in fixed-shape micro-batches. Its
  time still follows how many sampled records fall in each bucket: it narrows the channel (a
  length class, not a length) without closing it.
- ``deadline``: ``trim``'s compute, the reply held until a deadline fixed from the plan:
  ``local_steps x ceil(b_hi / rows) x`` the time of one full-width micro-batch (calibrated here on
  the ``max_length`` steps), ``b_hi`` the Poisson batch size exceeded with probability below 1e-6.
  A round that runs past it still leaks, and the deadline must be re-calibrated per machine.

Method: the default configuration (``conf/``: the embedded SmolLM2 model, ``data.max_length``,
batch 16, ``train.micro_batches``, ``train.precision``; the first client's shard of the default
data), one DP round per seed (``dpsgd.start_round`` with seeded research streams: every mode sees
the same batches). Each Poisson batch runs fedllm's DP step (``training.local._step``: clipping,
the node's noise, AdamW) once per computed mode, the order rotated from step to step so drift on
a shared machine hits all alike; one warm-up step per mode is not counted; empty batches are
skipped (all modes take the same empty step). Per step the statistic is the ratio to ``trim`` on
that batch (median [IQR] (min-max)); per round, the ratio of the rounds' sums (steps plus the
round's set-up, the same for all modes), median over rounds. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from scipy.stats import binom

from fedllm import task
from fedllm.config import ExperimentConfig, compose_experiment
from fedllm.data.formatting import make_collate
from fedllm.library_noise import quiet_libraries
from fedllm.privacy import dpsgd
from fedllm.privacy.randomness import dp_randomness
from fedllm.training import local
from fedllm.training.local import LocalSpec, split_by_length
from fedllm.training.microbatches import fixed_shape_chunks, rows_per_micro_batch
from fedllm.training.precision import use_bf16

COMPUTED = ("trim", "max_length", "buckets")
MODES = (*COMPUTED, "deadline")
NOISE_MULTIPLIER = 1.0
TAIL = 1e-6  # the deadline's Poisson batch size is exceeded with at most this probability


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of the default configuration")
    parser.add_argument("--rounds", type=int, default=4, help="DP rounds (seeds) of train.local_steps steps")
    parser.add_argument("--buckets", default=None, help="bucket widths (default: max_length / 4, / 2, max_length)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--out", type=Path, default=Path("outputs/bench/compute_channel.json"))
    return parser.parse_args(argv)


def bucket_chunks(batch: dict[str, torch.Tensor], rows: int, widths: list[int]) -> list[dict[str, torch.Tensor]]:
    """Each record in the narrowest bucket that holds it; each bucket in fixed-shape micro-batches."""
    lengths = batch["attention_mask"].sum(dim=1)
    chunks, lower = [], 0
    for width in widths:
        members = torch.nonzero((lengths > lower) & (lengths <= width)).flatten()
        lower = width
        if len(members) == 0:
            continue
        sub = {k: v[members][:, -width:] if v.dim() == 2 else v[members] for k, v in batch.items()}
        chunks.extend(fixed_shape_chunks(sub, rows, width))
    return chunks


def _chunker(mode: str, spec: LocalSpec, widths: list[int]):
    rows = rows_per_micro_batch(spec.batch_size, spec.micro_batches)
    assert spec.max_length is not None
    width = spec.max_length
    if mode == "trim":
        return lambda batch: split_by_length(batch, spec.micro_batches)
    if mode == "max_length":
        return lambda batch: fixed_shape_chunks(batch, rows, width)
    return lambda batch: bucket_chunks(batch, rows, widths)


def _spread(values: list[float]) -> dict:
    q = statistics.quantiles(values, n=4) if len(values) > 1 else [values[0]] * 3
    return {
        "median": statistics.median(values),
        "q1": q[0],
        "q3": q[2],
        "min": min(values),
        "max": max(values),
    }


def measure(cfg: ExperimentConfig, rounds: int, widths: list[int]) -> dict:
    """Every mode's step and round times on the same Poisson batches (see the module docstring)."""
    bundle = task.model_bundle(cfg.model, cfg.lora, cfg.seed)
    shard = task.tokenized_shard(cfg, 0)
    collate = make_collate(bundle.pad_id, prompt_only=cfg.train.objective == "choices")
    choice_ids = task.choice_ids_for(cfg)
    spec = LocalSpec(
        steps=cfg.train.local_steps,
        batch_size=cfg.train.batch_size,
        lr=cfg.train.lr,
        weight_decay=0.0,
        objective=cfg.train.objective,
        bf16=use_bf16(cfg.train.precision),
        micro_batches=cfg.train.micro_batches,
        max_length=cfg.data.max_length,
    )
    chunkers = {mode: _chunker(mode, spec, widths) for mode in COMPUTED}
    model = bundle.model
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    steps: list[dict] = []
    round_sums: list[dict[str, float]] = []
    for seed in range(rounds):
        started = time.perf_counter()
        session = dpsgd.start_round(
            model=model,
            optimizer=torch.optim.AdamW(params, lr=spec.lr),
            dataset=shard,
            batch_size=spec.batch_size,
            collate=collate,
            noise_multiplier=NOISE_MULTIPLIER,
            max_grad_norm=cfg.privacy.max_grad_norm,
            history=[],
            accountant="rdp",
            grad_sample_mode=cfg.privacy.grad_sample_mode,
            randomness=dp_randomness(seed),
        )
        setup = time.perf_counter() - started
        sums = dict.fromkeys(COMPUTED, setup)
        batches = local._batches(session.loader)
        try:
            for step in range(spec.steps + (seed == 0)):
                batch = next(batches)
                if len(batch["input_ids"]) == 0:
                    continue
                order = COMPUTED[step % 3 :] + COMPUTED[: step % 3]
                record = {"size": len(batch["input_ids"]), "longest": int(batch["attention_mask"].sum(1).max())}
                for mode in order:
                    chunks = chunkers[mode](batch)
                    wall, cpu = time.perf_counter(), time.process_time()
                    local._step(model, session.optimizer, chunks, spec, choice_ids, session)
                    record[mode] = time.perf_counter() - wall
                    record[f"{mode}_cpu"] = time.process_time() - cpu
                    record[f"{mode}_micro_batches"] = len(chunks)
                if seed == 0 and step == 0:
                    continue  # warm-up
                times = ", ".join(f"{mode} {record[mode]:.2f} s" for mode in COMPUTED)
                print(f"round {seed} step {step}: batch {record['size']}: {times}", file=sys.stderr, flush=True)
                steps.append(record)
                for mode in COMPUTED:
                    sums[mode] += record[mode]
        finally:
            session.close()
        round_sums.append(sums)
    return _summary(cfg, spec, len(shard), steps, round_sums, widths)


def _summary(cfg, spec: LocalSpec, n: int, steps: list[dict], round_sums: list[dict], widths: list[int]) -> dict:
    rows = rows_per_micro_batch(spec.batch_size, spec.micro_batches)
    per_micro_batch = statistics.median(s["max_length"] / s["max_length_micro_batches"] for s in steps)
    rate = 1 / math.ceil(n / spec.batch_size)
    b_hi = int(binom.isf(TAIL, n, rate)) + 1
    deadline = spec.steps * math.ceil(b_hi / rows) * per_micro_batch
    for sums in round_sums:
        sums["deadline"] = max(deadline, sums["trim"])
    result = {
        "records": n,
        "sample_rate": rate,
        "rows_per_micro_batch": rows,
        "width": spec.max_length,
        "bucket_widths": widths,
        "bf16": spec.bf16,
        "deadline_seconds": deadline,
        "deadline_batch_size": b_hi,
        "steps": steps,
        "round_seconds": round_sums,
        "modes": {},
    }
    for mode in MODES:
        entry: dict = {
            "round_seconds_median": statistics.median(r[mode] for r in round_sums),
            "round_ratio": _spread([r[mode] / r["trim"] for r in round_sums]),
        }
        if mode in COMPUTED:
            entry["step_seconds_median"] = statistics.median(s[mode] for s in steps)
            entry["step_ratio"] = _spread([s[mode] / s["trim"] for s in steps])
            entry["step_ratio_cpu"] = _spread([s[f"{mode}_cpu"] / s["trim_cpu"] for s in steps])
        result["modes"][mode] = entry
    return result


def _fmt(spread: dict | None) -> str:
    if spread is None:
        return "n/a"
    return f"{spread['median']:.3f} [{spread['q1']:.3f}, {spread['q3']:.3f}] ({spread['min']:.3f}-{spread['max']:.3f})"


def table(result: dict) -> str:
    lines = [
        "| mode | s/step | step / trim, wall: median [IQR] (min-max) | step / trim, CPU | s/round "
        "| round / trim: median [IQR] (min-max) | data-independent |",
        "|---|---|---|---|---|---|---|",
    ]
    closes = {"trim": "no", "max_length": "yes", "buckets": "no (length class)", "deadline": "unless overrun"}
    for mode, entry in result["modes"].items():
        step = f"{entry['step_seconds_median']:.3f}" if "step_seconds_median" in entry else "-"
        lines.append(
            f"| {mode} | {step} | {_fmt(entry.get('step_ratio'))} | {_fmt(entry.get('step_ratio_cpu'))} | "
            f"{entry['round_seconds_median']:.2f} | {_fmt(entry['round_ratio'])} | {closes[mode]} |"
        )
    return "\n".join(lines)


def main() -> None:
    quiet_libraries()
    args = parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    cfg = compose_experiment(args.overrides)
    width = cfg.data.max_length
    widths = [int(w) for w in args.buckets.split(",")] if args.buckets else [width // 4, width // 2, width]
    if widths[-1] != width:
        raise SystemExit(f"--buckets: the last width must be data.max_length={width}")
    started = time.time()
    result = measure(cfg, args.rounds, widths)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "date": time.strftime("%Y-%m-%d %H:%M"),
                "machine": f"{platform.processor() or platform.machine()}, "
                f"{os.cpu_count()} cores, torch {torch.__version__}, {args.threads} threads",
                "model": cfg.model.source,
                "batch_size": cfg.train.batch_size,
                "local_steps": cfg.train.local_steps,
                "micro_batches": cfg.train.micro_batches,
                "method": "same Poisson batches for every mode, interleaved in rotating order; ratios to trim",
                "command": " ".join(sys.argv),
                "seconds": round(time.time() - started),
                **result,
            },
            indent=2,
        )
    )
    print(table(result))
    print(
        f"\n{result['records']} records, rate {result['sample_rate']:.4f}, {result['rows_per_micro_batch']} rows "
        f"x {result['width']} tokens per micro-batch, bf16 {result['bf16']}; deadline "
        f"{result['deadline_seconds']:.2f} s per round (batch {result['deadline_batch_size']})"
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
