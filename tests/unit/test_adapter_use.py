"""A saved adapter is usable away from its run: a portable base-model name that resolves to the
exact base, a model card that states what the run measured, and ``fedllm evaluate`` scoring it
exactly as the server did."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel

from fedllm import task
from fedllm.cli.main import main
from fedllm.config import ModelConfig
from fedllm.errors import ConfigError, IntegrityError
from fedllm.evaluation.metrics import evaluate
from fedllm.finished_run import evaluate_run, load_finished_run
from fedllm.model.adapter_files import read_adapter_weights, save_adapter
from fedllm.model.adapters import adapter_state, load_adapter_state
from fedllm.model.base import (
    EMBEDDED_REFERENCE,
    base_for_adapter,
    base_reference,
    model_config_for,
)
from fedllm.model.model_card import model_card
from fedllm.tracking.run_files import Guarantee, RunSummary
from fedllm.training.precision import use_bf16
from tests.conftest import tiny_config

KEY = bytes(range(32))


def test_every_base_name_resolves_to_the_config_it_came_from():
    tiny = ModelConfig(source="tiny", hidden_size=32, num_layers=1, num_heads=2, intermediate_size=48)
    assert model_config_for(base_reference(tiny, seed=7)) == (tiny, 7)
    assert model_config_for(base_reference(ModelConfig(), seed=3)) == (ModelConfig(), 0)
    assert base_reference(ModelConfig(), seed=3) == EMBEDDED_REFERENCE
    hub = ModelConfig(source="pretrained", name_or_path="HuggingFaceTB/SmolLM2-135M-Instruct")
    assert model_config_for(base_reference(hub, seed=0))[0] == hub
    for bad in (
        "fedllm:huge",
        "fedllm:tiny?hidden_size=64",
        "fedllm:tiny?hidden_size=x&intermediate_size=1&num_heads=1&num_layers=1&seed=0",
    ):
        with pytest.raises(ConfigError):
            model_config_for(bad)


@pytest.fixture
def trained(tmp_path):
    """A run folder whose adapter moved away from its initial weights, saved as the server saves it."""
    cfg = tiny_config()
    bundle = task.model_bundle(cfg.model, cfg.lora, cfg.seed)
    with torch.random.fork_rng():
        torch.manual_seed(1)
        moved = {k: v + 0.05 * torch.randn_like(v) for k, v in bundle.initial_adapter.items()}
    load_adapter_state(bundle.model, moved)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.json").write_text(cfg.to_json(), encoding="utf-8")
    summary = RunSummary(
        status="completed",
        rounds_completed=2,
        test_examples=100,
        accountant="prv",
        guarantees=[
            Guarantee(
                level="sample",
                protects="any single training record of a node",
                against="the coordinator",
                epsilon=7.91234,
                delta=1e-5,
            )
        ],
        zero_shot_accuracy=0.5,
        final_accuracy=0.61,
        zero_shot_eval_loss=0.7,
        final_eval_loss=0.65,
    )
    name = base_reference(cfg.model, cfg.seed)
    save_adapter(bundle.model, run_dir / "adapter", None, base_name=name, card=model_card(cfg, summary, name))
    expected = evaluate(
        bundle.model,
        task.tokenized_test(cfg),
        bundle.pad_id,
        task.choice_ids_for(cfg),
        cfg.train.eval_batch_size,
        use_bf16(cfg.train.precision),
    )
    yield run_dir, moved, expected
    load_adapter_state(bundle.model, bundle.initial_adapter)


def test_the_saved_adapter_names_a_portable_base_and_loads_onto_it_with_stock_peft(trained):
    run_dir, moved, _ = trained
    config = json.loads((run_dir / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"].startswith("fedllm:tiny?")  # no machine-specific cache path
    bundle = task.model_bundle(tiny_config().model, tiny_config().lora, 0)
    # the live (cached) model keeps the name it was loaded with
    assert not (bundle.model.peft_config["default"].base_model_name_or_path or "").startswith("fedllm:")
    base = base_for_adapter(run_dir / "adapter", device="cpu")
    fresh = PeftModel.from_pretrained(base, str(run_dir / "adapter"))
    ids = torch.tensor([[5, 17, 99, 3]])
    with torch.no_grad():
        assert torch.allclose(fresh(input_ids=ids).logits, bundle.model(input_ids=ids).logits, atol=1e-5)


def test_the_model_card_states_base_prompt_privacy_and_results(trained):
    card = (trained[0] / "adapter" / "README.md").read_text()
    assert "fedllm:tiny?" in card and "Review: {prompt}" in card
    assert "(7.912, 1e-05)-DP by the prv accountant" in card
    assert "| accuracy | 0.5 | 0.61 |" in card
    assert "perplexity" not in card.split("## Results")[1].split("## Load")[0]  # not measured: not claimed
    cfg = tiny_config(privacy=type(tiny_config().privacy)(mode="none"))
    assert "No differential privacy" in model_card(cfg, RunSummary(), "x")


def test_evaluate_reproduces_the_servers_figures_from_the_folder_alone(trained, capsys):
    run_dir, _, expected = trained
    bundle = task.model_bundle(tiny_config().model, tiny_config().lora, 0)
    load_adapter_state(bundle.model, bundle.initial_adapter)  # the loader must bring the weights back
    result = evaluate_run(load_finished_run(run_dir, None), task.tokenized_test(tiny_config()))
    assert (result.loss, result.accuracy) == pytest.approx((expected.loss, expected.accuracy), abs=1e-6)
    assert main(["evaluate", str(run_dir), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["eval_loss"] == pytest.approx(expected.loss, abs=1e-6)


def test_a_tampered_or_sealed_adapter_is_not_loaded_silently(trained, tmp_path):
    run_dir, moved, _ = trained
    weights = run_dir / "adapter" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1] + b"\0")
    with pytest.raises(IntegrityError, match="altered"):
        load_finished_run(run_dir, None)
    bundle = task.model_bundle(tiny_config().model, tiny_config().lora, 0)
    save_adapter(bundle.model, tmp_path / "sealed", KEY)
    with pytest.raises(IntegrityError, match="encryption key"):
        read_adapter_weights(tmp_path / "sealed", None)
    plain = read_adapter_weights(tmp_path / "sealed", KEY)
    assert len(plain) == len(adapter_state(bundle.model))


def test_evaluate_names_a_folder_that_is_not_a_finished_run(tmp_path, capsys):
    assert main(["evaluate", str(tmp_path)]) == 1
    assert "not a finished run" in capsys.readouterr().err


def test_generate_answers_in_the_runs_prompt_format(trained, capsys):
    run_dir, _, _ = trained
    assert main(["generate", str(run_dir), "a fine film", "--max-new-tokens", "3"]) == 0
    with_template = capsys.readouterr().out
    assert main(["generate", str(run_dir), "a fine film", "--max-new-tokens", "3", "--raw"]) == 0
    raw = capsys.readouterr().out
    # greedy decoding: the same input gives the same text, and the template changes the input
    assert main(["generate", str(run_dir), "a fine film", "--max-new-tokens", "3"]) == 0
    assert capsys.readouterr().out == with_template
    assert with_template.strip() and raw.strip()
    with pytest.raises(SystemExit) as refused:
        main(["generate", str(run_dir), "x", "--max-new-tokens", "0"])
    assert refused.value.code == 2


def test_evaluate_and_generate_compare_the_adapter_with_the_base_model(trained, capsys):
    # issue 29: no base-model comparison; `eval_accuracy None` printed for a free-form task
    run_dir, _, expected = trained
    assert main(["evaluate", str(run_dir), "--json", "--compare-base"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["eval_loss"] == pytest.approx(expected.loss, abs=1e-6)
    assert "eval_accuracy" in printed and printed["base_eval_loss"] != pytest.approx(expected.loss, abs=1e-3)
    # the base model is what the initial adapter computes (LoRA's B starts at 0)
    finished = load_finished_run(run_dir, None)
    load_adapter_state(finished.bundle.model, finished.bundle.initial_adapter)
    base = evaluate_run(finished, task.tokenized_test(tiny_config()))
    assert printed["base_eval_loss"] == pytest.approx(base.loss, abs=1e-5)
    assert main(["generate", str(run_dir), "a fine film", "--max-new-tokens", "3", "--compare-base"]) == 0
    captured = capsys.readouterr()
    assert "\nadapter: " in captured.out and "\nbase:    " in captured.out
    assert "up to 3 tokens for each of 1 prompt(s), then the same without the adapter" in captured.err


def test_evaluate_prints_no_accuracy_for_free_form_answers():
    from fedllm.cli.use import _figures
    from fedllm.evaluation.metrics import EvalResult

    assert "eval_accuracy" not in _figures(EvalResult(loss=4.0, accuracy=None, examples=20))
    assert _figures(EvalResult(loss=0.4, accuracy=0.8, examples=20))["eval_accuracy"] == 0.8
