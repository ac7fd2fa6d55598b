"""A coordinator's crafted global adapter that makes one token overflow (issue 23's NaN oracle).

The coordinator knows the public base model and, as DP's adversary may, every record but the
target's. It sets layer 0's ``q_proj`` LoRA so that the query of the target token is +inf (RoPE
then makes it NaN), while every token of the other records gets a finite query: the A row is the
part of the target's normalised embedding orthogonal to all other tokens' (zero on them up to
rounding). The NaN spreads through layer 1 to the scored position, so a record holding the
token has a NaN loss and a NaN gradient; every other record stays finite.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from fedllm import task
from fedllm.config import ExperimentConfig
from fedllm.data.formatting import TokenizedDataset

OVERFLOW = 1e39  # above float32's largest value (3.4e38): the target's query is inf


def token_ids(shard: TokenizedDataset) -> set[int]:
    """Every token id that occurs in ``shard``'s records."""
    return {int(token) for input_ids, _, _ in shard.items for token in input_ids.tolist()}


def nan_adapter(cfg: ExperimentConfig, target: int, others: Iterable[int]) -> dict[str, torch.Tensor]:
    """The initial adapter of ``cfg``'s model with layer 0's query adapter crafted against ``target``.

    Args:
        cfg: the run's config (the base model, LoRA settings and seed the node will use).
        target: the token whose query must overflow.
        others: every token that must keep a finite query (fewer than the hidden size).
    """
    bundle = task.model_bundle(cfg.model, cfg.lora, cfg.seed)
    base = bundle.model.get_base_model()
    ids = [target, *sorted(set(others) - {target})]
    with torch.no_grad():
        layer = base.model.layers[0]
        rows = layer.input_layernorm(base.model.embed_tokens.weight[ids].float().unsqueeze(0))[0].double()
    basis, _ = torch.linalg.qr(rows[1:].T)  # orthonormal basis of the other tokens' inputs to q_proj
    direction = rows[0] - basis @ (basis.T @ rows[0])
    direction = direction / direction.norm()
    along = float(direction @ rows[0])
    scaling = cfg.lora.alpha / cfg.lora.r
    half = math.sqrt(OVERFLOW / (along * scaling))  # A and B each stay finite in float32
    adapter = {name: tensor.clone() for name, tensor in bundle.initial_adapter.items()}
    prefix = "base_model.model.model.layers.0.self_attn.q_proj"
    a, b = adapter[f"{prefix}.lora_A.weight"], adapter[f"{prefix}.lora_B.weight"]
    a.zero_()
    a[0] = (direction * half).float()
    b.zero_()
    b[:, 0] = half
    return adapter
