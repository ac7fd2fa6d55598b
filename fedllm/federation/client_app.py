"""The Flower ClientApp: set the global adapter, train locally with DP-SGD, reply adapters + metrics.

Only adapter tensors and scalar metrics leave the node; the data and base weights never do.
The node's DP history lives in ``context.state``, so epsilon composes over every round
the node takes part in.
"""

from __future__ import annotations

import json
import logging

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedllm import task
from fedllm.config import ExperimentConfig
from fedllm.data.formatting import make_collate
from fedllm.federation import records as keys
from fedllm.model.adapters import adapter_state, load_adapter_state
from fedllm.privacy.accounting import History, epsilon, normalise_history
from fedllm.privacy.planner import plan_client
from fedllm.training.local import DPSpec, LocalSpec, train_local
from fedllm.training.precision import use_bf16

log = logging.getLogger(__name__)

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    """One round of local training on this node's shard."""
    cfg = ExperimentConfig.from_json(str(msg.content[keys.CONFIG][keys.TASK_CONFIG]))
    server_round = int(msg.content[keys.CONFIG][keys.SERVER_ROUND])
    partition_id = int(context.node_config[keys.NODE_PARTITION_ID])
    torch.set_num_threads(cfg.train.threads_per_client)

    bundle = task.model_bundle(cfg.model, cfg.lora, cfg.seed)
    shard = task.tokenized_shard(cfg, partition_id)
    load_adapter_state(bundle.model, msg.content[keys.ARRAYS].to_torch_state_dict())

    history = _load_history(context)
    dp = _dp_spec(cfg, len(shard)) if cfg.privacy.enabled else None
    spec = _local_spec(cfg, partition_id, server_round)
    collate = make_collate(bundle.pad_id, prompt_only=cfg.train.objective == "choices")
    result = train_local(bundle.model, shard, collate, spec, task.choice_ids_for(cfg), dp, history)
    _save_history(context, result.history)

    metrics = _metrics(cfg, partition_id, len(shard), result, dp)
    log.info("client %d round %d: loss %.4f, epsilon %s", partition_id, server_round,
             result.mean_loss, metrics.get(keys.EPSILON, "n/a (no DP)"))
    reply = RecordDict({
        keys.ARRAYS: ArrayRecord(torch_state_dict=adapter_state(bundle.model)),
        keys.METRICS: MetricRecord(metrics),
    })
    return Message(content=reply, reply_to=msg)


def _dp_spec(cfg: ExperimentConfig, shard_size: int) -> DPSpec:
    """This node's DP-SGD settings: noise planned from its own shard size and the whole schedule."""
    plan = plan_client(
        shard_size=shard_size, batch_size=cfg.train.batch_size, rounds=cfg.federation.num_rounds,
        local_steps=cfg.train.local_steps, target_epsilon=cfg.privacy.target_epsilon,
        delta=cfg.privacy.delta, accountant=cfg.privacy.accountant,
        noise_multiplier=cfg.privacy.noise_multiplier,
    )
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


def _metrics(cfg: ExperimentConfig, partition_id: int, shard_size: int, result, dp: DPSpec | None) -> dict:
    metrics = {
        keys.NUM_EXAMPLES: shard_size,
        keys.PARTITION_ID: partition_id,
        keys.TRAIN_LOSS: float(result.mean_loss),
        keys.EXAMPLES_SEEN: result.examples_seen,
        keys.TRAIN_SECONDS: float(result.seconds),
    }
    if dp is None:
        return metrics
    metrics.update({
        keys.EPSILON: epsilon(result.history, delta=cfg.privacy.delta, accountant=cfg.privacy.accountant),
        keys.DELTA: float(cfg.privacy.delta),
        keys.NOISE_MULTIPLIER: float(dp.noise_multiplier),
        keys.SAMPLE_RATE: float(result.history[-1][1]),
        keys.TOTAL_STEPS: int(sum(steps for _, _, steps in result.history)),
        keys.DP_HISTORY: [float(v) for entry in result.history for v in entry],
    })
    return metrics


def _load_history(context: Context) -> History:
    if keys.STATE_PRIVACY not in context.state:
        return []
    return normalise_history(json.loads(str(context.state[keys.STATE_PRIVACY][keys.STATE_HISTORY])))


def _save_history(context: Context, history: History) -> None:
    context.state[keys.STATE_PRIVACY] = ConfigRecord({keys.STATE_HISTORY: json.dumps(history)})
