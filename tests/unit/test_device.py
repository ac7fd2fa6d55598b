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
from fedllm.privacy.dpsgd import start_round
from fedllm.privacy.randomness import GaussianNoise, dp_randomness
from fedllm.training.local import DPSpec, LocalSpec, train_local
from fedllm.training.objectives import per_example_loss
from fedllm.training.precision import autocast
from tests.training_data import FMT, choice_ids, easy_records

NO_CUDA = not torch.cuda.is_available()
DP = DPSpec(noise_multiplier=1.0, max_grad_norm=1.0, accountant="rdp", grad_sample_mode="hooks")


@pytest.mark.parametrize(
    ("fields", "key"),
    [
        ({"dtype": "int8"}, "model.dtype"),
        ({"quantization": "2bit"}, "model.quantization"),
        ({"device": "gpu"}, "model.device"),
        ({"device": "cuda:x"}, "model.device"),
        ({"source": "tiny", "quantization": "4bit"}, "model.quantization"),
        ({"quantization": "4bit", "device": "cpu"}, "model.quantization"),
        ({"quantization": "4bit", "dtype": "bf16"}, "model.dtype"),
    ],
)
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
        gpu_share(0.5, ModelConfig())  # Ray would otherwise wait forever for a GPU
    assert gpu_share(0.0, ModelConfig()) == 0.0


@pytest.mark.parametrize("fields", [{"device": "cuda"}, {"quantization": "4bit"}])
def test_gpu_model_settings_need_a_gpu_share_in_simulation(fields):
    # Ray hides the GPU from actors that ask for none: every client would fail at round time
    with pytest.raises(ConfigError, match="federation.client_gpus=0"):
        gpu_share(0.0, ModelConfig(**fields))


def _dp_round(model_cfg: ModelConfig) -> tuple[dict, dict]:
    bundle = task.model_bundle(model_cfg, LoraSettings(), 0)
    data = tokenize_records(easy_records(64, 5), bundle.tokenizer, FMT)
    before = adapter_state(bundle.model)
    spec = LocalSpec(
        steps=2,
        batch_size=16,
        lr=1e-2,
        weight_decay=0.0,
        objective="choices",
        bf16=model_cfg.dtype == "bf16",
        seed=0,
        max_length=FMT.max_length,
    )
    result = train_local(bundle.model, data, make_collate(bundle.pad_id, True), spec, choice_ids(bundle), DP, [])
    assert result.history and result.history[0][2] == 2  # both steps accounted
    return before, adapter_state(bundle.model)


def test_bf16_base_weights_keep_fp32_adapters_and_train_under_dp():
    cfg = ModelConfig(source="tiny", dtype="bf16")
    bundle = task.model_bundle(cfg, LoraSettings(), 0)
    frozen = {p.dtype for n, p in bundle.model.named_parameters() if "lora_" not in n}
    assert frozen == {torch.bfloat16}
    # RoPE's frequency table is a buffer: in bf16 its rounding would shift every position's angle
    assert {b.dtype for n, b in bundle.model.named_buffers() if "inv_freq" in n} == {torch.float32}
    before, after = _dp_round(cfg)
    # what is noised, sent and aggregated is unchanged: fp32 adapters of the same shapes
    assert {v.dtype for v in after.values()} == {torch.float32}
    assert {k: v.shape for k, v in after.items()} == {k: v.shape for k, v in before.items()}
    assert all(torch.isfinite(v).all() for v in after.values())
    assert any(not torch.equal(before[k], after[k]) for k in after)


def test_bf16_per_sample_gradients_are_clipped_in_fp32():
    bundle = task.model_bundle(ModelConfig(source="tiny"), LoraSettings(), 0)
    data = tokenize_records(easy_records(64, 6), bundle.tokenizer, FMT)
    params = [p for p in bundle.model.parameters() if p.requires_grad]
    bundle.model.train()
    clip = 1e-3  # far below every gradient's norm: every sample is clipped
    session = start_round(
        model=bundle.model,
        optimizer=torch.optim.SGD(params, lr=0.0),
        dataset=data,
        batch_size=16,
        collate=make_collate(bundle.pad_id, True),
        noise_multiplier=0.0,
        max_grad_norm=clip,
        history=[],
        accountant="rdp",
        grad_sample_mode="hooks",
        randomness=dp_randomness(0),
    )
    try:
        batch = next(b for b in session.loader if len(b["input_ids"]) > 0)
        with autocast(True):
            per_example_loss(bundle.model, batch, "choices", choice_ids(bundle)).mean().backward()
        assert {p.grad_sample.dtype for p in params} == {torch.bfloat16}  # what Opacus computes under autocast
        session.fp32_grad_samples()
        assert {p.grad_sample.dtype for p in params} == {torch.float32}
        session.optimizer.clip_and_accumulate()
        total = torch.sqrt(sum(p.summed_grad.pow(2).sum() for p in params))
        assert total <= len(batch["input_ids"]) * clip * (1 + 1e-6)
    finally:
        session.optimizer.zero_grad(set_to_none=True)
        session.close()


@pytest.mark.gpu
@pytest.mark.parametrize("fields", [{"dtype": "bf16"}, {"quantization": "4bit"}], ids=["bf16", "qlora-4bit"])
def test_gpu_dp_round_on_the_embedded_model(fields):
    cfg = ModelConfig(source="embedded", device="cuda", **fields)
    before, after = _dp_round(cfg)
    bundle = task.model_bundle(cfg, LoraSettings(), 0)
    assert next(p for p in bundle.model.parameters() if p.requires_grad).device.type == "cuda"
    assert all(v.device.type == "cpu" and v.dtype == torch.float32 for v in after.values())
    assert any(not torch.equal(before[k], after[k]) for k in after)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_noise_is_drawn_on_the_cpu_and_lands_on_the_parameter_device(dtype):
    reference = torch.zeros(64, 48, dtype=dtype, device="cuda")
    noise = GaussianNoise(dp_randomness(3).noise).like(reference, 1.5)
    assert noise.device == reference.device and noise.dtype == dtype
    cpu = GaussianNoise(dp_randomness(3).noise).like(reference.cpu(), 1.5)
    assert torch.equal(noise.cpu(), cpu)  # the same float64 draws, whatever the device
