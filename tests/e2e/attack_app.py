"""A ClientApp whose nodes misbehave on purpose: the real fedllm ClientApp behind a mod that
corrupts chosen clients' replies (``FEDLLM_TEST_ATTACKS="0:nan,5:scale,..."``).

Run with ``federation.client_app=tests.e2e.attack_app:app``. ``decline`` makes a client
refuse every round (the honest-only reference); ``crash`` raises in round 1 and behaves in
later rounds (a node that fails and comes back).
"""

from __future__ import annotations

import os

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedllm.federation import client_app as honest
from fedllm.federation import records as keys


def _attacks() -> dict[int, str]:
    spec = os.environ.get("FEDLLM_TEST_ATTACKS", "")
    return {int(client): attack for client, attack in (item.split(":") for item in spec.split(",") if item)}


def _corrupt(attack: str, sent: dict, arrays: dict, metrics: dict) -> tuple[dict, dict]:
    name = sorted(arrays)[0]
    if attack == "nan":
        arrays[name] = arrays[name].clone().fill_(float("nan"))
    elif attack == "inf":
        arrays[name] = arrays[name].clone().fill_(float("inf"))
    elif attack == "shape":
        arrays[name] = torch.zeros(arrays[name].shape[0] + 1, *arrays[name].shape[1:])
    elif attack == "missing":
        del arrays[name]
    elif attack == "extra":
        arrays["base_model.model.lm_head.weight"] = torch.zeros(4, 4)
    elif attack == "scale":
        arrays = {k: sent[k] + 1000.0 * (v - sent[k]) for k, v in arrays.items()}
    elif attack == "metric":
        metrics[keys.TRAIN_LOSS] = [1.0, 2.0]  # a list where a number belongs
    return arrays, metrics


def attack_mod(msg: Message, context: Context, call_next) -> Message:
    """Corrupt this node's reply if the test asked for it."""
    partition = int(context.node_config[keys.NODE_PARTITION_ID])
    attack = _attacks().get(partition)
    if msg.metadata.message_type != MessageType.TRAIN:  # the pre-flight: answered honestly
        return call_next(msg, context)
    server_round = int(msg.content[keys.CONFIG][keys.SERVER_ROUND])
    if attack == "decline" or (attack == "crash-reference" and server_round == 1):
        content = RecordDict(
            {
                keys.METRICS: MetricRecord({keys.PARTITION_ID: partition, keys.REFUSED: 1}),
                keys.STATUS: ConfigRecord({keys.CATEGORY: "policy"}),
            }
        )
        return Message(content=content, reply_to=msg)
    if attack == "crash" and server_round == 1:
        raise RuntimeError("simulated node crash mid-round")
    reply = call_next(msg, context)
    if attack is None or attack.startswith("crash"):
        return reply
    sent = msg.content[keys.ARRAYS].to_torch_state_dict()
    arrays, metrics = _corrupt(
        attack, sent, reply.content[keys.ARRAYS].to_torch_state_dict(), dict(reply.content[keys.METRICS])
    )
    content = RecordDict({keys.ARRAYS: ArrayRecord(torch_state_dict=arrays), keys.METRICS: MetricRecord(metrics)})
    return Message(content=content, reply_to=msg)


app = ClientApp(mods=[attack_mod])
app.train()(honest.train)
app.query()(honest.query)
