"""Issue 25, finding 8: the node's own files and data, read and written as untrusted.

A lone surrogate in a record gave the coordinator ``error`` instead of ``data``; a deeply nested
calibration cache crashed ``fedllm plan`` and made nodes answer ``error``; ``audit.jsonl`` was
appended through a symbolic link out of the state directory; one torn line in it made
``fedllm node-status`` fail.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

from fedllm.cli.node_status import node_status
from fedllm.config import FederationConfig, PrivacyConfig
from fedllm.data.sources import load_records
from fedllm.errors import DataError, FedLLMError
from fedllm.federation import records as keys
from fedllm.federation.audit import AUDIT_FILE, append_entry, read_entries
from fedllm.node.policy import policy_from_node_config
from fedllm.planning import plan_for
from fedllm.privacy import calibration_cache
from tests.conftest import tiny_config
from tests.node_driver import run_round


def _cfg(tmp_path: Path):
    return tiny_config(
        privacy=PrivacyConfig(state_dir=str(tmp_path / "server-says"), target_epsilon=6.0),
        federation=FederationConfig(num_clients=3, num_rounds=2),
    )


def _records(path: Path, extra: str = "") -> Path:
    lines = [
        json.dumps({"prompt": f"review {i} was {'great' if i % 2 else 'dull'}", "response": "ok"}) for i in range(40)
    ]
    path.write_text("\n".join(lines) + "\n" + extra, encoding="utf-8")
    return path


def _node(tmp_path: Path, data: Path) -> dict:
    return {
        keys.NODE_PARTITION_ID: 0,
        "state-dir": str(tmp_path / "node-state"),
        "data-path": str(data),
        "max-epsilon": 7.0,
        "delta": 1e-5,
        "allowed-models": "tiny",
        "sampling-size": 40,
    }


def _category(reply) -> str:
    assert reply.content[keys.METRICS][keys.REFUSED] == 1
    return reply.content[keys.STATUS][keys.CATEGORY]


LONE_SURROGATE = '{"prompt": "caf\\ud800 review", "response": "ok"}\n'  # valid JSON, not encodable text


def test_a_lone_surrogate_is_a_data_error_naming_file_and_line(tmp_path):
    data = _records(tmp_path / "d.jsonl", LONE_SURROGATE)
    with pytest.raises(DataError, match=r"d\.jsonl:41: field 'prompt' holds an unpaired surrogate '\\ud800'"):
        load_records(data, "auto", "prompt", "response")


def test_a_node_whose_file_holds_a_lone_surrogate_answers_data_not_error(tmp_path):
    reply = run_round(
        _cfg(tmp_path), "run", 1, node_config=_node(tmp_path, _records(tmp_path / "d.jsonl", LONE_SURROGATE))
    )
    assert _category(reply) == "data"


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDLLM_CACHE", str(tmp_path / "cache"))
    path = calibration_cache.cache_file()
    path.parent.mkdir(parents=True)
    return path


def test_a_deeply_nested_calibration_cache_is_an_empty_cache(cache_dir, tmp_path):
    cache_dir.write_text("[" * 200_000 + "]" * 200_000, encoding="utf-8")
    assert calibration_cache._read() == {}  # was: RecursionError out of `fedllm plan`
    assert plan_for(_cfg(tmp_path), 40).noise_multiplier > 0


def test_an_oversized_calibration_cache_is_not_read(cache_dir):
    cache_dir.write_text(json.dumps({"k": "x" * (calibration_cache.MAX_FILE_BYTES + 1)}), encoding="utf-8")
    assert calibration_cache._read() == {}


@pytest.mark.slow  # seconds each: kept out of the fast tier (make test runs it)
def test_a_node_with_a_deeply_nested_calibration_cache_still_trains(cache_dir, tmp_path):
    cache_dir.write_text("{" * 200_000, encoding="utf-8")
    reply = run_round(_cfg(tmp_path), "run", 1, node_config=_node(tmp_path, _records(tmp_path / "d.jsonl")))
    assert keys.REFUSED not in reply.content[keys.METRICS] or reply.content[keys.METRICS][keys.REFUSED] == 0


def test_the_audit_log_is_not_written_through_a_symbolic_link(tmp_path):
    outside = tmp_path / "elsewhere.txt"
    outside.write_text("the operator's file\n", encoding="utf-8")
    state = tmp_path / "node-state"
    state.mkdir()
    (state / AUDIT_FILE).symlink_to(outside)
    with pytest.raises(FedLLMError, match="symbolic link"):
        append_entry(state / AUDIT_FILE, {"round": 1})
    assert outside.read_text(encoding="utf-8") == "the operator's file\n"
    with pytest.raises(FedLLMError, match="symbolic link"):
        read_entries(state / AUDIT_FILE)


def test_a_fifo_in_place_of_the_audit_log_does_not_block_the_node(tmp_path):
    fifo = tmp_path / AUDIT_FILE
    os.mkfifo(fifo)
    with pytest.raises(OSError):  # no reader: ENXIO at once, instead of waiting for one forever
        append_entry(fifo, {"round": 1})


def test_the_audit_log_is_created_private(tmp_path):
    append_entry(tmp_path / AUDIT_FILE, {"round": 1})
    assert (tmp_path / AUDIT_FILE).stat().st_mode & 0o777 == 0o600


def test_one_torn_line_does_not_stop_node_status(tmp_path):
    node = _node(tmp_path, _records(tmp_path / "d.jsonl"))
    cfg = _cfg(tmp_path)
    run_round(cfg, "run", 1, node_config=node)
    audit = Path(node["state-dir"]) / AUDIT_FILE
    with audit.open("a", encoding="utf-8") as handle:
        handle.write('{"time": "2026-12-07T00:00:00Z", "kind": "train", "rece')  # the crash mid-write
        handle.write("\n[1, 2]\n")  # and a line that is JSON but no entry
    status = node_status(policy_from_node_config(node))
    assert "2 unreadable line(s)" in status
    assert "round 1: sent" in status


def test_node_status_says_when_a_lowered_cap_is_below_what_was_spent(tmp_path):
    # issue 29, item 10: "15.3925 spent of cap 12 ... 0.0000 left", and round epsilons with 16 digits
    node = _node(tmp_path, _records(tmp_path / "d.jsonl"))
    run_round(_cfg(tmp_path), "run", 1, node_config=node)
    shown = node_status(policy_from_node_config({**node, "max-epsilon": 0.01}))
    assert "ABOVE the cap 0.01 (lowered after it was spent)" in shown and "0.0000 left" not in shown
    assert re.search(r"round 1: sent \d+ tensors, epsilon \d+\.\d{4}$", shown, re.MULTILINE), shown
