"""The benchmark scripts run (tiny, fast settings); their numbers live in docs/benchmarks.md."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _script(name: str, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / name), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result


def test_bench_dp_step_tiny_mode(tmp_path):
    out = tmp_path / "dp.json"
    result = _script(
        "bench_dp_step.py",
        "--models",
        "tiny",
        "--batches",
        "4",
        "--seqs",
        "16",
        "--modes",
        "none,hooks",
        "--repeats",
        "2",
        "--steps",
        "2",
        "--threads",
        "1",
        "--out",
        str(out),
    )
    rows = json.loads(out.read_text())["rows"]
    assert [r["mode"] for r in rows] == ["hooks"]  # each DP mode against the non-DP replay of its batches
    row = rows[0]
    # fair method: one (DP, non-DP) pair per non-empty Poisson batch, both steps on that very batch
    assert row["pairs"] + row["empty_batches_skipped"] == 2 * 2 and len(row["batch_sizes"]) == row["pairs"]
    assert all(p["dp"] > 0 and p["none"] > 0 for p in row["step_seconds_per_pair"])
    for clock in ("", "_cpu"):
        assert (
            row[f"ratio_min{clock}"]
            <= row[f"ratio_q1{clock}"]
            <= row[f"ratio_median{clock}"]
            <= row[f"ratio_q3{clock}"]
            <= row[f"ratio_max{clock}"]
        )
    # peak memory of both modes on the same batches, each in a fresh process
    assert row["peak_mb_dp"] is not None and row["peak_mb_none"] is not None and row["peak_mb_ratio"] > 0
    breakdown = row["breakdown_ms"]
    assert breakdown["per-sample grads (backward hooks)"] > 0 and breakdown["noise draw (node's Philox stream)"] > 0
    assert breakdown["clipping (norms, clip, sum)"] > 0
    assert "| tiny | 4 | 16 | hooks |" in result.stdout and "| noise draw (node's Philox stream) |" in result.stdout


def test_bench_compute_channel_tiny_mode(tmp_path):
    out = tmp_path / "compute.json"
    result = _script(
        "bench_compute_channel.py",
        "--rounds",
        "2",
        "--threads",
        "1",
        "--out",
        str(out),
        "model=tiny",
        "train.local_steps=2",
    )
    data = json.loads(out.read_text())
    assert set(data["modes"]) == {"trim", "max_length", "buckets", "deadline"}
    for step in data["steps"]:  # every mode on the same batch: max_length's shape follows its size only
        assert step["max_length_micro_batches"] == -(-step["size"] // data["rows_per_micro_batch"])
        assert step["trim"] > 0 and step["max_length"] > 0 and step["buckets"] > 0
    assert data["modes"]["trim"]["round_ratio"]["median"] == 1.0
    for sums in data["round_seconds"]:  # the deadline holds the reply at least until it
        assert sums["deadline"] == max(data["deadline_seconds"], sums["trim"])
    assert "| max_length |" in result.stdout


def test_bench_federation_tiny_mode(tmp_path):
    out = tmp_path / "fed.json"
    _script(
        "bench_federation.py",
        "--models",
        "tiny",
        "--clients",
        "3",
        "--fraction",
        "1.0",
        "--rounds",
        "1",
        "--workdir",
        str(tmp_path / "runs"),
        "--out",
        str(out),
    )
    result = json.loads(out.read_text())
    standard, ffa = result["bytes_per_client_per_round"]
    assert ffa["bytes_fp32"] * 2 == standard["bytes_fp32"]  # FFA-LoRA halves communication
    assert result["scale"][0]["returncode"] == 0 and result["scale"][0]["peak_rss_mb"] > 0
    assert result["inprocess_overhead"]["preflight_node_seconds"] > 0  # 3 pre-flight queries, before round 1
    rounds = result["inprocess_overhead"]["rounds"]  # debug=smoke: 2 rounds of 3 clients, in process
    assert [r["round"] for r in rounds] == [1, 2] and all(r["clients"] == 3 for r in rounds)
    for r in rounds:
        assert r["client_training_s"] > 0 and r["eval_seconds"] > 0 and 0 < r["framework_share"] < 1
        assert abs(r["client_training_s"] + r["eval_seconds"] + r["framework_overhead_s"] - r["round_seconds"]) < 0.02


def test_bench_utility_tiny_mode(tmp_path):
    out = tmp_path / "utility.json"
    result = _script(
        "bench_utility.py",
        "--model",
        "tiny",
        "--presets",
        "ffa_dp_eps1",
        "--rounds",
        "1",
        "--workdir",
        str(tmp_path / "runs"),
        "--out",
        str(out),
    )
    rows = {r["preset"]: r for r in json.loads(out.read_text())["rows"]}
    assert list(rows) == ["zero_shot", "ffa_dp_eps1"]
    assert 0 < rows["ffa_dp_eps1"]["spent_epsilon"] <= 1.0
    assert rows["zero_shot"]["final_accuracy"] == rows["ffa_dp_eps1"]["zero_shot_accuracy"]
    assert "| zero-shot (base model) |" in result.stdout


def test_bench_utility_centralised_reference_takes_every_clients_steps():
    spec = importlib.util.spec_from_file_location("bench_utility", ROOT / "scripts" / "bench_utility.py")
    bench = importlib.util.module_from_spec(spec)
    sys.modules["bench_utility"] = bench  # dataclasses look their module up while being built
    spec.loader.exec_module(bench)
    federated = bench.overrides_for(bench.PRESETS["nonprivate"], "embedded", 10, 3, 5, [])
    centralised = bench.overrides_for(bench.PRESETS["centralised"], "embedded", 10, 3, 5, [])
    assert "federation.num_clients=10" in federated and "train.local_steps=5" in federated
    assert "federation.num_clients=1" in centralised and "train.local_steps=50" in centralised
    assert "federation.min_updates=1" in centralised  # one client: one update a round, knowingly

    def shared(overrides):
        return {o for o in overrides if not any(k in o for k in ("num_clients", "local_steps", "min_updates"))}

    assert shared(federated) == shared(centralised)
    with pytest.raises(SystemExit, match="disagree"):
        bench.zero_shot_row([{"zero_shot_accuracy": 0.5}, {"zero_shot_accuracy": 0.6}])
