"""Per-example losses: the training objective follows the data.

* ``token``: the usual next-token loss on the answer tokens (prompt masked).
* ``choices``: cross-entropy over just the scores of the fixed answers at the position
  right after the prompt. Under DP-SGD this spends the noisy gradient on the task rather
  than on learning the answer format (several points of accuracy at the same epsilon on the
  default task; see docs/benchmarks.md).

Both return one loss per example, so per-sample gradients stay exact.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fedllm.config import Objective
from fedllm.data.formatting import IGNORE_INDEX


def last_logits(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Logits at the final (prompt-end) position only: shape ``(batch, vocab)``."""
    out = model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        position_ids=batch["position_ids"],
        logits_to_keep=1,
    )
    return out.logits[:, -1, :].float()


def choices_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor], choice_ids: list[int]) -> torch.Tensor:
    """Per-example cross-entropy over the fixed answers' logits (batch from a prompt-only collate)."""
    scores = last_logits(model, batch)[:, choice_ids]
    return F.cross_entropy(scores, batch["choice"], reduction="none")


def token_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Per-example mean next-token loss over the answer tokens."""
    out = model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], position_ids=batch["position_ids"]
    )
    logits = out.logits[:, :-1, :].float()
    targets = batch["labels"][:, 1:]
    per_token = F.cross_entropy(logits.transpose(1, 2), targets, ignore_index=IGNORE_INDEX, reduction="none")
    counts = (targets != IGNORE_INDEX).sum(dim=1).clamp(min=1)
    return per_token.sum(dim=1) / counts


def per_example_loss(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], objective: Objective, choice_ids: list[int]
) -> torch.Tensor:
    """Dispatch on ``train.objective``."""
    if objective == "choices":
        return choices_loss(model, batch, choice_ids)
    return token_loss(model, batch)
