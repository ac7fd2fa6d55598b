"""The audit's side-channel adversaries on hand-built replies: what each reads of a reply, how a
node's signal becomes its canaries' scores, and the balanced placement they rely on."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import ConfigRecord, MetricRecord, RecordDict

from fedllm.audit.bound import audit_bound
from fedllm.audit.canaries import MAX_WORDS, MIN_WORDS, Layout, design_canaries
from fedllm.audit.side_channels import (
    METADATA,
    NONFINITE,
    REPLY_TIME,
    RepliesSeen,
    ReplyView,
    canary_weights,
    side_channel_scores,
    view_of,
)
from fedllm.federation import records as keys
from tests.flower_fakes import train_reply

LAYOUT = Layout(names=("a",), shapes=((4,),))


def design(count: int, clients: int, kind: str = "gradient", seed: int = 5):
    return design_canaries(
        count=count, kind=kind, clients=clients, clip_norm=1.0, layout=LAYOUT, choices=("yes", "no"), seed=seed
    )


def test_canaries_are_dealt_out_evenly_and_record_canaries_differ_in_length():
    d = design(10, 4, kind="record")
    assert sorted(len(d.placed_on(k)) for k in range(4)) == [2, 2, 3, 3]
    words = [len(c.prompt.split()) for c in d.canaries]
    assert all(MIN_WORDS <= w <= MAX_WORDS for w in words) and len(set(words)) > 3
    assert canary_weights(d).mean() == pytest.approx(1.0) and canary_weights(design(10, 4)).tolist() == [1.0] * 10


def test_a_reply_view_reads_every_field_but_the_partition_id():
    reply = train_reply(3, {"a": np.array([1.0, np.nan], dtype=np.float32)}, 1)
    reply.content[keys.METRICS] = MetricRecord({keys.PARTITION_ID: 2, keys.DP_HISTORY: [0.5, 0.1, 3.0]})
    reply.content[keys.STATUS] = ConfigRecord({keys.CATEGORY: "budget"})
    view = view_of(reply, 1.5)
    assert view.broken and view.seconds == 1.5  # the NaN
    assert view.features == {
        f"{keys.METRICS}.{keys.DP_HISTORY}[0]": 0.5,
        f"{keys.METRICS}.{keys.DP_HISTORY}[1]": 0.1,
        f"{keys.METRICS}.{keys.DP_HISTORY}[2]": 3.0,
        f"{keys.STATUS}.{keys.CATEGORY}=budget": 1.0,
        f"{keys.ARRAYS}.tensors": 1.0,
        f"{keys.ARRAYS}.elements": 2.0,
        f"{keys.ARRAYS}.bytes": 8.0,
    }
    refusal = train_reply(3, {}, 1)
    refusal.content = RecordDict({keys.STATUS: ConfigRecord({keys.CATEGORY: "error"})})
    assert view_of(refusal, 0.1).broken
    finite = train_reply(3, {"a": np.zeros(2, dtype=np.float32)}, 1)
    assert not view_of(finite, 0.1).broken


def leaky_views(d, marked: set[int], rounds: int = 2) -> RepliesSeen:
    """One reply per node and round; a node holding an included canary in ``marked`` replies with
    NaN, an extra metric and 5 s more (the three leaks), every other one identically in ~1 s."""
    rng = np.random.default_rng(0)
    seen = RepliesSeen()
    for server_round in range(1, rounds + 1):
        for client in range(max(c.client for c in d.canaries) + 1):
            leak = any(c.index in marked for c in d.for_client(client))
            features = {"metrics.epsilon": 0.3, **({"metrics.debug": 7.0} if leak else {})}
            seconds = 1.0 + 0.01 * rng.random() + (5.0 if leak else 0.0)
            seen.views[(server_round, client)] = ReplyView(seconds=seconds, broken=leak, features=features)
    return seen


def test_each_side_channel_catches_its_leak_when_each_node_holds_one_canary():
    d = design(80, 80)
    included = [c.included for c in d.canaries]
    scores = side_channel_scores(d, leaky_views(d, {c.index for c in d.canaries}))
    assert set(scores) == {NONFINITE, METADATA, REPLY_TIME}
    for name, values in scores.items():
        result = audit_bound(values, included, delta=1e-5, confidence=0.95, two_sided=name == METADATA, family=80)
        # every canary scored right: the split guess misses only by the included count not being 40
        assert result.correct >= result.guesses - 2 and result.epsilon_lower_bound > 1.5, (name, result)


def test_without_a_leak_every_side_channel_shows_nothing():
    d = design(80, 80)
    scores = side_channel_scores(d, leaky_views(d, set()))
    assert not scores[NONFINITE].any() and not scores[METADATA].any()  # identical replies
    result = audit_bound(scores[REPLY_TIME], [c.included for c in d.canaries], delta=1e-5, confidence=0.95)
    assert result.epsilon_lower_bound == 0.0, result


def test_a_node_signal_is_shared_among_its_canaries():
    d = design(6, 2)  # 3 canaries a node
    seen = RepliesSeen({(1, 0): ReplyView(1.0, True, {}), (1, 1): ReplyView(1.0, False, {})})
    scores = side_channel_scores(d, seen)[NONFINITE]
    assert [scores[c.index] for c in d.canaries] == [1 / 3 if c.client == 0 else 0.0 for c in d.canaries]


def test_nodes_are_compared_with_their_peers_only():
    """Nodes of another public sampling size reply with other accounting fields and no canary
    involved: compared only with their own group, they stand out no more than the rest."""
    d = design(8, 8)
    seen = RepliesSeen(
        {(1, k): ReplyView(1.0, False, {"metrics.sample-rate": 0.5 if k < 4 else 0.25}) for k in range(8)}
    )
    assert side_channel_scores(d, seen)[METADATA].any()
    grouped = side_channel_scores(d, seen, peers={k: k < 4 for k in range(8)})
    assert not grouped[METADATA].any()
