"""The server's round loop: Flower strategies configure and aggregate; this loop adds what a
private federation needs around them.

Per round (:func:`play_round`): send the strategy's train messages, validate every reply and
sort them into updates, refusals (a node that would pass its privacy cap trains nothing),
rejected replies (malformed, non-finite, or far larger than the round's others) and failures
(errors, no reply in time), record what was spent in the server ledger, aggregate the valid
updates, and return the :class:`RoundResult`; the caller evaluates and checkpoints it.
:func:`run_rounds` yields one result per round and ends cleanly, before the planned last round
if need be, once fewer than ``min_train_clients`` clients can still train. It starts at any
round, which is how an interrupted run resumes.

Under client-level DP no update is rejected for its size relative to the others'
(:func:`sort_replies`): that would make whether one client's update is used depend on
another client's data, and the noise is calibrated for each client moving the sum by at most
the clipping bound, with the count of contributing clients public.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import statistics
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedllm.config import AccountantName
from fedllm.errors import UpdateRejected
from fedllm.federation import records as keys
from fedllm.federation.protocol import parse_reply, parse_spending
from fedllm.federation.remote_text import escape_remote_text
from fedllm.federation.strategy import clip_reply
from fedllm.federation.validation import (
    GENERIC_MAX_STEPS,
    MechanismCheck,
    bounded_history,
    clip_bounds,
    expected_update,
    norm_outliers,
    update_norm,
)
from fedllm.node.release import Refusal, TrainReport
from fedllm.privacy.accounting import epsilon
from fedllm.privacy.client_level import ClientLevelRound
from fedllm.privacy.ledger import PrivacyLedger

log = logging.getLogger(__name__)


@dataclass
class RoundReplies:
    """One round's replies, sorted."""

    updates: list[Message] = field(default_factory=list)
    reports: list[TrainReport] = field(default_factory=list)
    refusals: list[Refusal] = field(default_factory=list)
    rejected: list[str] = field(default_factory=list)
    rejected_spending: list[tuple[TrainReport, str]] = field(default_factory=list)  # trained, reply rejected: why
    failures: list[str] = field(default_factory=list)
    sampled: int = 0  # train messages sent this round (set by play_round), answered or not


@dataclass(frozen=True)
class ReplyPolicy:
    """What the server accepts from clients."""

    num_clients: int
    update_norm_ratio: float
    max_update_norm: float | None
    require_accounting: bool = True  # sample-level DP: an update must carry its DP-SGD accounting
    uniform_weights: bool = True  # client-level DP is calibrated for the uniform mean
    client_level: bool = False  # client-level DP: no norm-outlier filter (see sort_replies)
    client_clip_norm: float | None = None  # client-level DP clipped on the nodes: C, which no update may exceed
    mechanism: MechanismCheck | None = None  # sample-level DP: the plan a DP history must match
    node_ids: tuple[int, ...] = ()  # deployment: partition i belongs to the node registered as node_ids[i]


def sort_replies(
    replies: list[Message],
    ledger: PrivacyLedger,
    server_round: int,
    sent: ArrayRecord,
    policy: ReplyPolicy,
    node_partitions: dict[int, int],
) -> RoundReplies:
    """Split replies into valid updates, refusals, rejected replies and failures; every reply
    is parsed and validated first (:mod:`fedllm.federation.protocol`). Nothing is recorded in
    ``ledger`` (it is read to check each DP history): the caller records what the round spent
    (:func:`record_refusals`, :func:`record_updates`).

    ``node_partitions`` remembers which client each node said it was, so a node cannot
    speak for another client later; only an accepted reply adds to it (a rejected claim must not
    lock the real client out). A valid update keeps only its adapter tensors and the FedAvg
    weight the server sets (:func:`fedavg_weights`), so Flower aggregates a fixed schema; outside
    client-level DP it is first clipped so it moves the average no more than the median of the
    round's other updates does (:func:`~fedllm.federation.validation.clip_bounds`).

    A train reply rejected for its tensors (or another part of its format) still carries what
    the node spent: when its accounting parses and passes the same checks as an accepted
    update's, it goes to ``rejected_spending`` (the server ledger records it, marked rejected),
    unless a reply accepted this round speaks for the same client.

    Updates far larger than the round's others are rejected (:func:`norm_outliers`), except
    under client-level DP (``policy.client_level``): there each update is clipped to ``C``
    before it is summed, and a filter on the unclipped norms would let one client's data
    decide whether another's update is used (its big update moves the median), so a client
    would change the sum by more than ``C`` and the published count of contributors. With
    client-side clipping (``policy.client_clip_norm``) an update above ``C`` is rejected instead:
    an honest node's never is, so that depends on no honest client's data.
    """
    result = RoundReplies()
    expected = expected_update(sent)
    candidates: list[tuple[Message, TrainReport]] = []
    refused: dict[int, int] = {}  # node -> client, of the refusals accepted
    seen: set[int] = set()
    for reply in replies:
        node = reply.metadata.src_node_id
        if reply.has_error():
            # the end of an error's text holds its message (the start, a traceback)
            result.failures.append(f"node {node}: {escape_remote_text(str(reply.error.reason)[-400:])}")
            continue
        try:
            parsed = parse_reply(
                reply.content, expected, policy.num_clients, require_accounting=policy.require_accounting
            )
        except UpdateRejected as exc:
            result.rejected.append(f"node {node}: {escape_remote_text(exc)}")
            _keep_spending(reply, str(exc), result, ledger, policy, node_partitions, seen)
            continue
        try:
            _check_identity(node, parsed.partition_id, policy.node_ids, node_partitions, seen)
            if isinstance(parsed, TrainReport):
                _check_mechanism(parsed, policy.mechanism, ledger)
            else:
                parsed = _accountable_refusal(parsed, policy.mechanism, ledger.accountant)
        except UpdateRejected as exc:
            result.rejected.append(f"node {node}: {escape_remote_text(exc)}")
            continue
        seen.add(parsed.partition_id)
        if isinstance(parsed, Refusal):
            result.refusals.append(parsed)
            refused[node] = parsed.partition_id
        else:
            candidates.append((reply, parsed))
    norms = {i: update_norm(reply.content.array_records[keys.ARRAYS], sent) for i, (reply, _) in enumerate(candidates)}
    outliers = _size_rejections(norms, policy)
    for index, (_, report) in enumerate(candidates):
        result.reports.append(report)  # trained means spent, whether or not the update is used
        if index in outliers:
            result.rejected.append(f"client {report.partition_id}: {outliers[index]}")
    accepted = [pair for index, pair in enumerate(candidates) if index not in outliers]
    # only replies accepted teach the server who a node is
    node_partitions.update(refused)
    node_partitions.update({reply.metadata.src_node_id: report.partition_id for reply, report in accepted})
    spent: dict[int, tuple[TrainReport, str]] = {}
    for report, reason in result.rejected_spending:  # never over an accepted reply's; the first per client
        if report.partition_id not in seen:
            spent.setdefault(report.partition_id, (report, reason))
    result.rejected_spending = list(spent.values())
    # under client-level DP the strategy clips every update to C (see the module docstring)
    kept_norms = None if policy.client_level else [norms[i] for i in norms if i not in outliers]
    result.updates = _for_aggregation(accepted, policy.uniform_weights, sent, kept_norms, server_round)
    for problem in result.rejected:
        log.warning("round %d: rejected %s", server_round, problem)
    for failure in result.failures:
        log.error("round %d: %s", server_round, failure)
    return result


CLIP_SLACK = 1.01  # float32 rounding of a node's clipped update, as the server measures it


def _size_rejections(norms: dict[int, float], policy: ReplyPolicy) -> dict[int, str]:
    """The updates rejected for their size, by index (see :func:`sort_replies`)."""
    if not policy.client_level:
        return norm_outliers(norms, policy.update_norm_ratio, policy.max_update_norm)
    if policy.client_clip_norm is None:
        return {}  # the server clips every update to C
    bound = policy.client_clip_norm * CLIP_SLACK
    return {
        i: f"update norm {norm:.4g} above privacy.client_clip_norm={policy.client_clip_norm:g} (the node must clip)"
        for i, norm in norms.items()
        if norm > bound
    }


def _keep_spending(
    reply: Message,
    reason: str,
    result: RoundReplies,
    ledger: PrivacyLedger,
    policy: ReplyPolicy,
    node_partitions: dict[int, int],
    seen: set[int],
) -> None:
    """A train reply rejected for its tensors: put what the node spent into ``rejected_spending``
    when its accounting passes every check an accepted update's does (the node did spend it, and
    the server's ledger must not report less than the node's own)."""
    report = parse_spending(reply.content, policy.num_clients)
    if report is None:
        return
    try:
        _check_identity(reply.metadata.src_node_id, report.partition_id, policy.node_ids, node_partitions, seen)
        _check_mechanism(report, policy.mechanism, ledger)
    except UpdateRejected:
        return
    result.rejected_spending.append((report, escape_remote_text(reason)))


def _check_identity(
    node: int, client: int, node_ids: tuple[int, ...], node_partitions: dict[int, int], seen: set[int]
) -> None:
    """A node speaks only for its own partition: the registered one when ``node_ids`` lists the
    federation's authenticated node ids, else the first it claimed in an accepted reply of this
    run. Reads ``node_partitions``, never writes it (:func:`sort_replies` does, once accepted).

    Raises:
        UpdateRejected: the claim is not this node's.
    """
    if node_ids and (node not in node_ids or node_ids.index(node) != client):
        raise UpdateRejected(
            f"claims to be client {client}, but federation.node_ids registers "
            + (f"client {node_ids.index(node)} for it" if node in node_ids else "no client for it")
        )
    owners = {other for other, partition in node_partitions.items() if partition == client}
    if node_partitions.get(node, client) != client or owners - {node} or client in seen:
        raise UpdateRejected(f"claims to be client {client}, which another reply or node already is")


def _check_mechanism(report: TrainReport, mechanism: MechanismCheck | None, ledger: PrivacyLedger) -> None:
    """Under sample-level DP, the reported history must be this run's plan, one round further,
    and one the server's accountant can account."""
    if report.accounting is None:
        return
    if mechanism is not None:
        before = ledger.clients.get(report.partition_id)
        previous = sum(s for _, _, s in before.history) if before and before.history else None
        mechanism.check(report.history, previous, report.public.num_examples)
    else:
        bounded_history(report.history, GENERIC_MAX_STEPS)
    if not accountable(report.history, report.accounting.delta, ledger.accountant):
        raise UpdateRejected("dp-history: the accountant cannot compute its epsilon")


def accountable(history, delta: float, accountant: AccountantName) -> bool:
    """Whether ``accountant`` computes an epsilon for ``history``. Cached per distinct history,
    failures included: a history resent round after round costs one accounting."""
    return _accountable(tuple((float(n), float(r), int(s)) for n, r, s in history), delta, accountant)


@lru_cache(maxsize=1024)
def _accountable(history: tuple[tuple[float, float, int], ...], delta: float, accountant: AccountantName) -> bool:
    try:
        return math.isfinite(epsilon(history, delta=delta, accountant=accountant))
    except Exception:  # noqa: BLE001 - untrusted histories can make an accountant overflow or run out of memory
        return False


MAX_WEIGHT_RATIO = 10.0  # no declared size outweighs this many times the median of the others'


def fedavg_weights(reports: list[TrainReport], uniform: bool) -> list[float]:
    """FedAvg weights: shard sizes when every update declared its size public (and the run
    does not need uniform weights), else 1 each: a size no DP covers is never assumed. A
    declared size counts at most :data:`MAX_WEIGHT_RATIO` times the median of the *other*
    updates' sizes, so no node raises its own cap by its claim (a lone update weighs 1)."""
    declared = [r.public.num_examples for r in reports]
    sizes = [size for size in declared if size is not None]
    if uniform or len(reports) < 2 or len(sizes) < len(declared):
        return [1.0] * len(reports)
    others = [statistics.median(sizes[:i] + sizes[i + 1 :]) for i in range(len(sizes))]
    return [float(min(size, MAX_WEIGHT_RATIO * bound)) for size, bound in zip(sizes, others, strict=True)]


def _for_aggregation(
    accepted: list[tuple[Message, TrainReport]],
    uniform: bool,
    sent: ArrayRecord,
    norms: list[float] | None,
    server_round: int = 0,
) -> list[Message]:
    """The accepted updates as Flower aggregates them: only their adapter tensors, in the order
    the server sent them (Flower pairs arrays by position), and the FedAvg weight the server sets;
    given their ``norms``, each is clipped so it moves the average no further than the median of
    the others (:func:`~fedllm.federation.validation.clip_bounds`)."""
    weights = fedavg_weights([report for _, report in accepted], uniform)
    clips = clip_bounds(norms, weights) if norms is not None else [None] * len(accepted)
    clipped = [i for i, bound in enumerate(clips) if bound is not None and norms and norms[i] > bound]
    if clipped:
        log.info(
            "round %d: %d of %d update(s) clipped to the median pull of the others",
            server_round,
            len(clipped),
            len(accepted),
        )
    reference = {name: array.numpy() for name, array in sent.items()} if clipped else {}
    for index, ((reply, _), weight) in enumerate(zip(accepted, weights, strict=True)):
        arrays = reply.content[keys.ARRAYS]
        reply.content = RecordDict(
            {
                keys.ARRAYS: ArrayRecord({name: arrays[name] for name in sent.keys()}),
                keys.METRICS: MetricRecord({keys.FEDAVG_WEIGHT: weight}),
            }
        )
        bound = clips[index]
        if index in clipped and bound is not None:
            clip_reply(reply, reference, bound)
    return [reply for reply, _ in accepted]


def _accountable_refusal(refusal: Refusal, mechanism: MechanismCheck | None, accountant: AccountantName) -> Refusal:
    """``refusal``, without its DP history when ``accountant`` cannot compute an epsilon for it
    (the refusal still counts; its unaccountable history does not).

    Raises:
        UpdateRejected: the history is beyond what any node of this run could hold
            (:meth:`MechanismCheck.check_bounds`): checked before any accountant runs.
    """
    history = refusal.history
    if history is not None:
        if mechanism is not None:
            mechanism.check_bounds(history)
        else:
            bounded_history(history, GENERIC_MAX_STEPS)
    if history is not None and (refusal.delta is None or not accountable(history, refusal.delta, accountant)):
        return dataclasses.replace(refusal, history=None)
    return refusal


def record_refusals(ledger: PrivacyLedger, refusals: list[Refusal], server_round: int) -> None:
    """Put each refusal (and the DP history it reported) into the server ledger."""
    for refusal in refusals:
        ledger.record_refusal(
            refusal.partition_id,
            server_round,
            refusal.reason,
            cap=refusal.cap,
            history=refusal.history,
            delta=refusal.delta,
        )
        log.warning("round %d: client %d %s", server_round, refusal.partition_id, refusal.reason)


def record_updates(
    ledger: PrivacyLedger,
    reports: list[TrainReport],
    server_round: int,
    rejected: list[tuple[TrainReport, str]] | None = None,
) -> None:
    """Put each client's reported DP-SGD history into the server ledger (epsilon is recomputed);
    ``rejected``: those of replies rejected after the node trained, with why (marked so)."""
    for report, reason in [*((r, None) for r in reports), *(rejected or [])]:
        if report.accounting is not None:
            acct = report.accounting
            ledger.record(
                report.partition_id,
                acct.history,
                server_round,
                delta=acct.delta,
                cap=acct.cap,
                can_continue=acct.can_continue,
                rejected=reason,
            )


def stop_reason(
    *,
    ledger: PrivacyLedger,
    num_clients: int,
    min_train_clients: int,
    server_round: int,
    num_rounds: int,
    min_updates: int = 1,
) -> str | None:
    """Why the run must end after ``server_round`` (too few clients can still train for a round
    to be aggregated: more rounds would spend their budgets for nothing), or None."""
    exhausted = ledger.exhausted()
    able = num_clients - len(exhausted)
    if server_round < num_rounds and able < max(min_train_clients, min_updates):
        needed = f"federation.min_train_clients={min_train_clients}"
        if min_updates > min_train_clients:
            needed = f"federation.min_updates={min_updates}"
        return (
            f"after round {server_round} only {able} of {num_clients} clients can train another round "
            f"within their privacy caps (exhausted: {exhausted}); {needed}"
        )
    return None


@dataclass
class LoopSettings:
    """What the loop needs from the experiment config."""

    num_rounds: int
    num_clients: int
    min_train_clients: int
    timeout: float
    train_config: ConfigRecord
    policy: ReplyPolicy
    min_updates: int = 1  # federation.min_updates: the fewest accepted updates a round aggregates


@dataclass
class RoundResult:
    """What one round produced: the global adapter after it (the one sent when nothing was
    aggregated), its sorted replies, and why the run must stop after it (None: go on)."""

    server_round: int
    arrays: ArrayRecord
    replies: RoundReplies
    stop_reason: str | None = None


def run_rounds(
    grid: Grid, strategy: Strategy, ledger: PrivacyLedger, settings: LoopSettings, arrays: ArrayRecord, first_round: int
) -> Iterator[RoundResult]:
    """Play rounds ``first_round`` .. ``num_rounds``, yielding each one's result as it ends (the
    caller evaluates and checkpoints it before the next round starts); stops after a round
    whose ``stop_reason`` is set."""
    node_partitions: dict[int, int] = {}  # which client each node said it was, for the whole run
    if settings.policy.client_level:
        log.info(
            "client-level DP: updates are clipped, not filtered by their norm relative to the round's others "
            "(federation.update_norm_ratio and federation.max_update_norm do not apply)"
        )
    for server_round in range(first_round, settings.num_rounds + 1):
        result = play_round(grid, strategy, ledger, settings, arrays, server_round, node_partitions)
        yield result
        if result.stop_reason:
            log.warning("stopping: %s", result.stop_reason)
            return
        arrays = result.arrays


def play_round(
    grid: Grid,
    strategy: Strategy,
    ledger: PrivacyLedger,
    settings: LoopSettings,
    arrays: ArrayRecord,
    server_round: int,
    node_partitions: dict[int, int],
) -> RoundResult:
    """One round from ``arrays``: sample and send, sort the replies, record what the clients
    spent in ``ledger``, aggregate, and decide whether the run can go on."""
    connected = len(set(grid.get_node_ids()))
    messages = list(strategy.configure_train(server_round, arrays, settings.train_config, grid))
    # the sample was drawn from the nodes connected then (all of them, unless the wait for
    # them timed out): the fewest seen around it, so a sampling ratio is never understated
    population = min(settings.num_clients, connected, len(set(grid.get_node_ids())))
    sent_at = time.monotonic()
    received = list(grid.send_and_receive(messages, timeout=settings.timeout))
    waited = time.monotonic() - sent_at  # the real wait: an engine that died returns long before the timeout
    replies = sort_replies(received, ledger, server_round, arrays, settings.policy, node_partitions)
    record_refusals(ledger, replies.refusals, server_round)
    replies.sampled = len(messages)  # amplification credit counts the clients sampled, not those that replied
    replies.failures += [
        f"node {m.metadata.dst_node_id}: {no_reply(waited, settings.timeout)}" for m in _unanswered(messages, received)
    ]
    aggregated = _aggregate_enough(strategy, ledger, settings, server_round, replies, population)
    # trained means spent, aggregated or not, accepted or not
    record_updates(ledger, replies.reports, server_round, replies.rejected_spending)
    reason = stop_reason(
        ledger=ledger,
        num_clients=settings.num_clients,
        min_train_clients=settings.min_train_clients,
        server_round=server_round,
        num_rounds=settings.num_rounds,
        min_updates=settings.min_updates,
    )
    return RoundResult(server_round, aggregated or arrays, replies, reason)


def _aggregate_enough(
    strategy: Strategy,
    ledger: PrivacyLedger,
    settings: LoopSettings,
    server_round: int,
    replies: RoundReplies,
    population: int,
) -> ArrayRecord | None:
    """The round's aggregate, or None when too few updates were accepted or aggregation failed:
    then the global adapter stays as it was, ``replies.updates`` is emptied (the round's record
    counts the updates aggregated: none) and ``replies.failures`` says why."""
    needed = max(settings.min_train_clients, settings.min_updates)
    count = len(replies.updates)
    if count >= needed:
        aggregated = _aggregate(strategy, ledger, server_round, replies, population)
        problem = f"aggregation of {count} update(s) failed or was not finite (see the log)"
    else:
        aggregated = None
        name = "min_updates" if settings.min_updates >= settings.min_train_clients else "min_train_clients"
        problem = f"{count} accepted update(s), fewer than federation.{name}={needed}: not aggregated"
        log.warning("round %d: %s", server_round, problem)
    if aggregated is None and replies.updates:
        replies.failures.append(f"round {server_round}: {problem}; the global adapter is unchanged")
        replies.updates = []
    return aggregated


def no_reply(waited: float, timeout: float) -> str:
    """What an unanswered message says: the time actually waited, and whether that was the
    timeout or an engine that gave up earlier (a node gone, a simulation engine that failed)."""
    if waited >= timeout:
        return f"no reply after {waited:.0f} s (federation.round_timeout={timeout:g} s)"
    return (
        f"no reply after {waited:.1f} s, before federation.round_timeout={timeout:g} s: the engine returned "
        "without it (node gone or engine stopped)"
    )


def _unanswered(messages: list[Message], replies: list[Message]) -> list[Message]:
    answered = {reply.metadata.src_node_id for reply in replies}
    return [message for message in messages if message.metadata.dst_node_id not in answered]


def _finite(arrays: ArrayRecord) -> bool:
    return all(bool(np.isfinite(array.numpy()).all()) for array in arrays.values())


def _aggregate(
    strategy: Strategy, ledger: PrivacyLedger, server_round: int, replies: RoundReplies, population: int
) -> ArrayRecord | None:
    """Aggregate the round's valid updates; under client-level DP, account the release (drawn
    from ``population`` nodes, ``replies.sampled`` of them sent a train message)."""
    try:
        aggregated, _ = strategy.aggregate_train(server_round, replies.updates)
    except Exception as exc:  # noqa: BLE001 - validated replies should never fail; if one does, skip the round
        log.error(
            "round %d: aggregation failed (%s: %s); the global adapter is unchanged",
            server_round,
            type(exc).__name__,
            escape_remote_text(exc),
        )
        return None
    if aggregated is not None and not _finite(aggregated):
        # a sum of finite updates can still overflow: never let it become the global adapter
        log.error("round %d: the aggregate holds NaN or infinite values; the global adapter is unchanged", server_round)
        return None
    if aggregated is not None and ledger.client_level is not None:
        ledger.client_level.record(
            ClientLevelRound(
                server_round=server_round,
                population=population,
                sampled=replies.sampled,
                contributed=len(replies.updates),
            )
        )
    return aggregated
