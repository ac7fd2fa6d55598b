"""End to end: `fedllm simulate debug=smoke` through Flower's simulation engine, as a user runs it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from peft import PeftModel

from fedllm.config import ExperimentConfig
from fedllm.privacy.accounting import epsilon

from .conftest import fedllm, stray_processes


def _rounds(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_run_writes_every_output(smoke_run):
    for name in (
        "adapter/adapter_config.json",
        "adapter/adapter_model.safetensors",
        "metrics.jsonl",
        "privacy_ledger.json",
        "summary.json",
        "config.json",
        ".hydra/config.yaml",
    ):
        assert (smoke_run / name).is_file(), name


def test_the_console_shows_the_run_and_no_library_noise(smoke_run):
    out, err = ((smoke_run.parent / name).read_text() for name in ("console.out", "console.err"))
    for noise in (
        "is_gradient_checkpointing",  # transformers, through PEFT, in every actor
        "`run_simulation` function is deprecated",  # Flower, twice per run
        "alembic",  # Flower's state database
        "Manually terminating ClientAppActor",  # Flower's normal shutdown
        "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO",  # Ray's tip
        "fraction_evaluate is set to 0.0",  # fedllm evaluates on the server
        "rounds:",  # the progress bar: not a terminal here, so no bar
    ):
        assert noise not in out + err, noise
    for line in err.splitlines():  # (stderr is empty here; a fresh machine may print a first-use line)
        assert "Warning" not in line and "warnings.warn" not in line and "Traceback" not in line, err[-2000:]
    block = out[out.index("run completed in") :]
    assert "2 of 2 rounds, 3 clients" in block and "utility: accuracy" in block
    assert "privacy: sample level, any single training record of a node: epsilon 7.99" in block
    assert f"outputs: {smoke_run}" in block and f"fedllm evaluate {smoke_run}" in block


def test_metrics_has_one_record_per_round_with_epsilon_per_client(smoke_run):
    rounds = _rounds(smoke_run)
    assert [r["round"] for r in rounds] == [0, 1, 2]
    assert rounds[0]["train_loss"] is None and 0 <= rounds[0]["eval_accuracy"] <= 1
    for record in rounds[1:]:
        assert set(record["epsilon"]) == {"0", "1", "2"}
        assert record["max_epsilon"] == max(record["epsilon"].values())
        # no node declared its train loss public (privacy.public_metrics=false): none is reported
        assert record["train_loss"] is None and record["eval_loss"] > 0 and record["num_clients"] == 3
    assert rounds[2]["max_epsilon"] > rounds[1]["max_epsilon"]


def test_ledger_epsilon_is_the_one_shot_value_for_all_steps_and_under_target(smoke_run):
    ledger = json.loads((smoke_run / "privacy_ledger.json").read_text())
    cfg = ExperimentConfig.from_dict(json.loads((smoke_run / "config.json").read_text()))
    total_steps = cfg.federation.num_rounds * cfg.train.local_steps
    assert set(ledger["clients"]) == {"0", "1", "2"}
    for client in ledger["clients"].values():
        assert client["steps"] == total_steps
        one_shot = epsilon(
            [(client["noise_multiplier"], client["sample_rate"], total_steps)],
            delta=cfg.privacy.delta,
            accountant=cfg.privacy.accountant,
        )
        assert client["epsilon"] == pytest.approx(one_shot, rel=1e-12)
        assert client["epsilon"] <= cfg.privacy.target_epsilon
        assert client["epsilon"] > cfg.privacy.target_epsilon - 0.05  # the plan spends the budget
    final = _rounds(smoke_run)[-1]["epsilon"]
    assert {k: v["epsilon"] for k, v in ledger["clients"].items()} == pytest.approx(final)


def test_summary_reports_accuracy_epsilon_and_time(smoke_run):
    summary = json.loads((smoke_run / "summary.json").read_text())
    rounds = _rounds(smoke_run)
    assert summary["zero_shot_accuracy"] == rounds[0]["eval_accuracy"]
    assert summary["final_accuracy"] == rounds[-1]["eval_accuracy"]
    assert summary["final_max_epsilon"] == pytest.approx(rounds[-1]["max_epsilon"])
    assert summary["target_epsilon"] == 8.0 and summary["rounds_completed"] == 2
    assert summary["rounds_without_updates"] == []
    assert summary["wall_seconds"] >= summary["federation_seconds"] > 0  # both measured by the ServerApp


def test_resolved_config_is_saved(smoke_run):
    hydra_cfg = yaml.safe_load((smoke_run / ".hydra" / "config.yaml").read_text())
    assert hydra_cfg["federation"]["num_clients"] == 3
    assert json.loads((smoke_run / "config.json").read_text())["model"]["source"] == "tiny"


def test_adapter_loads_with_stock_peft_and_matches_the_final_round(smoke_run):
    cfg = ExperimentConfig.from_dict(json.loads((smoke_run / "config.json").read_text()))
    from fedllm.model.base import load_model, load_tokenizer

    base = load_model(cfg.model, vocab_size=len(load_tokenizer(cfg.model)), seed=cfg.seed)
    model = PeftModel.from_pretrained(base, str(smoke_run / "adapter"))
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_b and all(p.abs().sum() > 0 for p in lora_b)  # trained: B starts at zero
    ids = torch.tensor([[1, 2, 3]])
    assert torch.isfinite(model(input_ids=ids).logits).all()


def test_the_adapter_is_usable_from_its_folder_alone(smoke_run):
    """What a reader of a released adapter does: the card states the run's epsilon, the base
    resolves from its portable name, and `fedllm evaluate` reproduces the server's last round."""
    summary = json.loads((smoke_run / "summary.json").read_text())
    card = (smoke_run / "adapter" / "README.md").read_text()
    assert f"({summary['guarantees'][0]['epsilon']:.4g}, 1e-05)-DP" in card and "Review: {prompt}" in card
    evaluated = json.loads(fedllm(["evaluate", str(smoke_run), "--json"], cwd=smoke_run).stdout)
    # the same weights, data and batches; under bf16 autocast (train.precision=auto on a CPU with
    # AMX) the kernels' accumulation order still varies between processes: 1.5e-5 apart was seen
    # once in CI. Another adapter or another split would be off by far more than this.
    assert evaluated["eval_loss"] == pytest.approx(summary["final_eval_loss"], rel=1e-4)
    one_example = 1 / summary["test_examples"]  # a borderline example may flip with that noise
    assert evaluated["eval_accuracy"] == pytest.approx(summary["final_accuracy"], abs=one_example + 1e-9)
    generated = fedllm(["generate", str(smoke_run), "a fine film", "--max-new-tokens", "4"], cwd=smoke_run)
    assert generated.stdout.strip()


def test_no_flower_or_ray_process_survives(smoke_run):
    assert stray_processes() == []


def test_privacy_none_baseline(smoke_sweep):
    run_dir = smoke_sweep / "baseline"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["privacy_mode"] == "none" and summary["final_max_epsilon"] is None
    ledger = json.loads((run_dir / "privacy_ledger.json").read_text())
    assert ledger["clients"] == {} and ledger["privacy_mode"] == "none"
    assert _rounds(run_dir)[1]["eval_loss"] > 0


def test_a_sweep_writes_one_run_directory_per_job(smoke_sweep):
    summaries = {job: json.loads((smoke_sweep / job / "summary.json").read_text()) for job in ("0", "1")}
    assert sorted(s["target_epsilon"] for s in summaries.values()) == [3.0, 8.0]
    for summary in summaries.values():
        assert 0 < summary["final_max_epsilon"] <= summary["target_epsilon"]
    # both jobs run in one process: the second must start from the same initial adapter
    zero_shot = [_rounds(smoke_sweep / job)[0]["eval_loss"] for job in ("0", "1")]
    assert zero_shot[0] == zero_shot[1]
    assert stray_processes() == []


def test_impossible_privacy_plan_fails_fast_with_a_clear_message(tmp_path):
    result = fedllm(
        ["simulate", "debug=smoke", "privacy.target_epsilon=0.0001", f"hydra.run.dir={tmp_path / 'run'}"],
        cwd=tmp_path,
        check=False,
    )
    assert result.returncode != 0
    assert "raise privacy.target_epsilon" in result.stdout + result.stderr
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
