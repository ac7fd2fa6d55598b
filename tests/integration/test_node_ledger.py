"""The real ClientApp, round by round, against its persisted ledger (no server needed)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedllm import task
from fedllm.config import ExperimentConfig, FederationConfig, PrivacyConfig
from fedllm.federation import records as keys
from fedllm.node.reply_cache import ReplyCache
from fedllm.privacy.node_ledger import NodeLedger
from tests.conftest import tiny_config
from tests.node_driver import run_round, simulated_node

ROOT = Path(__file__).resolve().parents[2]


def _cfg(state_dir: Path, rounds: int = 2, **privacy) -> ExperimentConfig:
    return tiny_config(
        privacy=PrivacyConfig(state_dir=str(state_dir), **privacy),
        federation=FederationConfig(num_clients=3, num_rounds=rounds),
    )


def _ledger(cfg: ExperimentConfig, client: int = 0) -> NodeLedger:
    return NodeLedger(Path(cfg.privacy.state_dir) / f"client-{client}", f"simulated-shard-{client}")


def test_a_repeated_round_resends_the_released_update_at_no_privacy_cost(tmp_path):
    cfg = _cfg(tmp_path)
    first = run_round(cfg, "run-a", 1)
    again = run_round(cfg, "run-a", 1)  # a resumed server sends the same round again
    assert again.content[keys.METRICS][keys.REPLAYED] == 1
    assert again.content[keys.METRICS][keys.EPSILON] == first.content[keys.METRICS][keys.EPSILON]
    sent = first.content[keys.ARRAYS].to_torch_state_dict()
    resent = again.content[keys.ARRAYS].to_torch_state_dict()
    assert all((sent[k] == resent[k]).all() for k in sent)
    assert len(_ledger(cfg).releases) == 1


@pytest.mark.slow  # seconds each: kept out of the fast tier (make test runs it)
def test_a_second_run_on_the_same_data_continues_from_the_node_ledger(tmp_path):
    cfg = _cfg(tmp_path)
    for server_round in (1, 2):
        assert run_round(cfg, "run-a", server_round).content[keys.METRICS][keys.REFUSED] == 0
    reply = run_round(cfg, "run-b", 1)  # the plan spent the whole budget in run-a
    assert reply.content[keys.METRICS][keys.REFUSED] == 1
    assert reply.content[keys.STATUS][keys.CATEGORY] == "budget"
    assert keys.ARRAYS not in reply.content.array_records  # a refusal sends no update
    assert [r.run_id for r in _ledger(cfg).releases] == ["run-a", "run-a"]


def test_the_node_config_cap_wins_over_the_server_target(tmp_path):
    cfg = _cfg(tmp_path, target_epsilon=8.0)
    own = simulated_node(cfg, max_epsilon=7.0, state_dir=str(tmp_path / "own"))
    assert run_round(cfg, "run", 1, node_config=own).content[keys.METRICS][keys.EPSILON_CAP] == 7.0
    reply = run_round(cfg, "run", 2, node_config=own)  # round 2 would reach ~8.0 > 7
    assert reply.content[keys.METRICS][keys.REFUSED] == 1
    assert (tmp_path / "own" / "privacy_ledger.json").is_file()
    lenient = simulated_node(cfg, max_epsilon=50.0, state_dir=str(tmp_path / "lenient"))
    assert run_round(cfg, "run", 1, node_config=lenient).content[keys.METRICS][keys.EPSILON_CAP] == 8.0


class _Killed(BaseException):
    """The node process dying at a given point (not an error any handler may catch)."""


def _die_after(monkeypatch, owner, name: str) -> None:
    """The next call of ``owner.name`` completes its write, then the node dies."""
    real = getattr(owner, name)

    def write_then_die(self, *args, **kwargs):
        real(self, *args, **kwargs)
        monkeypatch.setattr(owner, name, real)
        raise _Killed(name)

    monkeypatch.setattr(owner, name, write_then_die)


@pytest.mark.slow  # seconds each: kept out of the fast tier (make test runs it)
@pytest.mark.parametrize("step", ["save", "record"])
def test_a_node_dying_between_its_two_writes_ends_with_the_epsilon_of_an_uninterrupted_one(tmp_path, monkeypatch, step):
    # the reply cache and the ledger are two files: whichever the node dies after, its restart
    # must neither count round 2 twice (which cost it round 3 when the ledger came first) nor skip it
    reference = _cfg(tmp_path / "uninterrupted", rounds=3)
    for server_round in (1, 2, 3):
        run_round(reference, "run", server_round)
    cfg = _cfg(tmp_path / "killed", rounds=3)
    run_round(cfg, "run", 1)
    _die_after(monkeypatch, ReplyCache if step == "save" else NodeLedger, step)
    with pytest.raises(_Killed):
        run_round(cfg, "run", 2)
    replies = [run_round(cfg, "run", server_round) for server_round in (2, 3)]  # restarted
    assert [r.content[keys.METRICS][keys.REFUSED] for r in replies] == [0, 0]
    assert dict(replies[0].content[keys.METRICS]).get(keys.REPLAYED, 0) == (step == "record")
    assert [r.server_round for r in _ledger(cfg).releases] == [1, 2, 3]
    assert _ledger(cfg).history() == _ledger(reference).history()


@pytest.mark.slow  # seconds each: kept out of the fast tier (make test runs it)
def test_a_reply_saved_but_never_recorded_is_never_sent_unaccounted(tmp_path, monkeypatch):
    # round 2 released; the server sends round 2 again with another global adapter, and the node
    # dies after saving that second reply but before recording it. Asked once more, the node
    # must not resend that reply as if round 2's recorded release covered it
    cfg = _cfg(tmp_path, rounds=3)
    for server_round in (1, 2):
        run_round(cfg, "run", server_round)
    other = {
        name: tensor + 0.01 for name, tensor in task.model_bundle(cfg.model, cfg.lora, cfg.seed).initial_adapter.items()
    }
    _die_after(monkeypatch, ReplyCache, "save")
    with pytest.raises(_Killed):
        run_round(cfg, "run", 2, arrays=other)
    reply = run_round(cfg, "run", 2, arrays=other)
    assert keys.REPLAYED not in dict(reply.content[keys.METRICS])
    assert [r.server_round for r in _ledger(cfg).releases] == [1, 2, 2]  # what it sends is counted


def _node_process(config: Path, run_id: str, rounds: list[int]) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "tests.node_driver", str(config), run_id, *map(str, rounds)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
        start_new_session=True,
    )


@pytest.mark.slow  # node processes started and killed
@pytest.mark.timeout(300)
def test_a_node_killed_mid_run_ends_with_the_epsilon_of_an_uninterrupted_one(tmp_path):
    rounds = [1, 2, 3]
    reference = _cfg(tmp_path / "uninterrupted", rounds=3)
    for server_round in rounds:
        run_round(reference, "run", server_round)

    cfg = _cfg(tmp_path / "killed", rounds=3)
    config = tmp_path / "config.json"
    config.write_text(cfg.to_json())
    node = _node_process(config, "run", rounds)
    for line in node.stdout:  # kill the node while it trains round 2
        if json.loads(line) == {"round": 2, "started": True}:
            time.sleep(0.3)
            os.killpg(node.pid, signal.SIGKILL)
            break
    node.wait(timeout=60)
    assert node.returncode == -signal.SIGKILL
    # restarted, the node gets round 2 again (the server never saw its reply) and round 3
    restarted = _node_process(config, "run", [2, 3])
    assert restarted.wait(timeout=240) == 0
    assert _ledger(cfg).history() == _ledger(reference).history()
    assert [r.server_round for r in _ledger(cfg).releases] == rounds
    assert _ledger(cfg).epsilon(delta=1e-5, accountant="prv") <= cfg.privacy.target_epsilon
