"""Malicious and broken clients in a real simulation: every bad reply is rejected and counted,
the run finishes, and the global adapter matches the honest-only result."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from .conftest import fedllm

ROOT = Path(__file__).resolve().parents[2]
ATTACKS = ["nan", "inf", "shape", "missing", "extra", "scale", "metric"]
CRASHING = len(ATTACKS)  # client 7 crashes in round 1 and comes back in round 2
CLIENTS = len(ATTACKS) + 3  # clients 8 and 9 are honest


def _run(tmp_path: Path, name: str, attacks: dict[int, str]) -> Path:
    run_dir = tmp_path / name
    spec = ",".join(f"{client}:{attack}" for client, attack in attacks.items())
    # seeded: the attacked and the honest-only run must shuffle alike to be compared bit for bit
    fedllm(
        [
            "simulate",
            "debug=smoke",
            "privacy=none",
            "privacy.noise=seeded",
            f"federation.num_clients={CLIENTS}",
            "federation.min_updates=2",  # round 1 keeps only its 2 honest updates (the attacks are rejected)
            "federation.client_app=tests.e2e.attack_app:app",
            f"hydra.run.dir={run_dir}",
        ],
        cwd=tmp_path,
        env={"FEDLLM_TEST_ATTACKS": spec, "PYTHONPATH": str(ROOT)},
    )
    return run_dir


def test_malicious_and_crashing_clients_are_rejected_and_the_run_matches_honest_only(tmp_path):
    attacked = _run(tmp_path, "attacked", {**dict(enumerate(ATTACKS)), CRASHING: "crash"})
    honest = _run(tmp_path, "honest", {**{c: "decline" for c in range(len(ATTACKS))}, CRASHING: "crash-reference"})

    rounds = [json.loads(line) for line in (attacked / "metrics.jsonl").read_text().splitlines()]
    assert [r["rejected_updates"] for r in rounds] == [0, len(ATTACKS), len(ATTACKS)]
    reasons = " ".join(rounds[1]["rejections"])
    for expected in ("NaN or infinite", "shape", "missing", "unexpected", "median", "'train-loss' is not a number"):
        assert expected in reasons, expected
    assert len(rounds[1]["failed"]) == 1 and "simulated node crash" in rounds[1]["failed"][0]
    assert rounds[2]["failed"] == [] and rounds[2]["num_clients"] == 3  # the crashed node rejoined
    assert json.loads((attacked / "summary.json").read_text())["rounds_completed"] == 2

    final = load_file(attacked / "adapter" / "adapter_model.safetensors")
    reference = load_file(honest / "adapter" / "adapter_model.safetensors")
    for name, tensor in final.items():
        assert torch.isfinite(tensor).all()
        assert torch.allclose(tensor, reference[name], atol=1e-6), name


CANARY = "CANARY-7f3a9c-do-not-leak"


def test_no_client_text_reaches_anything_the_server_writes(tmp_path):
    data = tmp_path / "reviews.jsonl"
    with data.open("w", encoding="utf-8") as handle:
        for i in range(400):
            prompt = f"review {i}: {'a moving film' if i % 2 else 'a dull film'}"
            if i % 10 == 0:
                prompt += f" {CANARY}"  # planted in records that land in clients' shards and the test split
            handle.write(json.dumps({"text": prompt, "label": "positive" if i % 2 else "negative", "id": i}) + "\n")
    run_dir = tmp_path / "run"
    result = fedllm(
        [
            "simulate",
            "debug=smoke",
            "federation.num_rounds=1",
            "data=jsonl",
            f"data.path={data}",
            "data.prompt_field=text",
            "data.response_field=label",
            "data.choices=[positive,negative]",
            "data.prompt_template='Review: {prompt}\\nSentiment:'",
            "data.test_size=50",
            "data.max_length=48",  # these records are short: DP steps pad every record to it
            "tracking=wandb",
            f"hydra.run.dir={run_dir}",
        ],
        cwd=tmp_path,
        env={"WANDB_MODE": "offline"},
    )
    assert CANARY not in result.stdout + result.stderr
    written = [p for p in run_dir.rglob("*") if p.is_file()]
    assert any("wandb" in p.parts for p in written) and (run_dir / "checkpoint" / "state.json").is_file()
    for path in written:
        assert CANARY.encode() not in path.read_bytes(), path
