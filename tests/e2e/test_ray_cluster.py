"""`fedllm simulate` on a running multi-node Ray cluster (issue 16): a real head and a second
node, each started with `ray start` on this machine, joined with federation.ray_address. The
clients run on both nodes, the run's job ends with the run, the cluster outlives it, and the
test stops only the processes its own `ray start` commands created (`ray stop` would stop every
Ray on the machine)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from fedllm.config import ExperimentConfig
from fedllm.privacy.accounting import epsilon

from .conftest import fedllm, stray_processes

pytestmark = pytest.mark.slow

RAY = Path(sys.executable).with_name("ray")  # the venv's CLI: its nodes run this venv's Python
CLUSTER_TAG = "FEDLLM_TEST_RAY_CLUSTER"  # in the environment of every process the cluster starts
# Asks the cluster, as a second driver, for its nodes and actors (JSON on stdout). Actors are read
# from the GCS actor table: the public state API (ray.util.state) needs the dashboard, which a
# cluster started with --include-dashboard=false does not serve.
PROBE = """
import json, sys, ray
from ray._private import state
ray.init(address=sys.argv[1], logging_level="ERROR", log_to_driver=False)
nodes = [{"id": n["NodeID"], "alive": n["Alive"], "resources": n["Resources"]} for n in ray.nodes()]
actors = [{"class": a["ActorClassName"], "node": a["Address"]["NodeID"], "state": a["State"], "pid": a["Pid"],
           "job": a["JobID"]} for a in state.actors().values()]
print(json.dumps({"nodes": nodes, "actors": actors}))
ray.shutdown()
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _node_ports() -> list[str]:
    """Ports of one node's own services: two nodes on one machine must not share Ray's defaults."""
    return [
        f"--{name}={_free_port()}"
        for name in (
            "node-manager-port",
            "object-manager-port",
            "dashboard-agent-listen-port",
            "dashboard-agent-grpc-port",
            "runtime-env-agent-port",
            "metrics-export-port",
        )
    ]


def _still_running(pids: list[int], within: float) -> list[int]:
    """The pids among ``pids`` that are still live (not zombies) after waiting up to ``within`` s."""
    deadline = time.monotonic() + within
    while True:
        live = []
        for pid in pids:
            try:
                if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                    live.append(pid)
            except psutil.NoSuchProcess:
                pass
        if not live or time.monotonic() > deadline:
            return live
        time.sleep(0.5)


def cluster_processes(tag: str) -> list[psutil.Process]:
    """Live processes whose environment carries ``CLUSTER_TAG=tag``.

    Read from /proc directly: Ray's agents rename themselves (setproctitle), which overwrites
    the start of their environment block with NULs, and psutil then sees an empty environment.
    """
    entry = f"{CLUSTER_TAG}={tag}".encode()
    found = []
    for proc in psutil.process_iter(["status"]):
        if proc.info["status"] == psutil.STATUS_ZOMBIE:
            continue
        try:
            with open(f"/proc/{proc.pid}/environ", "rb") as environ:
                if entry in environ.read().split(b"\0"):
                    found.append(proc)
        except OSError:
            continue
    return found


def stop_cluster(tag: str) -> None:
    """Stop every process of this test's cluster, and only those (SIGTERM, then SIGKILL)."""
    procs = cluster_processes(tag)
    for proc in procs:
        try:
            proc.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=5)  # the GCS and the autoscaler monitor ignore SIGTERM
    for proc in alive:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=10)


@dataclass(frozen=True)
class Cluster:
    """A running two-node Ray cluster started by this test."""

    address: str
    tag: str
    env: dict

    def probe(self) -> dict:
        """The cluster's nodes and actors, as a new driver sees them (fails if it is gone)."""
        result = subprocess.run(
            [sys.executable, "-c", PROBE, self.address], capture_output=True, text=True, env=self.env, timeout=180
        )
        assert result.returncode == 0, result.stderr[-3000:]
        return json.loads(result.stdout.strip().splitlines()[-1])


def _servers(tag: str) -> set[int]:
    """The PIDs of the cluster's GCS and raylets (its workers come and go)."""
    return {proc.pid for proc in cluster_processes(tag) if proc.name() in ("gcs_server", "raylet")}


def _ray_start(args: list[str], env: dict) -> None:
    result = subprocess.run(
        [str(RAY), "start", "--disable-usage-stats", *args], capture_output=True, text=True, env=env, timeout=180
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    """A head (1 CPU, custom resource head_node) and a second node (1 CPU) on loopback, each with
    its own temp dir (short paths: Ray's socket paths must fit in 107 bytes); torn down by tag."""
    tag, port = uuid.uuid4().hex, _free_port()
    env = {**os.environ, CLUSTER_TAG: tag, "RAY_DISABLE_USAGE_STATS": "1"}
    env.pop("RAY_ADDRESS", None)
    dirs = [tempfile.mkdtemp(prefix="fedllm-ray-", dir="/tmp") for _ in range(2)]
    try:
        _ray_start(
            [
                "--head",
                f"--port={port}",
                "--num-cpus=1",
                '--resources={"head_node": 1}',
                "--include-dashboard=false",
                f"--dashboard-port={_free_port()}",
                f"--ray-client-server-port={_free_port()}",
                f"--temp-dir={dirs[0]}",
                *_node_ports(),
            ],
            env,
        )
        _ray_start([f"--address=127.0.0.1:{port}", "--num-cpus=1", f"--temp-dir={dirs[1]}", *_node_ports()], env)
        started = Cluster(address=f"127.0.0.1:{port}", tag=tag, env=env)
        deadline = time.monotonic() + 60
        while sum(node["alive"] for node in started.probe()["nodes"]) < 2:
            assert time.monotonic() < deadline, "the second Ray node never joined"
            time.sleep(1)
        yield started
    finally:
        stop_cluster(tag)
        for directory in dirs:
            shutil.rmtree(directory, ignore_errors=True)
    assert cluster_processes(tag) == [], "a process of the test's Ray cluster survived its teardown"


def test_a_run_on_a_two_node_cluster_uses_both_nodes_and_leaves_the_cluster_running(cluster, tmp_path):
    before = cluster.probe()
    servers = _servers(cluster.tag)
    assert len(servers) == 3  # one GCS, two raylets
    run_dir, rounds = tmp_path / "run", 2
    started = time.monotonic()
    fedllm(
        [
            "simulate",
            "debug=smoke",
            "federation.num_clients=4",
            f"federation.num_rounds={rounds}",
            f"federation.ray_address={cluster.address}",
            f"privacy.state_dir={tmp_path / 'nodes'}",
            f"hydra.run.dir={run_dir}",
        ],
        cwd=tmp_path,
    )
    print(f"two-node run: {time.monotonic() - started:.1f} s")  # the figure reported in issue 16

    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["rounds_completed"] == rounds
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [record["num_clients"] for record in metrics[1:]] == [4] * rounds

    after = cluster.probe()
    node_ids = {node["id"] for node in before["nodes"] if node["alive"]}
    assert len(node_ids) == 2 and {node["id"] for node in after["nodes"] if node["alive"]} == node_ids
    earlier_jobs = {actor["job"] for actor in before["actors"]}
    clients = [
        actor for actor in after["actors"] if actor["class"] == "ClientAppActor" and actor["job"] not in earlier_jobs
    ]
    # one 1-CPU client actor per 1-CPU node: every node ran clients
    assert {actor["node"] for actor in clients} == node_ids and len(clients) == 2
    # the run's job ended with it: the cluster stopped its actors, and nothing of the driver is left
    assert {actor["state"] for actor in clients} == {"DEAD"}
    # the GCS marks an actor DEAD before its raylet has reaped the worker: give the exit a moment
    assert _still_running([actor["pid"] for actor in clients], within=30.0) == []
    assert stray_processes() == []
    # ... while the cluster itself runs on
    assert _servers(cluster.tag) == servers

    # each client's epsilon covers all its steps, whichever node ran it in each round: the nodes
    # shared one ledger per client (privacy.state_dir on a filesystem both nodes see)
    cfg = ExperimentConfig.from_dict(json.loads((run_dir / "config.json").read_text()))
    ledger = json.loads((run_dir / "privacy_ledger.json").read_text())
    assert set(ledger["clients"]) == {"0", "1", "2", "3"}
    for client in ledger["clients"].values():
        assert client["steps"] == rounds * cfg.train.local_steps
        assert client["epsilon"] == pytest.approx(
            epsilon(
                [(client["noise_multiplier"], client["sample_rate"], client["steps"])],
                delta=cfg.privacy.delta,
                accountant=cfg.privacy.accountant,
            ),
            rel=1e-12,
        )


def test_a_second_run_joins_the_same_cluster_with_auto(cluster, tmp_path):
    """`auto` finds the cluster through RAY_ADDRESS, as Ray does."""
    run_dir = tmp_path / "run"
    fedllm(
        [
            "simulate",
            "debug=smoke",
            "federation.num_clients=2",
            "federation.min_updates=2",
            "federation.num_rounds=1",
            "federation.ray_address=auto",
            f"privacy.state_dir={tmp_path / 'nodes'}",
            f"hydra.run.dir={run_dir}",
        ],
        cwd=tmp_path,
        env={"RAY_ADDRESS": cluster.address},
    )
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "completed"
    assert sum(node["alive"] for node in cluster.probe()["nodes"]) == 2
