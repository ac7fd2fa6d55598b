"""fedllm's per-sample gradients of LoRA matrices (``privacy.grad_sample_mode=lora``) are Opacus's,
value for value, and nothing trainable escapes them (an unclipped parameter would be a release
the accountant does not cover)."""

from __future__ import annotations

import pytest
import torch
from opacus.grad_sample import GradSampleHooks

from fedllm import task
from fedllm.config import LoraSettings, ModelConfig
from fedllm.data.formatting import make_collate, tokenize_records
from fedllm.errors import ConfigError
from fedllm.model.adapters import adapter_state, load_adapter_state
from fedllm.privacy.dpsgd import start_round
from fedllm.privacy.lora_grad_sample import LoraGradSampler, per_sample_weight_grads, trainable_linears
from fedllm.privacy.randomness import dp_randomness
from fedllm.training.local import DPSpec, LocalSpec, train_local
from fedllm.training.objectives import per_example_loss
from fedllm.training.precision import autocast
from tests.training_data import FMT, choice_ids, easy_records


def _bundle(freeze_a: bool):
    bundle = task.model_bundle(ModelConfig(source="tiny"), LoraSettings(freeze_a=freeze_a), 0)
    # B starts at zero, which makes every A gradient zero: give both matrices real values
    gen = torch.Generator().manual_seed(1)
    state = adapter_state(bundle.model)
    load_adapter_state(bundle.model, {k: torch.randn(v.shape, generator=gen) * 0.1 for k, v in state.items()})
    return bundle


@pytest.fixture(scope="module", params=[False, True], ids=["lora", "ffa-lora"])
def bundle(request):
    return _bundle(request.param)


def _batch(bundle, n=12, seed=0):
    records = easy_records(n, seed)
    for i, record in enumerate(records):  # prompts of 1-4 extra words: rows of different lengths
        records[i] = type(record)(record.prompt + " really" * (i % 4), record.response)
    records = tokenize_records(records, bundle.tokenizer, FMT)
    batch = make_collate(bundle.pad_id, prompt_only=True)([records[i] for i in range(n)])
    assert len(set(batch["attention_mask"].sum(dim=1).tolist())) > 1  # left padding in play
    return batch


def _grad_samples(bundle, batch, sampler_factory, bf16=False) -> dict[str, torch.Tensor]:
    """One forward/backward of the mean loss with ``sampler_factory(model)`` attached."""
    model = bundle.model
    model.train()
    hooks = sampler_factory(model)
    try:
        with autocast(bf16, "cpu"):
            loss = per_example_loss(model, batch, "choices", choice_ids(bundle)).mean()
        loss.backward()
        out = {n: p.grad_sample for n, p in model.named_parameters() if p.requires_grad}
    finally:
        hooks.cleanup()
        model.zero_grad(set_to_none=True)
    return out


def _opacus(model):
    return GradSampleHooks(model, batch_first=True, loss_reduction="mean")


def test_per_sample_gradients_are_opacus_hooks_values(bundle):
    batch = _batch(bundle)
    ours = _grad_samples(bundle, batch, LoraGradSampler)
    theirs = _grad_samples(bundle, batch, _opacus)
    assert ours.keys() == theirs.keys() and ours
    for name, expected in theirs.items():
        assert ours[name].dtype == torch.float32
        assert ours[name].shape == (len(batch["input_ids"]), *expected.shape[1:])
        torch.testing.assert_close(ours[name], expected, rtol=1e-5, atol=1e-7, msg=name)
        assert expected.abs().max() > 0, name  # a real comparison, not zeros against zeros


def test_per_sample_gradients_sum_to_the_batch_gradient(bundle):
    """Independent of Opacus: the per-sample gradients of the mean loss, averaged, are autograd's."""
    batch = _batch(bundle, seed=3)
    ours = _grad_samples(bundle, batch, LoraGradSampler)
    model = bundle.model
    per_example_loss(model, batch, "choices", choice_ids(bundle)).mean().backward()
    try:
        for name, param in model.named_parameters():
            if param.requires_grad:
                torch.testing.assert_close(ours[name].mean(dim=0), param.grad, rtol=1e-5, atol=1e-7, msg=name)
    finally:
        model.zero_grad(set_to_none=True)


def test_under_bf16_autocast_the_per_sample_gradients_are_fp32_and_close_to_exact(bundle):
    """Opacus computes them in bf16 (fedllm casts them to fp32 afterwards); these come out fp32,
    from bf16 activations, within bf16's rounding of the fp32 values."""
    batch = _batch(bundle, seed=4)
    exact = _grad_samples(bundle, batch, _opacus)
    ours = _grad_samples(bundle, batch, LoraGradSampler, bf16=True)
    for name, expected in exact.items():
        assert ours[name].dtype == torch.float32
        torch.testing.assert_close(ours[name], expected, rtol=0.05, atol=0.05 * float(expected.abs().max()), msg=name)


def test_the_mean_loss_scale_goes_on_the_smaller_operand_and_gives_the_same_product():
    gen = torch.Generator().manual_seed(0)
    a, g = torch.randn(3, 5, 7, generator=gen), torch.randn(3, 5, 2, generator=gen)
    expected = torch.einsum("bto,bti->boi", g, a) * 3
    torch.testing.assert_close(per_sample_weight_grads(a, g, 3), expected)
    torch.testing.assert_close(per_sample_weight_grads(g, a, 3), expected.transpose(1, 2))


@pytest.mark.parametrize("mode", ["lora", "hooks"])
def test_a_seeded_dp_round_gives_the_same_adapter_under_either_mode(mode):
    """The whole DP-SGD round (micro-batches, clipping, the node's noise, AdamW) on the same
    Poisson batches and noise: only the per-sample-gradient code differs."""
    results = {}
    for which in ("hooks", mode):
        bundle = _bundle(False)
        data = tokenize_records(easy_records(120, 7), bundle.tokenizer, FMT)
        spec = LocalSpec(
            steps=3,
            batch_size=16,
            lr=1e-2,
            weight_decay=0.0,
            objective="choices",
            bf16=False,
            seed=5,
            micro_batches=2,
            max_length=FMT.max_length,
        )
        dp = DPSpec(noise_multiplier=0.7, max_grad_norm=0.1, accountant="rdp", grad_sample_mode=which)
        result = train_local(bundle.model, data, make_collate(bundle.pad_id, True), spec, choice_ids(bundle), dp, [])
        results[which] = (adapter_state(bundle.model), result.history)
    (reference, history), (ours, our_history) = results["hooks"], results[mode]
    assert our_history == history
    for name, value in reference.items():
        torch.testing.assert_close(ours[name], value, rtol=1e-5, atol=1e-6, msg=name)


def _tiny_round(model, data, collate):
    params = [p for p in model.parameters() if p.requires_grad]
    return start_round(
        model=model,
        optimizer=torch.optim.SGD(params, lr=0.1),
        dataset=data,
        batch_size=8,
        collate=collate,
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        history=[],
        accountant="rdp",
        grad_sample_mode="lora",
        randomness=dp_randomness(0),
    )


def test_a_trainable_parameter_outside_the_adapters_is_refused_before_any_step():
    """A trained embedding would have no (or, tied to ``lm_head``, a partial) per-sample gradient,
    hence no true clipping: its update would leave the node unbounded. The round does not start.
    (The tiny model ties ``lm_head`` to the embedding: a check by "is it a Linear's weight"
    alone would have let it through.)"""
    bundle = _bundle(False)
    model = bundle.model
    embedding = model.get_input_embeddings().weight
    embedding.requires_grad_(True)
    data = tokenize_records(easy_records(16, 8), bundle.tokenizer, FMT)
    try:
        assert model.get_output_embeddings().weight is embedding  # tied
        with pytest.raises(ConfigError, match="embed_tokens.*grad_sample_mode=hooks"):
            _tiny_round(model, data, make_collate(bundle.pad_id, True))
    finally:
        embedding.requires_grad_(False)
    assert len(trainable_linears(model)) == 8  # tiny: 2 layers x (q, v) x (A, B)


def test_a_second_backward_before_the_step_raises(bundle):
    """Two Poisson batches' samples must never be clipped as one: accumulation is refused."""
    batch = _batch(bundle, seed=9)
    model = bundle.model
    model.train()
    sampler = LoraGradSampler(model)
    try:
        per_example_loss(model, batch, "choices", choice_ids(bundle)).mean().backward()
        with pytest.raises(ValueError, match="second backward pass"):
            per_example_loss(model, batch, "choices", choice_ids(bundle)).mean().backward()
    finally:
        sampler.cleanup()
        model.zero_grad(set_to_none=True)
    assert not any(hasattr(p, "grad_sample") for p in model.parameters())


def test_evaluation_and_a_closed_round_leave_nothing_behind(bundle):
    model = bundle.model
    hooks_before = sum(len(m._forward_hooks) for m in model.modules())
    sampler = LoraGradSampler(model)
    assert sampler.attached
    model.eval()
    with torch.no_grad():
        per_example_loss(model, _batch(bundle, seed=10), "choices", choice_ids(bundle))
    assert not any(getattr(p, "grad_sample", None) is not None for p in model.parameters())
    sampler.cleanup()
    assert not sampler.attached
    assert sum(len(m._forward_hooks) for m in model.modules()) == hooks_before
