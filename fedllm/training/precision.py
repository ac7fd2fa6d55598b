"""Mixed precision as a config choice: bf16 autocast where the hardware does it natively."""

from __future__ import annotations

import contextlib
from functools import lru_cache
from pathlib import Path

import torch

from fedllm.config import Precision
from fedllm.errors import ConfigError


@lru_cache(maxsize=1)
def cpu_has_bf16() -> bool:
    """Whether this CPU has native bf16 matrix instructions (AVX512-BF16 or AMX)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def use_bf16(precision: Precision) -> bool:
    """Resolve ``train.precision`` (auto / fp32 / bf16) to whether we autocast to bf16.

    Raises:
        ConfigError: an unknown precision name.
    """
    if precision == "fp32":
        return False
    if precision == "bf16":
        return True
    if precision == "auto":
        return torch.cuda.is_available() or cpu_has_bf16()
    raise ConfigError(f"train.precision: unknown {precision!r}; known: auto, fp32, bf16")


def autocast(bf16: bool, device: str = "cpu"):
    """A bf16 autocast context (or a no-op); weights stay fp32, so DP accounting is unaffected."""
    if not bf16:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device, dtype=torch.bfloat16)
