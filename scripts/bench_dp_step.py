"""DP-SGD overhead of one local training step, measured fairly: the non-private step replays
exactly the Poisson batches the DP step drew (same records, hence same sizes and lengths),
interleaved step by step, on the default model (SmolLM2-135M + LoRA) and on model=tiny.

    .venv/bin/python scripts/bench_dp_step.py [--models embedded,tiny] [--batches 8,16]
        [--seqs 64,128] [--modes none,lora,hooks,functorch] [--repeats 3] [--steps 4]
        [--micro-batches 2] [--no-memory] [--out FILE]
        [--device cuda --dtype bf16 | --quantization 4bit]     # on a GPU (peak = CUDA memory)

Method (issue 17):
- Time. For each seed (``--repeats`` seeds) one DP round is opened with fedllm's own
  ``dpsgd.start_round`` (seeded research streams, so every mode draws the same batches; the
  seeded and the OS-entropy noise run the same Philox code). Each step draws one Poisson
  batch; fedllm's real step (``training.local._step``: per-sample clipping, the node's noise,
  AdamW, on fixed-shape micro-batches of ``ceil(batch / micro_batches)`` rows at the records'
  width, dummy rows filling the last, as DP training cuts them) runs on it under DP and, on
  the very same collated batch cut into length-sorted chunks as non-private training does,
  without DP (Opacus's hooks removed for that step, a separate AdamW), in
  alternating order (DP first on even steps, non-DP first on odd ones) so drift and cache
  effects hit both alike. The statistic is the per-step ratio DP / non-DP: its median, its
  interquartile range and its min-max over every (seed, step) pair; empty batches are skipped.
  One warm-up pair per configuration is not counted. Opening the round (``make_private``,
  hooks) is timed separately: once per round, not per step.
- Breakdown. Timers around the phases of both steps (forward; backward, and inside it
  Opacus's per-sample-gradient hooks; clipping; the noise draw from the node's stream and its
  addition; scaling and accounting; the optimizer update; zero_grad). Each timer is two
  ``perf_counter`` calls (~1 us per step in all, in both modes).
- Memory. Fresh processes per (configuration, mode) replay seed 0's batches (identical for
  DP and non-DP); the figure is the median over ``--memory-repeats`` processes of the peak
  resident set (VmHWM) above its level after loading the model (one process's peak varies by
  ~30 MB from run to run, non-DP too). Why RSS: on CPU torch allocates through malloc, which
  tracemalloc does not see, and the RSS peak is what the machine must hold; a fresh process
  keeps one configuration's freed-but-cached memory out of the next. On a GPU the peak is CUDA memory allocated.

Prints two tables (time and memory; the breakdown of the DP extra) and writes JSON.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings
from collections import defaultdict
from pathlib import Path

import torch

from fedllm.config import LoraSettings, ModelConfig
from fedllm.data.formatting import IGNORE_INDEX, TokenizedDataset, make_collate
from fedllm.library_noise import quiet_libraries
from fedllm.privacy import dpsgd, lora_grad_sample, randomness
from fedllm.privacy.lora_grad_sample import LoraGradSampler
from fedllm.privacy.randomness import dp_randomness
from fedllm.task import model_bundle
from fedllm.training import local
from fedllm.training.local import LocalSpec

CHOICE_IDS = [17, 42]
RECORDS = 512
NOISE_MULTIPLIER, CLIP = 1.0, 1.0


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="embedded,tiny")
    parser.add_argument("--batches", default="8,16")
    parser.add_argument("--seqs", default="64,128")
    parser.add_argument(
        "--modes",
        default="none,lora,hooks",
        help="grad-sample modes (lora, hooks, functorch); none (the non-private replay) is always measured",
    )
    parser.add_argument("--repeats", type=int, default=3, help="seeds (independent rounds) per configuration")
    parser.add_argument("--steps", type=int, default=4, help="DP / non-DP step pairs per seed")
    parser.add_argument("--micro-batches", type=int, default=2, help="train.micro_batches")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--no-memory", action="store_true", help="skip the per-configuration memory processes")
    parser.add_argument(
        "--memory-repeats",
        type=int,
        default=3,
        help="fresh processes per (configuration, mode); the median peak is reported (one varies by ~30 MB)",
    )
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


def local_spec(batch: int, micro_batches: int, seq: int) -> LocalSpec:
    bf16 = PLACEMENT["dtype"] == "bf16" or PLACEMENT["quantization"] != "none"
    return LocalSpec(
        steps=1,
        batch_size=batch,
        lr=1e-3,
        weight_decay=0.0,
        objective="choices",
        bf16=bf16,
        micro_batches=micro_batches,
        max_length=seq,
    )


# ---- phase timers ----------------------------------------------------------------------------


class Timers:
    """Seconds per named phase, accumulated while ``active`` names the step's mode."""

    def __init__(self):
        self.active: str | None = None
        self.seconds: dict[str, float] = defaultdict(float)

    def wrap(self, name: str, fn):
        @functools.wraps(fn)
        def timed(*args, **kwargs):
            if self.active is None:
                return fn(*args, **kwargs)
            started = time.process_time()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[name] += time.process_time() - started

        return timed

    def take(self) -> dict[str, float]:
        taken, self.seconds = dict(self.seconds), defaultdict(float)
        return taken


TIMERS = Timers()
_PATCHED = False


def install_timers() -> None:
    """Time the phases of fedllm's step and of Opacus's machinery (class-level, once)."""
    global _PATCHED
    if _PATCHED:
        return
    _PATCHED = True
    from opacus.grad_sample.grad_sample_module import GradSampleHooks

    local.per_example_loss = TIMERS.wrap("forward", local.per_example_loss)
    torch.Tensor.backward = TIMERS.wrap("backward", torch.Tensor.backward)
    GradSampleHooks.capture_backprops_hook = TIMERS.wrap("per_sample_grads", GradSampleHooks.capture_backprops_hook)
    GradSampleHooks.capture_activations_hook = TIMERS.wrap(
        "activation_capture", GradSampleHooks.capture_activations_hook
    )
    lora_grad_sample.per_sample_weight_grads = TIMERS.wrap("per_sample_grads", lora_grad_sample.per_sample_weight_grads)
    LoraGradSampler._forward = staticmethod(  # type: ignore[method-assign]
        TIMERS.wrap("activation_capture", LoraGradSampler.__dict__["_forward"].__func__)
    )
    randomness.GaussianNoise.like = TIMERS.wrap("noise_draw", randomness.GaussianNoise.like)
    if hasattr(randomness.GaussianNoise, "like_many"):
        randomness.GaussianNoise.like_many = TIMERS.wrap("noise_draw", randomness.GaussianNoise.like_many)
    torch.optim.AdamW.step = TIMERS.wrap("optimizer_update", torch.optim.AdamW.step)


def time_optimizer(optimizer) -> None:
    """Per-instance timers on a DP optimizer's phases (pre_step calls them through ``self``)."""
    for name, phase in (
        ("clip_and_accumulate", "clipping"),
        ("add_noise", "noise_total"),
        ("scale_grad", "scale_and_account"),
        ("step_hook", "scale_and_account"),
        ("zero_grad", "zero_grad"),
    ):
        method = getattr(optimizer, name)
        if method is not None:
            setattr(optimizer, name, TIMERS.wrap(phase, method))


def time_plain(optimizer) -> None:
    optimizer.zero_grad = TIMERS.wrap("zero_grad", optimizer.zero_grad)


# ---- one configuration -----------------------------------------------------------------------


def _dp_step(model, session, chunks, spec) -> float:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Full backward hook is firing", category=UserWarning)
        return local._step(model, session.optimizer, chunks, spec, CHOICE_IDS, session)


def _hooks_on(hooks) -> None:
    if isinstance(hooks, LoraGradSampler):
        hooks.attach()
    elif not hasattr(hooks, "autograd_grad_sample_hooks"):
        hooks.add_hooks(
            loss_reduction=hooks.loss_reduction,
            batch_first=hooks.batch_first,
            force_functorch=getattr(hooks, "force_functorch", False),
        )


def _hooks_off(hooks) -> None:
    if isinstance(hooks, LoraGradSampler):
        hooks.detach()
    elif hasattr(hooks, "autograd_grad_sample_hooks"):
        hooks.remove_hooks()


def _workload(model_name: str, batch: int, seq: int, micro_batches: int):
    """The model, synthetic records, collate, local spec and adapter parameters of one configuration."""
    bundle = model_bundle(model_config(model_name), LoraSettings(), 0)
    data = dataset(len(bundle.tokenizer), seq)
    collate = make_collate(bundle.pad_id, prompt_only=True)
    params = [p for p in bundle.model.parameters() if p.requires_grad]
    return bundle.model, data, collate, local_spec(batch, micro_batches, seq), params


def measure_config(
    model_name: str, batch: int, seq: int, mode: str, seeds: int, steps: int, micro_batches: int
) -> dict:
    """Interleaved DP / non-DP pairs on identical Poisson batches; per-pair times and phases."""
    install_timers()
    model, data, collate, spec, params = _workload(model_name, batch, seq, micro_batches)
    pairs, sizes, setup, empty = [], [], [], 0
    phases: dict[str, dict[str, float]] = {"dp": defaultdict(float), "none": defaultdict(float)}
    model.train()
    for seed in range(seeds):
        started = time.perf_counter()
        session = dpsgd.start_round(
            model=model,
            optimizer=torch.optim.AdamW(params, lr=1e-3),
            dataset=data,
            batch_size=batch,
            collate=collate,
            noise_multiplier=NOISE_MULTIPLIER,
            max_grad_norm=CLIP,
            history=[],
            accountant="rdp",
            grad_sample_mode=mode,
            randomness=dp_randomness(seed),
        )
        setup.append(time.perf_counter() - started)
        plain = torch.optim.AdamW(params, lr=1e-3)
        time_optimizer(session.optimizer)
        time_plain(plain)
        batches = local._batches(session.loader)
        try:
            warm = seed == 0
            for step in range(steps + warm):
                chunk_batch = next(batches)
                if len(chunk_batch["input_ids"]) == 0:
                    empty += 1
                    continue
                # each side cuts the batch as its training does: DP in fixed-shape micro-batches
                # (every row at data.max_length, dummy rows to fill the last), non-DP trimmed
                chunks = {
                    which: local._chunks(chunk_batch, spec, session if which == "dp" else None)
                    for which in ("dp", "none")
                }
                seconds = {}
                for which in ("dp", "none") if step % 2 == 0 else ("none", "dp"):
                    (_hooks_on if which == "dp" else _hooks_off)(session.hooks)
                    TIMERS.active = which
                    started, cpu = time.perf_counter(), time.process_time()
                    if which == "dp":
                        _dp_step(model, session, chunks["dp"], spec)
                    else:
                        local._step(model, plain, chunks["none"], spec, CHOICE_IDS, None)
                    seconds[which] = time.perf_counter() - started
                    seconds[f"{which}_cpu"] = time.process_time() - cpu
                    TIMERS.active = None
                    taken = TIMERS.take()
                    if not (warm and step == 0):
                        for name, value in taken.items():
                            phases[which][name] += value
                if warm and step == 0:
                    continue
                pairs.append(seconds)
                sizes.append(len(chunk_batch["input_ids"]))
        finally:
            _hooks_on(session.hooks)
            session.close()
    n = len(pairs)
    result = {"pairs": n, "empty_batches_skipped": empty, "batch_sizes": sizes}
    for clock, suffix in (("", ""), ("_cpu", "_cpu")):
        ratios = sorted(p["dp" + clock] / p["none" + clock] for p in pairs)
        quartiles = statistics.quantiles(ratios, n=4, method="inclusive") if n > 1 else [ratios[0]] * 3
        result.update(
            {
                f"dp_seconds_median{suffix}": statistics.median(p["dp" + clock] for p in pairs),
                f"none_seconds_median{suffix}": statistics.median(p["none" + clock] for p in pairs),
                f"ratio_median{suffix}": round(quartiles[1], 4),
                f"ratio_q1{suffix}": round(quartiles[0], 4),
                f"ratio_q3{suffix}": round(quartiles[2], 4),
                f"ratio_min{suffix}": round(ratios[0], 4),
                f"ratio_max{suffix}": round(ratios[-1], 4),
                f"ratio_of_totals{suffix}": round(
                    sum(p["dp" + clock] for p in pairs) / sum(p["none" + clock] for p in pairs), 4
                ),
            }
        )
    return {
        **result,
        "round_setup_seconds": statistics.median(setup),
        "phases_per_step": {k: {name: v / n for name, v in sorted(d.items())} for k, d in phases.items()},
        "step_seconds_per_pair": pairs,
    }


def breakdown(result: dict) -> dict[str, float]:
    """The DP step's extra CPU seconds per step, by phase (DP phase minus the same non-DP phase)."""
    dp, none = result["phases_per_step"]["dp"], result["phases_per_step"]["none"]
    hooks = dp.get("per_sample_grads", 0.0)
    capture = dp.get("activation_capture", 0.0)
    noise_draw = dp.get("noise_draw", 0.0)
    parts = {
        "forward (excl. activation capture)": dp.get("forward", 0) - capture - none.get("forward", 0),
        "activation capture (forward hooks)": capture,
        "backward (excl. per-sample grads)": dp.get("backward", 0) - hooks - none.get("backward", 0),
        "per-sample grads (backward hooks)": hooks,
        "clipping (norms, clip, sum)": dp.get("clipping", 0),
        "noise draw (node's Philox stream)": noise_draw,
        "noise addition": dp.get("noise_total", 0) - noise_draw,
        "scale + accounting": dp.get("scale_and_account", 0),
        "optimizer update": dp.get("optimizer_update", 0) - none.get("optimizer_update", 0),
        "zero_grad": dp.get("zero_grad", 0) - none.get("zero_grad", 0),
    }
    n = result["pairs"]
    extra = sum(p["dp_cpu"] - p["none_cpu"] for p in result["step_seconds_per_pair"]) / n
    parts["rest (untimed)"] = extra - sum(parts.values())
    parts["total extra (mean per step)"] = extra
    return {k: round(v * 1e3, 2) for k, v in parts.items()}  # milliseconds


# ---- memory ----------------------------------------------------------------------------------


def peak_mb() -> float:
    """Peak memory so far, in MB: CUDA memory allocated on a GPU, else the process's peak RSS."""
    if PLACEMENT["device"] != "cpu" and torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def probe(config: str, steps: int, micro_batches: int) -> dict:
    """Peak memory of one configuration in this (fresh) process, on seed 0's Poisson batches."""
    model_name, batch, seq, mode = config.split(",")
    batch, seq = int(batch), int(seq)
    model, data, collate, spec, params = _workload(model_name, batch, seq, micro_batches)
    model.train()
    base = peak_mb()
    sizes = []
    if mode == "none":  # the same sampling stream as the DP round's: the same batches
        loader = dpsgd.poisson_loader(data, batch, collate, dp_randomness(0))
        optimizer, session = torch.optim.AdamW(params, lr=1e-3), None
    else:
        session = dpsgd.start_round(
            model=model,
            optimizer=torch.optim.AdamW(params, lr=1e-3),
            dataset=data,
            batch_size=batch,
            collate=collate,
            noise_multiplier=NOISE_MULTIPLIER,
            max_grad_norm=CLIP,
            history=[],
            accountant="rdp",
            grad_sample_mode=mode,
            randomness=dp_randomness(0),
        )
        optimizer, loader = session.optimizer, session.loader
    batches = local._batches(loader)
    for _ in range(steps):
        chosen = next(batches)
        sizes.append(len(chosen["input_ids"]))
        if sizes[-1] == 0:
            continue
        chunks = local._chunks(chosen, spec, session)  # as each side's training cuts it
        if session is None:
            local._step(model, optimizer, chunks, spec, CHOICE_IDS, None)
        else:
            _dp_step(model, session, chunks, spec)
    if session is not None:
        session.close()
    return {"peak_mb": peak_mb() - base, "batch_sizes": sizes}


def _probe_once(config: tuple, steps: int, micro_batches: int) -> dict | None:
    placement = [f"--{key}={value}" for key, value in PLACEMENT.items()]
    result = subprocess.run(
        [
            sys.executable,
            __file__,
            "--probe",
            ",".join(map(str, config)),
            "--steps",
            str(steps),
            "--micro-batches",
            str(micro_batches),
            "--threads",
            "1",
            *placement,
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    if result.returncode != 0:
        return None
    return json.loads(result.stdout.strip().splitlines()[-1])


def measure_memory(config: tuple, steps: int, micro_batches: int, repeats: int) -> dict | None:
    """The median peak over ``repeats`` fresh processes (all peaks kept), or None if one failed."""
    runs = []
    for _ in range(repeats):
        run = _probe_once(config, steps, micro_batches)
        if run is None:
            return None  # the rest would fail alike: no more processes spent on it
        runs.append(run)
    peaks = [run["peak_mb"] for run in runs]
    return {"peak_mb": statistics.median(peaks), "peaks_mb": peaks, "batch_sizes": runs[0]["batch_sizes"]}


# ---- the run ---------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> list[dict]:
    torch.set_num_threads(args.threads)
    dp_modes = [m for m in args.modes.split(",") if m != "none"]
    rows = []
    for model_name in args.models.split(","):
        for batch in map(int, args.batches.split(",")):
            for seq in map(int, args.seqs.split(",")):
                memory_none = (
                    None
                    if args.no_memory
                    else measure_memory(
                        (model_name, batch, seq, "none"), args.steps, args.micro_batches, args.memory_repeats
                    )
                )
                for mode in dp_modes:
                    row = {"model": model_name, "batch": batch, "seq": seq, "mode": mode, "error": None}
                    try:
                        row.update(
                            measure_config(model_name, batch, seq, mode, args.repeats, args.steps, args.micro_batches)
                        )
                        row["breakdown_ms"] = breakdown(row)
                    except Exception as exc:  # a grad-sample mode that cannot handle this model: report it
                        row["error"] = f"{type(exc).__name__}: {str(exc)[:160]}"
                        rows.append(row)
                        continue
                    if memory_none is not None:
                        memory_dp = measure_memory(
                            (model_name, batch, seq, mode), args.steps, args.micro_batches, args.memory_repeats
                        )
                        row["peak_mb_none"] = round(memory_none["peak_mb"], 1)
                        row["peak_mb_dp"] = round(memory_dp["peak_mb"], 1) if memory_dp else None
                        row["peaks_mb_none"] = memory_none["peaks_mb"]
                        row["peaks_mb_dp"] = memory_dp["peaks_mb"] if memory_dp else None
                        row["memory_batch_sizes"] = memory_none["batch_sizes"]
                        ok = memory_dp and memory_dp["batch_sizes"] == memory_none["batch_sizes"]
                        row["peak_mb_ratio"] = (
                            round(memory_dp["peak_mb"] / memory_none["peak_mb"], 3)
                            if ok and memory_none["peak_mb"] > 0
                            else None
                        )
                    rows.append(row)
                    print(
                        f"{model_name} b{batch} s{seq} {mode}: wall {_spread(row, '')}, CPU {_spread(row, '_cpu')}",
                        file=sys.stderr,
                        flush=True,
                    )
    return rows


def _spread(r: dict, suffix: str) -> str:
    return (
        f"{r['ratio_median' + suffix]:.3f} [{r['ratio_q1' + suffix]:.3f}, {r['ratio_q3' + suffix]:.3f}] "
        f"({r['ratio_min' + suffix]:.3f}-{r['ratio_max' + suffix]:.3f})"
    )


def table(rows: list[dict]) -> str:
    lines = [
        "| model | batch | seq | mode | pairs | non-DP s/step | DP s/step "
        "| DP / non-DP wall: median [IQR] (min-max) | DP / non-DP CPU time: median [IQR] (min-max) "
        "| peak MB non-DP | peak MB DP | x |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        head = f"| {r['model']} | {r['batch']} | {r['seq']} | {r['mode']} |"
        if r["error"]:
            lines.append(f"{head} n/a: {r['error']} |" + " |" * 7)
            continue
        lines.append(
            f"{head} {r['pairs']} | {r['none_seconds_median']:.3f} | {r['dp_seconds_median']:.3f} | "
            f"{_spread(r, '')} | {_spread(r, '_cpu')} | {r.get('peak_mb_none', 'n/a')} | "
            f"{r.get('peak_mb_dp', 'n/a')} | {r.get('peak_mb_ratio', 'n/a')} |"
        )
    return "\n".join(lines)


def breakdown_table(rows: list[dict]) -> str:
    ok = [r for r in rows if not r["error"]]
    if not ok:
        return ""
    names = list(ok[0]["breakdown_ms"])
    lines = [
        "| DP extra, CPU ms per step | "
        + " | ".join(f"{r['model']} b{r['batch']} s{r['seq']} {r['mode']}" for r in ok)
        + " |",
        "|---|" + "---|" * len(ok),
    ]
    for name in names:
        lines.append(f"| {name} | " + " | ".join(f"{r['breakdown_ms'][name]:.1f}" for r in ok) + " |")
    lines.append(
        "| round set-up (once per round) | " + " | ".join(f"{r['round_setup_seconds'] * 1e3:.0f}" for r in ok) + " |"
    )
    return "\n".join(lines)


def main() -> None:
    quiet_libraries()  # the libraries' expected notices, as in `fedllm` itself
    args = parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    PLACEMENT.update(device=args.device, dtype=args.dtype, quantization=args.quantization)
    if args.probe:
        torch.set_num_threads(args.threads)
        print(json.dumps(probe(args.probe, args.steps, args.micro_batches)))
        return
    started = time.time()
    rows = run(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "date": time.strftime("%Y-%m-%d %H:%M"),
                "machine": f"{platform.processor() or platform.machine()}, "
                f"{os.cpu_count()} cores, torch {torch.__version__}, {args.threads} threads",
                "placement": PLACEMENT,
                "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
                "method": "fair: non-DP replays the DP step's Poisson batches, interleaved; per-pair ratio",
                "seeds": args.repeats,
                "steps_per_seed": args.steps,
                "micro_batches": args.micro_batches,
                "command": " ".join(sys.argv),
                "seconds": round(time.time() - started),
                "rows": rows,
            },
            indent=2,
        )
    )
    print(table(rows))
    print()
    print(breakdown_table(rows))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
