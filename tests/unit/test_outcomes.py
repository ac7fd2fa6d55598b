"""Honest outcomes (issue 15, item 1): a run in which no client trained, or whose engine failed,
is recorded and reported as failed, never as a result; timeouts say the time actually waited.

The round loop runs for real here (the in-process engine: the ServerApp loop and a ClientApp, no
Ray); Flower's engine is replaced by a stand-in where the test is about what happens when it fails.
"""

from __future__ import annotations

import dataclasses
import json
import threading
import time
from pathlib import Path

import pytest

from fedllm.analysis.report import privacy_utility_points, report_rows, to_markdown
from fedllm.analysis.runs import find_runs
from fedllm.config import ClientCap, ExperimentConfig, FederationConfig, TrainConfig
from fedllm.errors import FedLLMError
from fedllm.federation import simulation
from fedllm.federation.inprocess import InProcessGrid, run_inprocess, server_identity
from fedllm.federation.outputs import run_outcome
from fedllm.federation.server_app import prepare_run
from fedllm.tracking.run_files import RoundRecord, read_rounds, read_summary
from fedllm.tracking.run_manifest import verify_run_manifest, write_run_manifest
from tests.conftest import tiny_config


def _cfg(tmp_path: Path, **federation) -> ExperimentConfig:
    cfg = tiny_config(
        train=TrainConfig(local_steps=1, eval_batch_size=50),
        federation=FederationConfig(**{"num_clients": 2, "num_rounds": 2, "min_updates": 2, **federation}),
    )
    return dataclasses.replace(
        cfg,
        privacy=dataclasses.replace(cfg.privacy, state_dir=str(tmp_path / "nodes")),
        tracking=dataclasses.replace(cfg.tracking, progress=False),
    )


def always_fails(message, context):
    """A ClientApp whose every node crashes (as when the engine cannot start the app)."""
    raise RuntimeError("node cannot start: out of memory")


@pytest.mark.slow  # seconds each: kept out of the fast tier (make test runs it)
def test_a_run_in_which_no_client_trained_is_failed_with_the_reason(tmp_path):
    cfg, run_dir = _cfg(tmp_path), tmp_path / "run"
    prepare_run(cfg, run_dir)
    summary = run_inprocess(cfg, run_dir, client_app=always_fails)
    assert summary == read_summary(run_dir)
    assert summary.status == "failed" and summary.rounds_completed == 2
    assert "summary.json" in verify_run_manifest(run_dir, None)  # a failed run's files are vouched for too
    assert summary.failure and summary.failure.startswith("no client update in any of the 2 round(s) run: 4 failed")
    assert "out of memory" in summary.failure


@pytest.mark.slow  # seconds each: kept out of the fast tier (make test runs it)
def test_a_node_that_never_answered_says_how_long_was_waited(tmp_path):
    # the in-process engine returns at once for an unreachable node, as Flower's did when Ray had
    # failed: the message must not claim the hour-long timeout passed
    cfg, run_dir = _cfg(tmp_path, round_timeout=3600.0, num_rounds=1), tmp_path / "run"
    prepare_run(cfg, run_dir)
    summary = run_inprocess(cfg, run_dir, unreachable=[0, 1])
    failed = read_rounds(run_dir)[1].failed
    assert len(failed) == 2 and all("before federation.round_timeout=3600 s" in f for f in failed)
    assert summary.status == "failed" and summary.failure and "no reply within 3600" not in summary.failure


@pytest.mark.slow  # seconds each: kept out of the fast tier (make test runs it)
def test_completed_and_stopped_runs_say_so(tmp_path):
    cfg, run_dir = _cfg(tmp_path, num_rounds=1), tmp_path / "run"
    prepare_run(cfg, run_dir)
    assert run_inprocess(cfg, run_dir).status == "completed"
    assert "failure" not in json.loads((run_dir / "summary.json").read_text())
    assert verify_run_manifest(run_dir, None) == [
        "adapter/checksums.json",
        "config.json",
        "metrics.jsonl",
        "privacy_ledger.json",
        "summary.json",
    ]
    # a node capped between one round (epsilon 7.06) and two (8.0) trains round 1 and can do no more; with
    # min_train_clients=2 the run stops after round 1 (which aggregated both updates)
    capped = dataclasses.replace(
        _cfg(tmp_path / "b", min_train_clients=2),
        privacy=dataclasses.replace(
            cfg.privacy, state_dir=str(tmp_path / "b" / "nodes"), client_caps=(ClientCap(1, 7.5),)
        ),
    )
    prepare_run(capped, tmp_path / "stopped")
    stopped = run_inprocess(capped, tmp_path / "stopped")
    assert stopped.status == "stopped" and stopped.stop_reason


def test_outcome_rules():
    zero_shot, trained = RoundRecord(round=0), RoundRecord(round=1, num_clients=2)
    nothing = RoundRecord(round=1, num_clients=0, refused=[0, 1])
    assert run_outcome([zero_shot, trained], None) == ("completed", None)
    assert run_outcome([zero_shot, trained], "caps") == ("stopped", None)
    status, why = run_outcome([zero_shot, nothing], "caps")
    assert status == "failed" and why and "2 refused" in why and why.endswith("then stopped: caps")
    assert run_outcome([zero_shot, trained], None, failure="engine") == ("failed", "engine")


@pytest.mark.slow  # seconds each: kept out of the fast tier (make test runs it)
def test_simulate_fails_with_the_reason_when_no_client_trained(tmp_path, monkeypatch):
    from fedllm.cli.simulate import simulate

    def engine(cfg, run_dir, resume=False):  # the real round loop, every node crashing
        run_inprocess(cfg, run_dir, client_app=always_fails)

    monkeypatch.setattr(simulation, "run_simulation", engine)
    run_dir = tmp_path / "run"
    with pytest.raises(FedLLMError, match="the run failed: no client update in any of the 1 round"):
        simulate(_cfg(tmp_path, num_rounds=1), run_dir)
    summary = read_summary(run_dir)
    assert summary.status == "failed" and summary.wall_seconds is not None and summary.wall_seconds > 0


def test_simulate_records_a_failure_before_the_first_round(tmp_path, monkeypatch):
    from fedllm.cli.simulate import simulate

    def engine(cfg, run_dir, resume=False):
        raise simulation.EngineFailed("the simulation engine failed: RuntimeError: Ray did not start")

    monkeypatch.setattr(simulation, "run_simulation", engine)
    run_dir = tmp_path / "run"
    with pytest.raises(FedLLMError, match="Ray did not start"):
        simulate(_cfg(tmp_path), run_dir)
    summary = read_summary(run_dir)
    assert summary.status == "failed" and "Ray did not start" in (summary.failure or "")
    assert summary.rounds_completed == 0 and summary.rounds_planned == 2


def test_an_engine_that_fails_mid_run_stops_the_server_thread_and_the_call_returns(tmp_path, monkeypatch):
    """Flower's engine raises without joining the ServerApp thread (a Ray start-up failure):
    run_simulation must stop that thread (which would wait out round_timeout on every round),
    record the failure and raise, in seconds."""
    cfg, run_dir = _cfg(tmp_path, round_timeout=3600.0), tmp_path / "run"
    prepare_run(cfg, run_dir)
    pushed = threading.Event()

    class SilentNodes(InProcessGrid):
        def push_messages(self, messages):
            ids = super().push_messages(messages)
            pushed.set()
            return ids

    def crashing_engine(*, server_app, client_app, num_supernodes, backend_config):
        from flwr.app import Context, RecordDict

        grid = SilentNodes(client_app, num_supernodes, unreachable=range(num_supernodes))
        context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={})

        def serve():  # as Flower runs the ServerApp: its exception is queued, the thread never joined
            try:
                server_app(grid, context)
            except Exception:  # noqa: BLE001
                pass

        threading.Thread(target=serve, daemon=True).start()
        assert pushed.wait(120), "the ServerApp never sent round 1"
        raise RuntimeError("An error was encountered. Ending simulation.") from RuntimeError(
            "Simulation Runtime crashed."
        )

    monkeypatch.setattr("flwr.simulation.run_simulation", crashing_engine)
    monkeypatch.setattr(simulation, "stop_ray", lambda ray: None)
    started = time.monotonic()
    with server_identity(), pytest.raises(simulation.EngineFailed, match="Simulation Runtime crashed"):
        simulation.run_simulation(cfg, run_dir)
    assert time.monotonic() - started < 120
    summary = read_summary(run_dir)
    assert summary.status == "failed" and "the simulation engine failed" in (summary.failure or "")
    assert summary.rounds_completed == 0  # round 1 never ended: the zero-shot evaluation only


def _job(path: Path, summary: dict | None, model: str = "tiny", lr: float = 0.01) -> None:
    path.mkdir(parents=True)
    (path / "config.json").write_text(
        json.dumps(
            {
                "model": {"source": model, "name_or_path": None},
                "data": {"name": "rotten_tomatoes", "path": None},
                "train": {"lr": lr},
                "privacy": {"mode": "sample"},
            }
        )
    )
    if summary is None:
        (path / "simulate.log").write_text("[2026-01-01 00:00:00,000][fedllm][ERROR] - killed by the OOM killer\n")
        return
    (path / "summary.json").write_text(json.dumps(summary))
    (path / "metrics.jsonl").write_text(json.dumps({"round": 0}) + "\n")
    (path / "privacy_ledger.json").write_text(json.dumps({"clients": {"0": {"noise_multiplier": 0.9}}}))
    write_run_manifest(path, None)  # as fedllm writes a run: its manifest last


def test_the_report_lists_failed_and_unfinished_runs_as_such_and_never_plots_them(tmp_path):
    ok = {
        "status": "completed",
        "privacy_mode": "sample",
        "target_epsilon": 8.0,
        "final_max_epsilon": 7.9,
        "final_accuracy": 0.7,
        "zero_shot_accuracy": 0.5,
        "rounds_completed": 2,
    }
    _job(tmp_path / "0", ok, model="embedded")
    _job(
        tmp_path / "1",
        {
            **ok,
            "status": "failed",
            "failure": "no client update in any of the 2 round(s) run",
            "final_max_epsilon": 0.0,
        },
    )
    # a summary written before the status field existed: every round without an update
    _job(tmp_path / "2", {**ok, "status": None, "final_max_epsilon": 0.0, "rounds_without_updates": [1, 2]})
    _job(tmp_path / "3", None)  # a job that left no summary
    _job(tmp_path / "4", ok, lr=0.001)
    runs = find_runs(tmp_path, include_incomplete=True)
    rows = {row["run"]: row for row in report_rows(runs, tmp_path)}
    assert {r: rows[r]["status"] for r in rows} == {
        "0": "completed",
        "1": "failed",
        "2": "failed",
        "3": "unfinished",
        "4": "completed",
    }
    assert rows["1"]["final_accuracy"] is None and rows["1"]["spent_epsilon"] is None
    assert "no client update" in rows["1"]["note"] and "OOM" in rows["3"]["note"]
    assert (rows["4"]["model"], rows["4"]["data"], rows["4"]["lr"], rows["4"]["noise_multiplier"]) == (
        "tiny",
        "rotten_tomatoes",
        0.001,
        0.9,
    )
    assert [row["model"] for row in report_rows(runs, tmp_path)] == ["embedded", "tiny", "tiny", "tiny", "tiny"]
    points = privacy_utility_points(runs)
    assert len(points) == 2 and {p["group"] for p in points} == {"embedded / rotten_tomatoes", "tiny / rotten_tomatoes"}
    assert "| failed |" in to_markdown(report_rows(runs, tmp_path))
    assert [r.path.name for r in find_runs(tmp_path)] == ["0", "4"]  # the finished ones, by default


def test_report_cli_shows_every_job_and_plots_only_finished_runs(tmp_path, capsys):
    from fedllm.cli.main import main

    ok = {
        "status": "completed",
        "privacy_mode": "sample",
        "target_epsilon": 8.0,
        "final_max_epsilon": 7.9,
        "final_accuracy": 0.7,
        "zero_shot_accuracy": 0.5,
        "rounds_completed": 2,
    }
    _job(tmp_path / "0", ok)
    _job(tmp_path / "1", {**ok, "target_epsilon": 3.0, "final_max_epsilon": 2.9})
    _job(tmp_path / "2", {**ok, "status": "failed", "failure": "engine | crashed"})
    assert main(["report", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "| failed |" in out and "engine \\| crashed" in out and "1 of 3 runs failed or did not finish" in out
    assert (tmp_path / "privacy_utility.png").is_file()


def test_the_report_shows_every_adversary_of_an_audit_and_its_power(tmp_path):
    ok = {"status": "completed", "privacy_mode": "sample", "target_epsilon": 1.0, "final_max_epsilon": 0.99}
    _job(tmp_path / "a", ok)
    bounds = {"coordinator": 0.1, "output_reader": 0.0, "nonfinite": 0.0, "metadata": 0.2, "reply_time": 0.3}
    (tmp_path / "a" / "audit.json").write_text(json.dumps({"epsilon_lower_bound": bounds, "power": 2.5}))
    write_run_manifest(tmp_path / "a", None)  # `fedllm audit` vouches for what it added
    (row,) = report_rows(find_runs(tmp_path), tmp_path)
    assert {name: row[f"audit_{name}"] for name in bounds} == bounds and row["audit_power"] == 2.5
