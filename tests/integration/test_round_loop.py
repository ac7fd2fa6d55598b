"""The server's round loop with the real ServerApp and ClientApp in one process (seconds, no Ray):
bad replies, failures, unreachable nodes, refusals, the stop rule and resume.

The Ray simulations in tests/e2e run the same scenarios through Flower's engine; these pin
the loop's behaviour on every change (``make test-fast``).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from fedllm.config import ClientCap, ExperimentConfig, FederationConfig, TrainConfig
from fedllm.federation.inprocess import run_inprocess
from fedllm.federation.server_app import prepare_run
from fedllm.privacy.node_ledger import NodeLedger
from fedllm.tracking.run_files import RoundRecord, RunSummary, read_rounds, read_summary
from tests.conftest import tiny_config
from tests.e2e.attack_app import app as attack_app


def _cfg(tmp_path: Path, **federation) -> ExperimentConfig:
    cfg = tiny_config(
        train=TrainConfig(local_steps=1, eval_batch_size=50),
        federation=FederationConfig(**{"num_clients": 3, "num_rounds": 2, **federation}),
    )
    return dataclasses.replace(
        cfg,
        privacy=dataclasses.replace(cfg.privacy, state_dir=str(tmp_path / "nodes")),
        tracking=dataclasses.replace(cfg.tracking, progress=False),
    )


def _run(cfg: ExperimentConfig, run_dir: Path, **kwargs) -> tuple[RunSummary, list[RoundRecord]]:
    if not kwargs.get("resume"):
        prepare_run(cfg, run_dir)
    summary = run_inprocess(cfg, run_dir, **kwargs)
    assert read_summary(run_dir) == summary  # what the run returns is what it wrote
    return summary, read_rounds(run_dir)


@pytest.mark.slow  # seconds each: kept out of the fast tier (make test runs it)
def test_bad_replies_are_rejected_and_a_crash_is_counted_while_the_round_goes_on(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDLLM_TEST_ATTACKS", "0:nan,1:crash")
    # 2 honest updates in round 1: accepted knowingly (federation.min_updates=2)
    summary, rounds = _run(_cfg(tmp_path, num_clients=4, min_updates=2), tmp_path / "run", client_app=attack_app)
    assert [r.rejected_updates for r in rounds] == [0, 1, 1]
    assert "NaN or infinite" in rounds[1].rejections[0]
    assert len(rounds[1].failed) == 1 and "simulated node crash" in rounds[1].failed[0]
    assert [r.num_clients for r in rounds] == [0, 2, 3]  # the crashed node came back in round 2
    assert summary.rounds_completed == 2


@pytest.mark.slow  # seconds each: kept out of the fast tier (make test runs it)
def test_a_node_that_never_answers_is_a_failure_not_a_stall(tmp_path):
    summary, rounds = _run(_cfg(tmp_path, min_updates=2), tmp_path / "run", unreachable=[2])
    assert [len(r.failed) for r in rounds] == [0, 1, 1]
    assert "no reply" in rounds[1].failed[0]
    assert [r.num_clients for r in rounds] == [0, 2, 2]
    assert set(summary.client_epsilons or {}) == {"0", "1"}


@pytest.mark.slow  # seconds each: kept out of the fast tier (make test runs it)
def test_a_capped_node_refuses_and_the_run_stops_when_too_few_can_train(tmp_path):
    cfg = _cfg(tmp_path, min_train_clients=3)
    cfg = dataclasses.replace(cfg, privacy=dataclasses.replace(cfg.privacy, client_caps=(ClientCap(1, 4.0),)))
    summary, rounds = _run(cfg, tmp_path / "run")
    assert rounds[1].refused == [1]
    assert summary.rounds_completed == 1 and "only 2 of 3 clients" in (summary.stop_reason or "")
    assert NodeLedger(tmp_path / "nodes" / "client-1", "simulated-shard-1").history() == []  # trained nothing


class _ServerCrash(Exception):
    """The server dies mid-round."""


@pytest.mark.slow  # seconds each: kept out of the fast tier (make test runs it)
def test_resume_continues_without_a_second_release_of_a_finished_round(tmp_path):
    run_dir, cfg = tmp_path / "run", _cfg(tmp_path)

    def crash_in_round_2(message, reply):  # the server dies after node 0 has answered round 2
        if message.content["config"]["server-round"] == 2:
            raise _ServerCrash

    with pytest.raises(_ServerCrash):
        _run(cfg, run_dir, observer=crash_in_round_2)
    summary, rounds = _run(cfg, run_dir, resume=True)
    assert [r.round for r in rounds] == [0, 1, 2] and summary.rounds_completed == 2
    for client in range(3):
        releases = NodeLedger(tmp_path / "nodes" / f"client-{client}", f"simulated-shard-{client}").releases
        # the node that answered round 2 before the crash replays that update: one release per round
        assert sorted(r.server_round for r in releases) == [1, 2], client
    assert summary.final_max_epsilon is not None and summary.final_max_epsilon <= cfg.privacy.target_epsilon


@pytest.mark.slow  # seconds each: kept out of the fast tier (make test runs it)
def test_fedllm_simulate_runs_on_the_in_process_engine(tmp_path):
    from fedllm.cli.simulate import simulate

    cfg = _cfg(tmp_path)
    cfg = dataclasses.replace(cfg, federation=dataclasses.replace(cfg.federation, engine="inprocess"))
    summary = simulate(cfg, tmp_path / "run")
    assert summary.status == "completed" and summary.rounds_completed == 2
    assert summary == read_summary(tmp_path / "run")  # the ServerApp's summary: the command adds nothing
    assert summary.wall_seconds is not None and summary.federation_seconds is not None
    assert summary.wall_seconds >= summary.federation_seconds > 0 and (tmp_path / "run" / "adapter").is_dir()
