"""The Flower ClientApp: a thin adapter between Flower messages and the node's guard.

The node's rules come from its own node config (:mod:`fedllm.node.policy`); the decision
to refuse, replay or train, and the ledger, live in :mod:`fedllm.node.guard`; the reply
format in :mod:`fedllm.federation.protocol`. Every round is written to the node's audit log.
"""

from __future__ import annotations

import logging
import sys

import torch
from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.clientapp.mod import fixedclipping_mod
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

from fedllm.config import ExperimentConfig
from fedllm.errors import ConfigError
from fedllm.federation import records as keys
from fedllm.federation.audit import audit_round
from fedllm.federation.protocol import Refusal, refusal_reply, update_reply
from fedllm.model.device import usable_cpus
from fedllm.node.guard import RoundRequest, answer_round
from fedllm.node.policy import ERROR, node_policy

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

NODE_CONSOLE_FORMAT = "%(asctime)s fedllm node: %(message)s"


class _NodeConsole(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time of each line (not at creation)."""

    @property  # type: ignore[override]
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


def show_node_log() -> None:
    """Print this node's own round lines (trained with its epsilon, refused and why) on the
    SuperNode's console, where the operator looks. Flower's ClientApp process shows only Flower's
    logger; fedllm's INFO lines would otherwise go nowhere. Called for deployed nodes only: a
    simulation's researcher reads the server's round lines instead of one line per virtual node."""
    fedllm_log = logging.getLogger("fedllm")
    if not any(isinstance(h, _NodeConsole) for h in fedllm_log.handlers):
        handler = _NodeConsole()
        handler.setFormatter(logging.Formatter(NODE_CONSOLE_FORMAT))
        fedllm_log.addHandler(handler)
    fedllm_log.setLevel(logging.INFO)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """One round on this node: refuse, replay an update already released, or train."""
    policy = node_policy(context.node_config)
    if not policy.simulated:
        show_node_log()
    config = msg.content.config_records[keys.CONFIG]
    try:
        server_round = config[keys.SERVER_ROUND]
        if isinstance(server_round, list):
            raise TypeError(f"{keys.SERVER_ROUND} is a list")
        request = RoundRequest(cfg=ExperimentConfig.from_json(str(config[keys.TASK_CONFIG])),
                               run_id=str(config[keys.RUN_ID]), server_round=int(server_round),
                               received=msg.content.array_records[keys.ARRAYS].to_torch_state_dict())
    except (ConfigError, KeyError, ValueError, TypeError) as exc:
        raise ConfigError(f"the server's train message is malformed: {exc}") from exc
    torch.set_num_threads(min(request.cfg.train.threads_per_client, usable_cpus()))
    try:
        answer = answer_round(policy, request)
    except Exception:  # noqa: BLE001 - Flower would send the exception's text (record text, sizes) to the server
        log.exception("client %d: round %d failed; the server is told only 'error'", policy.partition_id,
                      request.server_round)
        answer = Refusal(policy.partition_id, ERROR, cap=policy.max_epsilon)
    if isinstance(answer, Refusal):
        reply = refusal_reply(msg, answer)
    else:
        reply = update_reply(msg, answer.arrays, answer.metrics)
    audit_round(policy.state_dir, config, reply.content)
    return reply
