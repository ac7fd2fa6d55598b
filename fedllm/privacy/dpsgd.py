"""Opacus wiring for one round of DP-SGD on a PEFT model that lives across rounds.

Each round builds a fresh PrivacyEngine whose accountant is loaded with the client's
full history first, so epsilon composes over every round (a fresh accountant per round
would report one round's epsilon only). The model is not wrapped
(``wrap_model=False``): adapter names stay as PEFT writes them, and ``close()`` removes
every hook and per-sample attribute Opacus attached, so nothing leaks into the next round
or the next client served by the same process.

Opacus clips, scales and accounts; the node's own randomness (:mod:`fedllm.privacy.randomness`)
decides the Poisson batches and draws the noise. Opacus's ``DPDataLoader`` is not used: it
sizes its sampler as ``int(1 / sample_rate)``, which is ``k - 1`` for ``k`` = 93, 99, 105, ...
batches (the accounted rate then disagrees with the planned one), and it samples on float32
uniforms. Our loader has exactly ``ceil(N / b)`` batches, so Opacus's accountant records
``1 / len(loader)``, the planner's rate, and the optimizer divides by the expected batch size
``int(N * q)`` as Opacus does for its own Poisson batches. N is the shard's own size unless the
shard comes as a :class:`SamplingShard`: a node samples its records at the public record count of
its node config (``sampling-size``), so the rate, the step count and the divisor are the same
whatever number of records it holds (docs/threat-model.md, "Neighbouring relation").
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from opacus import PrivacyEngine
from opacus.grad_sample.gsm_base import AbstractGradSampleHooks
from opacus.optimizers import DPOptimizer
from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed
from torch.utils.data import DataLoader, Dataset

from fedllm.config import AccountantName, GradSampleMode
from fedllm.errors import ConfigError
from fedllm.privacy.accounting import History, normalise_history
from fedllm.privacy.lora_grad_sample import LoraGradSampler
from fedllm.privacy.randomness import DPRandomness, GaussianNoise, PoissonBatchSampler


class NodeNoiseDPOptimizer(DPOptimizer):
    """Opacus's DPOptimizer with the Gaussian noise drawn from the node's noise stream.

    Why a subclass: Opacus draws its noise from a ``torch.Generator`` (reproducible by anyone
    who learns its seed) or, in its secure mode, from ``torchcsprng`` (no wheel for torch 2.13).
    Only the draw changes; per-sample clipping, the division by the expected batch size and
    the accountant's step hook are Opacus's own, taken over from the optimizer
    ``make_private`` built.
    """

    def __init__(self, built: DPOptimizer, noise: GaussianNoise, expected_batch_size: int | None = None):
        """
        Args:
            built: the optimizer ``make_private`` returned (flat clipping, one process).
            noise: the node's noise source.
            expected_batch_size: what the noised sum is divided by (default: Opacus's, from the
                loader's dataset length; a node's comes from its sampling size instead).

        Raises:
            ConfigError: ``built`` is another Opacus optimizer (per-layer, ghost, distributed),
                whose noise this class would not reproduce faithfully.
        """
        if type(built) is not DPOptimizer:
            raise ConfigError(
                f"node-side noise supports Opacus's DPOptimizer only, got {type(built).__name__}; "
                "use privacy.grad_sample_mode=hooks or functorch"
            )
        super().__init__(
            built.original_optimizer,
            noise_multiplier=built.noise_multiplier,
            max_grad_norm=built.max_grad_norm,
            expected_batch_size=built.expected_batch_size if expected_batch_size is None else expected_batch_size,
            loss_reduction=built.loss_reduction,
        )
        self.attach_step_hook(built.step_hook)  # the accountant: one step per (possibly empty) batch
        self.noise = noise

    def scale_grad(self) -> None:
        """Divide the noised sum by the expected batch size, as Opacus does, with its
        ``accumulated_iterations`` (a scan of every parameter) computed once per step instead
        of once per parameter."""
        if self.loss_reduction == "mean":
            divisor = self.expected_batch_size * self.accumulated_iterations
            for p in self.params:
                p.grad /= divisor

    def add_noise(self) -> None:
        """Add the node's noise to the clipped sum, as Opacus does with its own draw."""
        std = self.noise_multiplier * self.max_grad_norm
        for p in self.params:
            _check_processed_flag(p.summed_grad)  # Opacus's guard: no clipped sum is noised twice
        # the step's noise for every tensor, in parameter order: the same values as one ``like``
        # per tensor (what a coordinator regenerating seeded noise computes), one reused buffer
        noises = self.noise.like_many([p.summed_grad for p in self.params], std)
        for p, noise in zip(self.params, noises, strict=True):
            p.grad = (p.summed_grad + noise).view_as(p)
            _mark_as_processed(p.summed_grad)


@dataclass
class DPRound:
    """Live Opacus objects for one round; call :meth:`close` when the round ends."""

    engine: PrivacyEngine
    hooks: AbstractGradSampleHooks | LoraGradSampler
    optimizer: NodeNoiseDPOptimizer
    loader: DataLoader
    nonfinite: int = 0  # per-sample gradients zeroed this round for holding inf or NaN (the node's log only)

    def history(self) -> History:
        """The accountant's full history, including the steps just taken."""
        return normalise_history(self.engine.accountant.history)

    def empty_step(self) -> None:
        """Take a DP step on an empty Poisson batch: zero gradient plus noise, still accounted."""
        for param in self.optimizer.params:
            param.grad_sample = torch.zeros((0, *param.shape), dtype=param.dtype, device=param.device)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def fp32_grad_samples(self) -> None:
        """Per-sample gradients in fp32, with every non-finite one zeroed, before Opacus clips them.

        Under bf16 autocast Opacus computes them in bf16, and a norm taken in bf16 can be ~0.4%
        low: the clipped gradient could then exceed ``max_grad_norm``, the sensitivity the
        accountant assumes. In fp32 the clipping bound holds for the values that were computed.

        A record whose gradient holds an inf or NaN in any adapter tensor (a crafted global
        adapter can overflow on one token: issue 23) gets a zero gradient in every tensor: it then
        contributes nothing to the sum, so the sum's sensitivity stays ``max_grad_norm``, while
        clipping would have let the NaN through (``inf * 0``) and made the whole update a
        membership oracle. Each row's gradient depends on that row alone, so which rows are
        zeroed depends on each record alone. The count stays on the node (:attr:`nonfinite`).
        """
        passes: dict[int, list[torch.Tensor]] = {}  # backward pass -> its per-sample gradients, one per parameter
        for param in self.optimizer.params:
            samples = getattr(param, "grad_sample", None)
            if isinstance(samples, list):
                param.grad_sample = [s.float() for s in samples]
                for index, tensor in enumerate(param.grad_sample):
                    passes.setdefault(index, []).append(tensor)
            elif samples is not None:
                if samples.dtype != torch.float32:
                    param.grad_sample = samples.float()
                passes.setdefault(0, []).append(param.grad_sample)
        self.nonfinite += sum(zero_nonfinite_rows(tensors) for tensors in passes.values())

    def close(self) -> None:
        """Remove Opacus hooks and per-sample gradient attributes from the model."""
        self.hooks.cleanup()


def zero_nonfinite_rows(samples: list[torch.Tensor]) -> int:
    """Zero, in place and in every tensor, each row (sample) that is non-finite in any of them.

    Args:
        samples: one backward pass's per-sample gradients, one tensor per parameter, each with
            the batch as its first dimension.

    Returns:
        How many rows were zeroed.
    """
    if not samples:
        return 0
    rows = samples[0].shape[0]
    finite = torch.ones(rows, dtype=torch.bool, device=samples[0].device)
    for tensor in samples:
        finite &= torch.isfinite(tensor).reshape(rows, -1).all(dim=1)
    bad = ~finite
    if not bool(bad.any()):
        return 0
    for tensor in samples:
        tensor[bad] = 0
    return int(bad.sum())


class SamplingShard(Dataset):
    """A shard to be Poisson-sampled at the rate a public record count fixes, not its own length.

    The records are the shard's own (``len`` and indexing are its); ``sampling_size`` is the N
    from which the loader's ``ceil(N / b)`` batches, the rate ``1 / ceil(N / b)`` and the expected
    batch size are computed (:class:`~fedllm.privacy.randomness.PoissonBatchSampler`).
    """

    def __init__(self, records: Dataset, sampling_size: int):
        """
        Args:
            records: the shard (any dataset with a length).
            sampling_size: N, a positive record count chosen without looking at the records.

        Raises:
            ConfigError: ``sampling_size`` is not positive.
        """
        if sampling_size < 1:
            raise ConfigError(f"a sampling size must be a positive record count, got {sampling_size}")
        self.records, self.sampling_size = records, sampling_size

    def __len__(self) -> int:
        return len(self.records)  # type: ignore[arg-type]  # torch types Dataset without __len__

    def __getitem__(self, index: int):
        return self.records[index]


def poisson_sampler(dataset: Dataset, batch_size: int, randomness: DPRandomness) -> PoissonBatchSampler:
    """The Poisson batches for ``dataset``: at its :class:`SamplingShard` size if it has one, else its length."""
    size = dataset.sampling_size if isinstance(dataset, SamplingShard) else None
    # torch types Dataset without __len__; every shard a node trains on has one
    return PoissonBatchSampler(len(dataset), batch_size, randomness.sampling, size)  # type: ignore[arg-type]


def poisson_loader(dataset: Dataset, batch_size: int, collate: Callable, randomness: DPRandomness) -> DataLoader:
    """A loader of ``ceil(N / b)`` Poisson batches drawn from the node's sampling stream
    (N: the :class:`SamplingShard` size, else the shard's length).

    Args:
        dataset: the client's shard.
        batch_size: the expected batch size at N records.
        collate: batch builder; it must accept an empty list (an empty Poisson batch).
        randomness: the round's streams (only ``sampling`` is used).
    """
    return DataLoader(dataset, batch_sampler=poisson_sampler(dataset, batch_size, randomness), collate_fn=collate)


def start_round(
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    dataset: Dataset,
    batch_size: int,
    collate: Callable,
    noise_multiplier: float,
    max_grad_norm: float,
    history: History,
    accountant: AccountantName,
    grad_sample_mode: GradSampleMode,
    randomness: DPRandomness,
) -> DPRound:
    """Attach DP-SGD (Poisson sampling, per-sample clipping, Gaussian noise) for one round.

    Args:
        model: the PEFT model in training mode; only adapters require grad.
        optimizer: a fresh optimizer over the adapter parameters.
        dataset: the client's tokenized shard (a :class:`SamplingShard` to sample at a public size).
        batch_size: the expected Poisson batch size.
        collate: batch builder (must accept an empty batch).
        noise_multiplier: Gaussian noise std relative to ``max_grad_norm``.
        max_grad_norm: per-sample clipping bound.
        history: the client's accountant history before this round.
        accountant: ``rdp`` or ``prv``.
        grad_sample_mode: ``lora`` (fedllm's per-sample gradients of the adapter matrices,
            :mod:`fedllm.privacy.lora_grad_sample`), or Opacus's ``hooks`` or ``functorch``.
        randomness: the round's sampling and noise streams (:func:`~fedllm.privacy.randomness.dp_randomness`).

    Returns:
        The round's engine, hooks, DP optimizer and Poisson loader.
    """
    with warnings.catch_warnings():
        # Opacus warns that its own RNG is not secure; neither its noise nor its sampler runs here
        warnings.filterwarnings("ignore", message="Secure RNG turned off", category=UserWarning)
        engine = PrivacyEngine(accountant=accountant)
    engine.accountant.history = list(history)
    sampler = poisson_sampler(dataset, batch_size, randomness)
    loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=collate)
    # poisson_sampling=False: Opacus keeps our loader (already Poisson) and accounts 1 / len(loader).
    # Under ``lora`` Opacus still builds the optimizer and the accountant's hook as for its own
    # modes (one source for the rate and the expected batch size); only its per-sample
    # gradient hooks are swapped for fedllm's, which fill the same ``grad_sample`` attributes.
    hooks, built, loader = engine.make_private(
        module=model,
        optimizer=optimizer,
        data_loader=loader,
        noise_multiplier=noise_multiplier,
        max_grad_norm=max_grad_norm,
        poisson_sampling=False,
        grad_sample_mode="hooks" if grad_sample_mode == "lora" else grad_sample_mode,
        wrap_model=False,
    )
    if grad_sample_mode == "lora":
        hooks.cleanup()
        hooks = LoraGradSampler(model)
    hooks.forbid_grad_accumulation()  # what Opacus sets for its own Poisson loader
    # Opacus's own divisor is int(len(dataset) * q): it would follow the records held, not N
    dp_optimizer = NodeNoiseDPOptimizer(built, GaussianNoise(randomness.noise), sampler.expected_batch_size)
    return DPRound(engine=engine, hooks=hooks, optimizer=dp_optimizer, loader=loader)
