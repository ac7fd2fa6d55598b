"""The audit reads the whole reply (issue 23 item 6): a node that leaks through a side channel is
caught by the matching adversary, and the honest node stays at or below its accounted epsilon.

A reply-level channel gives one observation per node and round, so these audits deal one canary to
each of 32 nodes (one round of 5 DP steps at sample rate 1/2: an included canary is drawn at least
once with probability 31/32). The leaky node is the real ClientApp wrapped in this test only: when
its batches drew a canary this round (the audit's own log of sampled canaries grew), it sends a
NaN update, adds a metric the honest node never sends, and answers 20 s later as the coordinator's
clock reads it (the delay is added to the clock the audit times replies with, so the test does not
wait it out: what the adversary reads is the same as after a real sleep). The
accounted epsilon (about 0.3) is well below what 32 canaries can show (32 right guesses: 1.35 at
95%, 1.1 at 99%, for five adversaries together), so the check can fail both ways. The honest audit
runs at a confidence of 0.99 for all adversaries together, the leaky one at 0.95.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Context, Message, MessageType

import fedllm.audit.run as audit_run
import fedllm.audit.side_channels as side_channels
from fedllm.audit.bound import max_lower_bound
from fedllm.audit.side_channels import METADATA, NONFINITE, REPLY_TIME
from fedllm.config import AuditConfig, FederationConfig, PrivacyConfig, TrainConfig
from fedllm.federation import records as keys
from tests.conftest import tiny_config

NODES = 32
LEAK_SECONDS = 20.0  # above this machine's jitter: under load a node's reply time varies by up to ~15 s


class CoordinatorClock:
    """``time.perf_counter`` as the audit's reply clock reads it, plus the delays a leaky node added."""

    def __init__(self):
        self.delayed = 0.0

    def perf_counter(self) -> float:
        return time.perf_counter() + self.delayed


class LeakyNode:
    """The real ClientApp, leaking through every side channel when a canary was drawn."""

    def __init__(self, client_app, audit_folder: Path, clock: CoordinatorClock):
        self.client_app, self.audit_folder, self.clock = client_app, audit_folder, clock

    def drawn(self) -> int:
        # the nodes answer one after another in process: growth during a call is this node's
        return sum(path.stat().st_size for path in self.audit_folder.glob("*.sampled"))

    def __call__(self, message: Message, context: Context) -> Message:
        before = self.drawn()
        reply = self.client_app(message, context)
        if message.metadata.message_type != MessageType.TRAIN or self.drawn() == before:
            return reply
        arrays = reply.content.array_records[keys.ARRAYS]
        reply.content[keys.ARRAYS] = ArrayRecord(
            {name: Array(np.full_like(array.numpy(), np.nan)) for name, array in arrays.items()}
        )
        reply.content.metric_records[keys.METRICS]["debug-canary-drawn"] = 1
        self.clock.delayed += LEAK_SECONDS  # the reply reaches the coordinator this much later
        return reply


def side_channel_audit(tmp_path, monkeypatch, name: str, *, leaky: bool, confidence: float) -> dict:
    """Audit 32 nodes of the tiny federation, one canary each, with the honest or the leaky node."""
    if leaky:
        load, clock = audit_run.load_object, CoordinatorClock()
        monkeypatch.setattr(side_channels, "time", SimpleNamespace(perf_counter=clock.perf_counter))
        monkeypatch.setattr(
            audit_run, "load_object", lambda path: LeakyNode(load(path), tmp_path / name / "audit", clock)
        )
    base = tiny_config()
    cfg = tiny_config(
        data=dataclasses.replace(base.data, max_length=48),
        # batch 9: every node's N (16 or 17) gives sample rate 1/2; short records keep compute (and its jitter) small
        train=TrainConfig(local_steps=5, batch_size=9, eval_batch_size=50),
        federation=FederationConfig(num_clients=NODES, num_rounds=1),
    )
    cfg = dataclasses.replace(
        cfg,
        privacy=PrivacyConfig(target_epsilon=0.3, state_dir=str(tmp_path / name / "nodes")),
        tracking=dataclasses.replace(cfg.tracking, progress=False),
    )
    return audit_run.run_audit(cfg, AuditConfig(canaries=NODES, confidence=confidence, seed=7), tmp_path / name)


# a run of 32 nodes names up to 20 clients in one legend entry of its epsilon plot, too wide for
# matplotlib's tight layout (a cosmetic warning of fedllm/tracking/plots.py, not of the audit)
WIDE_LEGEND = "ignore:Tight layout not applied:UserWarning"


@pytest.mark.slow
@pytest.mark.filterwarnings(WIDE_LEGEND)
def test_a_node_leaking_through_its_reply_is_caught(tmp_path, monkeypatch):
    leaky = side_channel_audit(tmp_path, monkeypatch, "leaky", leaky=True, confidence=0.95)
    accounted = leaky["epsilon_accounted"]
    assert 0 < accounted <= 0.3
    assert leaky["power"] > accounted, leaky  # the audit could show a leak at all
    for name in (NONFINITE, METADATA, REPLY_TIME):
        assert leaky["epsilon_lower_bound"][name] > accounted, (name, leaky["adversaries"][name])
    assert leaky["epsilon_lower_bound_max"] > accounted
    assert leaky["best_adversary"] in (NONFINITE, METADATA, REPLY_TIME)
    assert "reply_time" in audit_run.format_audit(leaky)


@pytest.mark.slow
@pytest.mark.filterwarnings(WIDE_LEGEND)
def test_the_honest_node_stays_at_or_below_its_accounted_epsilon_on_every_channel(tmp_path, monkeypatch):
    honest = side_channel_audit(tmp_path, monkeypatch, "honest", leaky=False, confidence=0.99)
    accounted = honest["epsilon_accounted"]
    reply_time = honest["adversaries"][REPLY_TIME]
    # what 32 right guesses would show at the confidence each test ran at: the check can fail
    could = max_lower_bound(canaries=NODES, guesses=NODES, delta=1e-5, confidence=reply_time["test_confidence"])
    assert could > 3 * accounted, could
    for name, bound in honest["epsilon_lower_bound"].items():
        assert bound <= accounted, (name, honest["adversaries"][name])
    assert honest["epsilon_lower_bound"][NONFINITE] == 0.0  # no node ever sent a NaN or an error
