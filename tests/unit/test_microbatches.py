"""DP-SGD steps of fixed shape (issue 23, item 3): every row padded to ``data.max_length``,
micro-batches of fixed rows with zero-gradient dummy rows, so a record's clipped per-sample
gradient cannot follow its companions (fp32 and bf16 autocast alike)."""

from __future__ import annotations

import pytest
import torch

from fedllm import task
from fedllm.config import LoraSettings, ModelConfig
from fedllm.data.formatting import IGNORE_INDEX, PromptFormat, make_collate, tokenize_records
from fedllm.data.sources import Record
from fedllm.errors import ConfigError, DataError
from fedllm.model.adapters import adapter_state, load_adapter_state
from fedllm.privacy.lora_grad_sample import LoraGradSampler
from fedllm.training.local import DPSpec, LocalSpec, micro_batch_losses, split_by_length, train_local
from fedllm.training.microbatches import NO_INDEX, REAL, fixed_shape_chunks, rows_per_micro_batch
from tests.training_data import CHOICES, FMT, choice_ids, easy_records

WIDE = PromptFormat("Review: {prompt}\nSentiment:", " {response}", 96, CHOICES)
CLIP = 1e-3  # below every per-sample gradient norm here: every row is really clipped


@pytest.fixture(scope="module")
def bundle():
    bundle = task.model_bundle(ModelConfig(source="tiny"), LoraSettings(), 0)
    gen = torch.Generator().manual_seed(1)  # B starts at zero (every A gradient zero): give both values
    state = adapter_state(bundle.model)
    load_adapter_state(bundle.model, {k: torch.randn(v.shape, generator=gen) * 0.1 for k, v in state.items()})
    return bundle


def _items(bundle, count: int, long_at: int | None = None):
    """``count`` short records of varied lengths; with ``long_at``, one ~80-token record there."""
    records = easy_records(count, 3)
    records = [Record(r.prompt + " really" * (i % 5), r.response) for i, r in enumerate(records)]
    if long_at is not None:
        records.insert(long_at, Record(" ".join(["an endless digression"] * 25), "positive"))
    return tokenize_records(records, bundle.tokenizer, WIDE).items


def _clipped(bundle, items, bf16: bool, rows: int, trim: bool = False) -> list[torch.Tensor]:
    """Each row's clipped per-sample gradient (flat, fp32, Opacus's flat clipping at :data:`CLIP`),
    computed as a DP step computes it: today's fixed shapes, or (``trim``) the old length-trimmed chunks."""
    batch = make_collate(bundle.pad_id, prompt_only=True)(items)
    parts = -(-len(items) // rows)
    chunks = split_by_length(batch, parts) if trim else fixed_shape_chunks(batch, rows, WIDE.max_length)
    spec = LocalSpec(steps=1, batch_size=rows, lr=0.0, weight_decay=0.0, objective="choices", bf16=bf16)
    model = bundle.model
    model.train()
    sampler = LoraGradSampler(model)
    params = [p for p in model.parameters() if p.requires_grad]
    order = torch.argsort(batch["attention_mask"].sum(dim=1)) if trim else torch.arange(len(items))
    out: dict[int, torch.Tensor] = {}
    try:
        cursor = 0
        for chunk in chunks:
            micro_batch_losses(model, chunk, spec, choice_ids(bundle)).mean().backward()
            flat = torch.cat([p.grad_sample.reshape(len(chunk["input_ids"]), -1) for p in params], dim=1)
            factor = (CLIP / (flat.norm(dim=1) + 1e-6)).clamp(max=1.0)  # Opacus's flat clipping
            real = chunk[REAL].bool() if REAL in chunk else torch.ones(len(flat), dtype=torch.bool)
            for row in (flat * factor[:, None])[real]:
                out[int(order[cursor])] = row
                cursor += 1
            for p in params:
                p.grad_sample = None
            model.zero_grad(set_to_none=True)
    finally:
        sampler.cleanup()
    return [out[i] for i in range(len(items))]


def _worst_change(bundle, bf16: bool, trim: bool = False) -> float:
    """Largest relative change of a record's clipped gradient when one long record joins its batch."""
    alone = _clipped(bundle, _items(bundle, 11), bf16, rows=4, trim=trim)
    joined = _clipped(bundle, _items(bundle, 11, long_at=5), bf16, rows=4, trim=trim)
    del joined[5]  # the newcomer
    return max(float((a - b).norm() / a.norm()) for a, b in zip(alone, joined, strict=True))


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
def test_adding_a_record_leaves_the_others_clipped_gradients_unchanged(bundle, bf16):
    """The newcomer shifts every later record to another row and micro-batch, and is far longer
    than any of them: their clipped per-sample gradients move by at most 1e-6 relative."""
    assert _worst_change(bundle, bf16) <= 1e-6


def test_under_bf16_length_trimmed_chunks_let_a_companion_move_the_others(bundle):
    """The reason for the fixed shapes: with the old trimming a long companion widens a chunk and
    changes how bf16 rounds the other rows (the issue measured up to 13%)."""
    assert _worst_change(bundle, bf16=True, trim=True) > 1e-3


def _batch(bundle, count: int):
    return make_collate(bundle.pad_id, prompt_only=True)(list(_items(bundle, count)))


def test_micro_batches_have_fixed_shape_and_dummy_rows_that_do_not_count(bundle):
    batch = _batch(bundle, 11)
    batch["canary"] = torch.full((11,), 7)  # another per-row column (an audit's canary index)
    chunks = fixed_shape_chunks(batch, rows=4, width=96)
    assert [tuple(c["input_ids"].shape) for c in chunks] == [(4, 96)] * 3
    assert [int(c[REAL].sum()) for c in chunks] == [4, 4, 3]
    last = chunks[-1]
    assert last["labels"][3].eq(IGNORE_INDEX).all() and int(last["choice"][3]) == IGNORE_INDEX
    assert int(last["canary"][3]) == NO_INDEX and last["attention_mask"][3].all()
    # the real rows keep their tokens right-aligned, in the sampler's order
    width = batch["input_ids"].shape[1]
    torch.testing.assert_close(chunks[0]["input_ids"][:, -width:], batch["input_ids"][:4])
    assert not chunks[0]["attention_mask"][:, : 96 - width].any()
    assert fixed_shape_chunks(_batch(bundle, 0), rows=4, width=96) == []


def test_a_dummy_rows_per_sample_gradient_is_exactly_zero(bundle):
    chunk = fixed_shape_chunks(_batch(bundle, 3), rows=4, width=96)[0]
    spec = LocalSpec(steps=1, batch_size=4, lr=0.0, weight_decay=0.0, objective="choices", bf16=False)
    sampler = LoraGradSampler(bundle.model)
    try:
        micro_batch_losses(bundle.model, chunk, spec, choice_ids(bundle)).mean().backward()
        samples = [p.grad_sample for p in bundle.model.parameters() if p.requires_grad]
        assert all(bool(s[3].eq(0).all()) for s in samples)
        assert any(bool(s[:3].ne(0).any()) for s in samples)
    finally:
        sampler.cleanup()
        bundle.model.zero_grad(set_to_none=True)


def test_a_row_wider_than_the_fixed_width_is_a_callers_mistake(bundle):
    with pytest.raises(DataError, match="above the fixed width 8"):
        fixed_shape_chunks(_batch(bundle, 2), rows=4, width=8)


def test_rows_per_micro_batch_split_the_expected_batch():
    assert rows_per_micro_batch(16, 2) == 8
    assert rows_per_micro_batch(16, 3) == 6
    assert rows_per_micro_batch(4, 8) == 1


def test_dp_training_needs_the_fixed_width(bundle):
    data = tokenize_records(easy_records(32, 4), bundle.tokenizer, FMT)
    spec = LocalSpec(steps=1, batch_size=8, lr=1e-3, weight_decay=0.0, objective="choices", bf16=False, seed=0)
    dp = DPSpec(noise_multiplier=1.0, max_grad_norm=1.0, accountant="rdp", grad_sample_mode="lora")
    with pytest.raises(ConfigError, match="data.max_length"):
        train_local(bundle.model, data, make_collate(bundle.pad_id, True), spec, choice_ids(bundle), dp, [])


def test_a_dp_step_counts_only_real_rows(bundle):
    data = tokenize_records(easy_records(40, 5), bundle.tokenizer, FMT)
    spec = LocalSpec(
        steps=3,
        batch_size=40,
        lr=1e-3,
        weight_decay=0.0,
        objective="choices",
        bf16=False,
        seed=0,
        micro_batches=3,
        max_length=FMT.max_length,
    )
    dp = DPSpec(noise_multiplier=1.0, max_grad_norm=1.0, accountant="rdp", grad_sample_mode="lora")
    start = adapter_state(bundle.model)
    try:
        result = train_local(bundle.model, data, make_collate(bundle.pad_id, True), spec, choice_ids(bundle), dp, [])
    finally:
        load_adapter_state(bundle.model, start)
    assert result.examples_seen == 120  # rate 1: every record each step; 14-row micro-batches, dummies not counted
    assert result.history == [(1.0, 1.0, 3)]


def test_the_dp_update_is_the_sum_of_each_real_records_own_clipped_gradient(bundle):
    """Dummy rows add nothing and the divisor stays the expected batch: with no noise and plain
    SGD, one step over 10 records (micro-batches of 4 rows: 2 dummy rows) moves the adapter by
    ``-lr * sum_i clip(g_i) / 10``, each ``g_i`` computed from record ``i`` alone by autograd."""
    data = tokenize_records(easy_records(10, 8), bundle.tokenizer, FMT)
    model, clip, lr = bundle.model, 0.05, 10.0  # a large step: float rounding of the weights stays far below it
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    start = adapter_state(model)
    expected = {n: torch.zeros_like(p) for n, p in params.items()}
    collate = make_collate(bundle.pad_id, prompt_only=True)
    for index in range(len(data)):
        loss = micro_batch_losses(model, collate([data[index]]), _plain_spec(), choice_ids(bundle)).sum()
        grads = torch.autograd.grad(loss, list(params.values()))
        norm = torch.sqrt(sum(g.pow(2).sum() for g in grads))
        factor = min(1.0, clip / (float(norm) + 1e-6))
        for name, grad in zip(params, grads, strict=True):
            expected[name] -= lr * factor * grad / len(data)
    spec = LocalSpec(
        steps=1,
        batch_size=len(data),  # rate 1: every record in the step
        lr=lr,
        weight_decay=0.0,
        objective="choices",
        bf16=False,
        seed=0,
        micro_batches=3,
        optimizer="sgd",
        max_length=FMT.max_length,
    )
    dp = DPSpec(noise_multiplier=0.0, max_grad_norm=clip, accountant="rdp", grad_sample_mode="lora")
    try:
        before = {n: p.detach().clone() for n, p in params.items()}
        train_local(model, data, collate, spec, choice_ids(bundle), dp, [])
        for name, param in params.items():
            torch.testing.assert_close(param.detach() - before[name], expected[name], rtol=1e-4, atol=1e-7, msg=name)
    finally:
        load_adapter_state(model, start)


def _plain_spec() -> LocalSpec:
    return LocalSpec(steps=1, batch_size=1, lr=0.0, weight_decay=0.0, objective="choices", bf16=False)
