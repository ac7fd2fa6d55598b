"""The pre-flight: before round 1, ask every node whether it can join the planned schedule
under its own cap, so that a node capped below the plan is known before any round runs.

:func:`run_preflight` sends every connected node a ``query`` message carrying what a train
message carries, without arrays: the whole task config, the run id, and in ``server-round``
the first round still to play. Each node answers from its own policy and ledger
(:func:`fedllm.node.guard.answer_preflight`): how many of the planned rounds it can afford,
its epsilon spent now and after those rounds, its cap and delta; or a refusal in the train
refusal's own format (``policy``, ``data`` or ``error``; the detail stays in the node's log), or
``declined`` when its operator turned pre-flights off (``answer-preflight=false``).
The server logs one line per node and keeps the answers for ``summary.json`` (``preflight``).

Nothing adapts: the rounds then run exactly as planned, and each node decides each round
again (a node that could afford every round may still refuse one, if another run spent its
budget meanwhile). The pre-flight informs the coordinator and the operators; it steers nothing.

Bounded: no node can stall the run. The server waits at most :func:`preflight_wait` seconds,
``min(federation.round_timeout, 120 s)``, for the answers (and as long, before that, for the
nodes to connect, a wait round 1 would make anyway). A pre-flight costs a node what the start
of a round costs (its shard, the plan, a few accountant calls) and no training: tens of
seconds on a CPU node that loads its model for the first time, so 120 s leaves room for a
slow node while a silent one delays round 1 by two minutes at most, never by the hour a
round may take. A node that does not answer in time is listed as "no answer" and the run goes on.

Untrusted: every answer is validated as data (:func:`~fedllm.federation.protocol.parse_preflight`:
types, ranges, consistency with the rounds asked about, the node's claimed identity); a
malformed answer is rejected, counted and logged, never used and never fatal.

Privacy boundary: the answer reveals nothing that the node's train replies and refusals
(:class:`~fedllm.node.release.Accounting`, :class:`~fedllm.node.release.Refusal`)
do not already send about these rounds. Its cap, delta and spent epsilon are in every train
reply and budget refusal; rounds-affordable and the epsilon after them are a function of the
node's DP history (sent whole in every train reply and budget refusal), this run's plan (public),
and the sample rate ``1/ceil(N/B)`` fixed from its public sampling size N (not its records'
number), which every train reply carries in its DP history; a refusal is a train refusal's
category. What is new is when and at what cost: the coordinator learns these numbers before any
round, without the node spending any budget, and as often as it asks (docs/threat-model.md).
The node reads its ledger under the ledger's lock and writes nothing: no budget is consumed,
nothing is recorded, nothing is trained.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from fedllm.config import ExperimentConfig
from fedllm.errors import UpdateRejected
from fedllm.federation import records as keys
from fedllm.federation.protocol import parse_preflight
from fedllm.federation.remote_text import escape_remote_text
from fedllm.federation.rounds import _check_identity
from fedllm.federation.strategy import connected_nodes
from fedllm.node.policy import DECLINED
from fedllm.node.release import PreflightAnswer, Refusal

log = logging.getLogger(__name__)

PREFLIGHT_WAIT_S = 120.0  # the longest the server waits for the answers (see the module docstring)


def preflight_wait(round_timeout: float) -> float:
    """How long the server waits for pre-flight answers: ``min(round_timeout, PREFLIGHT_WAIT_S)``."""
    return min(round_timeout, PREFLIGHT_WAIT_S)


@dataclass
class PreflightReport:
    """What the nodes answered before ``first_round``, sorted like a round's replies."""

    first_round: int
    rounds_planned: int
    wait_seconds: float
    asked: int = 0
    answers: list[tuple[int, PreflightAnswer]] = field(default_factory=list)  # (node id, answer)
    refusals: list[tuple[int, Refusal]] = field(default_factory=list)  # (node id, refusal)
    declined: list[tuple[int, int]] = field(default_factory=list)  # (node id, client): answer-preflight=false
    rejected: list[str] = field(default_factory=list)  # "node N: why its answer was rejected"
    failed: list[str] = field(default_factory=list)  # "node N: the error it reported"
    unanswered: list[int] = field(default_factory=list)  # node ids

    @property
    def short(self) -> list[int]:
        """The clients whose cap lets them train fewer than every planned round."""
        return [a.partition_id for _, a in self.answers if a.rounds_affordable < a.rounds_planned]

    def to_dict(self) -> dict[str, Any]:
        """The ``preflight`` entry of ``summary.json``."""
        return {
            "first_round": self.first_round,
            "rounds_planned": self.rounds_planned,
            "wait_seconds": self.wait_seconds,
            "asked": self.asked,
            "nodes": [
                {
                    "client": a.partition_id,
                    "node": node,
                    "rounds_affordable": a.rounds_affordable,
                    "rounds_planned": a.rounds_planned,
                    "epsilon_spent": a.spent,
                    "epsilon_after": a.after,
                    "cap": a.cap,
                    "delta": a.delta,
                }
                for node, a in self.answers
            ],
            "short": self.short,
            "refused": [{"client": r.partition_id, "node": node, "category": r.category} for node, r in self.refusals],
            "declined": [{"client": client, "node": node} for node, client in self.declined],
            "rejected": list(self.rejected),
            "failed": list(self.failed),
            "no_answer": list(self.unanswered),
        }


def run_preflight(grid: Grid, cfg: ExperimentConfig, task: ConfigRecord, first_round: int) -> PreflightReport:
    """Ask every node whether it can join rounds ``first_round`` .. ``num_rounds``, log one line
    per node and return the answers (see the module docstring). Never raises for a node's answer.

    Args:
        grid: the engine's grid.
        cfg: the experiment (its schedule, clients, privacy mode and round timeout).
        task: what every train message carries (task config and run id); copied, not changed.
        first_round: the first round still to play (1, or where a resumed run continues).
    """
    fed = cfg.federation
    report = PreflightReport(
        first_round=first_round,
        rounds_planned=fed.num_rounds - first_round + 1,
        wait_seconds=preflight_wait(fed.round_timeout),
    )
    nodes = connected_nodes(grid, fed.num_clients, report.wait_seconds)
    query = ConfigRecord({**task, keys.SERVER_ROUND: first_round})
    messages = [
        Message(
            content=RecordDict({keys.CONFIG: query}),
            dst_node_id=node,
            message_type=MessageType.QUERY,
            ttl=report.wait_seconds,
        )  # a node that comes later never answers a stale query
        for node in nodes
    ]
    report.asked = len(messages)
    log.info(
        "pre-flight: asking %d node(s) whether they can train rounds %d-%d under their own caps (waiting up to %g s)",
        len(messages),
        first_round,
        fed.num_rounds,
        report.wait_seconds,
    )
    replies = list(grid.send_and_receive(messages, timeout=report.wait_seconds))
    _sort(report, replies, cfg)
    answered = {reply.metadata.src_node_id for reply in replies}
    report.unanswered = [node for node in nodes if node not in answered]
    _log(report)
    return report


def _sort(report: PreflightReport, replies: list[Message], cfg: ExperimentConfig) -> None:
    """Each reply into ``report``: a checked answer, a refusal, a rejection or a failure."""
    # an error reply's reason ends with its message (it starts with a traceback)
    report.failed = [
        f"node {reply.metadata.src_node_id}: {escape_remote_text(str(reply.error.reason)[-400:])}"
        for reply in replies
        if reply.has_error()
    ]
    seen: set[int] = set()
    claims: dict[int, int] = {}
    for reply in (reply for reply in replies if not reply.has_error()):
        node = reply.metadata.src_node_id
        try:
            parsed = parse_preflight(
                reply.content,
                cfg.federation.num_clients,
                rounds_planned=report.rounds_planned,
                sample_level=cfg.privacy.sample_level,
            )
            _check_identity(node, parsed.partition_id, cfg.federation.node_ids, claims, seen)
        except UpdateRejected as exc:
            report.rejected.append(f"node {node}: {escape_remote_text(exc)}")
            continue
        seen.add(parsed.partition_id)
        if isinstance(parsed, Refusal) and parsed.category == DECLINED:
            report.declined.append((node, parsed.partition_id))
        elif isinstance(parsed, Refusal):
            report.refusals.append((node, parsed))
        else:
            report.answers.append((node, parsed))


def describe(answer: PreflightAnswer, first_round: int) -> str:
    """One line on what a node can train, for the coordinator's log."""
    can = f"can train {answer.rounds_affordable} of {answer.rounds_planned} planned rounds"
    if answer.spent is None or answer.after is None:
        return f"{can} (no DP-SGD in this run: no node budget applies)"
    if answer.rounds_affordable == answer.rounds_planned:
        return f"{can} (epsilon {answer.after:.2f} of cap {answer.cap:g})"
    before = "before this run" if first_round == 1 else "so far"
    then = f", to epsilon {answer.after:.2f}" if answer.rounds_affordable else ""
    return (
        f"will refuse from round {first_round + answer.rounds_affordable}: cap {answer.cap:g} reached "
        f"(epsilon {answer.spent:.2f} spent {before}; {can}{then})"
    )


def _log(report: PreflightReport) -> None:
    for _, answer in report.answers:
        level = logging.INFO if answer.rounds_affordable == answer.rounds_planned else logging.WARNING
        log.log(level, "pre-flight: client %d %s", answer.partition_id, describe(answer, report.first_round))
    for _, refusal in report.refusals:
        log.warning(
            "pre-flight: client %d refuses this run (%s); the node's own log has the detail",
            refusal.partition_id,
            refusal.category,
        )
    for _, client in report.declined:
        log.info(
            "pre-flight: client %d declines pre-flights (its node config); it decides each round as it comes", client
        )
    for problem in report.rejected:
        log.warning("pre-flight: answer rejected: %s", problem)
    for failure in report.failed:
        log.error("pre-flight: %s", failure)
    for node in report.unanswered:
        log.warning("pre-flight: node %d: no answer within %g s", node, report.wait_seconds)
    full = len(report.answers) - len(report.short)
    log.info(
        "pre-flight: %d of %d node(s) can train every planned round; %d fewer, %d refuse, %d declined, "
        "%d rejected, %d failed, %d no answer; the rounds run as planned",
        full,
        report.asked,
        len(report.short),
        len(report.refusals),
        len(report.declined),
        len(report.rejected),
        len(report.failed),
        len(report.unanswered),
    )
