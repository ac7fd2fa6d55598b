"""Federation costs: communication per client per round, framework overhead per round, and how
far one machine scales in simulation.

    .venv/bin/python scripts/bench_federation.py [--clients 10,50,100] [--fraction 0.1]
        [--rounds 2] [--overhead-run RUN_DIR] [--out FILE]

1. Bytes each client sends per round: the adapter tensors on the wire (fp32), for standard
   LoRA and FFA-LoRA (`lora.freeze_a=true`, B only), on the default model and model=tiny, and
   what bf16 on the wire would halve them to.
2. Framework overhead per round, two ways:
   - in process (`--inprocess MODEL`, default tiny; `--inprocess none` skips it): the real
     ServerApp round loop and ClientApp run in this process (``run_inprocess``, no Ray), nodes
     one after another, with timers around every ClientApp call and every ``train_local`` call.
     A round's time splits exactly into client training, the server's held-out evaluation
     (``eval_seconds`` of metrics.jsonl), the nodes' work around training (shard, adapter,
     reply) and the rest (the round loop, message copies, aggregation, ledger, checkpoint,
     logging). Framework overhead = round - training - evaluation, as a share of the round.
   - of a finished Ray run (`--overhead-run`, e.g. a `make run` directory): its log keeps only
     the slowest client's training time, so the split is a bound: training at most the slowest
     client times the waves of ``--slots`` clients at a time, hence the rest at least what is
     left (it can come out negative when clients vary).
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

from fedllm.library_noise import quiet_libraries  # light: logging and warnings only

ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", default="10,50,100", help="client counts of the scale runs, or none")
    parser.add_argument("--fraction", type=float, default=0.1)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--models", default="embedded,tiny")
    parser.add_argument("--overhead-run", type=Path, default=None)
    parser.add_argument("--slots", type=int, default=2, help="clients a Ray run trains at a time (--overhead-run)")
    parser.add_argument("--inprocess", default="tiny", help="model of the in-process overhead run, or none")
    parser.add_argument(
        "--inprocess-overrides",
        default="",
        help="extra overrides for the in-process run, space-separated (e.g. federation.num_clients=4)",
    )
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
            rows.append(
                {
                    "model": name,
                    "lora": "FFA-LoRA (B only)" if freeze_a else "LoRA (A and B)",
                    "tensors": len(state),
                    "parameters": sum(t.numel() for t in state.values()),
                    "bytes_fp32": fp32,
                    "bytes_bf16": fp32 // 2,
                }
            )
    return rows


def overhead(run_dir: Path, slots: int) -> list[dict]:
    """Per round of a Ray run: wall time, training bound (slowest client x waves), evaluation, rest."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rows = []
    for before, record in zip(records, records[1:], strict=False):
        wall = record["wall_seconds"] - before["wall_seconds"]
        slowest, evaluation = record.get("slowest_client_seconds") or 0.0, record.get("eval_seconds") or 0.0
        waves = -(-record["num_clients"] // slots)
        rest = wall - slowest * waves - evaluation
        rows.append(
            {
                "round": record["round"],
                "round_seconds": round(wall, 1),
                "slowest_client_seconds": round(slowest, 1),
                "training_at_most_s": round(slowest * waves, 1),
                "eval_seconds": round(evaluation, 1),
                "rest_at_least_s": round(rest, 1),
                "rest_share_at_least": round(rest / wall, 3) if wall else None,
                "clients": record["num_clients"],
            }
        )
    return rows


def inprocess_overhead(model: str, overrides: list[str], workdir: Path) -> dict:
    """Run a federation in this process with timers; per round: training, evaluation, the rest."""
    from flwr.app import Message, MessageType

    from fedllm.cli.simulate import compose_checked, conf_dir
    from fedllm.config import with_state_dir
    from fedllm.federation import server_app
    from fedllm.federation.inprocess import run_inprocess
    from fedllm.federation.server_app import prepare_run
    from fedllm.federation.simulation import load_object
    from fedllm.node import guard

    run_dir = (workdir / f"inprocess-{model}").resolve()
    if run_dir.exists():
        import shutil

        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    base = ["debug=smoke"] if model == "tiny" else [f"model={model}"]
    cfg = with_state_dir(compose_checked([*base, "tracking.progress=false", *overrides], conf_dir()), run_dir)
    calls: list[dict] = []
    training = {"seconds": 0.0, "round": 1}  # the round the next ClientApp call serves
    train_local = guard.train_local

    def timed_train(*args, **kwargs):
        started = time.perf_counter()
        try:
            return train_local(*args, **kwargs)
        finally:
            training["seconds"] += time.perf_counter() - started

    client_app = load_object(cfg.federation.client_app)

    def timed_app(message: Message, context) -> Message:
        training["seconds"] = 0.0
        started = time.perf_counter()
        try:
            return client_app(message, context)
        finally:
            calls.append(
                {
                    "round": training["round"],
                    "kind": message.metadata.message_type,
                    "seconds": time.perf_counter() - started,
                    "train_seconds": training["seconds"],
                }
            )

    evaluator = server_app.RoundEvaluator.__call__

    def round_end(self, server_round, *args, **kwargs):  # the server evaluates after each round's replies
        try:
            return evaluator(self, server_round, *args, **kwargs)
        finally:
            training["round"] = server_round + 1

    started = time.perf_counter()
    guard.train_local, server_app.RoundEvaluator.__call__ = timed_train, round_end
    try:
        prepare_run(cfg, run_dir)
        run_inprocess(cfg, run_dir, client_app=timed_app)
    finally:
        guard.train_local, server_app.RoundEvaluator.__call__ = train_local, evaluator
    total = time.perf_counter() - started
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rows = []
    for before, record in zip(records, records[1:], strict=False):
        wall = record["wall_seconds"] - before["wall_seconds"]
        # train messages only: the pre-flight queries (before round 1) are reported on their own
        mine = [c for c in calls if c["round"] == record["round"] and c["kind"] == MessageType.TRAIN]
        train = sum(c["train_seconds"] for c in mine)
        node_other = sum(c["seconds"] for c in mine) - train
        evaluation = record.get("eval_seconds") or 0.0
        framework = wall - train - evaluation
        rows.append(
            {
                "round": record["round"],
                "round_seconds": round(wall, 2),
                "clients": len(mine),
                "client_training_s": round(train, 2),
                "eval_seconds": round(evaluation, 2),
                "node_work_around_training_s": round(node_other, 2),
                "server_and_engine_s": round(framework - node_other, 2),
                "framework_overhead_s": round(framework, 2),
                "framework_share": round(framework / wall, 4) if wall else None,
            }
        )
    preflight = sum(c["seconds"] for c in calls if c["kind"] == MessageType.QUERY)
    return {
        "model": model,
        "overrides": [*base, *overrides],
        "whole_run_seconds": round(total, 1),
        "preflight_node_seconds": round(preflight, 2),
        "rounds": rows,
    }


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
    args = [
        sys.executable,
        "-m",
        "fedllm.cli.main",
        "simulate",
        "debug=smoke",
        f"federation.num_clients={clients}",
        f"federation.fraction_train={fraction}",
        f"federation.num_rounds={rounds}",
        "data.max_records=6000",
        "data.test_size=200",
        "train.batch_size=8",
        "tracking.progress=false",
        f"hydra.run.dir={run_dir}",
    ]
    started = time.perf_counter()
    proc = subprocess.Popen(
        args,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
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
    return {
        "clients": clients,
        "sampled_per_round": max(1, round(fraction * clients)),
        "rounds": rounds,
        "returncode": proc.returncode,
        "wall_seconds": round(time.perf_counter() - started, 1),
        "federation_seconds": summary.get("federation_seconds"),
        "peak_rss_mb": round(peak / 2**20),
    }


def markdown(rows: list[dict]) -> str:
    keys = list(rows[0])
    return "\n".join(
        [
            "| " + " | ".join(keys) + " |",
            "|" + "---|" * len(keys),
            *("| " + " | ".join(str(r[k]) for k in keys) + " |" for r in rows),
        ]
    )


def main() -> None:
    quiet_libraries()  # the libraries' expected notices, as in `fedllm` itself
    args = parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{os.cpu_count()} cores",
        "bytes_per_client_per_round": wire_bytes(args.models.split(",")),
    }
    print(markdown(result["bytes_per_client_per_round"]))
    if args.inprocess != "none":
        result["inprocess_overhead"] = inprocess_overhead(
            args.inprocess, args.inprocess_overrides.split(), args.workdir
        )
        print(f"\nper-round split, in process ({result['inprocess_overhead']['overrides']}):")
        print(markdown(result["inprocess_overhead"]["rounds"]))
    if args.overhead_run:
        result["overhead"] = overhead(args.overhead_run, args.slots)
        print("\n" + markdown(result["overhead"]))
    if args.clients != "none":
        result["scale"] = [scale_run(int(n), args.fraction, args.rounds, args.workdir) for n in args.clients.split(",")]
        print("\n" + markdown(result["scale"]))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
