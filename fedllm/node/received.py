"""The global adapter a node receives is untrusted input: finite and bounded, or refused.

A coordinator chooses every value of the adapter it sends. Crafted from the public base
model, one adapter can make a single layer overflow to ``inf`` on one token only; a record
holding that token then turns the node's per-sample gradient (and, unchecked, its whole
update) into NaN, a membership oracle outside DP (issue 23). Two defences, both on the node:

* here, before anything reads the node's data: every received tensor must be a floating
  point tensor whose entries are finite and at most ``max_abs`` in magnitude, and the
  adapter's global L2 norm at most ``max_norm`` (both from the node's own config). With
  entries bounded, an adapter's output is bounded by a polynomial in the bound, far from the
  float range; a refusal depends only on the received tensors and the node config, never on
  records;
* in DP-SGD (:meth:`fedllm.privacy.dpsgd.DPRound.fp32_grad_samples`): a per-sample gradient
  that is non-finite anyway is zeroed before clipping, so it contributes nothing and the
  sensitivity stays ``max_grad_norm``.

Honest adapters sit far inside the defaults: LoRA's A matrices start with entries below
``1/sqrt(fan_in)`` (0.042 on the default model) and B at zero; the default model's whole
adapter has a norm of about 13 at initialisation (67 at rank 64 on every linear layer).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

# defaults of the node-config bounds: orders of magnitude above any trained adapter, orders of
# magnitude below what it takes to overflow float32 or bfloat16 (both reach ~3.4e38)
DEFAULT_MAX_ABS = 100.0
DEFAULT_MAX_NORM = 1000.0


class ReceivedAdapterError(Exception):
    """The received adapter breaks the node's bounds (detail for the node's log only)."""


def check_received_adapter(arrays: Mapping[str, torch.Tensor], *, max_abs: float, max_norm: float) -> None:
    """Refuse a received adapter that is not floating point, finite and within the bounds.

    Args:
        arrays: the adapter tensors as received, by name.
        max_abs: the largest magnitude any entry may have.
        max_norm: the largest L2 norm of all entries together.

    Raises:
        ReceivedAdapterError: naming the first tensor (or the norm) at fault.
    """
    squares = 0.0
    for name, tensor in arrays.items():
        if not isinstance(tensor, torch.Tensor) or not torch.is_floating_point(tensor):
            kind = tensor.dtype if isinstance(tensor, torch.Tensor) else type(tensor).__name__
            raise ReceivedAdapterError(f"{name}: {kind}, expected floating-point values")
        values = tensor.detach().to(torch.float64)  # float64: the sums below cannot overflow
        if not bool(torch.isfinite(values).all()):
            raise ReceivedAdapterError(f"{name}: holds non-finite values (inf or NaN)")
        largest = float(values.abs().max()) if values.numel() else 0.0
        if largest > max_abs:
            raise ReceivedAdapterError(f"{name}: an entry of magnitude {largest:.3g} exceeds the bound {max_abs:g}")
        squares += float(values.square().sum())
    norm = math.sqrt(squares)
    if norm > max_norm:
        raise ReceivedAdapterError(f"the adapter's L2 norm {norm:.3g} exceeds the bound {max_norm:g}")
