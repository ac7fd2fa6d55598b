"""The node's privacy boundary for one round: refuse, replay or train, then commit.

Everything in the server's request is untrusted. The node's own policy
(:mod:`fedllm.node.policy`) decides what may run; the server's target and delta can only
lower the node's cap. Under the node's ledger lock (held from the check to the record) the
guard replays an update already released for this round, or checks that the round keeps
the node within its cap, trains, and records the release before the update can leave (a
crash afterwards keeps it counted; a ledger is never reset). DP noise and Poisson batches
come from the node's own OS entropy (``LocalSpec.seed=None``) unless a simulated node runs
the ``seeded`` research mode.

What leaves: the adapter and the accounting metadata, plus what the node declared public;
a refusal says only its category, and the detail goes to this node's log. Flower-free:
:mod:`fedllm.federation.client_app` translates messages to and from it.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import TypeAlias

import torch

from fedllm import task
from fedllm.audit.injection import (
    CanaryShard,
    GradientCanaries,
    adapter_parameters,
    canary_items,
    load_node_canaries,
    with_canary_column,
)
from fedllm.config import ExperimentConfig
from fedllm.data.formatting import TokenizedDataset, make_collate
from fedllm.errors import DataError, LedgerError, PrivacyPlanError
from fedllm.federation.protocol import Accounting, PublicStats, Refusal, TrainReport
from fedllm.federation.remote_text import escape_remote_text
from fedllm.model.adapters import adapter_state, load_adapter_state
from fedllm.node.policy import BUDGET, DATA, POLICY, NodePolicy, PolicyViolation, check_request
from fedllm.node.reply_cache import ReplyCache, arrays_digest
from fedllm.planning import plan_for
from fedllm.privacy.accounting import History, extend_history
from fedllm.privacy.budget import check_round, effective_budget
from fedllm.privacy.calibration import DPPlan
from fedllm.privacy.node_ledger import NodeLedger, Release
from fedllm.training.local import DPSpec, LocalResult, LocalSpec, train_local
from fedllm.training.precision import use_bf16

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RoundRequest:
    """What the server asked for this round (untrusted)."""

    cfg: ExperimentConfig
    run_id: str
    server_round: int
    received: dict[str, torch.Tensor]


@dataclass(frozen=True)
class Update:
    """The node's update: the adapter arrays and their wire metrics."""

    arrays: dict[str, torch.Tensor]
    metrics: dict


Answer: TypeAlias = Update | Refusal  # the node's answer to a round: an update or a refusal


def answer_round(policy: NodePolicy, request: RoundRequest) -> Answer:
    """Decide and carry out one round on this node (see the module docstring)."""
    node, server_round = policy.partition_id, request.server_round
    try:
        check_request(policy, request.cfg)
    except PolicyViolation as exc:
        log.warning("client %d: refusing round %d (policy): %s", node, server_round, escape_remote_text(exc))
        return Refusal(node, POLICY, cap=policy.max_epsilon)
    cfg = node_view(request.cfg, policy)
    try:
        own, fingerprint = task.node_shard(cfg, node, policy.data_path, policy.data_format)
        shard = with_canaries(cfg, policy, own)
        plan = plan_for(cfg, len(shard)) if cfg.privacy.sample_level else None
    except (DataError, PrivacyPlanError) as exc:
        log.error("client %d: declining round %d (data): %s", node, server_round, escape_remote_text(exc))
        return Refusal(node, DATA, cap=policy.max_epsilon)
    if plan is None:
        result, arrays = _train(cfg, shard, request, None, [], _seed(cfg, policy, server_round))
        return Update(arrays=arrays, metrics=TrainReport(node, None, _public(policy, shard, result)).to_metrics())
    return _private_round(policy, cfg, request, (shard, fingerprint), plan)


def with_canaries(cfg: ExperimentConfig, policy: NodePolicy,
                  shard: TokenizedDataset) -> TokenizedDataset | CanaryShard:
    """The shard, plus this simulated node's audit canaries when ``fedllm audit`` placed some here
    (the key exists only in a simulation driver's node config)."""
    if not policy.audit_canaries:
        return shard
    design = load_node_canaries(policy.audit_canaries)
    items = canary_items(design, shard, lambda records: task.tokenize_for_node(cfg, records))
    return CanaryShard(shard, items, design)


def node_view(cfg: ExperimentConfig, policy: NodePolicy) -> ExperimentConfig:
    """The server's config with the node's own data rules in place of the server's."""
    return dataclasses.replace(cfg, data=dataclasses.replace(
        cfg.data, overlong=policy.overlong, max_record_chars=policy.max_record_chars, duplicates=policy.duplicates,
        prompt_field=policy.prompt_field, response_field=policy.response_field))


def _private_round(policy: NodePolicy, cfg: ExperimentConfig, request: RoundRequest, data: tuple,
                   plan: DPPlan) -> Answer:
    shard, fingerprint = data
    node, run_id, server_round = policy.partition_id, request.run_id, request.server_round
    budget = effective_budget(run_target=cfg.privacy.target_epsilon, run_delta=cfg.privacy.delta,
                              node_max_epsilon=policy.max_epsilon, node_delta=policy.delta)
    dp = DPSpec(noise_multiplier=plan.noise_multiplier, max_grad_norm=cfg.privacy.max_grad_norm,
                accountant=policy.accountant, grad_sample_mode=cfg.privacy.grad_sample_mode)
    steps, rate = cfg.train.local_steps, plan.sample_rate
    key = policy.state_key()  # the node's own storage key (node config encrypt-state), or None
    cache = ReplyCache(policy.state_dir, key)
    # keyed by dataset too: one state directory may hold several datasets' budgets
    cache_key = (run_id, server_round, f"{policy.dataset_id}|{arrays_digest(request.received)}")
    # the lock covers check, training and record: a second run on this node waits, then sees this release
    with NodeLedger(policy.state_dir, policy.dataset_id, fingerprint, key=key).locked() as ledger:
        if ledger.find(run_id, server_round) and (cached := cache.find(cache_key)):
            log.info("client %d round %d: resending the update already released (no new privacy cost)",
                     node, server_round)
            return Update(arrays=cached.arrays, metrics=TrainReport.replay_metrics(cached.metrics))
        history = ledger.history()
        decision = check_round(history, noise_multiplier=dp.noise_multiplier, sample_rate=rate, steps=steps,
                               budget=budget, accountant=dp.accountant)
        if not decision.allowed:
            log.warning("client %d round %d: %s", node, server_round, escape_remote_text(decision.reason))
            return Refusal(node, BUDGET, cap=budget.max_epsilon, spent=decision.spent, delta=budget.delta,
                           history=history)
        expected = extend_history(history, noise_multiplier=dp.noise_multiplier, sample_rate=rate, steps=steps)
        result, arrays = _train(cfg, shard, request, dp, history, _seed(cfg, policy, server_round))
        if result.history != expected:  # the ledger must hold exactly what Opacus accounted
            raise LedgerError(f"Opacus accounted {result.history}, the ledger expected {expected}")
        # persisted before the update can leave: a crash from here on keeps the release counted
        ledger.record(Release(run_id=run_id, server_round=server_round, noise_multiplier=dp.noise_multiplier,
                              sample_rate=rate, steps=steps, fingerprint=fingerprint))
        after = check_round(expected, noise_multiplier=dp.noise_multiplier, sample_rate=rate, steps=steps,
                            budget=budget, accountant=dp.accountant)  # its `spent` is this round's epsilon
        accounting = Accounting(epsilon=after.spent, cap=budget.max_epsilon, delta=budget.delta, history=expected,
                                can_continue=after.allowed)
        metrics = TrainReport(node, accounting, _public(policy, shard, result)).to_metrics()
        cache.save(cache_key, arrays, metrics)  # under the lock: the release and its reply go together
    log.info("client %d round %d: train loss %.4f (kept on this node), epsilon %.4f of cap %g", node,
             server_round, result.mean_loss, after.spent, budget.max_epsilon)
    return Update(arrays=arrays, metrics=metrics)


def _seed(cfg: ExperimentConfig, policy: NodePolicy, server_round: int) -> int | None:
    """None: fresh OS entropy (the default, and always on a deployed node). A seed only in the
    ``seeded`` research mode of a simulated node: then anyone who knows ``cfg.seed`` can
    reproduce the noise, which the run's summary and console say."""
    if cfg.privacy.noise == "seeded" and policy.seeded_noise:
        return research_seed(cfg, policy.partition_id, server_round)
    return None


def research_seed(cfg: ExperimentConfig, partition_id: int, server_round: int) -> int:
    """The seed of a ``seeded`` node's round: a public function of the run's seed, so anyone who
    knows ``cfg.seed`` (the coordinator sent it) regenerates the node's noise (``fedllm audit`` does)."""
    return cfg.seed * 1_000_003 + partition_id * 1_009 + server_round


def _train(cfg: ExperimentConfig, shard, request: RoundRequest, dp: DPSpec | None, history: History,
           seed: int | None) -> tuple[LocalResult, dict[str, torch.Tensor]]:
    bundle = task.model_bundle(cfg.model, cfg.lora, cfg.seed)
    load_adapter_state(bundle.model, request.received)
    collate = make_collate(bundle.pad_id, prompt_only=cfg.train.objective == "choices")
    override = None
    if isinstance(shard, CanaryShard):
        collate = with_canary_column(collate)
        if shard.design.kind == "gradient":
            override = GradientCanaries(shard.design, adapter_parameters(bundle.model))
    spec = LocalSpec(steps=cfg.train.local_steps, batch_size=cfg.train.batch_size, lr=cfg.train.lr,
                     weight_decay=cfg.train.weight_decay, objective=cfg.train.objective,
                     bf16=use_bf16(cfg.train.precision), micro_batches=cfg.train.micro_batches, seed=seed,
                     optimizer=cfg.train.optimizer)
    result = train_local(bundle.model, shard, collate, spec, task.choice_ids_for(cfg), dp, history, override)
    return result, adapter_state(bundle.model)


def _public(policy: NodePolicy, shard, result: LocalResult) -> PublicStats:
    """What the node's config declares public besides the adapter (nothing by default)."""
    return PublicStats(
        num_examples=len(shard) if policy.public_size else None,
        train_loss=float(result.mean_loss) if policy.public_metrics else None,
        train_seconds=float(result.seconds) if policy.public_metrics else None,
        examples_seen=int(result.examples_seen) if policy.public_metrics else None,
    )

