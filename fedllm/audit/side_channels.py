"""The audit's side-channel adversaries: each scores every canary from what a node's reply carries
besides the values of its update (issue 23 item 6).

A reply is one observation per (round, node), so a side channel tells about a node's canaries
together. Each adversary turns the replies of a node into one signal per round, sums it over the
rounds in which the node trained (where its canaries could have been used) and shares it among the
canaries dealt to that node (``signal / placed``: with one canary per node the signal points at
that canary alone; with several it cannot tell them apart, which caps what it can show). The
coordinator observes, per train reply:

- **non-finite** (:data:`NONFINITE`): the reply is an error, a refusal of category ``error``, or an
  update with a NaN or infinite entry (signal 1, else 0). A NaN oracle (issue 23 item 1: one record
  sampled makes the update NaN) reads "in" exactly there;
- **metadata** (:data:`METADATA`): every other field of the reply (every metric and config entry:
  accounting fields, refusal category, ``num-examples`` and metrics when declared public, anything
  a node adds) and the update's shape (tensors, elements, bytes), but not ``partition-id`` (the
  coordinator assigned it). The signal sums, over the fields, the node's value in z-scores
  against the round's nodes and whether it sent the field at all (in the same units): a field only
  some nodes send, or one that grows with a record, puts those nodes on top. A field may as well
  shrink with a record (a sample rate ``1 / ceil(n / B)``), so this adversary guesses both ways
  (:data:`TWO_SIDED`: the reversed scores are tested too, and counted in the Bonferroni family);
- **reply time** (:data:`REPLY_TIME`): the node's wall time from the message's delivery to its
  reply, as the coordinator's engine measures it, in z-scores against the round's other
  nodes (slower: more likely in). Each canary's share is weighted by its length relative to the
  mean (record canaries differ in length by design, 4 to 24 words; gradient canaries all weigh 1),
  so that compute following a record's length would put the long included canaries on top.

For a **record canary** these channels carry whatever a node's code computes from that record
outside DP (its length, its tokens overflowing, its loss). For a **gradient canary** the record's
content is fixed and only its designed per-sample gradient differs, so they carry what follows
from the gradient (a non-finite or huge update) and, through the Poisson batch size, its presence
at all (the batch size itself is not covered by DP: ``docs/threat-model.md``).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np
from flwr.app import Context, Message

from fedllm.audit.canaries import CanaryDesign
from fedllm.federation import records as keys

NONFINITE, METADATA, REPLY_TIME = "nonfinite", "metadata", "reply_time"
SIDE_CHANNELS = (NONFINITE, METADATA, REPLY_TIME)
TWO_SIDED = frozenset({METADATA})  # adversaries whose channel may point either way
ERROR_CATEGORY = "error"  # the refusal category of a node whose update was not finite


@dataclass(frozen=True)
class ReplyView:
    """What one train reply shows besides its update's values.

    ``features``: every field as a number (a list field as one entry per element, a text field as
    ``key=value`` with value 1, the update's ``tensors`` / ``elements`` / ``bytes``).
    """

    seconds: float
    broken: bool  # an error, an ``error`` refusal or a non-finite update
    features: dict[str, float]


@dataclass
class RepliesSeen:
    """Every train reply the coordinator saw, by ``(round, client)``."""

    views: dict[tuple[int, int], ReplyView] = field(default_factory=dict)

    def to_dict(self) -> dict:
        """JSON-ready: ``"round/client" -> {seconds, broken, features}``."""
        return {f"{r}/{k}": dataclasses.asdict(v) for (r, k), v in sorted(self.views.items())}

    def rounds(self) -> list[int]:
        """The rounds with at least one reply, in order."""
        return sorted({r for r, _ in self.views})

    def of_round(self, server_round: int) -> dict[int, ReplyView]:
        """``client -> view`` for one round."""
        return {k: v for (r, k), v in self.views.items() if r == server_round}


class ReplyClock:
    """Wraps a ClientApp and times each reply as the coordinator's engine observes it: from the
    message's delivery to the node until its reply comes back (keyed by message id)."""

    def __init__(self, client_app: Callable[[Message, Context], Message]):
        self.client_app = client_app
        self.seconds: dict[str, float] = {}

    def __call__(self, message: Message, context: Context) -> Message:
        """Deliver ``message`` and time the reply (also when the app raises)."""
        started = time.perf_counter()
        try:
            return self.client_app(message, context)
        finally:
            self.seconds[message.metadata.message_id] = time.perf_counter() - started


def view_of(reply: Message, seconds: float) -> ReplyView:
    """The side-channel view of one reply (Flower's message as the server receives it)."""
    if reply.has_error():
        return ReplyView(seconds=seconds, broken=True, features={"error": 1.0, "error-code": float(reply.error.code)})
    features: dict[str, float] = {}
    broken = False
    for name, record in reply.content.metric_records.items():
        for key, value in record.items():
            if key == keys.PARTITION_ID:
                continue  # assigned by the coordinator
            _add(features, f"{name}.{key}", value)
    for name, config in reply.content.config_records.items():
        for key, entry in config.items():
            _add(features, f"{name}.{key}", entry)
            broken |= key == keys.CATEGORY and entry == ERROR_CATEGORY
    for name, arrays in reply.content.array_records.items():
        values = [array.numpy() for array in arrays.values()]
        features[f"{name}.tensors"] = float(len(values))
        features[f"{name}.elements"] = float(sum(v.size for v in values))
        features[f"{name}.bytes"] = float(sum(v.nbytes for v in values))
        broken |= any(not np.all(np.isfinite(v)) for v in values)
    return ReplyView(seconds=seconds, broken=broken, features=features)


def _add(features: dict[str, float], key: str, value: object) -> None:
    if isinstance(value, list):
        for i, item in enumerate(value):
            _add(features, f"{key}[{i}]", item)
    elif isinstance(value, bool | int | float):
        features[key] = float(value)
    elif isinstance(value, str):
        features[f"{key}={value}"] = 1.0
    else:  # bytes and anything else: only its size
        features[f"{key}.size"] = float(len(value)) if hasattr(value, "__len__") else 1.0


def _z(values: np.ndarray) -> np.ndarray:
    """``(x - mean) / std`` over a round's peers (all equal: every z is 0). The mean, not the
    median, is the centre so that a value held by a majority and one held by a minority keep their
    order in every group (a field sent by some nodes is above 0 there, below 0 where not sent).
    A non-finite value (a NaN metric) counts as the largest deviation."""
    finite = np.isfinite(values)
    if not finite.any():
        return np.zeros_like(values)
    clean = np.where(finite, values, 0.0)
    center = float(np.mean(clean[finite]))
    scale = float(np.std(clean[finite]))
    # equal values can leave a rounding-sized std: that is no deviation
    z = (clean - center) / scale if scale > 1e-9 * max(1.0, abs(center)) else np.zeros_like(values)
    return np.where(finite, z, float(np.max(np.abs(z), initial=0.0)) + 1.0)


def nonfinite_signal(views: Mapping[int, ReplyView]) -> dict[int, float]:
    """1 for a node whose reply was broken this round, else 0."""
    return {k: float(v.broken) for k, v in views.items()}


def metadata_signal(views: Mapping[int, ReplyView]) -> dict[int, float]:
    """The sum over fields of each node's z-score, of the field's value (0 where not sent)
    and of whether it sent the field: a field sent, or larger, counts up."""
    clients = list(views)
    names = sorted({name for v in views.values() for name in v.features})
    total = np.zeros(len(clients))
    for name in names:
        sent = np.array([float(name in views[k].features) for k in clients])
        value = np.array([views[k].features.get(name, 0.0) for k in clients])
        total += _z(sent) + _z(value)
    return dict(zip(clients, total.tolist(), strict=True))


def time_signal(views: Mapping[int, ReplyView]) -> dict[int, float]:
    """Each node's reply time in z-scores against the round's nodes (slower: higher)."""
    clients = list(views)
    z = _z(np.array([views[k].seconds for k in clients], dtype=float))
    return dict(zip(clients, z.tolist(), strict=True))


SIGNALS: dict[str, Callable[[Mapping[int, ReplyView]], dict[int, float]]] = {
    NONFINITE: nonfinite_signal,
    METADATA: metadata_signal,
    REPLY_TIME: time_signal,
}


def canary_weights(design: CanaryDesign) -> np.ndarray:
    """Each canary's length relative to the mean (words of a record canary; 1 for gradient canaries)."""
    lengths = np.array([len(f"{c.prompt} {c.response}".split()) for c in design.canaries], dtype=float)
    if design.kind != "record" or lengths.sum() == 0:
        return np.ones(len(design.canaries))
    return lengths / lengths.mean()


def side_channel_scores(
    design: CanaryDesign, seen: RepliesSeen, peers: Mapping[int, object] | None = None
) -> dict[str, np.ndarray]:
    """Every side-channel adversary's score of every canary (higher: more likely in).

    A canary's score is its node's signal summed over the rounds, shared among the canaries
    dealt to that node; for the reply time, weighted by :func:`canary_weights`. Each round's
    signal compares a node with its peers: the nodes of the same public group (their public
    sampling size N: the accounting fields, the sample rate and the batch sizes follow from it, so
    nodes of different N differ with no canary at all); a node without peers shows nothing.

    Args:
        design: the canaries (their placement and text are public to the adversary; their
            inclusion is what it guesses).
        seen: the train replies the coordinator observed.
        peers: ``client -> public group`` (None: every node is every other's peer).

    Returns:
        ``adversary name -> scores`` for :data:`SIDE_CHANNELS`.
    """
    placed = {k: len(design.placed_on(k)) for k in {c.client for c in design.canaries}}
    weights = canary_weights(design)
    scores: dict[str, np.ndarray] = {}
    for name, signal in SIGNALS.items():
        per_node: dict[int, float] = {}
        for server_round in seen.rounds():
            views = seen.of_round(server_round)
            for group in _groups(views, peers):
                for client, value in signal({k: views[k] for k in group}).items():
                    per_node[client] = per_node.get(client, 0.0) + value
        values = np.array([per_node.get(c.client, 0.0) / placed[c.client] for c in design.canaries])
        scores[name] = values * weights if name == REPLY_TIME else values
    return scores


def _groups(views: Mapping[int, ReplyView], peers: Mapping[int, object] | None) -> list[list[int]]:
    if peers is None:
        return [list(views)]
    groups: dict[object, list[int]] = {}
    for client in views:
        groups.setdefault(peers.get(client), []).append(client)
    return list(groups.values())
