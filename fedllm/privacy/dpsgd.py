"""Opacus wiring for one round of DP-SGD on a PEFT model that lives across rounds.

Each round builds a fresh PrivacyEngine whose accountant is loaded with the client's
full history first, so epsilon composes over every round (a fresh accountant per round
would report one round's epsilon only). The model is not wrapped
(``wrap_model=False``): adapter names stay as PEFT writes them, and ``close()`` removes
every hook and per-sample attribute Opacus attached, so nothing leaks into the next round
or the next client served by the same process.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from opacus import PrivacyEngine
from opacus.optimizers import DPOptimizer
from torch.utils.data import DataLoader

from fedllm.errors import ConfigError
from fedllm.model.device import model_device
from fedllm.privacy.accounting import History, normalise_history


@dataclass
class DPRound:
    """Live Opacus objects for one round; call :meth:`close` when the round ends."""

    engine: PrivacyEngine
    hooks: object
    optimizer: DPOptimizer
    loader: DataLoader

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
        """Per-sample gradients in fp32 before Opacus clips them.

        Under bf16 autocast Opacus computes them in bf16, and a norm taken in bf16 can be ~0.4%
        low: the clipped gradient could then exceed ``max_grad_norm``, the sensitivity the
        accountant assumes. In fp32 the clipping bound holds for the values that were computed.
        """
        for param in self.optimizer.params:
            samples = getattr(param, "grad_sample", None)
            if isinstance(samples, list):
                param.grad_sample = [s.float() for s in samples]
            elif samples is not None and samples.dtype != torch.float32:
                param.grad_sample = samples.float()

    def close(self) -> None:
        """Remove Opacus hooks and per-sample gradient attributes from the model."""
        self.hooks.cleanup()


def start_round(*, model: torch.nn.Module, optimizer: torch.optim.Optimizer, loader: DataLoader,
                noise_multiplier: float, max_grad_norm: float, history: History,
                accountant: str, grad_sample_mode: str, secure_mode: bool,
                noise_generator: torch.Generator | None) -> DPRound:
    """Attach DP-SGD (Poisson sampling, per-sample clipping, Gaussian noise) for one round.

    Args:
        model: the PEFT model in training mode; only adapters require grad.
        optimizer: a fresh optimizer over the adapter parameters.
        loader: a data loader over the client's shard with the expected batch size.
        noise_multiplier: Gaussian noise std relative to ``max_grad_norm``.
        max_grad_norm: per-sample clipping bound.
        history: the client's accountant history before this round.
        accountant: ``rdp`` or ``prv``.
        grad_sample_mode: Opacus per-sample gradient mode.
        secure_mode: use a cryptographically secure RNG for noise and sampling.
        noise_generator: seeded generator for reproducible noise (ignored in secure mode).
    """
    if secure_mode and model_device(model).type != "cpu":
        # Opacus's secure generator (torchcsprng) lives on the CPU and cannot draw CUDA noise
        raise ConfigError("privacy.secure_mode=true runs on the CPU only; use model.device=cpu for it")
    engine = PrivacyEngine(accountant=accountant, secure_mode=secure_mode)
    engine.accountant.history = list(history)
    hooks, dp_optimizer, dp_loader = engine.make_private(
        module=model, optimizer=optimizer, data_loader=loader,
        noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm,
        poisson_sampling=True, grad_sample_mode=grad_sample_mode, wrap_model=False,
        noise_generator=None if secure_mode else noise_generator,
    )
    return DPRound(engine=engine, hooks=hooks, optimizer=dp_optimizer, loader=dp_loader)
