"""Reading run directories: clear errors for missing or malformed files."""

from __future__ import annotations

import json

import pytest

from fedllm.analysis.report import report_rows, to_markdown
from fedllm.analysis.runs import find_runs, load_run
from fedllm.errors import DataError
from fedllm.tracking.run_files import RunSummary
from fedllm.tracking.run_manifest import write_run_manifest


def _write_run(path, rounds_text=None, summary=None):
    path.mkdir(parents=True)
    (path / "config.json").write_text("{}")
    (path / "privacy_ledger.json").write_text(json.dumps({"clients": {}, "accountant": "rdp"}))
    (path / "summary.json").write_text(json.dumps(summary or {"privacy_mode": "none", "final_accuracy": 0.5}))
    (path / "metrics.jsonl").write_text(
        rounds_text if rounds_text is not None else json.dumps({"round": 0, "epsilon": None}) + "\n"
    )
    write_run_manifest(path, None)  # as fedllm writes a run: its manifest last


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
        _write_run(
            tmp_path / job,
            summary={
                "privacy_mode": "sample",
                "target_epsilon": eps,
                "final_max_epsilon": eps - 0.01,
                "final_accuracy": 0.8,
            },
        )
    runs = find_runs(tmp_path)
    assert [r.path.name for r in runs] == ["0", "1"]
    table = to_markdown(report_rows(runs, tmp_path))
    assert "| 0 | sample | 8 | 7.99 |" in table and "| 1 | sample | 3 | 2.99 |" in table


def test_a_directory_without_runs_is_an_error(tmp_path):
    with pytest.raises(DataError, match="no finished fedllm run"):
        find_runs(tmp_path)


# Issue 15: failed and unfinished jobs are found and labelled, never taken for results.


def test_jobs_without_a_summary_are_unfinished_and_a_resume_folder_is_not_a_job(tmp_path):
    _write_run(tmp_path / "0", summary={"status": "completed", "privacy_mode": "none", "final_accuracy": 0.5})
    (tmp_path / "1" / ".hydra").mkdir(parents=True)  # Hydra made it; the job died before config.json
    (tmp_path / "2" / ".hydra").mkdir(parents=True)  # the log folder of a `resume=` command
    (tmp_path / "2" / ".hydra" / "overrides.yaml").write_text("- resume=outputs/x\n")
    runs = find_runs(tmp_path, include_incomplete=True)
    assert [(r.path.name, r.status) for r in runs] == [("0", "completed"), ("1", "unfinished")]
    assert [r.path.name for r in find_runs(tmp_path)] == ["0"]


def test_a_failed_run_needs_no_metrics_or_ledger(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "summary.json").write_text(json.dumps({"status": "failed", "failure": "engine"}))
    (run,) = find_runs(tmp_path, include_incomplete=True)
    assert run.status == "failed" and run.rounds == [] and run.ledger == {}
    with pytest.raises(DataError, match="no finished fedllm run.*1 failed or unfinished"):
        find_runs(tmp_path)


def test_summaries_written_before_the_status_field_are_classified():
    from fedllm.analysis.runs import run_status

    def status(old: dict) -> str:
        return run_status(RunSummary.from_dict(old))

    assert status({"rounds_completed": 2, "rounds_without_updates": [1, 2], "stop_reason": None}) == "failed"
    assert status({"rounds_completed": 2, "rounds_without_updates": [1], "stop_reason": None}) == "completed"
    assert status({"rounds_completed": 1, "rounds_without_updates": [], "stop_reason": "caps"}) == "stopped"
