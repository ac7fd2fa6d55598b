"""A node's record count is not released (issue 23, item 2), tried as a curious coordinator.

The attack: with ``answer-preflight=false`` the coordinator sends train messages whose
``train.batch_size`` or ``privacy.delta`` straddle a guess of the node's record count n; before
the fix a ``data`` refusal came back exactly when n < batch or delta >= 1/n (n found in 10-20
messages, no release recorded), and a round at batch 1 returned ``sample-rate = 1/n``. D and D
minus one record were then told apart with certainty, so the add/remove-one guarantee the node
prints did not hold. Now every plan, rate, refusal and declared size comes from the node's public
``sampling-size`` N: each probe below gets the same reply from D and from D' (the real ClientApp,
no engine). And the epsilon the node accounts for a shard whose n differs from N is Google's
dp-accounting's for a Poisson-sampled Gaussian at the rate N fixes.
"""

from __future__ import annotations

import json
from pathlib import Path

import dp_accounting
import pytest
from dp_accounting.pld import PLDAccountant

from fedllm import task
from fedllm.config import FederationConfig, ModelConfig, PrivacyConfig, TrainConfig
from fedllm.federation import records as keys
from fedllm.planning import plan_for
from fedllm.privacy.accounting import epsilon
from tests.conftest import tiny_config
from tests.node_driver import run_round

RECORDS = 120  # D; D' is D without its last record
SAMPLING_SIZE = 100  # the node's public N: a round figure near its dataset's size, not equal to it


def _records(path: Path, count: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        "".join(
            json.dumps({"prompt": f"review number {i} was {'great' if i % 2 else 'dull'}", "response": "positive"})
            + "\n"
            for i in range(count)
        ),
        encoding="utf-8",
    )
    return path


def _node(tmp_path: Path, records: int, probe: str, **extra) -> dict:
    """A deployed node holding ``records`` records, with a fresh state for each probe (so every
    reply is the probe's own, never a budget refusal left by an earlier probe)."""
    return {
        keys.NODE_PARTITION_ID: 0,
        "state-dir": str(tmp_path / f"state-{records}" / probe),
        "data-path": str(_records(tmp_path / f"data-{records}.jsonl", records)),
        "max-epsilon": 1e6,  # the node's cap never binds: only the server's values move
        "delta": 1e-5,
        "sampling-size": SAMPLING_SIZE,
        "answer-preflight": "false",
        "max-batch-size": 4096,
        "allowed-models": "tiny",
        **{key.replace("_", "-"): value for key, value in extra.items()},
    }


def _reply(cfg, node: dict) -> dict:
    """Everything a reply tells the server besides the adapter: its metrics and refusal category."""
    reply = run_round(
        cfg, "probe", 1, node_config=node, arrays=task.model_bundle(cfg.model, cfg.lora, cfg.seed).initial_adapter
    )
    status = dict(reply.content[keys.STATUS]) if keys.STATUS in reply.content.config_records else {}
    return {"metrics": dict(reply.content[keys.METRICS]), "status": status}


def _probe_cfg(batch_size: int = 16, delta: float = 1e-5):
    return tiny_config(
        train=TrainConfig(local_steps=1, batch_size=batch_size),
        privacy=PrivacyConfig(delta=delta, noise_multiplier=1.0),  # fixed noise: no calibration per probe
        federation=FederationConfig(num_clients=3, num_rounds=1),
    )


# the batch sizes straddle n = 120 (D) and 119 (D'), where the refusal used to flip, and N = 100;
# batch 1 used to return sample-rate 1/n exactly
BATCHES = [1, 99, 100, 101, 119, 120, 121]
# the deltas straddle 1/n for both n (1/119.5 lies between 1/120 and 1/119) and 1/N
DELTAS = [1 / 121, 1 / 119.5, 1 / 118, 1 / 101, 1 / 100, 1 / 99]


@pytest.mark.slow  # seconds each: kept out of the fast tier (make test runs it)
def test_a_size_probe_gets_the_same_answers_from_d_and_from_d_minus_one_record(tmp_path):
    probes = [(f"batch-{b}", _probe_cfg(batch_size=b)) for b in BATCHES]
    probes += [(f"delta-{i}", _probe_cfg(delta=d)) for i, d in enumerate(DELTAS)]
    answers = {}
    for name, cfg in probes:
        with_all = _reply(cfg, _node(tmp_path, RECORDS, name))
        without_one = _reply(cfg, _node(tmp_path, RECORDS - 1, name))
        assert with_all == without_one, name  # refusal category, sample rate, epsilon, history: all equal
        answers[name] = with_all
    # the boundaries follow N, not n: the answers are those of a node of SAMPLING_SIZE records
    assert answers["batch-1"]["metrics"][keys.SAMPLE_RATE] == 1 / SAMPLING_SIZE
    assert answers["batch-100"]["metrics"][keys.REFUSED] == 0
    for name in ("batch-101", "batch-119", "batch-120", "batch-121", "delta-4", "delta-5"):
        assert answers[name]["status"] == {keys.CATEGORY: "policy"}, name  # decided from public values
    for name in ("batch-99", "delta-0", "delta-1", "delta-2", "delta-3"):
        assert answers[name]["metrics"][keys.REFUSED] == 0, name


@pytest.mark.slow  # seconds each: kept out of the fast tier (make test runs it)
def test_a_public_size_is_the_sampling_size_not_the_record_count(tmp_path):
    cfg = _probe_cfg()
    sent = [_reply(cfg, _node(tmp_path, n, "public", public_size="true"))["metrics"] for n in (RECORDS, RECORDS - 1)]
    assert sent[0] == sent[1] and sent[0][keys.NUM_EXAMPLES] == SAMPLING_SIZE


def _pld_epsilon(noise: float, rate: float, steps: int, delta: float) -> float:
    """Google's dp-accounting: a Poisson-sampled Gaussian composed ``steps`` times, add/remove-one."""
    accountant = PLDAccountant(
        neighboring_relation=dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE, value_discretization_interval=1e-3
    )
    accountant.compose(dp_accounting.PoissonSampledDpEvent(rate, dp_accounting.GaussianDpEvent(noise)), steps)
    return accountant.get_epsilon(delta)


@pytest.mark.slow  # seconds each: kept out of the fast tier (make test runs it)
@pytest.mark.parametrize("records", [60, 130])  # fewer and more records than the node's N = 100
def test_the_accounted_epsilon_is_dp_accountings_at_the_rate_the_sampling_size_fixes(tmp_path, records):
    cfg = tiny_config(
        model=ModelConfig(source="tiny"),
        train=TrainConfig(local_steps=3, batch_size=16),
        federation=FederationConfig(num_clients=3, num_rounds=2),
    )
    node = _node(tmp_path, records, "pinned", max_epsilon=8.0)
    metrics = _reply(cfg, node)["metrics"]
    plan = plan_for(cfg, SAMPLING_SIZE)  # N = 100, b = 16: q = 1 / 7, whatever the records
    assert plan.sample_rate == 1 / 7
    assert metrics[keys.REFUSED] == 0
    assert metrics[keys.DP_HISTORY] == [plan.noise_multiplier, 1 / 7, 3.0]  # what Opacus accounted
    theirs = _pld_epsilon(plan.noise_multiplier, 1 / 7, 3, 1e-5)
    # the node's PRV accountant is within +0.5% of dp-accounting's PLD (tests/unit/test_privacy.py)
    assert theirs <= metrics[keys.EPSILON] <= theirs * 1.005
    # and the rate the records would have given is not what was accounted
    own_rate = 1 / -(-records // 16)
    assert epsilon([(plan.noise_multiplier, own_rate, 3)], delta=1e-5, accountant="prv") != pytest.approx(
        metrics[keys.EPSILON], rel=0.01
    )
