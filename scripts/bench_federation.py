"""Federation costs: communication per client per round, framework overhead per round, and how
far one machine scales in simulation.

    .venv/bin/python scripts/bench_federation.py [--clients 10,50,100] [--fraction 0.1]
        [--rounds 2] [--overhead-run RUN_DIR] [--out FILE]

1. Bytes each client sends per round: the adapter tensors on the wire (fp32), for standard
   LoRA and FFA-LoRA (`lora.freeze_a=true`, B only), on the default model and model=tiny, and
   what bf16 on the wire would halve them to.
2. Per-round overhead of a finished run (`--overhead-run`, e.g. a `make run` directory): round
   wall time against the slowest client's local training and the server's evaluation.
3. Scale: `fedllm simulate` with model=tiny at each client count (the given fraction sampled
   per round), measuring wall time and the peak resident memory of the whole process tree.
Prints tables and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", default="10,50,100")
    parser.add_argument("--fraction", type=float, default=0.1)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--models", default="embedded,tiny")
    parser.add_argument("--overhead-run", type=Path, default=None)
    parser.add_argument("--workdir", type=Path, default=Path("outputs/bench/federation"))
    parser.add_argument("--out", type=Path, default=Path("outputs/bench/federation.json"))
    return parser.parse_args(argv)


def wire_bytes(models: list[str]) -> list[dict]:
    """Adapter bytes per client per round, as fedllm sends them (fp32 tensors)."""
    from fedllm.config import LoraSettings, ModelConfig
    from fedllm.task import model_bundle

    rows = []
    for name in models:
        for freeze_a in (False, True):
            state = model_bundle(ModelConfig(source=name), LoraSettings(freeze_a=freeze_a), 0).initial_adapter
            fp32 = sum(t.numel() * t.element_size() for t in state.values())
            rows.append({"model": name, "lora": "FFA-LoRA (B only)" if freeze_a else "LoRA (A and B)",
                         "tensors": len(state), "parameters": sum(t.numel() for t in state.values()),
                         "bytes_fp32": fp32, "bytes_bf16": fp32 // 2})
    return rows


def overhead(run_dir: Path) -> list[dict]:
    """Per round: wall time, slowest client's training, evaluation, and the rest (framework)."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rows = []
    for before, record in zip(records, records[1:], strict=False):
        wall = record["wall_seconds"] - before["wall_seconds"]
        slowest, evaluation = record.get("slowest_client_seconds") or 0.0, record.get("eval_seconds") or 0.0
        rows.append({"round": record["round"], "round_seconds": round(wall, 1), "slowest_client_seconds":
                     round(slowest, 1), "eval_seconds": round(evaluation, 1),
                     "other_seconds": round(wall - slowest - evaluation, 1), "clients": record["num_clients"]})
    return rows


def _tree_rss(root: psutil.Process) -> int:
    total = 0
    for proc in [root, *root.children(recursive=True)]:
        try:
            total += proc.memory_info().rss
        except psutil.NoSuchProcess:
            continue
    return total


def scale_run(clients: int, fraction: float, rounds: int, workdir: Path) -> dict:
    """One `fedllm simulate` with model=tiny; wall time and peak memory of its process tree."""
    run_dir = workdir / f"clients-{clients}"
    args = [sys.executable, "-m", "fedllm.cli.main", "simulate", "debug=smoke", f"federation.num_clients={clients}",
            f"federation.fraction_train={fraction}", f"federation.num_rounds={rounds}", "data.max_records=6000",
            "data.test_size=200", "train.batch_size=8", "tracking.progress=false", f"hydra.run.dir={run_dir}"]
    started = time.perf_counter()
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "PYTHONWARNINGS": "ignore"})
    peak = 0
    watcher = psutil.Process(proc.pid)

    def sample() -> None:
        nonlocal peak
        while proc.poll() is None:
            peak = max(peak, _tree_rss(watcher))
            time.sleep(0.5)

    thread = threading.Thread(target=sample)
    thread.start()
    proc.wait()
    thread.join()
    summary = json.loads((run_dir / "summary.json").read_text()) if proc.returncode == 0 else {}
    return {"clients": clients, "sampled_per_round": max(1, round(fraction * clients)), "rounds": rounds,
            "returncode": proc.returncode, "wall_seconds": round(time.perf_counter() - started, 1),
            "federation_seconds": summary.get("federation_seconds"), "peak_rss_mb": round(peak / 2**20)}


def markdown(rows: list[dict]) -> str:
    keys = list(rows[0])
    return "\n".join(["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys),
                      *("| " + " | ".join(str(r[k]) for k in keys) + " |" for r in rows)])


def main() -> None:
    args = parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    result = {"date": time.strftime("%Y-%m-%d"), "machine": f"{os.cpu_count()} cores",
              "bytes_per_client_per_round": wire_bytes(args.models.split(","))}
    print(markdown(result["bytes_per_client_per_round"]))
    if args.overhead_run:
        result["overhead"] = overhead(args.overhead_run)
        print("\n" + markdown(result["overhead"]))
    result["scale"] = [scale_run(int(n), args.fraction, args.rounds, args.workdir) for n in args.clients.split(",")]
    print("\n" + markdown(result["scale"]))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
