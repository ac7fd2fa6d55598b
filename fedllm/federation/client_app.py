"""The Flower ClientApp: a thin adapter between Flower messages and the node's guard.

The node's rules come from its own node config (:mod:`fedllm.node.policy`); the decision
to refuse, replay or train, and the ledger, live in :mod:`fedllm.node.guard`; the reply
format in :mod:`fedllm.federation.protocol`. Two message types: ``train`` (one round) and
``query`` (the pre-flight before round 1, :mod:`fedllm.federation.preflight`: read only, it
spends nothing). Every answer is written to the node's audit log.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from typing import TypeVar

import torch
from flwr.app import Context, Message, MessageType
from flwr.clientapp import ClientApp
from flwr.clientapp.mod import fixedclipping_mod
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

from fedllm.audit.injection import node_extension
from fedllm.config import ExperimentConfig
from fedllm.errors import ConfigError
from fedllm.federation import records as keys
from fedllm.federation.audit import PREFLIGHT, audit_round
from fedllm.federation.flower_runtime import is_flower_virtual_node, virtual_node_policy
from fedllm.federation.protocol import preflight_reply, refusal_reply, update_reply
from fedllm.library_noise import quiet_libraries
from fedllm.model.device import usable_cpus
from fedllm.node.app_check import warn_if_not_pinned
from fedllm.node.guard import PreflightRequest, RoundRequest, answer_preflight, answer_round
from fedllm.node.policy import ERROR, SIMULATED_NODES_ENV, NodePolicy, node_policy
from fedllm.node.release import Refusal

log = logging.getLogger(__name__)

_Decided = TypeVar("_Decided")


class _Refusal(Exception):
    """Carries a refusal reply past Flower's clipping mod, which needs an update to clip."""

    def __init__(self, reply: Message):
        super().__init__("refused")
        self.reply = reply


def client_clipping_mod(msg: Message, context: Context, call_next) -> Message:
    """Flower's ``fixedclipping_mod`` when the server asks for client-side clipping of a train
    round's update, else a no-op (a pre-flight query has no update to clip)."""
    if msg.metadata.message_type != MessageType.TRAIN or KEY_CLIPPING_NORM not in msg.content[keys.CONFIG]:
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
quiet_libraries()  # this module is what Ray's actors and Flower's ClientApp processes import first

NODE_CONSOLE_FORMAT = "%(asctime)s fedllm node: %(message)s"


class _NodeConsole(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time of each line (not at creation)."""

    @property
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


def _task(msg: Message, kind: str) -> tuple[ExperimentConfig, str, int]:
    """The task config, run id and round of a ``train`` or ``query`` message (untrusted).

    Raises:
        ConfigError: the message is malformed.
    """
    config = msg.content.config_records[keys.CONFIG]
    try:
        server_round = config[keys.SERVER_ROUND]
        if isinstance(server_round, list):
            raise TypeError(f"{keys.SERVER_ROUND} is a list")
        return ExperimentConfig.from_json(str(config[keys.TASK_CONFIG])), str(config[keys.RUN_ID]), int(server_round)
    except (ConfigError, KeyError, ValueError, TypeError) as exc:
        raise ConfigError(f"the server's {kind} message is malformed: {exc}") from exc
    except RecursionError as exc:  # a task config nested deeper than the JSON parser goes
        raise ConfigError(f"the server's {kind} message is malformed: its task config is nested too deeply") from exc


def _answered(policy: NodePolicy, what: str, decide: Callable[[], _Decided]) -> _Decided | Refusal:
    """``decide()``, or an ``error`` refusal when it fails unexpectedly: Flower would send the
    exception's text (record text, sizes) to the server; the traceback stays in this node's log."""
    try:
        return decide()
    except Exception:  # noqa: BLE001 - see the docstring
        log.exception("client %d: %s failed; the server is told only 'error'", policy.partition_id, what)
        return Refusal(policy.partition_id, ERROR, cap=policy.max_epsilon)


def _node(context: Context, cfg: ExperimentConfig) -> NodePolicy:
    """This node's policy; a deployed node's lines go to its operator's console.

    ``cfg`` (the server's experiment) is used only by a virtual node of Flower's own
    simulation runtime (``flwr run .``), whose operator is the researcher who sent it
    (:mod:`fedllm.federation.flower_runtime`); every other node ignores it here.
    """
    if not os.environ.get(SIMULATED_NODES_ENV) and is_flower_virtual_node(context.node_config):
        return virtual_node_policy(cfg, context.node_config)
    policy = node_policy(context.node_config)
    if not policy.simulated:
        show_node_log()
        warn_if_not_pinned()  # loaded by Flower from the coordinator's bundle, not by `fedllm node run`
    return policy


@app.train()
def train(msg: Message, context: Context) -> Message:
    """One round on this node: refuse, replay an update already released, or train."""
    cfg, run_id, server_round = _task(msg, "train")
    policy = _node(context, cfg)
    try:
        request = RoundRequest(
            cfg=cfg,
            run_id=run_id,
            server_round=server_round,
            received=msg.content.array_records[keys.ARRAYS].to_torch_state_dict(),
        )
    except (KeyError, ValueError, TypeError) as exc:
        raise ConfigError(f"the server's train message is malformed: {exc}") from exc
    torch.set_num_threads(min(request.cfg.train.threads_per_client, usable_cpus()))
    answer = _answered(
        policy, f"round {server_round}", lambda: answer_round(policy, request, node_extension(policy.audit_canaries))
    )
    if isinstance(answer, Refusal):
        reply = refusal_reply(msg, answer)
    else:
        reply = update_reply(msg, answer.arrays, answer.metrics)
    audit_round(policy.state_dir, msg.content[keys.CONFIG], reply.content)
    return reply


@app.query()
def query(msg: Message, context: Context) -> Message:
    """The pre-flight: how many of the planned rounds this node can join within its own cap.
    Read only: nothing is trained, spent or recorded in the ledger (:func:`answer_preflight`)."""
    cfg, run_id, first_round = _task(msg, "query")
    policy = _node(context, cfg)
    request = PreflightRequest(cfg=cfg, run_id=run_id, first_round=first_round)
    answer = _answered(
        policy, "the pre-flight", lambda: answer_preflight(policy, request, node_extension(policy.audit_canaries))
    )
    reply = preflight_reply(msg, answer)
    audit_round(policy.state_dir, msg.content[keys.CONFIG], reply.content, kind=PREFLIGHT)
    return reply
