"""Train the adapters for N local steps, with or without DP-SGD; knows nothing of Flower."""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol

import torch
from torch.utils.data import DataLoader, Dataset

from fedllm.config import AccountantName, GradSampleMode, Objective, OptimizerName
from fedllm.errors import ConfigError
from fedllm.model.device import model_device, to_device
from fedllm.privacy import dpsgd
from fedllm.privacy.accounting import History
from fedllm.privacy.randomness import dp_randomness, node_dropout, torch_generator
from fedllm.training.microbatches import REAL, fixed_shape_chunks, rows_per_micro_batch
from fedllm.training.objectives import per_example_loss
from fedllm.training.precision import autocast


@dataclass(frozen=True)
class LocalSpec:
    """How to train locally this round.

    ``seed``: None (the default, what a node uses) draws the Poisson batches and the DP noise
    from fresh OS entropy on every call, which nobody can reproduce; an int reproduces them bit
    for bit, for research simulations only (no guarantee against anyone who knows it).

    ``max_length``: the run's ``data.max_length``. Under DP-SGD (required there) every row is
    padded to it and computed in micro-batches of ``ceil(batch_size / micro_batches)`` rows
    (:mod:`fedllm.training.microbatches`), so a step's compute follows its Poisson batch size
    only. Without DP (no privacy claim) batches are trimmed to their records instead.
    """

    steps: int
    batch_size: int
    lr: float
    weight_decay: float
    objective: Objective
    bf16: bool
    seed: int | None = None
    micro_batches: int = 1
    optimizer: OptimizerName = "adamw"  # or "sgd": plain SGD, the update then linear in the noisy gradients
    max_length: int | None = None


class GradientOverride(Protocol):
    """Replaces some rows' gradients with designed ones (``fedllm audit``'s gradient canaries)."""

    def keep(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Per row: 1 if its own loss trains, 0 if its gradient is designed instead."""

    def replace_samples(self, batch: dict[str, torch.Tensor]) -> None:
        """Under DP-SGD, before clipping: overwrite the designed rows' per-sample gradients."""

    def add_to_grads(self, batch: dict[str, torch.Tensor], total: int) -> None:
        """Without DP: add the designed rows' gradients to the batch-mean gradient."""


@dataclass(frozen=True)
class DPSpec:
    """DP-SGD settings for this round (the sample rate follows from the loader)."""

    noise_multiplier: float
    max_grad_norm: float
    accountant: AccountantName
    grad_sample_mode: GradSampleMode


@dataclass(frozen=True)
class LocalResult:
    """What a round of local training produced."""

    mean_loss: float
    steps: int
    examples_seen: int
    seconds: float
    history: History
    nonfinite: int = 0  # per-sample gradients zeroed for holding inf or NaN (DP only; never sent)


def train_local(
    model: torch.nn.Module,
    dataset: Dataset,
    collate: Callable,
    spec: LocalSpec,
    choice_ids: list[int],
    dp: DPSpec | None = None,
    history: History | None = None,
    override: GradientOverride | None = None,
) -> LocalResult:
    """Run ``spec.steps`` optimizer steps on the trainable (adapter) parameters.

    Args:
        model: PEFT model; only adapter parameters require grad.
        dataset: the client's tokenized shard.
        collate: batch builder for the objective (under DP it must accept an empty list).
        spec: local hyper-parameters.
        choice_ids: token ids of the fixed answers (``choices`` objective).
        dp: DP-SGD settings, or None for non-private training.
        history: the client's DP history before this round (DP only).
        override: designed gradients for some records (an audit's canaries), or None.

    Returns:
        The mean loss over steps, examples seen and the DP history after the round.

    Raises:
        ConfigError: DP-SGD without ``spec.max_length`` (its steps would follow the records' lengths).
    """
    if dp is not None and spec.max_length is None:
        raise ConfigError(
            "DP-SGD pads every record to a width fixed before reading the data: set LocalSpec.max_length "
            "(the run's data.max_length)"
        )
    randomness = dp_randomness(spec.seed)  # fresh OS entropy unless seeded (research only)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(spec, params)
    model.train()  # Opacus refuses a model in eval mode
    started = time.perf_counter()
    session = None
    if dp is None:
        loader = DataLoader(
            dataset,
            batch_size=spec.batch_size,
            shuffle=True,
            collate_fn=collate,
            generator=torch_generator(randomness.sampling),
        )
    else:
        session = dpsgd.start_round(
            model=model,
            optimizer=optimizer,
            dataset=dataset,
            batch_size=spec.batch_size,
            collate=collate,
            noise_multiplier=dp.noise_multiplier,
            max_grad_norm=dp.max_grad_norm,
            history=list(history or []),
            accountant=dp.accountant,
            grad_sample_mode=dp.grad_sample_mode,
            randomness=randomness,
        )
        optimizer, loader = session.optimizer, session.loader
    try:
        with node_dropout(randomness):
            losses, seen = _run_steps(model, optimizer, loader, spec, choice_ids, session, override)
        new_history = session.history() if session else list(history or [])
    finally:
        optimizer.zero_grad(set_to_none=True)
        if session is not None:
            session.close()  # last: the DP optimizer's zero_grad re-creates grad_sample attributes
    mean_loss = sum(losses) / len(losses) if losses else float("nan")
    return LocalResult(
        mean_loss=mean_loss,
        steps=spec.steps,
        examples_seen=seen,
        seconds=time.perf_counter() - started,
        history=new_history,
        nonfinite=session.nonfinite if session else 0,
    )


def make_optimizer(spec: LocalSpec, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    """A fresh optimizer for the round: AdamW, or plain SGD (no momentum)."""
    if spec.optimizer == "sgd":
        return torch.optim.SGD(params, lr=spec.lr, weight_decay=spec.weight_decay)
    return torch.optim.AdamW(params, lr=spec.lr, weight_decay=spec.weight_decay)


def _batches(loader: DataLoader) -> Iterator:
    """Batches forever: one Poisson draw (or shuffled pass) after another."""
    while True:
        yield from loader


def split_by_length(batch: dict[str, torch.Tensor], parts: int) -> list[dict[str, torch.Tensor]]:
    """Split a left-padded batch into up to ``parts`` chunks of similar length, each trimmed
    of the padding columns it does not need (batches mix short and long records; computing
    them in length-sorted chunks wastes far less compute on padding).

    Non-private training only: the chunks' shapes follow the records' lengths, so the time a
    step takes would reveal them (DP-SGD uses :func:`fedllm.training.microbatches.fixed_shape_chunks`)."""
    lengths = batch["attention_mask"].sum(dim=1)
    order = torch.argsort(lengths)
    chunks = []
    for rows in torch.tensor_split(order, min(parts, len(order))):
        width = int(lengths[rows].max())
        chunks.append({k: v[rows][:, -width:] if v.dim() == 2 else v[rows] for k, v in batch.items()})
    return chunks


def _run_steps(
    model, optimizer, loader, spec: LocalSpec, choice_ids, session, override: GradientOverride | None
) -> tuple[list[float], int]:
    losses: list[float] = []
    seen = 0
    batches = _batches(loader)
    for _ in range(spec.steps):
        batch = next(batches)
        size = len(batch["input_ids"]) if isinstance(batch, dict) else 0
        if size == 0:
            # an empty Poisson batch is still a DP step: noise is added and accounted
            session.empty_step()
            continue
        losses.append(_step(model, optimizer, _chunks(batch, spec, session), spec, choice_ids, session, override))
        seen += size
    return losses, seen


def _chunks(batch: dict[str, torch.Tensor], spec: LocalSpec, session) -> list[dict[str, torch.Tensor]]:
    """DP: fixed-shape micro-batches (data-independent compute); otherwise length-sorted chunks."""
    if session is None:
        return split_by_length(batch, spec.micro_batches)
    assert spec.max_length is not None  # checked by train_local
    return fixed_shape_chunks(batch, rows_per_micro_batch(spec.batch_size, spec.micro_batches), spec.max_length)


def micro_batch_losses(
    model: torch.nn.Module,
    chunk: dict[str, torch.Tensor],
    spec: LocalSpec,
    choice_ids: list[int],
    override: GradientOverride | None = None,
) -> torch.Tensor:
    """Per-row losses of one micro-batch (on the model's device), as a step trains on them.

    Args:
        model: the PEFT model.
        chunk: one micro-batch (a DP one has a ``real`` column: a dummy row's loss is zeroed).
        spec: local hyper-parameters (objective, bf16 autocast).
        choice_ids: token ids of the fixed answers.
        override: an audit's designed gradients, whose rows' own losses are zeroed.

    Returns:
        One loss per row; under DP the mean of it is what a backward pass takes.
    """
    with autocast(spec.bf16, model_device(model).type):
        per_example = per_example_loss(model, chunk, spec.objective, choice_ids)
    if REAL in chunk:
        per_example = per_example * chunk[REAL].to(per_example.dtype)
    if override is not None:
        per_example = per_example * override.keep(chunk).to(per_example.device)
    return per_example


def _step(
    model,
    optimizer,
    chunks,
    spec: LocalSpec,
    choice_ids,
    session: dpsgd.DPRound | None,
    override: GradientOverride | None = None,
) -> float:
    """One optimizer step over a batch given as chunks (fixed-shape under DP, length-sorted otherwise).

    Under DP every chunk's per-sample gradients are clipped and summed by Opacus
    (``signal_skip_step`` defers the update); noise is added once and the sum divided by
    the expected batch size, exactly as for the unsplit Poisson batch. Without DP the
    chunk losses are weighted so the gradient is that of the whole batch's mean loss. A dummy
    row (``real`` 0) has its loss multiplied by zero: exactly zero per-sample gradient, and it
    counts in neither the loss nor the batch.
    """
    total = sum(_real_rows(c) for c in chunks)
    loss_sum = 0.0
    device = model_device(model)
    for index, chunk in enumerate(chunks):
        chunk = to_device(chunk, device)
        per_example = micro_batch_losses(model, chunk, spec, choice_ids, override)
        last = index == len(chunks) - 1
        if session is not None:
            with warnings.catch_warnings():
                # torch warns on every backward that Opacus's hooks sit on modules whose inputs are
                # frozen activations: expected with LoRA on a frozen base model, and harmless
                warnings.filterwarnings("ignore", message="Full backward hook is firing", category=UserWarning)
                per_example.mean().backward()
            session.fp32_grad_samples()
            if override is not None:
                override.replace_samples(chunk)
            if not last:
                optimizer.signal_skip_step(do_skip=True)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
        else:
            (per_example.sum() / total).backward()
            if override is not None:
                override.add_to_grads(chunk, total)
        loss_sum += float(per_example.detach().sum())
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss_sum / total


def _real_rows(chunk: dict[str, torch.Tensor]) -> int:
    """Rows of ``chunk`` that hold a record (a DP micro-batch's dummy rows do not count)."""
    return int(chunk[REAL].sum()) if REAL in chunk else len(chunk["input_ids"])
