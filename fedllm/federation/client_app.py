"""The Flower ClientApp: check the node's budget, train locally with DP-SGD, reply adapters + metrics.

Only adapter tensors and scalar metrics leave the node; the data and base weights never do.
Every DP-SGD round is recorded in the node's persisted ledger (per dataset fingerprint)
before its update is sent, so epsilon composes over rounds, restarts and runs. A round that
would take the node past its own cap is refused with the reason, and nothing is trained.
"""

from __future__ import annotations

import logging

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.mod import fixedclipping_mod
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

from fedllm import task
from fedllm.config import ExperimentConfig
from fedllm.data.formatting import make_collate
from fedllm.errors import DataError, LedgerError, PrivacyPlanError
from fedllm.federation import records as keys
from fedllm.federation.node_state import NodeSettings, ReplyCache, arrays_digest, audit_round, node_settings
from fedllm.model.adapters import adapter_state, load_adapter_state
from fedllm.privacy.accounting import History, extend_history
from fedllm.privacy.budget import Budget, BudgetDecision, check_round, effective_budget
from fedllm.privacy.node_ledger import NodeLedger, Release
from fedllm.privacy.planner import DPPlan, plan_client
from fedllm.training.local import DPSpec, LocalResult, LocalSpec, train_local
from fedllm.training.precision import use_bf16

log = logging.getLogger(__name__)


class _Refusal(Exception):
    """Carries a refusal reply past Flower's clipping mod, which needs an update to clip."""

    def __init__(self, reply: Message):
        super().__init__("refused")
        self.reply = reply


def client_clipping_mod(msg: Message, context: Context, call_next) -> Message:
    """Flower's ``fixedclipping_mod`` when the server asks for client-side clipping, else a no-op."""
    if KEY_CLIPPING_NORM not in msg.content[keys.CONFIG]:
        return call_next(msg, context)

    def train_or_refuse(inner_msg: Message, inner_context: Context) -> Message:
        reply = call_next(inner_msg, inner_context)
        if not reply.has_error() and keys.ARRAYS not in reply.content.array_records:
            raise _Refusal(reply)
        return reply

    try:
        return fixedclipping_mod(msg, context, train_or_refuse)
    except _Refusal as refusal:
        return refusal.reply


app = ClientApp(mods=[client_clipping_mod])


@app.train()
def train(msg: Message, context: Context) -> Message:
    """One round on this node: decline, refuse, replay an update already released, or train;
    every round is written to the node's audit log."""
    cfg = ExperimentConfig.from_json(str(msg.content[keys.CONFIG][keys.TASK_CONFIG]))
    node = node_settings(context.node_config, int(context.node_config[keys.NODE_PARTITION_ID]), cfg)
    torch.set_num_threads(cfg.train.threads_per_client)
    reply = _answer(msg, cfg, node)
    audit_round(node.state_dir, msg.content[keys.CONFIG], reply.content)
    return reply


def _answer(msg: Message, cfg: ExperimentConfig, node: NodeSettings) -> Message:
    server_round = int(msg.content[keys.CONFIG][keys.SERVER_ROUND])
    received = msg.content[keys.ARRAYS].to_torch_state_dict()
    try:  # unusable local data: decline, do not crash the run
        shard, fingerprint = task.node_shard(cfg, node.partition_id, node.data_path, node.data_format)
        if cfg.privacy.sample_level:
            _plan(cfg, len(shard))
    except (DataError, PrivacyPlanError) as exc:
        log.error("client %d: declining round %d: %s", node.partition_id, server_round, exc)
        return _refusal(msg, node, spent=float("nan"), cap=float(node.max_epsilon or cfg.privacy.target_epsilon),
                        reason=f"declined: this node's data is unusable: {exc}")
    if not cfg.privacy.sample_level:
        if node.max_epsilon is not None:
            return _refusal(msg, node, spent=float("inf"), cap=node.max_epsilon, reason=(
                f"refused: this node caps epsilon at {node.max_epsilon:g} but the run trains without "
                f"DP-SGD (privacy.mode={cfg.privacy.mode}): its records would have no sample-level guarantee"))
        outcome = _train(cfg, node, shard, server_round, received, None, [])
        return _reply(msg, outcome.arrays, outcome.result_metrics)
    run_id = str(msg.content[keys.CONFIG][keys.RUN_ID])
    return _private_round(msg, cfg, node, (shard, fingerprint), run_id, server_round, received)


def _private_round(msg: Message, cfg: ExperimentConfig, node: NodeSettings, data: tuple, run_id: str,
                   server_round: int, received: dict) -> Message:
    shard, fingerprint = data
    ledger = NodeLedger(node.state_dir, fingerprint)
    cache = ReplyCache(node.state_dir)
    cache_key = (run_id, server_round, arrays_digest(received))
    if ledger.find(run_id, server_round) and (cached := cache.find(cache_key)):
        log.info("client %d round %d: resending the update already released (no new privacy cost)",
                 node.partition_id, server_round)
        return _reply(msg, cached.arrays, {**cached.metrics, keys.REPLAYED: 1})
    budget = effective_budget(run_target=cfg.privacy.target_epsilon, run_delta=cfg.privacy.delta,
                              node_max_epsilon=node.max_epsilon, node_delta=node.delta)
    plan = _plan(cfg, len(shard))
    dp, rate = _dp_spec(cfg, plan), plan.sample_rate
    history = ledger.history(cfg.privacy.ledger_scope, run_id)
    decision = check_round(history, noise_multiplier=dp.noise_multiplier, sample_rate=rate,
                           steps=cfg.train.local_steps, budget=budget, accountant=dp.accountant)
    if not decision.allowed:
        log.info("client %d round %d: %s", node.partition_id, server_round, decision.reason)
        return _refusal(msg, node, spent=decision.spent, cap=budget.max_epsilon, reason=decision.reason,
                        history=history, delta=budget.delta)
    outcome = _train(cfg, node, shard, server_round, received, dp, history)
    expected = extend_history(history, noise_multiplier=dp.noise_multiplier, sample_rate=rate,
                              steps=outcome.result.steps)
    if outcome.result.history != expected:  # the ledger must hold exactly what Opacus accounted
        raise LedgerError(f"Opacus accounted {outcome.result.history}, the ledger expected {expected}")
    # the same budget check, one round ahead: its `spent` is the epsilon this round reached
    next_round = check_round(expected, noise_multiplier=dp.noise_multiplier, sample_rate=rate,
                             steps=cfg.train.local_steps, budget=budget, accountant=dp.accountant)
    metrics = {**outcome.result_metrics, **_privacy_metrics(expected, next_round, dp, budget)}
    cache.save(cache_key, outcome.arrays, metrics)
    ledger.record(Release(run_id=run_id, server_round=server_round, noise_multiplier=dp.noise_multiplier,
                          sample_rate=rate, steps=outcome.result.steps))
    log.info("client %d round %d: loss %.4f, epsilon %.4f of cap %g", node.partition_id, server_round,
             outcome.result.mean_loss, metrics[keys.EPSILON], budget.max_epsilon)
    return _reply(msg, outcome.arrays, metrics)


class _Outcome:
    """A finished round of local training: the adapter to send and the metrics about it."""

    def __init__(self, result: LocalResult, arrays: dict, result_metrics: dict):
        self.result, self.arrays, self.result_metrics = result, arrays, result_metrics


def _train(cfg: ExperimentConfig, node: NodeSettings, shard, server_round: int, received: dict,
           dp: DPSpec | None, history: History) -> _Outcome:
    bundle = task.model_bundle(cfg.model, cfg.lora, cfg.seed)
    load_adapter_state(bundle.model, received)
    collate = make_collate(bundle.pad_id, prompt_only=cfg.train.objective == "choices")
    result = train_local(bundle.model, shard, collate, _local_spec(cfg, node.partition_id, server_round),
                         task.choice_ids_for(cfg), dp, history)
    metrics = {
        keys.NUM_EXAMPLES: len(shard),
        keys.UNIT_WEIGHT: 1,
        keys.PARTITION_ID: node.partition_id,
        keys.TRAIN_LOSS: float(result.mean_loss),
        keys.EXAMPLES_SEEN: result.examples_seen,
        keys.TRAIN_SECONDS: float(result.seconds),
        keys.REFUSED: 0,
    }
    return _Outcome(result, adapter_state(bundle.model), metrics)


def _plan(cfg: ExperimentConfig, shard_size: int) -> DPPlan:
    """This node's plan: noise from its own shard size and the whole schedule, and the sample
    rate Opacus will run.

    Raises:
        PrivacyPlanError: the target cannot be met for this shard.
    """
    return plan_client(
        shard_size=shard_size, batch_size=cfg.train.batch_size, rounds=cfg.federation.num_rounds,
        local_steps=cfg.train.local_steps, target_epsilon=cfg.privacy.target_epsilon,
        delta=cfg.privacy.delta, accountant=cfg.privacy.accountant,
        noise_multiplier=cfg.privacy.noise_multiplier,
    )


def _dp_spec(cfg: ExperimentConfig, plan: DPPlan) -> DPSpec:
    """This node's DP-SGD settings for ``plan``."""
    return DPSpec(noise_multiplier=plan.noise_multiplier, max_grad_norm=cfg.privacy.max_grad_norm,
                  accountant=cfg.privacy.accountant, grad_sample_mode=cfg.privacy.grad_sample_mode,
                  secure_mode=cfg.privacy.secure_mode)


def _local_spec(cfg: ExperimentConfig, partition_id: int, server_round: int) -> LocalSpec:
    return LocalSpec(
        steps=cfg.train.local_steps, batch_size=cfg.train.batch_size, lr=cfg.train.lr,
        weight_decay=cfg.train.weight_decay, objective=cfg.train.objective,
        bf16=use_bf16(cfg.train.precision), micro_batches=cfg.train.micro_batches,
        # distinct, reproducible sampling and noise per (run seed, client, round)
        seed=cfg.seed * 1_000_003 + partition_id * 1_009 + server_round,
    )


def _privacy_metrics(history: History, next_round: BudgetDecision, dp: DPSpec, budget: Budget) -> dict:
    """Spent epsilon, the history it comes from, and whether one more round fits the cap."""
    last = history[-1]
    return {
        keys.EPSILON: next_round.spent,
        keys.EPSILON_CAP: budget.max_epsilon,
        keys.DELTA: budget.delta,
        keys.NOISE_MULTIPLIER: float(dp.noise_multiplier),
        keys.SAMPLE_RATE: float(last[1]),
        keys.TOTAL_STEPS: int(sum(steps for _, _, steps in history)),
        keys.DP_HISTORY: [float(v) for entry in history for v in entry],
        keys.CAN_CONTINUE: int(next_round.allowed),
        keys.REFUSED: 0,
    }


def _reply(msg: Message, arrays: dict, metrics: dict) -> Message:
    content = RecordDict({keys.ARRAYS: ArrayRecord(torch_state_dict=arrays), keys.METRICS: MetricRecord(metrics)})
    return Message(content=content, reply_to=msg)


def _refusal(msg: Message, node: NodeSettings, *, spent: float, cap: float, reason: str,
             history: History | None = None, delta: float | None = None) -> Message:
    """A reply with no update: why the node did not train, and what it has spent."""
    metrics = {keys.PARTITION_ID: node.partition_id, keys.NUM_EXAMPLES: 0, keys.REFUSED: 1,
               keys.CAN_CONTINUE: 0, keys.EPSILON_CAP: float(cap)}
    if history is not None:
        metrics[keys.EPSILON] = float(spent)
        metrics[keys.DP_HISTORY] = [float(v) for entry in history for v in entry]
        metrics[keys.DELTA] = float(delta)
    content = RecordDict({keys.METRICS: MetricRecord(metrics),
                          keys.STATUS: ConfigRecord({keys.REASON: reason})})
    return Message(content=content, reply_to=msg)
