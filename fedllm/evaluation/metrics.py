"""Held-out evaluation of the global adapter: answer loss, perplexity and fixed-answer accuracy.

Free-form answers are scored per token, as language-model perplexity is usually reported: the
loss is the total negative log-likelihood of every held-out answer token divided by the number
of those tokens (long answers weigh more than short ones), and perplexity is its exp. A mean of
per-record means would weigh a 3-token answer like a 50-token one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fedllm.data.formatting import IGNORE_INDEX, TokenizedDataset, make_collate
from fedllm.evaluation.progress import Progress
from fedllm.model.device import model_device, to_device
from fedllm.training.objectives import last_logits, token_loss
from fedllm.training.precision import autocast


@dataclass(frozen=True)
class EvalResult:
    """A held-out evaluation.

    ``loss`` (nats): with fixed answers, the mean over records of the answer cross-entropy; without,
    the mean NLL per answer token (``tokens`` of them). ``loss_stderr`` is its standard error over
    records (None for a single record): records are the independent units, so for the per-token
    loss it is the ratio estimator's (delta method), not a count of tokens as if each were independent.
    """

    loss: float
    accuracy: float | None
    examples: int
    tokens: int | None = None
    loss_stderr: float | None = None

    @property
    def perplexity(self) -> float:
        """exp(loss): per answer token for free-form answers."""
        return math.exp(self.loss) if self.loss < 50 else float("inf")

    @property
    def perplexity_stderr(self) -> float | None:
        """Standard error of the perplexity, by the delta method: perplexity x ``loss_stderr``."""
        if self.loss_stderr is None or math.isinf(self.perplexity):
            return None
        return self.perplexity * self.loss_stderr


def mean_stderr(values: torch.Tensor) -> tuple[float, float | None]:
    """The mean of per-record ``values`` and its standard error (sample std / sqrt(n); None for n < 2)."""
    values = values.double()
    n = values.numel()
    stderr = float(values.std(correction=1) / math.sqrt(n)) if n > 1 else None
    return float(values.mean()), stderr


def ratio_stderr(nll_sums: torch.Tensor, counts: torch.Tensor) -> tuple[float, float | None]:
    """Per-token mean NLL ``sum(nll) / sum(tokens)`` over records and its standard error.

    The records (not the tokens) are the independent draws, so the standard error is the ratio
    estimator's: sqrt(sum_i (s_i - L c_i)^2 / (n (n - 1))) / mean(c), for record ``i`` with NLL
    sum ``s_i`` over ``c_i`` tokens and ``L`` the per-token mean (Cochran, Sampling Techniques, 6.2).
    """
    sums, counts = nll_sums.double(), counts.double()
    n, total = sums.numel(), float(counts.sum())
    if total == 0:
        return float("nan"), None
    loss = float(sums.sum()) / total
    if n < 2:
        return loss, None
    residuals = sums - loss * counts
    return loss, math.sqrt(float((residuals**2).sum()) / (n * (n - 1))) / (total / n)


def answer_nll(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per record: the summed NLL of its answer tokens and how many there are.

    The training loss (:func:`token_loss`, a per-record mean) times each record's count, so the
    evaluation scores exactly what the token objective trains.
    """
    counts = (batch["labels"][:, 1:] != IGNORE_INDEX).sum(dim=1)
    return token_loss(model, batch).double() * counts, counts


@torch.no_grad()
def evaluate(
    model: torch.nn.Module, dataset: TokenizedDataset, pad_id: int, choice_ids: list[int], batch_size: int, bf16: bool
) -> EvalResult:
    """Evaluate on ``dataset``.

    With fixed answers (``choice_ids``): the loss is the cross-entropy of the correct answer
    among the answers' scores after the prompt (the classification loss; 0.693 = chance for
    two answers), averaged over records, and accuracy compares those scores (the most likely
    answer wins). Without: the NLL per answer token over all records (see the module docstring).
    """
    was_training = model.training
    model.eval()
    # batch similar lengths together: far less padding, same results
    order = sorted(range(len(dataset)), key=lambda i: len(dataset[i][0]))
    collate = make_collate(pad_id, prompt_only=bool(choice_ids))
    losses, counts, correct = [], [], 0
    device = model_device(model)
    progress = Progress("held-out evaluation", len(order), "records")
    for start in range(0, len(order), batch_size):
        batch = to_device(collate([dataset[i] for i in order[start : start + batch_size]]), device)
        with autocast(bf16, device.type):
            if choice_ids:
                scores = last_logits(model, batch)[:, choice_ids]
                losses.append(F.cross_entropy(scores, batch["choice"], reduction="none").cpu())
                correct += int((scores.argmax(dim=1) == batch["choice"]).sum())
            else:
                nll, count = answer_nll(model, batch)
                losses.append(nll.cpu())
                counts.append(count.cpu())
        progress.advance(len(order[start : start + batch_size]))
    model.train(was_training)
    n = len(dataset)
    if choice_ids:
        loss, stderr = mean_stderr(torch.cat(losses))
        return EvalResult(loss=loss, accuracy=correct / n, examples=n, loss_stderr=stderr)
    tokens = torch.cat(counts)
    loss, stderr = ratio_stderr(torch.cat(losses), tokens)
    return EvalResult(loss=loss, accuracy=None, examples=n, tokens=int(tokens.sum()), loss_stderr=stderr)
