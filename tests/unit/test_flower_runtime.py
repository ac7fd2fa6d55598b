"""Virtual nodes of Flower's own simulation runtime (`flwr run .`): who may take the experiment as
its policy (only a ClientApp inside Flower's simulation actor), and how the ServerApp sizes the
experiment to the federation. The end-to-end run: tests/e2e/test_flwr_run.py."""

from __future__ import annotations

import dataclasses
import sys
import types

import pytest

from fedllm import task
from fedllm.errors import ConfigError
from fedllm.federation import client_app, flower_runtime
from fedllm.federation.flower_runtime import (
    FLOWER_CLIENT_ACTOR,
    in_flower_client_actor,
    is_flower_virtual_node,
    simulation_overrides,
    virtual_node_policy,
)
from tests.conftest import tiny_config
from tests.node_driver import node_context, run_round, train_message

FLOWER_KEYS = {"partition-id": 0, "num-partitions": 2}


def _coordinator_cfg(tmp_path):
    """A coordinator's experiment that would, if a node took it as policy, lift its cap and
    move its ledger to a folder the coordinator chose."""
    cfg = tiny_config()
    return dataclasses.replace(
        cfg, privacy=dataclasses.replace(cfg.privacy, target_epsilon=1e6, state_dir=str(tmp_path / "coordinator"))
    )


def test_a_supernode_with_only_flowers_simulation_keys_does_not_take_the_coordinators_experiment(tmp_path):
    """An operator who started a SuperNode with `--node-config "partition-id=0 num-partitions=2"`
    (Flower's own examples do) is not a virtual node: outside Flower's simulation actor the node
    still needs its own state-dir, and nothing is written where the coordinator said."""
    cfg = _coordinator_cfg(tmp_path)
    assert not in_flower_client_actor()
    assert not is_flower_virtual_node(FLOWER_KEYS)
    with pytest.raises(Exception, match="state-dir: required"):
        run_round(cfg, "run-a", 1, node_config=dict(FLOWER_KEYS))
    assert not (tmp_path / "coordinator").exists()


class _FakeRay(types.SimpleNamespace):
    """Ray's runtime context as seen from an actor of class ``cls`` in ``module``."""

    def __init__(self, module: str, cls: str, actor_id: str | None = "a1"):
        descriptor = types.SimpleNamespace(module_name=module, class_name=cls)
        handle = types.SimpleNamespace(_ray_actor_creation_function_descriptor=descriptor)
        context = types.SimpleNamespace(get_actor_id=lambda: actor_id, current_actor=handle)
        super().__init__(is_initialized=lambda: True, get_runtime_context=lambda: context)


@pytest.mark.parametrize(
    ("ray", "expected"),
    [
        (_FakeRay(*FLOWER_CLIENT_ACTOR), True),
        (_FakeRay("my_app", "ClientAppActor"), False),  # a look-alike class elsewhere
        (_FakeRay(FLOWER_CLIENT_ACTOR[0], "SomeOtherActor"), False),
        (_FakeRay(*FLOWER_CLIENT_ACTOR, actor_id=None), False),  # a Ray driver or task, not an actor
        (types.SimpleNamespace(is_initialized=lambda: True, get_runtime_context=lambda: 1 / 0), False),  # Ray moved
    ],
)
def test_only_flowers_client_actor_counts_as_a_virtual_node(monkeypatch, ray, expected):
    monkeypatch.setitem(sys.modules, "ray", ray)
    assert in_flower_client_actor() is expected
    assert is_flower_virtual_node(FLOWER_KEYS) is expected
    # a node config of its own (any key beyond Flower's two) is a node's own config, even there
    assert not is_flower_virtual_node({**FLOWER_KEYS, "state-dir": "/var/lib/fedllm"})


@pytest.mark.slow  # seconds each: kept out of the fast tier (make test runs it)
def test_a_virtual_node_runs_the_experiments_policy_with_its_ledger_where_the_run_keeps_it(monkeypatch, tmp_path):
    monkeypatch.setattr(flower_runtime, "in_flower_client_actor", lambda: True)
    cfg = tiny_config()
    cfg = dataclasses.replace(cfg, privacy=dataclasses.replace(cfg.privacy, state_dir=str(tmp_path / "nodes")))
    policy = virtual_node_policy(cfg, {"partition-id": "1", "num-partitions": 3})
    assert policy.simulated and policy.partition_id == 1
    assert policy.max_epsilon == cfg.privacy.target_epsilon
    assert policy.state_dir == tmp_path / "nodes" / "client-1"
    with pytest.raises(ConfigError, match="has 3 clients"):
        virtual_node_policy(cfg, {"partition-id": 3, "num-partitions": 4})
    initial = task.model_bundle(cfg.model, cfg.lora, cfg.seed).initial_adapter
    reply = client_app.app(
        train_message(cfg, "run-b", 1, initial), node_context({"partition-id": 0, "num-partitions": 3})
    )
    assert not reply.has_error()
    assert any((tmp_path / "nodes" / "client-0").iterdir())  # the ledger and audit log, in the run


def test_the_experiment_takes_the_federations_size_unless_the_overrides_name_another():
    assert simulation_overrides(["debug=smoke"], 2) == ["debug=smoke", "federation.num_clients=2"]
    assert simulation_overrides(["federation.num_clients=4"], 4) == ["federation.num_clients=4"]
    with pytest.raises(ConfigError, match="federation.num_clients=10, but .* has 2 virtual SuperNodes"):
        simulation_overrides(["federation.num_clients=10"], 2)
