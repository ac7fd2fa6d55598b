"""Would a documented node train in a documented run? The same parsing and budget math a real
SuperNode and ServerApp use (Flower's config parser, the node policy, the run's DP plan, the
node's accountant), without starting either: for the README's and docker/compose.yaml's examples."""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from functools import lru_cache

from fedllm.config import ExperimentConfig
from fedllm.node.policy import NodePolicy, policy_from_node_config
from fedllm.planning import plan_for
from fedllm.privacy.budget import effective_budget
from fedllm.privacy.calibration import DPPlan, rounds_within_cap


def parse_flower_config(text: str) -> dict:
    """``text`` as Flower parses ``--run-config`` / ``--node-config`` (a .toml path or KEY=VALUE pairs)."""
    from flwr.common.config import parse_config_args

    return parse_config_args([text])


def run_config(overrides: str) -> ExperimentConfig:
    """The experiment the deployment ServerApp composes from its ``overrides`` run config."""
    from fedllm.federation.deployment_server_app import compose_config

    return compose_config(overrides)


@dataclass(frozen=True)
class NodeOutlook:
    """How many of the run's rounds a node would train before its own cap stops it."""

    rounds: int
    planned: int
    policy: NodePolicy


def node_outlook(cfg: ExperimentConfig, node_config: str) -> NodeOutlook:
    """The rounds a node with ``node_config`` trains in ``cfg``'s run.

    The node plans its noise from its public ``sampling-size`` (whatever number of records it
    holds) and the run's target and schedule, then checks each round against the stricter of
    the run's budget and its own cap, with its own accountant, as :func:`fedllm.node.guard` does.
    """
    policy = policy_from_node_config(parse_flower_config(node_config))
    assert policy.sampling_size is not None  # a deployed node's config must name it
    plan = _plan(cfg, policy.sampling_size)
    budget = effective_budget(
        run_target=cfg.privacy.target_epsilon,
        run_delta=cfg.privacy.delta,
        node_max_epsilon=policy.max_epsilon,
        node_delta=policy.delta,
    )
    rounds = rounds_within_cap(
        noise_multiplier=plan.noise_multiplier,
        sample_rate=plan.sample_rate,
        local_steps=cfg.train.local_steps,
        max_rounds=cfg.federation.num_rounds,
        cap=budget.max_epsilon,
        delta=budget.delta,
        accountant=policy.accountant,
    )
    return NodeOutlook(rounds, cfg.federation.num_rounds, policy)


@lru_cache(maxsize=16)  # nodes of one run with one sampling size share a plan (PRV planning takes seconds)
def _plan(cfg: ExperimentConfig, records: int) -> DPPlan:
    return plan_for(cfg, records)


def quoted_flag(command: str, flag: str) -> str:
    """The value of ``flag`` in a shell command line (``--flag 'value'`` or ``--flag=value``)."""
    args = shlex.split(re.sub(r"\\\n", " ", command))
    for index, arg in enumerate(args):
        if arg == flag:
            return args[index + 1]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    raise AssertionError(f"{flag} not in {command!r}")
