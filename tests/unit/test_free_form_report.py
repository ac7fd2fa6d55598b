"""Issue 29, item 1: own-data (free-form) runs vanished from `fedllm report`: accuracy `-`, no
perplexity column, no privacy-utility plot; and runs of different shapes were drawn as one line."""

from __future__ import annotations

from fedllm.analysis.report import privacy_utility_points, report_rows, to_markdown
from fedllm.analysis.runs import find_runs
from tests.free_form_runs import write_free_form_sweep


def test_a_free_form_sweep_reports_perplexity_and_exact_match(tmp_path):
    root = write_free_form_sweep(tmp_path)
    rows = {row["run"]: row for row in report_rows(find_runs(root), root)}
    assert (rows["eps8"]["zero_shot_perplexity"], rows["eps8"]["final_perplexity"]) == (77.0, 62.0)
    assert rows["eps8"]["final_exact_match"] == 1 / 3 and rows["eps8"]["final_accuracy"] is None
    table = to_markdown(list(rows.values()))
    assert "final_perplexity" in table and "62" in table


def test_a_free_form_sweep_is_plotted_by_perplexity_one_line_per_shape(tmp_path):
    points = privacy_utility_points(find_runs(write_free_form_sweep(tmp_path)))
    assert {p["metric"] for p in points} == {"perplexity"}
    by_group = {}
    for point in points:
        by_group.setdefault(point["group"], []).append((point["epsilon"], point["perplexity"]))
    assert by_group == {
        "tiny / jsonl:chats.jsonl / 4 clients x 2 rounds": [(0.99, 68.8), (7.98, 62.0), (None, 50.3)],
        "tiny / jsonl:chats.jsonl / 4 clients x 3 rounds": [(7.99, 58.1)],
    }


def test_the_report_command_writes_the_perplexity_plot(tmp_path, capsys):
    from fedllm.cli.main import main

    root = write_free_form_sweep(tmp_path)
    assert main(["report", str(root)]) == 0
    assert (root / "privacy_utility_perplexity.png").stat().st_size > 0
    assert not (root / "privacy_utility.png").exists()  # no run has fixed answers
    assert "privacy_utility_perplexity.png" in capsys.readouterr().out
