"""Privacy end to end: caps and refusals, early stop, client-level DP, kill-and-resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from fedllm.privacy.accounting import epsilon
from fedllm.privacy.client_level import ZERO_OUT
from fedllm.privacy.node_ledger import NodeLedger
from fedllm.processes import tagged_processes

from .conftest import FEDLLM, SESSION_TAG, fedllm, stray_processes


def _json(path: Path) -> dict:
    return json.loads(path.read_text())


def _rounds(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_node_caps_refuse_rounds_and_the_run_stops_when_too_few_can_train(tmp_path):
    run_dir = tmp_path / "run"
    fedllm(
        [
            "simulate",
            "debug=smoke",
            "privacy=both",
            "federation.num_rounds=3",
            "federation.min_train_clients=2",
            "federation.min_updates=1",  # the capped clients refuse: rounds of 1-2 updates, knowingly
            "privacy.client_delta=1e-2",
            "privacy.client_caps=[{client: 1, max_epsilon: 6.5}, {client: 2, max_epsilon: 7, delta: 1e-6}]",
            f"hydra.run.dir={run_dir}",
        ],
        cwd=tmp_path,
    )
    summary = _json(run_dir / "summary.json")
    ledger = _json(run_dir / "privacy_ledger.json")
    # at the 3-round plan, one round costs ~6 of the 8: clients 1 and 2 cannot afford a second
    assert summary["rounds_completed"] == 1 and summary["rounds_planned"] == 3
    assert "only 1 of 3 clients can train another round" in summary["stop_reason"]
    caps = {"0": 8.0, "1": 6.5, "2": 7.0}
    for client, entry in ledger["clients"].items():
        assert entry["cap"] == caps[client] and entry["epsilon"] <= caps[client]
        assert summary["client_epsilons"][client] == entry["epsilon"]
    assert ledger["clients"]["2"]["delta"] == 1e-6  # the node's own, stricter delta
    assert {g["level"] for g in summary["guarantees"]} == {"sample", "client"}
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()


def test_client_level_dp_reports_its_epsilon_every_round(tmp_path):
    run_dir = tmp_path / "run"
    fedllm(
        [
            "simulate",
            "debug=smoke",
            "privacy=client",
            "privacy.client_noise_multiplier=1.5",
            f"hydra.run.dir={run_dir}",
        ],
        cwd=tmp_path,
    )
    rounds = _rounds(run_dir)
    for record in rounds[1:]:
        # every client every round: a Gaussian mechanism with multiplier 1.5 per round, composed
        expected = epsilon([(1.5, 1.0, record["round"])], delta=1e-3, accountant="rdp")
        assert record["client_level_epsilon"] == pytest.approx(expected, rel=1e-6)
        assert record["epsilon"] is None and record["num_clients"] == 3
    summary = _json(run_dir / "summary.json")
    assert summary["client_level_epsilon"] == rounds[-1]["client_level_epsilon"]
    assert summary["guarantees"][0]["adjacency"] == ZERO_OUT
    assert summary["final_max_epsilon"] is None  # no sample-level guarantee was claimed


def _wait_for_checkpoint(run_dir: Path, server_round: int, proc: subprocess.Popen) -> None:
    state = run_dir / "checkpoint" / "state.json"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if state.is_file() and json.loads(state.read_text())["server_round"] >= server_round:
            return
        time.sleep(0.1)
    raise AssertionError(f"no checkpoint of round {server_round} appeared")


def _reap_tagged_processes(timeout: float = 30.0) -> None:
    """Ray workers of a killed driver exit on their own; wait for them, kill any that stay."""
    deadline = time.monotonic() + timeout
    while stray_processes() and time.monotonic() < deadline:
        time.sleep(0.5)
    for proc in tagged_processes(*SESSION_TAG):
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            continue


KEY = {"FEDLLM_ENCRYPTION_KEY": "11" * 32}


@pytest.mark.timeout(600)
def test_a_killed_encrypted_server_resumes_and_ends_with_the_uninterrupted_epsilons(tmp_path, smoke_run):
    run_dir = tmp_path / "run"
    env = {**os.environ, "PYTHONWARNINGS": "ignore::DeprecationWarning", SESSION_TAG[0]: SESSION_TAG[1], **KEY}
    proc = subprocess.Popen(
        [*FEDLLM, "simulate", "debug=smoke", "storage.encrypt=true", f"hydra.run.dir={run_dir}"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        _wait_for_checkpoint(run_dir, 1, proc)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        _reap_tagged_processes()
    assert not (run_dir / "summary.json").exists()  # it really was interrupted

    wrong = fedllm(
        ["simulate", f"resume={run_dir}"], cwd=tmp_path, check=False, env={"FEDLLM_ENCRYPTION_KEY": "22" * 32}
    )
    assert wrong.returncode == 1 and "wrong encryption key" in wrong.stdout + wrong.stderr
    _reap_tagged_processes()
    fedllm(["simulate", f"resume={run_dir}"], cwd=tmp_path, env=KEY)
    resumed, reference = _json(run_dir / "privacy_ledger.json"), _json(smoke_run / "privacy_ledger.json")
    assert {c: e["epsilon"] for c, e in resumed["clients"].items()} == {
        c: e["epsilon"] for c, e in reference["clients"].items()
    }
    assert [r["round"] for r in _rounds(run_dir)] == [0, 1, 2]
    summary = _json(run_dir / "summary.json")
    assert summary["rounds_completed"] == 2 and summary["stop_reason"] is None
    for client in range(3):  # every node released each round exactly once
        node = run_dir / "nodes" / f"client-{client}"
        assert (node / "privacy_ledger.json").read_bytes().startswith(b"FEDLLM-SEALED")  # encrypted like the run
        releases = NodeLedger(
            node, f"simulated-shard-{client}", key=bytes.fromhex(KEY["FEDLLM_ENCRYPTION_KEY"])
        ).releases
        assert [r.server_round for r in releases] == [1, 2]
        assert {r.run_id for r in releases} == {summary["run_id"]}
    assert not (run_dir / "adapter" / "adapter_model.safetensors").exists()  # only the encrypted form
    assert fedllm(["verify", str(run_dir)], cwd=tmp_path, env=KEY).stdout.startswith("ok: adapter, checkpoint")


def test_resume_refuses_other_overrides_and_non_runs(tmp_path):
    result = fedllm(["simulate", f"resume={tmp_path}"], cwd=tmp_path, check=False)
    assert result.returncode == 1 and "not a resumable run" in result.stderr + result.stdout
    result = fedllm(["simulate", f"resume={tmp_path}", "federation.num_rounds=5"], cwd=tmp_path, check=False)
    assert result.returncode == 1 and "drop the other overrides" in result.stderr + result.stdout
