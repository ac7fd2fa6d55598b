"""Where the model runs and in what precision its frozen weights are stored.

``auto`` is the CPU where CUDA is absent; with CUDA, accelerate picks the device, so it follows
what this process may see (a Ray actor given a GPU share sees exactly that GPU,
``CUDA_VISIBLE_DEVICES`` and a launcher's ``LOCAL_RANK`` are honoured).
"""

from __future__ import annotations

import os

import torch

from fedllm.config import ModelConfig, ModelDtype
from fedllm.errors import ConfigError

DTYPES: dict[ModelDtype, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(name: str) -> torch.device:
    """The torch device for ``model.device``.

    Raises:
        ConfigError: a CUDA device was asked for and this process sees none (or not that one).
    """
    if name == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")  # never MPS or another backend Opacus is not tested on
        # imported only here, with CUDA: CPU runs and the CLI (usable_cpus) never need accelerate
        from accelerate import PartialState

        # accelerate: cuda:LOCAL_RANK under `accelerate launch` / torchrun, else the first visible GPU
        return PartialState().device
    device = torch.device(name)
    if device.type == "cuda":
        visible = torch.cuda.device_count()
        if visible == 0:
            raise ConfigError(
                f"model.device={name}: no CUDA GPU is visible to this process (install a CUDA "
                "build of torch, check CUDA_VISIBLE_DEVICES, or use model.device=auto)"
            )
        if device.index is not None and device.index >= visible:
            raise ConfigError(f"model.device={name}: only {visible} CUDA device(s) visible")
    return device


def model_device(model: torch.nn.Module) -> torch.device:
    """The device of the model's trainable (adapter) parameters: where batches must go."""
    for param in model.parameters():
        if param.requires_grad:
            return param.device
    return next(model.parameters()).device


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """The batch's tensors on ``device`` (a no-op on the CPU)."""
    if device.type == "cpu":
        return batch
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def quantization_config(cfg: ModelConfig, device: torch.device):
    """The bitsandbytes config for ``model.quantization`` (None when not quantising).

    4-bit is QLoRA's recipe: NF4 weights, double quantisation, bf16 compute.

    Raises:
        ConfigError: no CUDA device, or bitsandbytes is not installed (the ``gpu`` extra).
    """
    if cfg.quantization == "none":
        return None
    if device.type != "cuda":
        raise ConfigError(f"model.quantization={cfg.quantization} needs a CUDA GPU; this process runs on {device}")
    # bitsandbytes is the optional `gpu` extra, and BitsAndBytesConfig pulls in transformers
    # (~0.5 s): both imported only when quantising
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as exc:
        raise ConfigError(f"model.quantization={cfg.quantization} needs bitsandbytes: pip install -e '.[gpu]'") from exc
    from transformers import BitsAndBytesConfig

    if cfg.quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )


def usable_cpus() -> int:
    """The CPUs this process may run on: its affinity (set by ``taskset``, a cpuset, a scheduler),
    which ``os.cpu_count()`` ignores; more threads than these only contend with each other."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # platforms without affinity (macOS)
        return os.cpu_count() or 1
