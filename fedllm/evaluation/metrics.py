"""Held-out evaluation of the global adapter: answer loss and fixed-answer accuracy."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fedllm.data.formatting import TokenizedDataset, make_collate
from fedllm.model.device import model_device, to_device
from fedllm.training.objectives import last_logits, token_loss
from fedllm.training.precision import autocast


@dataclass(frozen=True)
class EvalResult:
    """Mean held-out loss (nats), its exp, and accuracy if the task has fixed answers."""

    loss: float
    accuracy: float | None
    examples: int

    @property
    def perplexity(self) -> float:
        """exp(loss)."""
        return math.exp(self.loss) if self.loss < 50 else float("inf")


@torch.no_grad()
def evaluate(model: torch.nn.Module, dataset: TokenizedDataset, pad_id: int, choice_ids: list[int],
             batch_size: int, bf16: bool) -> EvalResult:
    """Evaluate on ``dataset``.

    With fixed answers (``choice_ids``): the loss is the cross-entropy of the correct answer
    among the answers' scores after the prompt (the classification loss; 0.693 = chance for
    two answers), and accuracy compares those scores (the most likely answer wins).
    Without: the mean NLL of the answer tokens.
    """
    was_training = model.training
    model.eval()
    # batch similar lengths together: far less padding, same results
    order = sorted(range(len(dataset)), key=lambda i: len(dataset[i][0]))
    collate = make_collate(pad_id, prompt_only=bool(choice_ids))
    total_loss, correct = 0.0, 0
    device = model_device(model)
    for start in range(0, len(order), batch_size):
        batch = to_device(collate([dataset[i] for i in order[start:start + batch_size]]), device)
        with autocast(bf16, device.type):
            if choice_ids:
                scores = last_logits(model, batch)[:, choice_ids]
                total_loss += float(F.cross_entropy(scores, batch["choice"], reduction="sum"))
                predicted = scores.argmax(dim=1)
                correct += int((predicted == batch["choice"]).sum())
            else:
                total_loss += float(token_loss(model, batch).sum())
    model.train(was_training)
    n = len(dataset)
    return EvalResult(loss=total_loss / n, accuracy=correct / n if choice_ids else None, examples=n)
