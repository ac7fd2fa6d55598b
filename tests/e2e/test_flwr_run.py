"""`flwr run .` on Flower's local simulation SuperLink, as a Flower user types it (issue 15): the
federation's 2 virtual SuperNodes become the experiment's clients, they train under DP-SGD with
the experiment's own policy and ledgers under the run directory, and nothing is installed.

Flower's CLI starts a local SuperLink in the background that outlives the command (Flower keeps
it for the next `flwr run`); the test gives it its own FLWR_HOME and stops exactly the processes
it started (found by a tag in their environment), then checks that none is left."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psutil
import pytest

from fedllm.processes import tagged_processes

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
FLWR = Path(sys.executable).with_name("flwr")
LOCAL_SUPERLINK_PORT = 39091  # Flower's local SuperLink (fixed in flwr 1.42)


def _port_in_use(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _stop(tag: tuple[str, str]) -> list[str]:
    """Terminate the tagged processes (then kill what is left); what was still running."""
    procs = tagged_processes(*tag)
    names = [f"{p.pid}: {' '.join(p.cmdline())[:60]}" for p in procs]
    for proc in procs:
        proc.terminate()
    _, alive = psutil.wait_procs(procs, timeout=15)
    for proc in alive:
        proc.kill()
    return names


def _engine_left(tag: tuple[str, str], wait: float = 30.0) -> list[str]:
    """Tagged processes other than Flower's local SuperLink (and its SuperExec), after up to
    ``wait`` seconds for them to exit: Ray's workers are reaped a moment after the run ends."""
    deadline = time.monotonic() + wait
    while True:
        engine = []
        for proc in tagged_processes(*tag):
            try:
                line = " ".join(proc.cmdline())
            except psutil.NoSuchProcess:
                continue
            if "flower-superlink" not in line and "flower-superexec" not in line:
                engine.append(f"{proc.pid}: {line[:80]}")
        if not engine or time.monotonic() > deadline:
            return engine
        time.sleep(1)


def test_flwr_run_trains_the_virtual_nodes_of_the_local_simulation_federation(tmp_path):
    if _port_in_use(LOCAL_SUPERLINK_PORT):
        pytest.skip(f"a local SuperLink already listens on {LOCAL_SUPERLINK_PORT}; this test starts its own")
    tag = ("FEDLLM_TEST_FLWR_RUN", uuid.uuid4().hex)
    run_dir = tmp_path / "run"
    env = {
        **os.environ,
        "FLWR_HOME": str(tmp_path / "flwr-home"),
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",  # the README's setting: no `uv sync`
        "FLWR_DISABLE_UPDATE_CHECK": "1",  # no request to PyPI from the test
        "PATH": f"{FLWR.parent}{os.pathsep}{os.environ.get('PATH', '')}",  # flower-superlink of this venv
        tag[0]: tag[1],
    }
    started = time.monotonic()
    try:
        # Flower's local federation has 2 nodes: fewer than 3 updates a round, accepted knowingly
        run_config = f'overrides="debug=smoke federation.min_updates=2" output-dir="{run_dir}"'
        result = subprocess.run(
            [FLWR, "run", ".", "--stream", "--run-config", run_config],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=480,
        )
        engine = _engine_left(tag)  # the run's own processes (simulation, Ray) end with it
    finally:
        left = _stop(tag)
    output = result.stdout[-4000:] + result.stderr[-4000:]
    summary_file = run_dir / "summary.json"
    assert summary_file.exists(), output
    summary = json.loads(summary_file.read_text())
    assert summary["status"] == "completed", output
    assert summary["rounds_completed"] == 2 and summary["rounds_without_updates"] == []
    rounds = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["num_clients"] for r in rounds] == [0, 2, 2], rounds  # both virtual nodes, every round
    assert 0 < summary["final_max_epsilon"] <= summary["target_epsilon"] == 8.0
    config = json.loads((run_dir / "config.json").read_text())
    assert config["federation"]["num_clients"] == 2  # the federation's size, said in the log
    assert "running 2 clients (federation.num_clients=2)" in output
    # the virtual nodes' ledgers and audit logs are the run's, as under `fedllm simulate`
    # each node's state folder, and beside it its ledger anchor (outside the state folder by design)
    assert sorted(p.name for p in (run_dir / "nodes").iterdir() if p.is_dir()) == ["client-0", "client-1"]
    for client in ("client-0", "client-1"):
        assert any((run_dir / "nodes" / client).glob("*.json*"))
    # nothing was installed: no runtime environment next to the installed app
    assert not list((tmp_path / "flwr-home").rglob("pyvenv.cfg"))
    assert engine == [], f"the run's engine outlived it: {engine}"
    assert left, "the local SuperLink this run started was not found"  # Flower keeps it for the next run
    assert not [p.pid for p in tagged_processes(*tag)], "processes outlived the test"
    assert time.monotonic() - started < 480
