"""The node's budget follows its records, not its files (issue 23, item 4), through the real
ClientApp: after spending almost all of a cap of 8, no innocent-looking change to the data
file gives the records it still holds a fresh budget."""

from __future__ import annotations

import csv
import json
import shutil
import unicodedata
from collections.abc import Callable
from pathlib import Path

import pytest

from fedllm.cli.node_status import node_status
from fedllm.config import FederationConfig, PrivacyConfig
from fedllm.federation import records as keys
from fedllm.federation.client_app import app
from fedllm.node.policy import policy_from_node_config
from fedllm.planning import plan_for
from fedllm.privacy.accounting import epsilon, extend_history
from tests.conftest import tiny_config
from tests.node_driver import node_context, query_message, run_round

CAP = 8.0
Row = dict[str, str]


def _cfg():
    return tiny_config(
        privacy=PrivacyConfig(target_epsilon=CAP), federation=FederationConfig(num_clients=3, num_rounds=2)
    )


def _rows(count: int = 120, first: int = 0) -> list[Row]:
    rows = [
        {
            "prompt": f"review number {i} was {'great' if i % 2 else 'dull'}",
            "response": "positive" if i % 2 else "negative",
        }
        for i in range(first, first + count)
    ]
    if first == 0:  # as some editors save text: decomposed accents, trailing blanks (an export may normalise both)
        rows[0]["prompt"] = "review number 0: the cafe\u0301 scene was dull  "
    return rows


def _jsonl(path: Path, rows: list[Row]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def _node(state: Path, data: Path, **extra) -> dict:
    config = {
        keys.NODE_PARTITION_ID: 0,
        "state-dir": str(state),
        "data-path": str(data),
        "max-epsilon": CAP,
        "delta": 1e-5,
        "allowed-models": "tiny",  # the random test model, which a node allows only by name
        "sampling-size": 120,  # the file's 120 records: a node whose N is its n
    }
    return {**config, **{k.replace("_", "-"): v for k, v in extra.items()}}


def _rounds_epsilon(rounds: int, records: int = 120) -> float:
    """Epsilon of ``rounds`` rounds of the plan for ``records`` records, straight from the accountant."""
    cfg, history = _cfg(), []
    plan = plan_for(cfg, records)
    for _ in range(rounds):
        history = extend_history(
            history, noise_multiplier=plan.noise_multiplier, sample_rate=plan.sample_rate, steps=cfg.train.local_steps
        )
    return epsilon(history, delta=1e-5, accountant="prv")


def _preflight(node: dict) -> dict:
    """The node's answer to the server's pre-flight query for a run's rounds 1-2 (spends nothing)."""
    reply = app(query_message(_cfg(), "run-b"), node_context(node))
    return _metrics(reply)


def _metrics(reply) -> dict:
    return dict(reply.content[keys.METRICS])


@pytest.fixture(scope="module")
def spent(tmp_path_factory) -> tuple[Path, float]:
    """A node's state dir and data file after the plan's two rounds: almost all of the cap spent."""
    root = tmp_path_factory.mktemp("spent")
    node = _node(root / "state", _jsonl(root / "reviews.jsonl", _rows()))
    for server_round in (1, 2):
        reply = _metrics(run_round(_cfg(), "run-a", server_round, node_config=node))
        assert reply[keys.REFUSED] == 0
    assert 7.9 < reply[keys.EPSILON] <= CAP
    return root, reply[keys.EPSILON]


def _append(folder: Path, original: Path) -> tuple[Path, dict]:
    renamed = folder / "reviews-2026.jsonl"
    shutil.move(original, renamed)
    with renamed.open("a", encoding="utf-8") as handle:
        handle.write(json.dumps({"prompt": "one more review, newly added", "response": "positive"}) + "\n")
    return renamed, {}


def _reorder(folder: Path, original: Path) -> tuple[Path, dict]:
    lines = original.read_text(encoding="utf-8").splitlines()
    original.unlink()
    return _write(folder / "shuffled.jsonl", "\n".join(reversed(lines)) + "\n"), {}


def _copy_and_fix_a_typo(folder: Path, original: Path) -> tuple[Path, dict]:
    rows = [json.loads(line) for line in original.read_text(encoding="utf-8").splitlines()]
    rows[5]["prompt"] = rows[5]["prompt"].replace("number", "no.")
    return _jsonl(folder / "copy" / "reviews-fixed.jsonl", rows), {}


def _fix_a_typo_in_place_then_move(folder: Path, original: Path) -> tuple[Path, dict]:
    text = original.read_text(encoding="utf-8").replace("review number 7 was", "review number 7 is")
    original.write_text(text, encoding="utf-8")
    moved = folder / "archive" / "reviews.jsonl"
    moved.parent.mkdir()
    shutil.move(original, moved)
    return moved, {}


def _export_to_csv(folder: Path, original: Path) -> tuple[Path, dict]:
    rows = [json.loads(line) for line in original.read_text(encoding="utf-8").splitlines()]
    exported = folder / "export.csv"
    with exported.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["answer", "question"])  # the spreadsheet's own column names and order
        writer.writerows([row["response"], unicodedata.normalize("NFC", row["prompt"]).strip()] for row in rows)
    return exported, {"prompt_field": "question", "response_field": "answer"}


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


Change = Callable[[Path, Path], tuple[Path, dict]]


@pytest.mark.parametrize(
    "change, new_records",
    [
        (_append, 1),
        (_reorder, 0),
        (_copy_and_fix_a_typo, 1),  # an edited record is a new record
        (_fix_a_typo_in_place_then_move, 1),
        (_export_to_csv, 0),
    ],
    ids=["rename-and-append", "rename-and-reorder", "copy-and-fix-a-typo", "fix-in-place-then-move", "csv-export"],
)
@pytest.mark.slow  # seconds each: kept out of the fast tier (make test runs it)
def test_no_change_to_the_file_gives_its_unchanged_records_a_fresh_budget(spent, tmp_path, change: Change, new_records):
    root, before = spent
    shutil.copytree(root / "state", tmp_path / "state")
    data, extra = change(tmp_path, shutil.copy(root / "reviews.jsonl", tmp_path / "reviews.jsonl"))
    node = _node(tmp_path / "state", data, **extra)
    outlook = _preflight(node)  # what the node tells the server before round 1: nothing left
    assert outlook[keys.ROUNDS_AFFORDABLE] == 0 and outlook[keys.EPSILON] == pytest.approx(before, rel=1e-9)
    reply = run_round(_cfg(), "run-b", 1, node_config=node)
    metrics = _metrics(reply)
    assert metrics[keys.REFUSED] == 1 and reply.content[keys.STATUS][keys.CATEGORY] == "budget"
    assert metrics[keys.EPSILON] == pytest.approx(before, rel=1e-9)  # the worst record: an unchanged one
    shown = node_status(policy_from_node_config(node))
    assert f"{before:.4f} spent of cap 8" in shown
    assert f"{new_records} never trained on" in shown


def test_other_records_in_the_same_state_dir_train_on_their_own_budget(spent, tmp_path):
    root, _ = spent
    shutil.copytree(root / "state", tmp_path / "state")
    node = _node(tmp_path / "state", _jsonl(tmp_path / "other.jsonl", _rows(first=1000)))
    metrics = _metrics(run_round(_cfg(), "run-b", 1, node_config=node))
    assert metrics[keys.REFUSED] == 0
    assert metrics[keys.EPSILON] == pytest.approx(_rounds_epsilon(1), rel=1e-12)  # one round: a fresh budget


def test_half_the_records_replaced_trains_once_more_and_reports_the_old_halfs_epsilon(tmp_path):
    # round 1 on 120 records, then a file that keeps 60 of them and adds 60 new ones: the kept
    # records compose both rounds (the worst), the new ones one round
    cfg = _cfg()
    node = _node(tmp_path / "state", _jsonl(tmp_path / "reviews.jsonl", _rows()))
    first = _metrics(run_round(cfg, "run-a", 1, node_config=node))
    mixed = _jsonl(tmp_path / "mixed.jsonl", _rows()[:60] + _rows(60, first=1000))
    second = _metrics(run_round(cfg, "run-b", 1, node_config=_node(tmp_path / "state", mixed)))
    assert first[keys.REFUSED] == second[keys.REFUSED] == 0
    expected = _rounds_epsilon(2)  # both files hold 120 records: the same mechanism twice
    assert second[keys.EPSILON] == pytest.approx(expected, rel=1e-12) and second[keys.EPSILON] > first[keys.EPSILON]
    shown = node_status(policy_from_node_config(_node(tmp_path / "state", mixed)))
    assert f"{expected:.4f} spent of cap 8" in shown and "120 distinct in the data file, 0 never trained on" in shown
