"""Issue 29, item 6: evaluation took minutes a round with nothing printed (it read as a hang)."""

from __future__ import annotations

import logging

from fedllm.evaluation.progress import Progress


def test_a_long_loop_logs_how_far_it_got_and_a_short_one_logs_nothing(caplog):
    now = [0.0]
    with caplog.at_level(logging.INFO, logger="fedllm"):
        quick = Progress("held-out evaluation", 100, "records", every=20, clock=lambda: now[0])
        for _ in range(10):
            now[0] += 1.0
            quick.advance(10)
        assert caplog.messages == []
        slow = Progress("held-out evaluation", 100, "records", every=20, clock=lambda: now[0])
        for _ in range(10):
            now[0] += 9.0
            slow.advance(10)
    assert caplog.messages == [
        "held-out evaluation: 30 of 100 records (30%) after 27 s",
        "held-out evaluation: 60 of 100 records (60%) after 54 s",
        "held-out evaluation: 90 of 100 records (90%) after 81 s",
    ]
