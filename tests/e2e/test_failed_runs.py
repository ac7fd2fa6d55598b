"""A sweep whose jobs fail (every client crashes) through the real `fedllm simulate -m` and
Flower's engine (issue 15, item 1): each job is recorded as failed, the sweep runs every job,
exits non-zero instead of hanging, leaves no process behind, and `fedllm report` lists the jobs
as failed rows, never as privacy-utility points."""

from __future__ import annotations

import json
from pathlib import Path

from .conftest import fedllm, stray_processes

ROOT = Path(__file__).resolve().parents[2]


def test_a_sweep_of_failing_jobs_exits_1_and_the_report_says_failed(tmp_path):
    sweep = tmp_path / "sweep"
    result = fedllm(
        [
            "simulate",
            "-m",
            "debug=smoke",
            "federation.num_rounds=1",
            "privacy.target_epsilon=3,8",
            "federation.client_app=tests.e2e.attack_app:app",
            f"hydra.sweep.dir={sweep}",
        ],
        cwd=tmp_path,
        env={"FEDLLM_TEST_ATTACKS": "0:crash,1:crash,2:crash", "PYTHONPATH": str(ROOT)},
        check=False,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 1, output[-3000:]
    assert "2 of 2 jobs failed" in result.stderr
    for job in ("0", "1"):
        summary = json.loads((sweep / job / "summary.json").read_text())
        assert summary["status"] == "failed" and summary["failure"].startswith("no client update in any of the 1")
        assert "simulated node crash" in summary["failure"]
    assert stray_processes() == []
    report = fedllm(["report", str(sweep)], cwd=tmp_path)
    assert report.stdout.count("| failed |") == 2 and "they are not plotted" in report.stdout
    assert not (sweep / "privacy_utility.png").exists()
