"""Per-sample gradients of LoRA adapter matrices, computed directly (``privacy.grad_sample_mode=lora``).

With LoRA every trainable tensor is the weight of a small bias-free ``nn.Linear`` (``lora_A``:
``r x d_in``, ``lora_B``: ``d_out x r``). The per-sample gradient of such a weight is
``g_i^T a_i`` for sample ``i``'s input activations ``a_i`` (tokens x in) and output gradient
``g_i`` (tokens x out): one batched matmul. Opacus's generic hooks compute the same thing but
wrap every module in a full backward hook (autograd inserts identity functions around its
inputs and outputs), scale the whole backprop tensor by the batch size and go through generic
per-module bookkeeping, a fixed cost per call that dominates for 120 small matrices a step.

Here a forward hook keeps the layer's input and puts a gradient hook on its output tensor,
which hands over ``g`` and nothing else. The result is written to ``param.grad_sample`` in
fp32, where Opacus's DPOptimizer clips, sums, noises and accounts exactly as in its own modes
(:mod:`fedllm.privacy.dpsgd`): only the computation of the per-sample gradients changes, and
``tests/unit/test_lora_grad_sample.py`` pins it to Opacus's hooks.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from fedllm.errors import ConfigError


def trainable_linears(model: nn.Module) -> list[nn.Linear]:
    """The bias-free ``nn.Linear`` layers whose weight trains: every adapter matrix.

    A weight counts only if that layer is its one owner: a weight tied to an embedding (or
    shared by two layers) gets gradient from elsewhere too, which these hooks would not see.

    Raises:
        ConfigError: some trainable parameter is not such a weight (a trained bias, an
            embedding, a norm, ``modules_to_save``, a tied weight): its per-sample gradient
            would be missing or partial, so it would escape clipping.
    """
    owners: dict[int, list[nn.Module]] = {}
    for module in model.modules():
        for param in module.parameters(recurse=False):
            owners.setdefault(id(param), []).append(module)
    layers = []
    for module in model.modules():
        if (
            isinstance(module, nn.Linear)
            and module.weight.requires_grad
            and (module.bias is None or not module.bias.requires_grad)
            and owners[id(module.weight)] == [module]
        ):
            layers.append(module)
    covered = {id(layer.weight) for layer in layers}
    stray = [
        name for name, p in model.named_parameters(remove_duplicate=False) if p.requires_grad and id(p) not in covered
    ]
    if stray:
        raise ConfigError(
            "privacy.grad_sample_mode=lora computes per-sample gradients of LoRA matrices only "
            f"(bias-free linear weights used by one layer); these trainable parameters are not: "
            f"{', '.join(stray[:5])}{' ...' if len(stray) > 5 else ''}; use privacy.grad_sample_mode=hooks"
        )
    return layers


def per_sample_weight_grads(activations: torch.Tensor, out_grads: torch.Tensor, scale: float) -> torch.Tensor:
    """``scale * g_i^T a_i`` for every sample ``i``, in fp32: shape (batch, out, in).

    Args:
        activations: the layer's input, (batch, ..., in).
        out_grads: the gradient of the loss with respect to its output, (batch, ..., out).
        scale: the factor undoing the loss's mean over the batch (its size), as Opacus's
            ``loss_reduction="mean"``; applied to whichever operand is smaller.
    """
    batch = activations.shape[0]
    a = activations.reshape(batch, -1, activations.shape[-1]).float()
    g = out_grads.reshape(batch, -1, out_grads.shape[-1]).float()
    if a.shape[-1] <= g.shape[-1]:
        a = a * scale
    else:
        g = g * scale
    return torch.bmm(g.transpose(1, 2), a)


class LoraGradSampler:
    """Hooks that fill ``weight.grad_sample`` of every adapter matrix on each backward pass.

    The object mirrors what :mod:`fedllm.privacy.dpsgd` uses of Opacus's hooks:
    :meth:`cleanup` at the end of a round, :meth:`forbid_grad_accumulation` (always on here:
    a second backward before the optimizer step would mix two batches' samples, so it raises).
    """

    def __init__(self, model: nn.Module):
        """Attach to every adapter matrix of ``model`` (:func:`trainable_linears`)."""
        self.layers = trainable_linears(model)
        self._handles: list[RemovableHandle] = []
        self.attach()

    def attach(self) -> None:
        """Install the forward hooks (idempotent)."""
        if not self._handles:
            self._handles = [layer.register_forward_hook(self._forward) for layer in self.layers]

    def detach(self) -> None:
        """Remove the hooks; a graph already built keeps the gradient hooks it holds."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    @property
    def attached(self) -> bool:
        """Whether the forward hooks are installed."""
        return bool(self._handles)

    def forbid_grad_accumulation(self) -> None:
        """No-op: accumulation across backward passes is always refused (see the class)."""

    def cleanup(self) -> None:
        """Remove the hooks and every ``grad_sample`` attribute they set."""
        self.detach()
        for weight in self._weights():
            if hasattr(weight, "grad_sample"):
                del weight.grad_sample

    def _weights(self) -> Iterator[torch.Tensor]:
        return (layer.weight for layer in self.layers)

    @staticmethod
    def _forward(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        if not (module.training and torch.is_grad_enabled() and output.requires_grad):
            return  # evaluation: nothing will be clipped
        activations = inputs[0].detach()
        weight = module.weight

        def store(out_grads: torch.Tensor) -> None:
            if getattr(weight, "grad_sample", None) is not None:
                raise ValueError(
                    "a second backward pass before the optimizer step: Poisson sampling is not "
                    "compatible with gradient accumulation (call optimizer.step() after each backward)"
                )
            samples = per_sample_weight_grads(activations, out_grads.detach(), activations.shape[0])
            weight.grad_sample = samples  # type: ignore[union-attr]  # Opacus's attribute, read by its optimizer

        output.register_hook(store)
