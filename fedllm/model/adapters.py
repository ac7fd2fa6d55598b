"""Adapter-only state: the only tensors that ever cross the wire."""

from __future__ import annotations

import torch
from peft import PeftModel, get_peft_model_state_dict, set_peft_model_state_dict


def adapter_state(model: PeftModel) -> dict[str, torch.Tensor]:
    """A detached CPU copy of the adapter weights, keyed by PEFT parameter names."""
    return {k: v.detach().cpu().clone() for k, v in get_peft_model_state_dict(model).items()}


def load_adapter_state(model: PeftModel, state: dict[str, torch.Tensor]) -> None:
    """Set the adapter weights; every expected name must be present with the right shape.

    Raises:
        ValueError: names or shapes differ from the model's adapters.
    """
    expected = get_peft_model_state_dict(model)
    if set(state) != set(expected):
        missing = sorted(set(expected) - set(state))[:3]
        extra = sorted(set(state) - set(expected))[:3]
        raise ValueError(f"adapter names differ: missing {missing}, unexpected {extra}")
    for name, tensor in state.items():
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise ValueError(f"{name}: shape {tuple(tensor.shape)}, expected {tuple(expected[name].shape)}")
    set_peft_model_state_dict(model, {k: v.to(torch.float32) for k, v in state.items()})
