"""The node's DP randomness: nobody can replay its noise or batches, and the sampler is exact.

The attack these tests reproduce (issue 12): a coordinator that can reproduce a node's Poisson
batches and noise replays its round on the data with and without one record, and tells the two
apart with certainty. It knows every input the node trains from, so no seed may come from them.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset

from fedllm import task
from fedllm.config import LoraSettings, ModelConfig
from fedllm.data.formatting import make_collate, tokenize_records
from fedllm.errors import ConfigError, PrivacyPlanError
from fedllm.model.adapters import adapter_state, load_adapter_state
from fedllm.privacy.calibration import sample_rate_for
from fedllm.privacy.dpsgd import SamplingShard, poisson_loader, start_round
from fedllm.privacy.randomness import GaussianNoise, PoissonBatchSampler, dp_randomness, node_dropout
from fedllm.training.local import DPSpec, LocalSpec, train_local
from tests.training_data import FMT, choice_ids, easy_records

DP = DPSpec(noise_multiplier=0.8, max_grad_norm=1.0, accountant="rdp", grad_sample_mode="hooks")
# Opacus's DPDataLoader sizes its sampler int(1 / (1 / k)) = k - 1 batches for these k
OPACUS_OFF_BY_ONE = (93, 99, 105, 117, 123, 186, 198)


@pytest.fixture(scope="module")
def bundle():
    return task.model_bundle(ModelConfig(source="tiny"), LoraSettings(), 0)


@pytest.fixture(scope="module")
def shard(bundle):
    return tokenize_records(easy_records(64, 21), bundle.tokenizer, FMT)


def _spec(seed: int | None, steps: int = 3, batch_size: int = 16) -> LocalSpec:
    return LocalSpec(
        steps=steps,
        batch_size=batch_size,
        lr=1e-2,
        weight_decay=0.0,
        objective="choices",
        bf16=False,
        seed=seed,
        max_length=FMT.max_length,
    )


def _train(bundle, data, start: dict, seed: int | None, **spec) -> tuple[dict, object]:
    """One DP round from the adapter ``start``: the adapter it produces and its result."""
    load_adapter_state(bundle.model, start)
    result = train_local(
        bundle.model, data, make_collate(bundle.pad_id, True), _spec(seed, **spec), choice_ids(bundle), DP, []
    )
    return adapter_state(bundle.model), result


def _same(a: dict, b: dict) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


def _reset_global_rngs() -> None:
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


# ---- the curious coordinator ----------------------------------------------------------------


def _candidate_seeds() -> list[int]:
    """Seeds a coordinator would try: small ints, the run seed, and the derivation fedllm used
    before issue 12 (``seed * 1_000_003 + partition * 1_009 + round``, and ``+ 1`` for noise)."""
    derived = {
        s * 1_000_003 + p * 1_009 + r + extra for s in (0, 42) for p in (0, 1) for r in (1, 2) for extra in (0, 1)
    }
    return sorted({0, 1, 2, 42, 1234, 2**31 - 1} | derived)


@pytest.mark.slow  # seconds each: kept out of the fast tier (make test runs it)
def test_unseeded_rounds_cannot_be_replayed_by_a_coordinator_who_knows_every_input(bundle, shard):
    start = adapter_state(bundle.model)
    _reset_global_rngs()  # whatever global RNG state the coordinator's config could set on the node
    first, _ = _train(bundle, shard, start, seed=None)
    _reset_global_rngs()
    second, _ = _train(bundle, shard, start, seed=None)
    assert not _same(first, second)  # fresh entropy on every call
    for seed in _candidate_seeds():
        replay, _ = _train(bundle, shard, start, seed=seed)
        assert not _same(first, replay), f"seed {seed} reproduces a node's secure round"
        assert not _same(second, replay), f"seed {seed} reproduces a node's secure round"


def test_seeded_rounds_are_bit_identical_which_is_why_that_mode_is_research_only(bundle, shard):
    start = adapter_state(bundle.model)
    one, r1 = _train(bundle, shard, start, seed=1234)
    two, r2 = _train(bundle, shard, start, seed=1234)
    other, _ = _train(bundle, shard, start, seed=1235)
    assert _same(one, two) and r1.mean_loss == r2.mean_loss and r1.examples_seen == r2.examples_seen
    assert not _same(one, other)


# ---- the two streams ------------------------------------------------------------------------


def _key(generator: np.random.Generator) -> tuple[int, ...]:
    return tuple(int(x) for x in generator.bit_generator.state["state"]["key"])


def test_sampling_and_noise_streams_never_share_seed_material():
    # before issue 12 round r's noise seed (s + 1) was round r + 1's sampler seed
    owner: dict[tuple, tuple] = {}
    for seed in [*range(200), None, None]:
        streams = dp_randomness(seed)
        for name in ("sampling", "noise"):
            key = _key(getattr(streams, name))
            assert key not in owner, f"{name} stream of seed {seed} reuses the key of {owner[key]}"
            owner[key] = (name, seed)
    streams = dp_randomness(5)
    assert streams.seeded and not dp_randomness().seeded
    assert not np.array_equal(streams.sampling.random(64), streams.noise.random(64))


def test_unseeded_streams_ignore_every_global_rng():
    draws = []
    for _ in range(2):
        _reset_global_rngs()
        streams = dp_randomness()
        draws.append((streams.sampling.random(8), streams.noise.standard_normal(8)))
    assert not np.array_equal(draws[0][0], draws[1][0])
    assert not np.array_equal(draws[0][1], draws[1][1])


@pytest.mark.parametrize("seed", [-1, 1.5, "7", True])
def test_a_seeded_stream_needs_a_non_negative_int(seed):
    with pytest.raises(ConfigError, match="non-negative int"):
        dp_randomness(seed)


# ---- the Poisson sampler --------------------------------------------------------------------


@pytest.mark.parametrize("batch", [8, 16, 32])
def test_sampler_size_and_rate_agree_with_the_planner_for_every_shard_size(batch):
    rng = dp_randomness(0).sampling
    wrong = []
    for n in range(1, 100_001):
        if n < batch:
            with pytest.raises(PrivacyPlanError):
                sample_rate_for(batch, n)
            with pytest.raises(PrivacyPlanError):
                PoissonBatchSampler(n, batch, rng)
            continue
        sampler = PoissonBatchSampler(n, batch, rng)
        planned = sample_rate_for(batch, n)
        # Opacus accounts 1 / len(loader): the loader's length must give the planned rate exactly
        if not (sampler.rate == planned and 1 / len(sampler) == planned and len(sampler) == -(-n // batch)):
            wrong.append(n)
    assert wrong == []


class _Uniforms:
    """A stand-in sampling stream whose every uniform is ``value`` (in the dtype asked for)."""

    def __init__(self, value: float):
        self.value = value

    def random(self, size, dtype=np.float64):
        return np.full(size, self.value, dtype=dtype)


def test_sampler_decides_inclusion_in_float64_at_the_exact_rate():
    rate = sample_rate_for(16, 1480)  # 1/93, whose float32 rounding lies below it
    assert float(np.float32(rate)) < rate
    below, above = np.nextafter(rate, 0.0), np.nextafter(rate, 1.0)
    # `below` rounds to float32(rate): a float32 comparison (Opacus's) would exclude the record
    assert np.float32(below) == np.float32(rate)
    assert next(iter(PoissonBatchSampler(1480, 16, _Uniforms(below)))) == list(range(1480))
    assert next(iter(PoissonBatchSampler(1480, 16, _Uniforms(rate)))) == []
    assert next(iter(PoissonBatchSampler(1480, 16, _Uniforms(above)))) == []


def test_sampler_includes_records_at_the_planned_rate_and_yields_empty_batches():
    sampler = PoissonBatchSampler(1480, 16, dp_randomness(3).sampling)
    batches = [b for _ in range(20) for b in sampler]
    assert len(batches) == 20 * 93
    draws = 20 * 93 * 1480
    expected = draws / 93
    spread = (draws * (1 / 93) * (92 / 93)) ** 0.5
    # seeded, so deterministic; 6 standard deviations around the binomial mean
    assert abs(sum(map(len, batches)) - expected) < 6 * spread
    assert all(len(set(b)) == len(b) and all(0 <= i < 1480 for i in b) for b in batches)
    two = PoissonBatchSampler(2, 1, dp_randomness(4).sampling)
    tiny = [b for _ in range(50) for b in two]  # every pass draws afresh
    assert [] in tiny and [0, 1] in tiny


class _Repeat(Dataset):
    """``size`` records cycling through a small tokenized shard (cheap large shards)."""

    def __init__(self, base: Dataset, size: int):
        self.base, self.size = base, size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int):
        return self.base[index % len(self.base)]


@pytest.mark.parametrize(("n", "batch"), [(1480, 16)] + [(4 * k - 3, 4) for k in OPACUS_OFF_BY_ONE])
def test_a_real_dp_round_accounts_exactly_the_planned_rate(bundle, shard, n, batch):
    planned = sample_rate_for(batch, n)
    batches = round(1 / planned)
    assert int(1 / planned) == batches - 1  # a shard Opacus's own loader got wrong
    data = _Repeat(shard, n)
    assert len(poisson_loader(data, batch, make_collate(bundle.pad_id, True), dp_randomness(0))) == batches
    _, result = _train(bundle, data, adapter_state(bundle.model), seed=0, steps=2, batch_size=batch)
    assert result.history == [(DP.noise_multiplier, planned, 2)]


def test_empty_poisson_batches_in_a_round_are_noised_accounted_steps(bundle, shard):
    data = _Repeat(shard, 2)
    sampler = PoissonBatchSampler(2, 1, dp_randomness(8).sampling)
    batches = [b for _ in range(4) for b in sampler]  # the round's 8 steps: four passes of two
    assert [] in batches  # seed 8 draws at least one empty batch in this round
    _, result = _train(bundle, data, adapter_state(bundle.model), seed=8, steps=8, batch_size=1)
    assert result.history == [(DP.noise_multiplier, 0.5, 8)]
    assert result.examples_seen == sum(map(len, batches))


# ---- the noise ------------------------------------------------------------------------------


def test_noise_keeps_the_planned_std_and_sums_four_draws():
    std, size = 0.8 * 1.5, 1_000_000
    noise = GaussianNoise(dp_randomness(7).noise).like(torch.zeros(size), std)
    assert noise.dtype == torch.float32 and noise.shape == (size,)
    # seeded, so deterministic; the std estimate's relative standard error is 0.07%: 1% is 14 of them
    assert float(noise.double().std()) == pytest.approx(std, rel=0.01)
    assert abs(float(noise.double().mean())) < 6 * std / size**0.5
    # the floating-point mitigation: (four N(0, std^2) draws, in float64) / 2, not one draw
    twin = dp_randomness(7).noise.standard_normal((4, size)).sum(axis=0) * (std / 2)
    torch.testing.assert_close(noise, torch.from_numpy(twin).float())


def test_noise_follows_the_reference_dtype_and_zero_std_takes_no_draw():
    noise = GaussianNoise(dp_randomness(9).noise)
    assert noise.like(torch.zeros(3, 4, dtype=torch.bfloat16), 1.0).dtype == torch.bfloat16
    streams = dp_randomness(9)
    source = GaussianNoise(streams.noise)
    assert torch.equal(source.like(torch.ones(5), 0.0), torch.zeros(5))
    assert streams.noise.standard_normal() == dp_randomness(9).noise.standard_normal()


def test_one_draw_per_step_gives_exactly_the_per_tensor_draws_in_order():
    """The DP step draws all its noise in one call; a per-tensor regeneration (the audit's
    seeded-noise coordinator) must get the very same values, and the stream must continue alike."""
    references = [torch.zeros(3, 4), torch.zeros(5), torch.zeros(2, 2, 2, dtype=torch.bfloat16), torch.zeros(1)]
    streams = dp_randomness(13), dp_randomness(13)
    many = GaussianNoise(streams[0].noise).like_many(references, 0.7)
    one = GaussianNoise(streams[1].noise)
    for reference, noise in zip(references, many, strict=True):
        assert noise.shape == reference.shape and noise.dtype == reference.dtype
        assert torch.equal(noise, one.like(reference, 0.7))
    assert streams[0].noise.standard_normal() == streams[1].noise.standard_normal()
    zeros = GaussianNoise(streams[0].noise).like_many(references, 0.0)
    assert all(torch.equal(z, torch.zeros_like(r)) for z, r in zip(zeros, references, strict=True))
    assert streams[0].noise.standard_normal() == streams[1].noise.standard_normal()  # std 0 takes no draw


def test_the_dp_step_adds_the_node_noise_scaled_by_the_expected_batch_size(bundle, shard):
    """The optimizer's noise is ours (not Opacus's generator) and has std z * C / expected batch."""
    model = bundle.model
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    z, clip, lr = 0.7, 2.0, 1.0
    session = start_round(
        model=model,
        optimizer=torch.optim.SGD(params, lr=lr),
        dataset=_Repeat(shard, 32),
        batch_size=16,
        collate=make_collate(bundle.pad_id, True),
        noise_multiplier=z,
        max_grad_norm=clip,
        history=[],
        accountant="rdp",
        grad_sample_mode="hooks",
        randomness=dp_randomness(11),
    )
    try:
        assert session.optimizer.expected_batch_size == 16
        session.empty_step()
        assert session.history() == [(z, 0.5, 1)]
    finally:
        session.close()
    twin = GaussianNoise(dp_randomness(11).noise)
    for param, old in zip(params, before, strict=True):
        expected = old - lr * twin.like(old, z * clip) / 16
        torch.testing.assert_close(param.detach(), expected)


@pytest.mark.parametrize("n", [3, 64])  # fewer records than one batch, and more than N's batches hold
def test_a_shard_sampled_at_a_public_size_runs_the_rate_and_divisor_of_that_size(bundle, shard, n):
    # N = 100, b = 16: 7 batches, q = 1/7, expected batch int(100 / 7) = 14, whatever n is
    data = SamplingShard(_Repeat(shard, n), 100)
    randomness = dp_randomness(5)
    params = [p for p in bundle.model.parameters() if p.requires_grad]
    session = start_round(
        model=bundle.model,
        optimizer=torch.optim.SGD(params, lr=0.1),
        dataset=data,
        batch_size=16,
        collate=make_collate(bundle.pad_id, True),
        noise_multiplier=DP.noise_multiplier,
        max_grad_norm=DP.max_grad_norm,
        history=[],
        accountant="rdp",
        grad_sample_mode="hooks",
        randomness=randomness,
    )
    try:
        assert len(session.loader) == 7 and session.optimizer.expected_batch_size == 14
        batches = [b for _ in range(30) for b in session.loader.batch_sampler]
        assert all(0 <= i < n for b in batches for i in b)  # only the shard's own records are drawn
    finally:
        session.close()
    _, result = _train(bundle, data, adapter_state(bundle.model), seed=1, steps=2, batch_size=16)
    assert result.history == [(DP.noise_multiplier, 1 / 7, 2)]  # what Opacus accounted: 1/len(loader)


def test_a_sampling_size_below_one_batch_is_refused_whatever_the_shard_holds(shard):
    rng = dp_randomness(0).sampling
    with pytest.raises(PrivacyPlanError, match="sampling size of 15 records"):
        PoissonBatchSampler(1000, 16, rng, sampling_size=15)
    assert len(PoissonBatchSampler(0, 16, rng, sampling_size=16)) == 1  # no record: empty batches, one per pass
    with pytest.raises(ConfigError, match="positive record count"):
        SamplingShard(shard, 0)


# ---- dropout (lora.dropout, set by the coordinator) from the node's own stream ----------------------------


def _dropout_mask(randomness, public_seed: int = 0) -> torch.Tensor:
    torch.manual_seed(public_seed)  # what building the model from the coordinator's seed does
    with node_dropout(randomness):
        return torch.nn.functional.dropout(torch.ones(256), p=0.5, training=True)


def test_dropout_masks_come_from_the_round_stream_not_the_public_seed():
    fresh = [_dropout_mask(dp_randomness()) for _ in range(2)]
    assert not torch.equal(fresh[0], fresh[1])  # OS entropy: 2**-256 odds of equal masks
    torch.manual_seed(0)
    public = torch.nn.functional.dropout(torch.ones(256), p=0.5, training=True)
    assert not torch.equal(fresh[0], public)  # whoever knows the seed cannot predict the mask
    assert torch.equal(_dropout_mask(dp_randomness(7)), _dropout_mask(dp_randomness(7), public_seed=99))


def test_node_dropout_leaves_torchs_global_generator_as_it_was():
    torch.manual_seed(3)
    expected = torch.rand(4)
    torch.manual_seed(3)
    with node_dropout(dp_randomness()):
        torch.rand(100)
    assert torch.equal(torch.rand(4), expected)


def test_a_third_stream_leaves_seeded_batches_and_noise_as_they_were():
    sampling, noise = np.random.SeedSequence(11).spawn(2)
    streams = dp_randomness(11)
    assert streams.sampling.random() == np.random.Generator(np.random.Philox(sampling)).random()
    assert streams.noise.random() == np.random.Generator(np.random.Philox(noise)).random()
