"""Adapter-only state: the only tensors that ever cross the wire."""

from __future__ import annotations

import torch
from peft import PeftModel, get_peft_model_state_dict, set_peft_model_state_dict

from fedllm.errors import ModelError


def adapter_state(model: PeftModel) -> dict[str, torch.Tensor]:
    """A detached CPU copy of the trainable adapter weights, keyed by PEFT parameter names.

    With standard LoRA that is every adapter tensor; with ``lora.freeze_a`` (FFA-LoRA) only the
    B matrices: the frozen A matrices are the same seeded initialisation on every node.
    """
    suffix = f".{model.active_adapter}"
    trainable = {name.replace(suffix, "") for name, param in model.named_parameters() if param.requires_grad}
    return {k: v.detach().cpu().clone() for k, v in get_peft_model_state_dict(model).items() if k in trainable}


def load_adapter_state(model: PeftModel, state: dict[str, torch.Tensor]) -> None:
    """Set the adapter weights; every expected name must be present with the right shape.

    Raises:
        ModelError: names or shapes differ from the model's adapters.
    """
    expected = adapter_state(model)
    if set(state) != set(expected):
        missing = sorted(set(expected) - set(state))[:3]
        extra = sorted(set(state) - set(expected))[:3]
        raise ModelError(f"adapter names differ: missing {missing}, unexpected {extra}")
    for name, tensor in state.items():
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise ModelError(f"{name}: shape {tuple(tensor.shape)}, expected {tuple(expected[name].shape)}")
    set_peft_model_state_dict(model, {k: v.to(torch.float32) for k, v in state.items()})
