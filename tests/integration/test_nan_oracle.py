"""Issue 23's NaN membership oracle, played through the real ClientApp by a coordinator who crafts
the global adapter (:mod:`tests.nan_adapter`): whether the target record is in the node's data must
not decide whether the node's answer is finite, refused or an error."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import pytest
import torch

from fedllm import task
from fedllm.config import FederationConfig, ModelConfig, PrivacyConfig, TrainConfig
from fedllm.data.formatting import make_collate
from fedllm.federation import records as keys
from fedllm.privacy.node_ledger import NodeLedger
from fedllm.training.objectives import per_example_loss
from tests.conftest import tiny_config
from tests.nan_adapter import nan_adapter, token_ids
from tests.node_driver import node_context, train_message

RECORDS = 24
TARGET_WORD = "zygomorphic"
LAX = {"max-adapter-abs": 1e30, "max-adapter-norm": 1e30}  # an operator who raised the bounds far


# the random test model (hidden size above the records' vocabulary, so the coordinator can aim at one
# token exactly), and the default model (SmolLM2-135M, hidden size 576)
MODELS = {
    "tiny": ModelConfig(source="tiny", hidden_size=256, num_layers=2, num_heads=4, intermediate_size=128),
    "embedded": ModelConfig(),
}
MODEL_PARAMS = [pytest.param("tiny"), pytest.param("embedded", marks=pytest.mark.slow)]


def _cfg(model: str = "tiny", **train):
    base = tiny_config()
    return tiny_config(
        model=MODELS[model],
        # the records are a few words long: a narrower fixed width of the DP steps keeps this test quick
        data=dataclasses.replace(base.data, max_length=32),
        # fp32 (the coordinator picks it); batch = the node's sampling size: every record in every step
        train=TrainConfig(local_steps=2, batch_size=RECORDS, precision="fp32", **train),
        privacy=PrivacyConfig(noise_multiplier=50.0),
        federation=FederationConfig(num_clients=1, num_rounds=3, min_updates=1),
    )


def _write(path: Path, with_target: bool) -> Path:
    """D' (``with_target`` False) or D = D' plus the one record holding the target word."""
    rows = [
        {
            "prompt": f"review number {i} was {'great' if i % 2 else 'dull'}",
            "response": "positive" if i % 2 else "negative",
        }
        for i in range(RECORDS)
    ]
    if with_target:
        rows.append({"prompt": f"review number 7 was {TARGET_WORD}", "response": "positive"})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def _node(tmp_path: Path, with_target: bool, **extra) -> dict:
    name = "with" if with_target else "without"
    return {
        keys.NODE_PARTITION_ID: 0,
        "state-dir": str(tmp_path / f"state-{name}"),
        "data-path": str(_write(tmp_path / f"data-{name}.jsonl", with_target)),
        "max-epsilon": 1000.0,
        "delta": 1e-5,
        "allowed-models": "tiny,embedded",
        "sampling-size": RECORDS,  # sampling rate 1/ceil(N/batch) = 1 for D' and for D
        **extra,
    }


def _crafted(tmp_path: Path, cfg) -> tuple[dict[str, torch.Tensor], int]:
    """The adapter a coordinator crafts knowing D' and the target word, and the target token."""
    node = _node(tmp_path / "coordinator", with_target=True)
    with_target, _ = task.node_shard(cfg, 0, node["data-path"], "auto")
    without, _ = task.node_shard(cfg, 0, _node(tmp_path / "coordinator", with_target=False)["data-path"], "auto")
    bundle = task.model_bundle(cfg.model, cfg.lora, cfg.seed)
    others = token_ids(without) | {bundle.pad_id, 0}  # and the dummy rows of fixed-shape micro-batches (token 0)
    target = min(token_ids(with_target) - others)
    return nan_adapter(cfg, target, others), target


def _losses(cfg, adapter, shard) -> torch.Tensor:
    bundle = task.model_bundle(cfg.model, cfg.lora, cfg.seed)
    batch = make_collate(bundle.pad_id, prompt_only=True)(list(shard.items))
    with bundle.adapter(adapter) as model, torch.no_grad():
        model.eval()
        return per_example_loss(model, batch, "choices", task.choice_ids_for(cfg))


@pytest.mark.parametrize("model", MODEL_PARAMS)
def test_the_crafted_adapter_makes_only_the_target_record_nan(tmp_path, model):
    """The attack is real: without the node's defences one record decides whether the update is NaN."""
    cfg = _cfg(model)
    adapter, _ = _crafted(tmp_path, cfg)
    shard, _ = task.node_shard(cfg, 0, _node(tmp_path, with_target=True)["data-path"], "auto")
    losses = _losses(cfg, adapter, shard)
    assert torch.isnan(losses[-1])  # the target record, last in the file
    assert torch.isfinite(losses[:-1]).all()


def _round(cfg, node: dict, adapter: dict, server_round: int):
    from fedllm.federation.client_app import app

    return app(train_message(cfg, "oracle", server_round, adapter), node_context(node))


@pytest.mark.parametrize("model", MODEL_PARAMS)
def test_a_node_refuses_the_crafted_adapter_before_reading_its_data(tmp_path, model):
    cfg = _cfg(model)
    adapter, _ = _crafted(tmp_path, cfg)
    for with_target in (True, False):
        node = _node(tmp_path, with_target)
        reply = _round(cfg, node, adapter, 1)
        assert keys.ARRAYS not in reply.content.array_records
        assert reply.content[keys.STATUS][keys.CATEGORY] == "policy"
        assert dict(reply.content[keys.METRICS]) == {
            keys.PARTITION_ID: 0,
            keys.REFUSED: 1,
            keys.CAN_CONTINUE: 0,
            keys.EPSILON_CAP: 1000.0,
        }
        assert not (Path(node["state-dir"]) / "privacy_ledger.json").exists()  # nothing spent, nothing read


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), 101.0])
def test_a_non_finite_or_out_of_bounds_adapter_is_refused(tmp_path, bad):
    cfg = _cfg()
    adapter = {k: v.clone() for k, v in task.model_bundle(cfg.model, cfg.lora, cfg.seed).initial_adapter.items()}
    next(iter(adapter.values()))[0, 0] = bad
    reply = _round(cfg, _node(tmp_path, with_target=False), adapter, 1)
    assert reply.content[keys.STATUS][keys.CATEGORY] == "policy"


@pytest.mark.slow  # seconds each: kept out of the fast tier (make test runs it)
@pytest.mark.parametrize("model", MODEL_PARAMS)
def test_a_node_with_raised_bounds_sends_a_finite_update_with_or_without_the_record(tmp_path, caplog, model):
    """Past the bounds, the target record's NaN gradient is zeroed before clipping: D and D' both
    give finite updates, and only the node's own log counts the zeroed gradients."""
    cfg = _cfg(model)
    adapter, _ = _crafted(tmp_path, cfg)
    zeroed = {}
    for with_target in (True, False):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="fedllm"):
            reply = _round(cfg, _node(tmp_path, with_target, **LAX), adapter, 1)
        arrays = reply.content[keys.ARRAYS].to_torch_state_dict()
        assert all(torch.isfinite(t).all() for t in arrays.values())
        assert reply.content[keys.METRICS][keys.REFUSED] == 0
        zeroed[with_target] = [
            r.getMessage() for r in caplog.records if "were zeroed before clipping" in r.getMessage()
        ]
    assert len(zeroed[True]) == 1 and "2 per-sample gradient(s)" in zeroed[True][0]  # one in each step
    assert zeroed[False] == []


def test_an_update_that_is_not_finite_is_counted_and_answered_error(tmp_path):
    """A learning rate that overflows the update (plain SGD, lr near float32's largest value): the node
    never sends it, says only 'error', and the release (the DP mechanism ran) stays in its ledger and
    in the reply's accounting."""
    cfg = _cfg(lr=3e38, optimizer="sgd")
    node = _node(tmp_path, with_target=False)
    initial = task.model_bundle(cfg.model, cfg.lora, cfg.seed).initial_adapter
    reply = _round(cfg, node, initial, 1)
    assert keys.ARRAYS not in reply.content.array_records
    assert reply.content[keys.STATUS][keys.CATEGORY] == "error"
    metrics = reply.content[keys.METRICS]
    assert metrics[keys.EPSILON] > 0 and len(metrics[keys.DP_HISTORY]) == 3
    ledger = NodeLedger(Path(node["state-dir"]), str(Path(node["data-path"]).resolve()))
    assert len(ledger.releases) == 1
