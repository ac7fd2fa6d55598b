"""Joining a Ray cluster (federation.ray_address, issue 16), without starting one: an address
nobody answers fails at once in one line naming it, what travels to the cluster's workers, and
the checks that run on its nodes. tests/e2e/test_ray_cluster.py runs a real two-node cluster."""

from __future__ import annotations

import dataclasses
import os
import re
import socket
import sys
import time

import pytest
import ray

from fedllm.config import FederationConfig, StorageConfig
from fedllm.federation import ray_cluster, simulation
from fedllm.federation.ray_cluster import ClusterError
from fedllm.node.policy import SIMULATED_NODES_ENV
from tests.conftest import tiny_config


def _closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_an_address_nobody_answers_fails_at_once_naming_it():
    address = f"127.0.0.1:{_closed_port()}"
    started = time.monotonic()
    with pytest.raises(ClusterError) as err:
        ray_cluster.connect(ray, address, {})
    assert time.monotonic() - started < ray_cluster.CONNECT_TIMEOUT_S + 1  # Ray's own retries take ~10 min
    assert str(err.value).startswith(f"federation.ray_address={address}: no Ray cluster answers there (")
    assert "\n" not in str(err.value) and not ray.is_initialized()


def test_auto_is_resolved_as_ray_does_and_checked_too(monkeypatch):
    port = _closed_port()
    monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{port}")
    target = ray_cluster.resolve("auto")  # Ray names loopback by this machine's IP
    assert target.endswith(f":{port}")
    with pytest.raises(
        ClusterError,
        match=rf"^federation[.]ray_address=auto \({re.escape(target)}\): no Ray "
        "cluster answers",
    ):
        ray_cluster.connect(ray, "auto", {})


def test_simulate_on_an_unreachable_cluster_fails_cleanly_and_leaves_nothing_set(tmp_path):
    address = f"127.0.0.1:{_closed_port()}"
    cfg = tiny_config(federation=FederationConfig(num_clients=2, num_rounds=1, min_updates=2, ray_address=address))
    cfg = dataclasses.replace(cfg, privacy=dataclasses.replace(cfg.privacy, state_dir=str(tmp_path / "nodes")))
    with pytest.raises(ClusterError, match=f"^federation[.]ray_address={address}: no Ray cluster answers"):
        with simulation.ray_session(ray, cfg, tmp_path / "run"):  # run_simulation's Ray, without the engine
            pytest.fail("an unreachable cluster was joined")
    assert SIMULATED_NODES_ENV not in os.environ and not ray.is_initialized()


def test_workers_get_the_node_config_path_and_offline_policy_but_no_secret(monkeypatch):
    monkeypatch.setenv(SIMULATED_NODES_ENV, "/shared/run/simulated_nodes.json")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv(StorageConfig().key_env, "00" * 32)
    monkeypatch.setenv("HF_HOME", "/home/me/hf")  # a path of this machine, not of the cluster's nodes
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    env = ray_cluster.job_env(simulation.CLUSTER_ENV)
    assert env[SIMULATED_NODES_ENV] == "/shared/run/simulated_nodes.json" and env["HF_HUB_OFFLINE"] == "1"
    assert env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] == "1"  # set by the test environment
    assert {StorageConfig().key_env, "HF_HOME", "TRANSFORMERS_OFFLINE"}.isdisjoint(env)
    assert env["PYTHONPATH"].split(os.pathsep)[: len(sys.path)] == [p for p in sys.path if p][: len(sys.path)]


def test_a_local_ray_is_started_even_when_a_cluster_is_named_by_the_environment(tiny_cfg):
    # ray.init() without an address joins RAY_ADDRESS or the last `ray start` here, then refuses num_cpus
    init_args = simulation.local_backend(tiny_cfg)["init_args"]
    assert init_args["address"] == "local" and init_args["num_cpus"] >= 1


def test_a_node_fits_a_client_only_with_every_resource_it_asks_for():
    assert ray_cluster.fits({"CPU": 2.0, "memory": 1e9}, {"num_cpus": 2.0, "num_gpus": 0.0})
    assert not ray_cluster.fits({"CPU": 1.0}, {"num_cpus": 2.0, "num_gpus": 0.0})
    assert not ray_cluster.fits({"CPU": 4.0}, {"num_cpus": 1.0, "num_gpus": 0.5})
    assert ray_cluster.fits({"CPU": 4.0, "GPU": 1.0}, {"num_cpus": 1.0, "num_gpus": 0.5})
    assert not ray_cluster.fits({}, {"num_cpus": 1.0})  # a node that left the cluster


def test_a_marker_counts_as_seen_only_with_this_runs_token(tmp_path):
    (tmp_path / "a").write_text("token-1")
    (tmp_path / "b").write_text("token-2")  # the same path on another machine, another file
    markers = [str(tmp_path / name) for name in ("a", "b", "missing")]
    assert ray_cluster.sees_markers(markers, "token-1") == [True, False, False]


def test_a_cluster_gpu_count_replaces_this_machines():
    from fedllm.config import ModelConfig

    assert simulation.gpu_share(0.5, ModelConfig(), cluster_gpus=2.0) == 0.5  # this machine may have none
    from fedllm.errors import ConfigError

    with pytest.raises(ConfigError, match=r"^federation[.]client_gpus=0[.]5: the Ray cluster has no GPU"):
        simulation.gpu_share(0.5, ModelConfig(), cluster_gpus=0.0)
