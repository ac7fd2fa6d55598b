"""Wrap a base model with PEFT LoRA adapters and freeze everything else."""

from __future__ import annotations

import torch
from peft import LoraConfig, PeftModel, get_peft_model

from fedllm.config import LoraSettings
from fedllm.errors import ConfigError, ModelError


def apply_lora(model: torch.nn.Module, settings: LoraSettings) -> PeftModel:
    """Add LoRA adapters to ``model``; only ``lora_`` parameters stay trainable.

    Raises:
        ConfigError: a target module does not exist in the model.
    """
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [m for m in settings.target_modules if m not in names]
    if missing:
        raise ConfigError(
            f"lora.target_modules: {missing} not found in the model; it has e.g. "
            f"{sorted(n for n in names if n.endswith('proj'))}"
        )
    config = LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=list(settings.target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(model, config)
    if settings.freeze_a:
        # FFA-LoRA: A stays at its (seeded, hence identical on every node) initialisation and only
        # B trains, so averaging B averages the product BA exactly and halves what is sent and noised
        for name, param in peft_model.named_parameters():
            if "lora_A" in name:
                param.requires_grad_(False)
    assert_only_adapters_trainable(peft_model)
    return peft_model


def assert_only_adapters_trainable(model: torch.nn.Module) -> None:
    """Fail loudly if any non-LoRA parameter would be trained (it would then leak and be sent)."""
    wrong = [n for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n]
    if wrong:
        raise ModelError(f"non-adapter parameters are trainable: {wrong[:5]}")
    if not any(p.requires_grad for p in model.parameters()):
        raise ModelError("no trainable adapter parameters: check lora.target_modules against the model's layers")
