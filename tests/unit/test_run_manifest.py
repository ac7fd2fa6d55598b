"""A run folder's claims are covered by its manifest (issue 25, item 3): ``fedllm verify`` fails on an
edited ``summary.json``, ``fedllm report`` shows no epsilon for a run that fails or lacks
verification, and ``evaluate`` refuses an edited ``config.json`` before it loads anything."""

from __future__ import annotations

import hashlib
import json

import pytest

from fedllm.analysis.report import integrities, privacy_utility_points, report_rows, to_markdown
from fedllm.analysis.runs import find_runs
from fedllm.cli.at_rest import verify_run
from fedllm.cli.main import main
from fedllm.errors import IntegrityError
from fedllm.finished_run import load_finished_run
from fedllm.storage import checksum
from fedllm.tracking.run_manifest import MANIFEST_FILE, run_integrity, verify_run_manifest, write_run_manifest
from tests.conftest import tiny_config

KEY = bytes(range(32))
SUMMARY = {
    "status": "completed",
    "privacy_mode": "sample",
    "target_epsilon": 8.0,
    "final_max_epsilon": 7.9,
    "final_accuracy": 0.7,
    "zero_shot_accuracy": 0.5,
    "rounds_completed": 2,
}


def _run(path, key=None):
    """A finished run folder as the ServerApp leaves it (its manifest written last)."""
    path.mkdir(parents=True)
    (path / "config.json").write_text(tiny_config().to_json())
    (path / "summary.json").write_text(json.dumps(SUMMARY))
    (path / "metrics.jsonl").write_text(json.dumps({"round": 0}) + "\n")
    (path / "privacy_ledger.json").write_text(json.dumps({"clients": {"0": {"epsilon": 7.9}}}))
    write_run_manifest(path, key)
    return path


def _edit_summary(run_dir, epsilon=0.0123):
    (run_dir / "summary.json").write_text(json.dumps({**SUMMARY, "final_max_epsilon": epsilon}))


def test_verify_fails_on_an_edited_summary(tmp_path, capsys):
    run_dir = _run(tmp_path / "run")
    assert main(["verify", str(run_dir)]) == 0
    assert "manifest.json (config.json, metrics.jsonl, privacy_ledger.json, summary.json)" in capsys.readouterr().out
    _edit_summary(run_dir)
    with pytest.raises(IntegrityError, match=r"summary\.json: missing or altered"):
        verify_run(run_dir, None)
    assert main(["verify", str(run_dir)]) == 1
    assert "summary.json" in capsys.readouterr().err


def test_report_does_not_present_an_edited_runs_epsilon(tmp_path, capsys):
    _run(tmp_path / "honest")
    _edit_summary(_run(tmp_path / "edited"))
    runs = find_runs(tmp_path, include_incomplete=True)
    rows = {row["run"]: row for row in report_rows(runs, tmp_path)}
    assert (rows["honest"]["integrity"], rows["honest"]["spent_epsilon"]) == ("checksum only", 7.9)
    edited = rows["edited"]
    assert edited["integrity"] == "FAILS verification"
    assert edited["spent_epsilon"] is None and edited["final_accuracy"] is None
    assert "summary.json: missing or altered" in edited["note"] and "not shown" in edited["note"]
    assert [p["epsilon"] for p in privacy_utility_points(runs)] == [7.9]  # never plotted
    assert main(["report", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "0.0123" not in out and "1 of 2 runs: FAILS verification" in out
    assert "checksum only (written without a storage key)" in out.replace("are checked by checksum", "checksum")


def test_a_run_without_a_manifest_is_reported_unverified(tmp_path):
    run_dir = _run(tmp_path / "run")
    (run_dir / MANIFEST_FILE).unlink()  # deleting the manifest does not make an edit acceptable
    _edit_summary(run_dir)
    (row,) = report_rows(find_runs(tmp_path), tmp_path)
    assert (row["integrity"], row["spent_epsilon"]) == ("unverified", None) and "no manifest.json" in row["note"]
    with pytest.raises(IntegrityError, match="manifest.json: missing"):
        verify_run(run_dir, None)


def test_with_a_key_an_edit_with_a_recomputed_manifest_is_caught(tmp_path):
    run_dir = _run(tmp_path / "run", key=KEY)
    verify_run_manifest(run_dir, KEY)
    _edit_summary(run_dir)
    manifest = json.loads((run_dir / MANIFEST_FILE).read_text())
    manifest["sha256"]["summary.json"] = hashlib.sha256((run_dir / "summary.json").read_bytes()).hexdigest()
    forged = {k: v for k, v in manifest.items() if k != "mac"}
    (run_dir / MANIFEST_FILE).write_text(json.dumps({**forged, "checksum": checksum(forged)}))
    with pytest.raises(IntegrityError, match="unkeyed checksum"):
        verify_run_manifest(run_dir, KEY)
    (run_dir / MANIFEST_FILE).write_text(json.dumps(manifest))  # the old MAC over new digests
    assert run_integrity(run_dir, KEY).state == "FAILS verification"
    assert run_integrity(run_dir, None).state == "unverified"  # a keyed manifest needs the key to say anything
    rows = report_rows(find_runs(tmp_path), tmp_path, integrities(find_runs(tmp_path), KEY))
    assert rows[0]["spent_epsilon"] is None
    assert "7.9" not in to_markdown(rows) and "0.0123" not in to_markdown(rows)


def test_a_file_added_after_the_run_is_not_taken_for_the_runs(tmp_path):
    run_dir = _run(tmp_path / "run")
    (run_dir / "audit.json").write_text(json.dumps({"epsilon_lower_bound": {"coordinator": 0.0}}))
    with pytest.raises(IntegrityError, match=r"audit\.json: not in"):
        verify_run_manifest(run_dir, None)


def test_evaluate_refuses_an_edited_config_before_loading_anything(tmp_path):
    run_dir = _run(tmp_path / "run")
    (run_dir / "adapter").mkdir()
    (run_dir / "config.json").write_text(tiny_config(seed=7).to_json())
    with pytest.raises(IntegrityError, match=r"config\.json: missing or altered"):
        load_finished_run(run_dir, None)
