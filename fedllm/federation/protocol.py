"""The reply format on the wire: Flower messages built from, and parsed into, the node's releases.

What a node may release is defined Flower-free in :mod:`fedllm.node.release`; this module is its
Flower codec (the reply messages) and the server's parser and validator.

A node's reply is a release. By default it carries the adapter tensors and the accounting
metadata the server needs to recompute the node's epsilon (noise multiplier, sample rate,
steps: the DP history; the node's cap and delta; whether one more round fits), nothing
else; the sample rate is fixed from the node's public sampling size N, never from its record
count. Data-dependent values no DP covers (train loss, examples seen, timings) leave only when
the node's own config declares them public; a public size is N, not the records' number. A refusal says only its
category (budget, data, policy) and the epsilon numbers; the detail stays in the node's log.

The server parses every reply with :func:`parse_reply` into a typed :class:`TrainReport` or
:class:`Refusal`, or rejects it with :class:`~fedllm.errors.UpdateRejected`.

The pre-flight answer (:class:`PreflightAnswer`, parsed by :func:`parse_preflight`) says, before
round 1, how many of the planned rounds fit the node's own cap: the rounds planned and
affordable, the epsilon spent now and after the affordable rounds, the cap and delta; or it is a
refusal (``policy``, ``data``, ``error``) in the train refusal's own format. It carries nothing a
train reply or refusal of those rounds does not (see :mod:`fedllm.federation.preflight`).
"""

from __future__ import annotations

import dataclasses
import math

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from fedllm.errors import UpdateRejected
from fedllm.federation import records as keys
from fedllm.federation.validation import TensorSpec, validate_arrays
from fedllm.node.policy import BUDGET, PREFLIGHT_REFUSAL_CATEGORIES, REFUSAL_CATEGORIES
from fedllm.node.release import Accounting, PreflightAnswer, PublicStats, Refusal, TrainReport
from fedllm.privacy.accounting import History

MAX_HISTORY_ENTRIES = 100  # a node's lifetime of (noise, rate) changes; bounds the server's accounting work
# what a real mechanism can be; beyond these an accountant overflows or runs out of memory
NOISE_RANGE = (0.05, 1e4)
MAX_STEPS = 10**7


def update_reply(msg: Message, arrays: dict, metrics: dict) -> Message:
    """The reply message carrying an update and its metrics (from :meth:`TrainReport.to_metrics`)."""
    content = RecordDict({keys.ARRAYS: ArrayRecord(torch_state_dict=arrays), keys.METRICS: MetricRecord(metrics)})
    return Message(content=content, reply_to=msg)


def refusal_reply(msg: Message, refusal: Refusal, categories: tuple[str, ...] = REFUSAL_CATEGORIES) -> Message:
    """The reply message of a refusal (no tensors)."""
    if refusal.category not in categories:
        raise ValueError(f"unknown refusal category {refusal.category!r}")
    content = RecordDict(
        {keys.METRICS: MetricRecord(refusal.to_metrics()), keys.STATUS: ConfigRecord({keys.CATEGORY: refusal.category})}
    )
    return Message(content=content, reply_to=msg)


def preflight_reply(msg: Message, answer: PreflightAnswer | Refusal) -> Message:
    """The reply to a pre-flight query: the answer, or a refusal exactly as a train refusal is sent."""
    if isinstance(answer, Refusal):
        return refusal_reply(msg, answer, PREFLIGHT_REFUSAL_CATEGORIES)
    return Message(content=RecordDict({keys.METRICS: MetricRecord(answer.to_metrics())}), reply_to=msg)


# ---- the server side: parse and validate --------------------------------------------------------

# metric -> (type, minimum, maximum); None = unbounded. Type int accepts only whole numbers.
Schema = dict[str, tuple[type, float | None, float | None]]
_SCHEMA: Schema = {
    keys.PARTITION_ID: (int, 0, None),
    keys.REFUSED: (int, 0, 1),
    keys.EPSILON: (float, 0, None),
    keys.EPSILON_CAP: (float, 0, None),
    keys.DELTA: (float, 1e-300, 0.1),
    keys.NOISE_MULTIPLIER: (float, 0, None),
    keys.SAMPLE_RATE: (float, 0, 1),
    keys.TOTAL_STEPS: (int, 0, None),
    keys.CAN_CONTINUE: (int, 0, 1),
    keys.REPLAYED: (int, 1, 1),
    keys.NUM_EXAMPLES: (int, 1, 1e9),
    keys.TRAIN_LOSS: (float, 0, None),
    keys.TRAIN_SECONDS: (float, 0, None),
    keys.EXAMPLES_SEEN: (int, 0, None),
}
_ACCOUNTING = (keys.EPSILON, keys.EPSILON_CAP, keys.DELTA, keys.DP_HISTORY, keys.CAN_CONTINUE)


def _number(name: str, value: object, num_clients: int, schema: Schema = _SCHEMA) -> float:
    kind, low, high = schema[name]
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise UpdateRejected(f"metric {name!r} is not a number ({type(value).__name__})")
    if not math.isfinite(value):
        raise UpdateRejected(f"metric {name!r} is not finite ({value})")
    if kind is int and float(value) != int(value):
        raise UpdateRejected(f"metric {name!r} must be a whole number, got {value}")
    if (low is not None and value < low) or (high is not None and value > high):
        raise UpdateRejected(f"metric {name!r}={value} out of range [{low}, {high}]")
    if name == keys.PARTITION_ID and value >= num_clients:
        raise UpdateRejected(f"metric {name!r}={value}: there are only {num_clients} clients")
    return float(value)


def parse_history(flat: object) -> History:
    """A flat ``[noise, rate, steps, ...]`` list as checked ``(noise, rate, steps)`` entries.

    Raises:
        UpdateRejected: not a bounded list of finite, possible mechanisms.
    """
    if (
        not isinstance(flat, list)
        or len(flat) % 3
        or not all(isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in flat)
    ):
        raise UpdateRejected("metric 'dp-history' must be a flat list of finite (noise, rate, steps) triples")
    if len(flat) > 3 * MAX_HISTORY_ENTRIES:
        raise UpdateRejected(f"metric 'dp-history' holds more than {MAX_HISTORY_ENTRIES} entries")
    triples = list(zip(flat[0::3], flat[1::3], flat[2::3], strict=True))
    for noise, rate, steps in triples:
        if (
            not NOISE_RANGE[0] <= noise <= NOISE_RANGE[1]
            or not 0 < rate <= 1
            or not 0 <= steps <= MAX_STEPS
            or steps != int(steps)
        ):
            raise UpdateRejected(f"metric 'dp-history' holds an impossible mechanism ({noise}, {rate}, {steps})")
    return [(float(n), float(r), int(s)) for n, r, s in triples]


def _metrics(
    content: RecordDict,
    num_clients: int,
    schema: Schema = _SCHEMA,
    lists: frozenset[str] = frozenset({keys.DP_HISTORY}),
) -> dict:
    """The reply's one metric record, every number checked against ``schema`` (``lists``: the
    list-valued metrics it may also hold, parsed by the caller)."""
    if list(content.metric_records) != [keys.METRICS]:
        raise UpdateRejected(f"expected exactly one metric record {keys.METRICS!r}, got {list(content.metric_records)}")
    metrics = dict(content.metric_records[keys.METRICS])
    unknown = sorted(set(metrics) - set(schema) - lists)
    if unknown:
        raise UpdateRejected(f"unexpected metric(s) {unknown[:3]}")
    for name in (keys.PARTITION_ID, keys.REFUSED):
        if name not in metrics:
            raise UpdateRejected(f"metric {name!r} is missing")
    for name, value in metrics.items():
        if name not in lists:
            metrics[name] = _number(name, value, num_clients, schema)
    return metrics


def _accounting(metrics: dict) -> Accounting | None:
    present = [name for name in _ACCOUNTING if name in metrics]
    if not present:
        return None
    if len(present) != len(_ACCOUNTING):
        raise UpdateRejected(f"incomplete accounting: missing {sorted(set(_ACCOUNTING) - set(present))}")
    history = parse_history(metrics[keys.DP_HISTORY])
    if not history:
        raise UpdateRejected("an update under DP-SGD with an empty DP history")
    return Accounting(
        epsilon=metrics[keys.EPSILON],
        cap=metrics[keys.EPSILON_CAP],
        delta=metrics[keys.DELTA],
        history=history,
        can_continue=bool(metrics[keys.CAN_CONTINUE]),
    )


def _refusal(content: RecordDict, metrics: dict, categories: tuple[str, ...] = REFUSAL_CATEGORIES) -> Refusal:
    if content.array_records:
        raise UpdateRejected("a refusal must not carry tensors")
    status = content.config_records.get(keys.STATUS)
    category = str(status.get(keys.CATEGORY, "")) if status else ""
    if category not in categories:
        raise UpdateRejected(f"a refusal needs a category ({', '.join(categories)})")
    history = parse_history(metrics[keys.DP_HISTORY]) if keys.DP_HISTORY in metrics else None
    return Refusal(
        partition_id=int(metrics[keys.PARTITION_ID]),
        category=category,
        cap=metrics.get(keys.EPSILON_CAP),
        spent=metrics.get(keys.EPSILON),
        delta=metrics.get(keys.DELTA),
        history=history,
    )


def parse_reply(
    content: RecordDict, expected: dict[str, TensorSpec], num_clients: int, *, require_accounting: bool
) -> TrainReport | Refusal:
    """Validate a reply and read it as a typed report or refusal.

    Args:
        content: the reply's records, untrusted.
        expected: the adapter tensors the server sent (names, shapes, dtypes).
        num_clients: partition ids must be below this.
        require_accounting: the run trains with DP-SGD: an update must carry its accounting.

    Raises:
        UpdateRejected: anything outside the format (the reply must not be used).
    """
    metrics = _metrics(content, num_clients)
    if metrics[keys.REFUSED] == 1:
        return _refusal(content, metrics)
    if content.config_records:
        raise UpdateRejected("an update must not carry config records")
    validate_arrays(content, expected)
    accounting = _accounting(metrics)
    if require_accounting and accounting is None:
        raise UpdateRejected("an update without DP-SGD accounting in a sample-level DP run")
    public = PublicStats(
        num_examples=None if keys.NUM_EXAMPLES not in metrics else int(metrics[keys.NUM_EXAMPLES]),
        train_loss=metrics.get(keys.TRAIN_LOSS),
        train_seconds=metrics.get(keys.TRAIN_SECONDS),
        examples_seen=None if keys.EXAMPLES_SEEN not in metrics else int(metrics[keys.EXAMPLES_SEEN]),
    )
    return TrainReport(
        partition_id=int(metrics[keys.PARTITION_ID]),
        accounting=accounting,
        public=public,
        replayed=bool(metrics.get(keys.REPLAYED, 0)),
    )


def parse_spending(content: RecordDict, num_clients: int) -> TrainReport | None:
    """The DP accounting of a train reply the server rejects (for its tensors, say): what the node
    says it spent, when that part of the reply is well-formed, else None. The caller checks it as
    it checks an accepted update's before the ledger records it.

    Args:
        content: the reply's records, untrusted.
        num_clients: partition ids must be below this.
    """
    try:
        metrics = _metrics(content, num_clients)
        if metrics[keys.REFUSED] == 1:
            return None
        accounting = _accounting(metrics)
    except UpdateRejected:
        return None
    if accounting is None:
        return None
    size = metrics.get(keys.NUM_EXAMPLES)
    return TrainReport(
        partition_id=int(metrics[keys.PARTITION_ID]),
        accounting=accounting,
        public=PublicStats(num_examples=None if size is None else int(size)),
    )


_PREFLIGHT_SCHEMA: Schema = {
    keys.PARTITION_ID: (int, 0, None),
    keys.REFUSED: (int, 0, 1),
    keys.CAN_CONTINUE: (int, 0, 0),  # in a refusal, as a train refusal sends it
    keys.ROUNDS_PLANNED: (int, 1, None),
    keys.ROUNDS_AFFORDABLE: (int, 0, None),
    keys.EPSILON: (float, 0, None),
    keys.EPSILON_AFTER: (float, 0, None),
    keys.EPSILON_CAP: (float, 0, None),
    keys.DELTA: (float, 1e-300, 0.1),
}
_PREFLIGHT_BUDGET = (keys.EPSILON, keys.EPSILON_AFTER, keys.DELTA)


def parse_preflight(
    content: RecordDict, num_clients: int, *, rounds_planned: int, sample_level: bool
) -> PreflightAnswer | Refusal:
    """Validate a pre-flight answer and read it as a typed answer or refusal.

    Args:
        content: the reply's records, untrusted.
        num_clients: partition ids must be below this.
        rounds_planned: the rounds the query asked about (the answer must repeat it).
        sample_level: the run trains with DP-SGD: an answer must carry the node's epsilon
            numbers; without it, it carries none and every planned round fits.

    Raises:
        UpdateRejected: anything outside the format or inconsistent in itself.
    """
    if content.array_records:
        raise UpdateRejected("a pre-flight answer must not carry tensors")
    metrics = _metrics(content, num_clients, _PREFLIGHT_SCHEMA, lists=frozenset())
    if metrics[keys.REFUSED] == 1:
        refusal = _refusal(content, metrics, (*PREFLIGHT_REFUSAL_CATEGORIES, BUDGET))
        if refusal.category == BUDGET:
            raise UpdateRejected(
                "a pre-flight refusal is policy, data, error or declined: a node tells a budget shortfall by "
                "rounds-affordable"
            )
        return refusal
    if content.config_records:
        raise UpdateRejected("a pre-flight answer must not carry config records")
    for name in (keys.ROUNDS_PLANNED, keys.ROUNDS_AFFORDABLE, keys.EPSILON_CAP):
        if name not in metrics:
            raise UpdateRejected(f"metric {name!r} is missing")
    planned, affordable = int(metrics[keys.ROUNDS_PLANNED]), int(metrics[keys.ROUNDS_AFFORDABLE])
    if planned != rounds_planned:
        raise UpdateRejected(f"rounds-planned={planned}, but the query planned {rounds_planned}")
    if affordable > planned:
        raise UpdateRejected(f"rounds-affordable={affordable} is more than rounds-planned={planned}")
    answer = PreflightAnswer(
        partition_id=int(metrics[keys.PARTITION_ID]),
        rounds_planned=planned,
        rounds_affordable=affordable,
        cap=metrics[keys.EPSILON_CAP],
    )
    if not sample_level:
        if any(name in metrics for name in _PREFLIGHT_BUDGET) or affordable != planned:
            raise UpdateRejected(
                "without DP-SGD no node budget applies: an answer carries no epsilon and affords every planned round"
            )
        return answer
    return _preflight_budget(answer, metrics)


def _preflight_budget(answer: PreflightAnswer, metrics: dict) -> PreflightAnswer:
    """``answer`` with its epsilon numbers, checked against each other and the cap."""
    missing = [name for name in _PREFLIGHT_BUDGET if name not in metrics]
    if missing:
        raise UpdateRejected(f"a pre-flight answer under DP-SGD without {missing}")
    spent, after = metrics[keys.EPSILON], metrics[keys.EPSILON_AFTER]
    if after < spent or (answer.rounds_affordable == 0 and after != spent):
        raise UpdateRejected(
            f"epsilon-after={after} does not follow epsilon={spent} by {answer.rounds_affordable} round(s)"
        )
    if answer.rounds_affordable and after > answer.cap:
        raise UpdateRejected(
            f"epsilon-after={after} is above the node's own cap {answer.cap} after rounds it says it can afford"
        )
    return dataclasses.replace(answer, spent=spent, after=after, delta=metrics[keys.DELTA])
