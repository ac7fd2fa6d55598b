"""The audit's canaries: their design, who may plant them, how they enter DP-SGD, and the
seeded-noise attack at the level of one node's round."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedllm import task
from fedllm.audit.adversaries import SeededNoise
from fedllm.audit.canaries import MAX_WORDS, MIN_WORDS, SUPPORT, Canary, Layout, design_canaries
from fedllm.audit.injection import CanaryShard, GradientCanaries, adapter_parameters, with_canary_column
from fedllm.config import LoraSettings, ModelConfig
from fedllm.data.formatting import PromptFormat, choice_token_ids, make_collate, tokenize_records
from fedllm.data.sources import Record
from fedllm.errors import ConfigError
from fedllm.model.adapters import adapter_state, load_adapter_state
from fedllm.node.policy import AUDIT_CANARIES, policy_from_node_config
from fedllm.training.local import DPSpec, LocalSpec, train_local

FMT = PromptFormat("Review: {prompt}\nSentiment:", " {response}", 32, ("positive", "negative"))


@pytest.fixture(scope="module")
def bundle():
    return task.model_bundle(ModelConfig(source="tiny"), LoraSettings(), 0)


def _design(bundle, count=50, seed=3, kind="gradient"):
    return design_canaries(
        count=count,
        kind=kind,
        clients=3,
        clip_norm=1.0,
        layout=Layout.of(bundle.initial_adapter),
        choices=("positive", "negative"),
        seed=seed,
    )


def test_the_design_is_the_auditors_secret_and_fair(bundle):
    a, b, other = _design(bundle, 2000), _design(bundle, 2000), _design(bundle, 2000, seed=4)
    assert a.canaries == b.canaries and a.canaries != other.canaries
    included = sum(c.included for c in a.canaries)
    assert abs(included - 1000) < 5 * np.sqrt(2000 * 0.25)  # each canary in with probability 1/2
    assert {c.client for c in a.canaries} == {0, 1, 2}
    assert sorted(c.index for c in a.for_client(1)) == [c.index for c in a.canaries if c.included and c.client == 1]
    assert (
        design_canaries(
            count=10, kind="gradient", clients=3, clip_norm=1.0, layout=Layout.of(bundle.initial_adapter)
        ).secret
        != design_canaries(
            count=10, kind="gradient", clients=3, clip_norm=1.0, layout=Layout.of(bundle.initial_adapter)
        ).secret
    )  # unseeded: fresh OS entropy


def test_gradient_canaries_have_norm_c_and_are_nearly_orthogonal(bundle):
    design = _design(bundle, 20)
    size = design.layout.size
    vectors = []
    for canary in design.canaries:
        where, values = design.direction(canary.index)
        assert len(where) == min(SUPPORT, size) and len(set(where.tolist())) == len(where)
        assert np.linalg.norm(values) == pytest.approx(1.0)
        dense = np.zeros(size)
        dense[where] = values
        vectors.append(dense)
    gram = np.array(vectors) @ np.array(vectors).T
    assert np.abs(gram - np.eye(len(vectors))).max() < 0.2


def test_record_canaries_are_random_words_with_a_task_answer(bundle):
    design = _design(bundle, 30, kind="record")
    assert all(
        c.response in ("positive", "negative") and MIN_WORDS <= len(c.prompt.split()) <= MAX_WORDS
        for c in design.canaries
    )
    assert len({c.prompt for c in design.canaries}) == 30


def test_only_the_simulation_driver_can_plant_canaries_on_a_node(tmp_path):
    deployed = {
        "partition-id": 0,
        "state-dir": str(tmp_path),
        "data-path": str(tmp_path / "d.jsonl"),
        "max-epsilon": 8,
        "delta": 1e-5,
        "sampling-size": 40,
        AUDIT_CANARIES: str(tmp_path / "c.json"),
    }
    with pytest.raises(ConfigError, match=AUDIT_CANARIES):
        policy_from_node_config(deployed)
    assert policy_from_node_config(deployed, simulated=True).audit_canaries == str(tmp_path / "c.json")


def _shard(bundle, design, n=40):
    records = [Record(f"word{i} film", "positive" if i % 2 else "negative") for i in range(n)]
    shard = tokenize_records(records, bundle.tokenizer, FMT)
    return CanaryShard(shard, [shard[0] for _ in design.canaries], design)


def _score(design, index, before, after):
    descent = design.layout.flatten(before) - design.layout.flatten(after)
    return design.unit_score(index, descent)


@pytest.mark.parametrize("private", [True, False])
def test_a_planted_gradient_canary_moves_the_adapter_along_its_direction(bundle, private):
    design = _design(bundle, 6)
    design.canaries = [Canary(index=0, included=True, client=0), Canary(index=1, included=True, client=0)]
    load_adapter_state(bundle.model, bundle.initial_adapter)
    dataset = _shard(bundle, design)
    collate = with_canary_column(make_collate(bundle.pad_id, prompt_only=True))
    spec = LocalSpec(
        steps=3,
        batch_size=len(dataset),
        lr=0.5,
        weight_decay=0.0,
        objective="choices",
        bf16=False,
        optimizer="sgd",
        max_length=FMT.max_length,
    )
    dp = (
        DPSpec(noise_multiplier=0.0, max_grad_norm=1.0, accountant="rdp", grad_sample_mode="hooks") if private else None
    )
    override = GradientCanaries(design, adapter_parameters(bundle.model))
    before = adapter_state(bundle.model)
    train_local(bundle.model, dataset, collate, spec, choice_token_ids(bundle.tokenizer, FMT), dp, override=override)
    after = adapter_state(bundle.model)
    load_adapter_state(bundle.model, bundle.initial_adapter)
    # every record is in every batch (rate 1), no noise: each step moves lr / batch * C along each canary
    expected = 3 * 0.5 / len(dataset) * 1.0
    for index in (0, 1):
        assert _score(design, index, before, after) == pytest.approx(expected, rel=0.3)
    assert abs(_score(design, 5, before, after)) < 0.3 * expected  # a canary the node does not hold


def test_the_coordinator_regenerates_seeded_noise_but_not_the_nodes_own(bundle):
    """One node's round under plain SGD: with the research seed the noise is a public function of
    it, and subtracting it leaves only the clipped gradients (norm at most steps x C); with
    OS-entropy noise the same subtraction leaves the noise in."""
    design = _design(bundle, 2)
    records = [Record(f"word{i} plot", "positive" if i % 2 else "negative") for i in range(64)]
    shard = tokenize_records(records, bundle.tokenizer, FMT)
    collate = make_collate(bundle.pad_id, prompt_only=True)
    noise, lr, steps = 4.0, 0.1, 3
    dp = DPSpec(noise_multiplier=noise, max_grad_norm=1.0, accountant="rdp", grad_sample_mode="hooks")
    order = [(name, tuple(p.shape)) for name, p in adapter_parameters(bundle.model).items()]
    attack = SeededNoise(
        seed_for=lambda r, k: 1234,
        param_order=order,
        layout=design.layout,
        steps=steps,
        lr=lr,
        std_for=lambda k: noise * 1.0,
    )
    residual, known_batch, seen = {}, {}, {}
    for seed in (1234, None):
        load_adapter_state(bundle.model, bundle.initial_adapter)
        spec = LocalSpec(
            steps=steps,
            batch_size=16,
            lr=lr,
            weight_decay=0.0,
            objective="choices",
            bf16=False,
            optimizer="sgd",
            seed=seed,
            max_length=FMT.max_length,
        )
        before = design.layout.flatten(adapter_state(bundle.model))
        seen[seed] = train_local(
            bundle.model, shard, collate, spec, choice_token_ids(bundle.tokenizer, FMT), dp
        ).examples_seen
        descent = before - design.layout.flatten(adapter_state(bundle.model))
        residual[seed] = np.linalg.norm(attack(1, 0, descent))
        # with the true expected batch (16) instead of the attack's estimate of it
        known_batch[seed] = np.linalg.norm(descent / lr * 16 - attack.noise_sum(1, 0))
    load_adapter_state(bundle.model, bundle.initial_adapter)
    # what is left is the sum of the clipped per-sample gradients: at most C per record drawn
    assert residual[1234] <= seen[1234] * 1.0 * 1.001
    assert known_batch[1234] <= seen[1234] * 1.0 * 1.001
    # the node's own noise stays in even when the coordinator knows the batch size: the difference
    # of two independent noise sums has norm about noise * C * sqrt(2 * steps * d), far above any
    # clipped sum (the attack's own estimate of the batch size is meaningless then, so it is not used)
    assert known_batch[None] > 3 * seen[None]


def test_canary_rows_keep_their_index_through_collate(bundle):
    design = _design(bundle, 4)
    dataset = _shard(bundle, design, n=6)
    batch = with_canary_column(make_collate(bundle.pad_id, prompt_only=True))([dataset[i] for i in range(len(dataset))])
    assert batch["canary"].tolist() == [-1] * 6 + [c.index for c in design.canaries]
    assert torch.equal(
        GradientCanaries(design, adapter_parameters(bundle.model)).keep(batch),
        torch.tensor([1.0] * 6 + [0.0] * len(design.canaries)),
    )


def test_the_score_plot_draws_scores_that_differ_only_by_rounding(tmp_path):
    """A canary client's update seen without noise gives scores equal up to rounding, for which
    matplotlib cannot make finite-sized bins by itself."""
    from fedllm.tracking.plots import plot_audit

    scores = {"coordinator": [128.0, 128.00000000000003] * 30 + [0.0] * 40, "output_reader": [2.0] * 100}
    path = plot_audit(tmp_path, scores, [True] * 60 + [False] * 40)
    assert path.stat().st_size > 0


def test_the_score_plot_titles_each_adversary_with_its_bound_and_the_accounted_epsilon(tmp_path, monkeypatch):
    import matplotlib.axes

    from fedllm.tracking.plots import plot_audit

    titles = []
    original = matplotlib.axes.Axes.set

    def spy(self, **kwargs):
        titles.append(kwargs.get("title"))
        return original(self, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "set", spy)
    scores = {"coordinator": [1.0] * 60 + [0.0] * 40}
    plot_audit(tmp_path, scores, [True] * 60 + [False] * 40, bounds={"coordinator": 0.412}, accounted=7.99)
    assert titles == ["coordinator\nlower bound 0.412 vs accounted 7.99"]


def test_the_canaries_a_node_samples_are_logged_and_counted(tmp_path):
    from fedllm.audit.injection import NOT_A_CANARY, sampled_canaries

    log = tmp_path / "canaries-client-0.json.sampled"
    collate = with_canary_column(lambda items: {"rows": torch.tensor(len(items))}, log)
    item = (torch.zeros(1), torch.zeros(1), torch.zeros(1))
    collate([(*item, torch.tensor(3)), (*item, torch.tensor(NOT_A_CANARY))])
    collate([(*item, torch.tensor(NOT_A_CANARY))])  # a batch without canaries writes nothing
    collate([(*item, torch.tensor(5)), (*item, torch.tensor(3))])
    assert log.read_text().splitlines() == ["3", "5 3"]
    assert sampled_canaries([log, tmp_path / "never-written.sampled"]) == {3, 5}


def test_the_audits_power_is_the_bound_of_all_correct_guesses_on_the_sampled_canaries(bundle):
    from fedllm.audit.bound import epsilon_lower_bound
    from fedllm.audit.run import _power

    design = _design(bundle, count=100)
    included = [c.index for c in design.canaries if c.included]
    assert _power(design, set(), 1e-5, 0.95) == {"canaries_sampled": 0, "power": 0.0}
    excluded = {c.index for c in design.canaries if not c.included}
    power = _power(design, set(included[:20]) | excluded, 1e-5, 0.95)  # excluded ones never count
    assert power["canaries_sampled"] == 20
    assert power["power"] == epsilon_lower_bound(canaries=100, guesses=20, correct=20, delta=1e-5, confidence=0.95)
    assert _power(design, None, 1e-5, 0.95) == {"canaries_sampled": None, "power": None}
