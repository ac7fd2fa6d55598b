"""Device, dtype and quantisation settings: CPU behaviour here, the GPU paths behind `gpu`."""

from __future__ import annotations

import pytest
import torch

from fedllm import task
from fedllm.config import LoraSettings, ModelConfig
from fedllm.data.formatting import make_collate, tokenize_records
from fedllm.errors import ConfigError
from fedllm.federation.simulation import gpu_share
from fedllm.model.adapters import adapter_state
from fedllm.model.device import quantization_config, resolve_device
from fedllm.training.local import DPSpec, LocalSpec, train_local
from tests.unit.test_training import FMT, _choice_ids, _easy_records

NO_CUDA = not torch.cuda.is_available()
DP = DPSpec(noise_multiplier=1.0, max_grad_norm=1.0, accountant="rdp", grad_sample_mode="hooks", secure_mode=False)


@pytest.mark.parametrize(("fields", "key"), [
    ({"dtype": "int8"}, "model.dtype"),
    ({"quantization": "2bit"}, "model.quantization"),
    ({"device": "gpu"}, "model.device"),
    ({"device": "cuda:x"}, "model.device"),
    ({"source": "tiny", "quantization": "4bit"}, "model.quantization"),
    ({"quantization": "4bit", "device": "cpu"}, "model.quantization"),
])
def test_bad_device_settings_name_the_key(fields, key):
    with pytest.raises(ConfigError, match=key):
        ModelConfig(**fields)


@pytest.mark.skipif(not NO_CUDA, reason="checks the CPU-only behaviour")
def test_cpu_machine_resolves_auto_to_cpu_and_refuses_cuda_and_quantisation():
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ConfigError, match="no CUDA GPU"):
        resolve_device("cuda")
    with pytest.raises(ConfigError, match="needs a CUDA GPU"):
        quantization_config(ModelConfig(quantization="4bit"), torch.device("cpu"))
    with pytest.raises(ConfigError, match="client_gpus"):
        gpu_share(0.5)  # Ray would otherwise wait forever for a GPU
    assert gpu_share(0.0) == 0.0


def _dp_round(model_cfg: ModelConfig) -> tuple[dict, dict]:
    bundle = task.model_bundle(model_cfg, LoraSettings(), 0)
    data = tokenize_records(_easy_records(64, 5), bundle.tokenizer, FMT)
    before = adapter_state(bundle.model)
    spec = LocalSpec(steps=2, batch_size=16, lr=1e-2, weight_decay=0.0, objective="choices",
                     bf16=model_cfg.dtype == "bf16", seed=0)
    result = train_local(bundle.model, data, make_collate(bundle.pad_id, True), spec, _choice_ids(bundle), DP, [])
    assert result.history and result.history[0][2] == 2  # both steps accounted
    return before, adapter_state(bundle.model)


def test_bf16_base_weights_keep_fp32_adapters_and_train_under_dp():
    cfg = ModelConfig(source="tiny", dtype="bf16")
    bundle = task.model_bundle(cfg, LoraSettings(), 0)
    frozen = {p.dtype for n, p in bundle.model.named_parameters() if "lora_" not in n}
    assert frozen == {torch.bfloat16}
    before, after = _dp_round(cfg)
    # what is noised, sent and aggregated is unchanged: fp32 adapters of the same shapes
    assert {v.dtype for v in after.values()} == {torch.float32}
    assert {k: v.shape for k, v in after.items()} == {k: v.shape for k, v in before.items()}
    assert all(torch.isfinite(v).all() for v in after.values())
    assert any(not torch.equal(before[k], after[k]) for k in after)


@pytest.mark.gpu
@pytest.mark.parametrize("fields", [{"dtype": "bf16"}, {"quantization": "4bit"}], ids=["bf16", "qlora-4bit"])
def test_gpu_dp_round_on_the_embedded_model(fields):
    cfg = ModelConfig(source="embedded", device="cuda", **fields)
    before, after = _dp_round(cfg)
    bundle = task.model_bundle(cfg, LoraSettings(), 0)
    assert next(p for p in bundle.model.parameters() if p.requires_grad).device.type == "cuda"
    assert all(v.device.type == "cpu" and v.dtype == torch.float32 for v in after.values())
    assert any(not torch.equal(before[k], after[k]) for k in after)
