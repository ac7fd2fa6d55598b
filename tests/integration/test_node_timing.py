"""A node's response time is public (docs/threat-model.md): under DP-SGD it must not say whether
the shard holds an unusually long record (issue 23, attack 3). Through the real ClientApp: the
same node, the same n and config, with and without one record far longer than the others."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from fedllm.config import DataConfig, FederationConfig, PrivacyConfig, TrainConfig
from fedllm.federation import records as keys
from tests.conftest import RT_PROMPT, tiny_config
from tests.node_driver import run_round

RECORDS = 32
MAX_LENGTH = 256  # the coordinator's data.max_length; the long record fills it (~240 words)


def _records_file(path: Path, long_record: bool) -> Path:
    lines = [
        {"prompt": f"review {i} was {'great' if i % 2 else 'dull'}", "response": "negative"} for i in range(RECORDS)
    ]
    if long_record:  # replaces one short record: the same n
        lines[7] = {"prompt": " ".join(["an endless digression"] * 80), "response": "positive"}
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n", encoding="utf-8")
    return path


def _node(tmp_path: Path, long_record: bool, run: int) -> dict:
    name = "long" if long_record else "short"
    return {
        keys.NODE_PARTITION_ID: 0,
        "state-dir": str(tmp_path / f"state-{name}-{run}"),  # a fresh ledger: every round fits the cap
        "data-path": str(_records_file(tmp_path / f"{name}.jsonl", long_record)),
        "max-epsilon": 50.0,
        "delta": 1e-5,
        "allowed-models": "tiny",
        "sampling-size": 32,  # the file's 32 records: every record in every step at batch 32
    }


def _reply_seconds(cfg, node: dict) -> tuple[float, float]:
    """The reply's CPU time (the node trains on one thread: its compute) and wall time."""
    started, cpu = time.perf_counter(), time.process_time()
    reply = run_round(cfg, "timing", 1, node_config=node)
    seconds = time.process_time() - cpu, time.perf_counter() - started
    assert reply.content[keys.METRICS][keys.REFUSED] == 0
    return seconds


@pytest.mark.slow  # seconds each: kept out of the fast tier (make test runs it)
def test_one_long_record_does_not_slow_the_nodes_reply(tmp_path):
    # every record in every step (batch = n): the long one is always drawn, and each step's
    # Poisson batch has the same size with or without it, so only the records' lengths differ
    cfg = tiny_config(
        data=DataConfig(
            name="jsonl",
            path=str(tmp_path / "server-side.jsonl"),
            prompt_template=RT_PROMPT,
            choices=("positive", "negative"),
            test_size=10,
            max_length=MAX_LENGTH,
        ),
        train=TrainConfig(local_steps=1, batch_size=RECORDS, precision="fp32"),
        federation=FederationConfig(num_clients=1, num_rounds=1, min_updates=1),
        privacy=PrivacyConfig(target_epsilon=50.0),
    )
    _reply_seconds(cfg, _node(tmp_path, False, -1))  # warm-up: model, tokenizer, calibration cache
    times: dict[bool, list[tuple[float, float]]] = {False: [], True: []}
    for run in range(3):  # interleaved, so drift on a shared machine hits both alike
        for long_record in (run % 2 == 0, run % 2 != 0):
            times[long_record].append(_reply_seconds(cfg, _node(tmp_path, long_record, run)))
    # compared on CPU time, the fastest of three: the reply waits on exactly this compute, while
    # wall time on a shared test machine also measures its neighbours (it varied by 30% between
    # two identical rounds here); the wall times are in the message
    ratio = min(t[0] for t in times[True]) / min(t[0] for t in times[False])
    assert 0.9 <= ratio <= 1.1, times
