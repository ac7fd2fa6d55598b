"""The run directory's typed files: the exact JSON keys writers produce, lenient reading of older
runs, and what the ServerApp puts in them (perplexity for free-form tasks, wall time)."""

from __future__ import annotations

import json
import math
import time

import pytest

from fedllm.evaluation.metrics import EvalResult
from fedllm.federation.checkpoint import ServerState
from fedllm.federation.evaluator import round_record
from fedllm.federation.outputs import run_summary
from fedllm.federation.rounds import RoundReplies
from fedllm.federation.server_app import new_ledger
from fedllm.node.release import PublicStats, Refusal, TrainReport
from fedllm.privacy.ledger import PrivacyLedger
from fedllm.tracking.run_files import (
    Guarantee,
    RoundRecord,
    RunSummary,
    read_rounds,
    read_summary,
    write_summary,
)
from fedllm.tracking.run_log import RunLog
from tests.conftest import tiny_config

# the keys of a metrics.jsonl line and of summary.json, as notebooks, scripts and older tools read them
ROUND_KEYS = {
    "round",
    "train_loss",
    "eval_loss",
    "eval_accuracy",
    "eval_perplexity",
    "epsilon",
    "max_epsilon",
    "num_clients",
    "refused",
    "failed",
    "rejected_updates",
    "rejections",
    "client_level_epsilon",
    "slowest_client_seconds",
    "eval_seconds",
    "wall_seconds",
    "exact_match",
    "samples",
}
SUMMARY_KEYS = {
    "status",
    "run_id",
    "rounds_completed",
    "rounds_planned",
    "stop_reason",
    "rounds_without_updates",
    "num_clients",
    "privacy_mode",
    "target_epsilon",
    "delta",
    "accountant",
    "noise",
    "final_max_epsilon",
    "client_epsilons",
    "guarantees",
    "zero_shot_accuracy",
    "final_accuracy",
    "zero_shot_eval_loss",
    "final_eval_loss",
    "zero_shot_eval_perplexity",
    "final_eval_perplexity",
    "test_examples",
    "federation_seconds",
    "wall_seconds",
}
SAMPLE = Guarantee(
    level="sample", protects="a record", against="everyone", epsilon=7.5, delta=1e-5, accounts="its lifetime ledger"
)
CLIENT = Guarantee(
    level="client",
    protects="a client",
    against="the others",
    epsilon=2.0,
    delta=1e-3,
    adjacency="zero-out",
    noise_multiplier=1.1,
    clip_norm=0.5,
)


def test_a_round_record_keeps_its_keys_and_reads_back_from_its_line():
    record = RoundRecord(
        round=1,
        eval_loss=0.6,
        eval_accuracy=0.7,
        epsilon={"0": 1.5},
        max_epsilon=1.5,
        num_clients=2,
        refused=[3],
        failed=["node 9: gone"],
        rejected_updates=1,
        rejections=["node 8: NaN"],
        wall_seconds=4.25,
    )
    line = record.to_line()
    assert line.endswith("\n") and set(json.loads(line)) == ROUND_KEYS
    assert list(json.loads(line)) == sorted(ROUND_KEYS)  # sorted keys, as metrics.jsonl always had
    assert RoundRecord.from_dict(json.loads(line)) == record


def test_a_summary_writes_every_key_and_the_optional_ones_only_when_set(tmp_path):
    plain = RunSummary(status="completed", run_id="r", rounds_completed=2, guarantees=[SAMPLE])
    assert set(plain.to_dict()) == SUMMARY_KEYS
    assert plain.to_dict()["guarantees"] == [
        {
            "level": "sample",
            "protects": "a record",
            "against": "everyone",
            "epsilon": 7.5,
            "delta": 1e-5,
            "accounts": "its lifetime ledger",
        }
    ]
    full = RunSummary(
        status="failed",
        failure="engine",
        warning="seeded",
        client_level_epsilon=2.0,
        guarantees=[SAMPLE, CLIENT],
        audit={"canaries": 50},
    )
    assert set(full.to_dict()) == SUMMARY_KEYS | {"failure", "warning", "client_level_epsilon", "audit"}
    assert set(full.to_dict()["guarantees"][1]) == {
        "level",
        "protects",
        "against",
        "epsilon",
        "delta",
        "adjacency",
        "noise_multiplier",
        "clip_norm",
    }
    write_summary(tmp_path, full)
    assert read_summary(tmp_path) == full


def test_files_of_older_runs_read_with_defaults_and_unknown_keys_are_passed_over(tmp_path):
    old_round = {"round": 2, "eval_loss": 0.5, "eval_accuracy": 0.8, "num_clients": 3, "someday": 1}
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"round": 0}) + "\n\n" + json.dumps(old_round) + "\n")
    zero_shot, second = read_rounds(tmp_path)
    assert zero_shot == RoundRecord(round=0) and second.eval_perplexity is None and second.num_clients == 3
    (tmp_path / "summary.json").write_text(
        json.dumps({"status": None, "rounds_completed": 2, "rounds_without_updates": None, "final_accuracy": 0.8})
    )
    summary = read_summary(tmp_path)
    assert (summary.status, summary.rounds_without_updates, summary.final_accuracy) == (None, [], 0.8)
    assert summary.wall_seconds is None and summary.guarantees == []


def _replies() -> RoundReplies:
    reports = [
        TrainReport(0, None, PublicStats(train_loss=1.0, train_seconds=3.0)),
        TrainReport(1, None, PublicStats(train_loss=3.0, train_seconds=5.0)),
        TrainReport(2, None),
    ]
    return RoundReplies(
        updates=[],
        reports=reports,
        refusals=[Refusal(4, "budget"), Refusal(3, "policy")],
        failures=["node 7: gone"],
        rejected=["node 8: NaN"],
    )


def test_a_round_record_has_perplexity_for_free_form_answers_and_accuracy_for_fixed_ones():
    ledger = PrivacyLedger(accountant="rdp", delta=1e-5, target_epsilon=8.0)
    ledger.record(1, [(1.0, 0.1, 5)], 1, delta=1e-5, cap=8.0, can_continue=True)
    free_form = round_record(
        1, EvalResult(loss=2.0, accuracy=None, examples=10), _replies(), ledger, sample_level=True, eval_seconds=0.5
    )
    assert free_form.eval_perplexity == pytest.approx(math.exp(2.0)) and free_form.eval_accuracy is None
    assert free_form.train_loss == 2.0 and free_form.slowest_client_seconds == 5.0
    assert free_form.refused == [3, 4] and free_form.rejected_updates == 1 and free_form.failed == ["node 7: gone"]
    assert free_form.epsilon == {"1": ledger.epsilon(1)} and free_form.max_epsilon == ledger.epsilon(1) > 0
    fixed = round_record(
        1, EvalResult(loss=0.6, accuracy=0.75, examples=10), RoundReplies(), ledger, sample_level=False
    )
    assert fixed.eval_perplexity is None and fixed.eval_accuracy == 0.75 and fixed.epsilon is None
    diverged = round_record(
        1, EvalResult(loss=math.inf, accuracy=None, examples=10), RoundReplies(), ledger, sample_level=False
    )
    assert diverged.eval_loss is None and diverged.eval_perplexity is None  # JSON has no infinity


def test_the_summary_carries_zero_shot_and_final_perplexity_and_the_wall_time_since_the_run_began(tmp_path):
    cfg = tiny_config()
    run_log = RunLog(tmp_path, 2, show_progress=False)
    for number, loss in enumerate((3.0, 2.5, 2.0)):
        run_log.log_round(
            RoundRecord(round=number, eval_loss=loss, eval_perplexity=math.exp(loss), num_clients=2 if number else 0)
        )
    state = ServerState(run_id="r", server_round=2, arrays={}, ledger={}, rounds=[], config={})
    summary = run_summary(cfg, state, new_ledger(cfg), run_log, started=time.perf_counter() - 100)
    assert summary.zero_shot_eval_perplexity == pytest.approx(math.exp(3.0))
    assert summary.final_eval_perplexity == pytest.approx(math.exp(2.0))
    assert summary.status == "completed" and summary.rounds_completed == 2
    assert summary.federation_seconds is not None and summary.wall_seconds is not None
    assert summary.wall_seconds >= 100 > summary.federation_seconds
    assert [r.round for r in read_rounds(tmp_path)] == [0, 1, 2]
    run_log.close()
