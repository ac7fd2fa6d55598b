"""``fedllm plan [overrides]``: the DP-SGD plan for a configuration, before any training.

Prints, per client, the sampling rate and the noise multiplier that meets the target under
RDP and PRV, the epsilon after each round, and which client binds (the one with the
highest sampling rate needs the most noise). Impossible plans end with what to change.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass

from fedllm.config import ExperimentConfig
from fedllm.errors import FedLLMError

log = logging.getLogger("fedllm")


@dataclass(frozen=True)
class PlanRow:
    """One client's plan under both accountants."""

    client: int
    shard_size: int
    sample_rate: float
    noise_rdp: float
    noise_prv: float
    epsilon_by_round: list[float]


def build_plan(cfg: ExperimentConfig) -> list[PlanRow]:
    """Plan every client of ``cfg`` (shard sizes come from the real split of the data).

    Raises:
        PrivacyPlanError: the target cannot be met for some client.
    """
    from fedllm import task
    from fedllm.privacy.planner import epsilon_by_round, plan_client

    shards = task.split_for(cfg).shards
    rows = []
    for client, shard in enumerate(shards):
        plans = {
            name: plan_client(shard_size=len(shard), batch_size=cfg.train.batch_size,
                              rounds=cfg.federation.num_rounds, local_steps=cfg.train.local_steps,
                              target_epsilon=cfg.privacy.target_epsilon, delta=cfg.privacy.delta,
                              accountant=name, noise_multiplier=cfg.privacy.noise_multiplier)
            for name in ("rdp", "prv")
        }
        chosen = plans[cfg.privacy.accountant]
        curve = epsilon_by_round(noise_multiplier=chosen.noise_multiplier, sample_rate=chosen.sample_rate,
                                 local_steps=cfg.train.local_steps, rounds=cfg.federation.num_rounds,
                                 delta=cfg.privacy.delta, accountant=cfg.privacy.accountant)
        rows.append(PlanRow(client=client, shard_size=len(shard), sample_rate=chosen.sample_rate,
                            noise_rdp=plans["rdp"].noise_multiplier, noise_prv=plans["prv"].noise_multiplier,
                            epsilon_by_round=curve))
    return rows


def binding_row(rows: list[PlanRow]) -> PlanRow:
    """The client that needs the most noise: highest sampling rate, then smallest shard."""
    return max(rows, key=lambda row: (row.sample_rate, -row.shard_size))


def format_plan(cfg: ExperimentConfig, rows: list[PlanRow]) -> str:
    """The table ``fedllm plan`` prints."""
    lines = [
        f"target epsilon {cfg.privacy.target_epsilon} at delta {cfg.privacy.delta}, "
        f"{cfg.federation.num_rounds} rounds x {cfg.train.local_steps} local steps, expected batch "
        f"{cfg.train.batch_size}, accountant used for training: {cfg.privacy.accountant}",
        "client  records  sample_rate  noise(rdp)  noise(prv)  epsilon after each round",
    ]
    for row in rows:
        curve = " ".join(f"{value:.3f}" for value in row.epsilon_by_round)
        lines.append(f"{row.client:>6}  {row.shard_size:>7}  {row.sample_rate:>11.5f}  {row.noise_rdp:>10.4f}  "
                     f"{row.noise_prv:>10.4f}  {curve}")
    binding = binding_row(rows)
    lines.append(f"binding: client {binding.client} (smallest shard, {binding.shard_size} records, highest "
                 f"sampling rate) needs the most noise; the target epsilon is met after the last round")
    return "\n".join(lines)


def plan_cli(argv: list[str]) -> int:
    """Compose the config with Hydra overrides and print the plan."""
    from hydra import compose, initialize_config_dir

    from fedllm.cli.simulate import conf_dir
    from fedllm.config import from_hydra

    try:
        with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
            cfg = from_hydra(compose(config_name="config", overrides=argv))
        if not cfg.privacy.enabled:
            raise FedLLMError("privacy=none: there is nothing to plan")
        print(format_plan(cfg, build_plan(cfg)))
    except FedLLMError as exc:
        print(f"fedllm plan: {exc}", file=sys.stderr)
        return 1
    return 0
