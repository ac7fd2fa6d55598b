"""Reading run directories: clear errors for missing or malformed files."""

from __future__ import annotations

import json

import pytest

from fedllm.analysis.report import report_rows, to_markdown
from fedllm.analysis.runs import find_runs, load_run
from fedllm.errors import DataError


def _write_run(path, rounds_text=None, summary=None):
    path.mkdir(parents=True)
    (path / "config.json").write_text("{}")
    (path / "privacy_ledger.json").write_text(json.dumps({"clients": {}, "accountant": "rdp"}))
    (path / "summary.json").write_text(json.dumps(summary or {"privacy_mode": "none", "final_accuracy": 0.5}))
    (path / "metrics.jsonl").write_text(rounds_text if rounds_text is not None else
                                        json.dumps({"round": 0, "epsilon": None}) + "\n")


def test_malformed_metrics_line_names_file_and_line(tmp_path):
    _write_run(tmp_path / "run", rounds_text='{"round": 0}\n{broken\n')
    with pytest.raises(DataError, match=r"metrics\.jsonl:2: not valid JSON"):
        load_run(tmp_path / "run")


def test_missing_file_says_which(tmp_path):
    _write_run(tmp_path / "run")
    (tmp_path / "run" / "privacy_ledger.json").unlink()
    with pytest.raises(DataError, match=r"privacy_ledger\.json: missing"):
        load_run(tmp_path / "run")


def test_sweep_directories_are_found_in_order_and_tabulated(tmp_path):
    for job, eps in (("1", 3.0), ("0", 8.0)):
        _write_run(tmp_path / job, summary={"privacy_mode": "sample", "target_epsilon": eps,
                                            "final_max_epsilon": eps - 0.01, "final_accuracy": 0.8})
    runs = find_runs(tmp_path)
    assert [r.path.name for r in runs] == ["0", "1"]
    table = to_markdown(report_rows(runs, tmp_path))
    assert "| 0 | sample | 8 | 7.99 |" in table and "| 1 | sample | 3 | 2.99 |" in table


def test_a_directory_without_runs_is_an_error(tmp_path):
    with pytest.raises(DataError, match="no finished fedllm run"):
        find_runs(tmp_path)
