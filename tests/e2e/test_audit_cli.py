"""`fedllm audit` as a user runs it: the console table, audit.json, the summary entry, the plot
and the report's columns."""

from __future__ import annotations

import json

from .conftest import fedllm


def test_fedllm_audit_writes_its_outputs_and_the_report_shows_them(tmp_path):
    run_dir = tmp_path / "audited"
    result = fedllm(
        [
            "audit",
            "debug=smoke",
            "audit.canaries=60",
            "audit.seed=3",
            "tracking.progress=false",
            f"hydra.run.dir={run_dir}",
        ],
        cwd=tmp_path,
    )
    console = result.stdout + result.stderr
    assert "privacy audit (60 canaries, gradient)" in console and "coordinator" in console
    audit = json.loads((run_dir / "audit.json").read_text())
    assert audit["canaries"] == 60 and audit["confidence"] == 0.95 and audit["delta"] == 1e-5
    for result_ in audit["adversaries"].values():
        assert {"epsilon_lower_bound", "guesses", "correct", "ceiling"} <= set(result_)
        assert result_["epsilon_lower_bound"] <= audit["epsilon_accounted"]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["audit"]["epsilon_lower_bound"] == audit["epsilon_lower_bound"]
    assert set(audit["epsilon_lower_bound"]) == {"coordinator", "output_reader", "nonfinite", "metadata", "reply_time"}
    assert audit["epsilon_lower_bound_max"] == max(audit["epsilon_lower_bound"].values())
    assert "audit's lower bound" in console and "power" in console
    assert (run_dir / "audit_scores.png").stat().st_size > 0
    # issue 29, item 9: the console says where the audit went
    assert f"audit written: {run_dir / 'audit.json'}, {run_dir / 'audit_scores.png'}" in console
    fedllm(["report", str(run_dir)], cwd=tmp_path)
    table = (run_dir / "report.md").read_text()
    assert "audit_coordinator" in table and "audit_output_reader" in table
    assert "audit_reply_time" in table and "audit_power" in table


def test_fedllm_audit_rejects_a_bad_audit_setting_in_one_line(tmp_path):
    result = fedllm(
        ["audit", "debug=smoke", "audit.kind=loud", f"hydra.run.dir={tmp_path / 'x'}"], cwd=tmp_path, check=False
    )
    assert result.returncode != 0
    assert "audit.kind" in result.stderr + result.stdout
