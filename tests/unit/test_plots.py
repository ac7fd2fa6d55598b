"""The run plots read as a newcomer reads them: equal clients visible, epsilon from zero, whole rounds."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedllm.tracking import plots
from fedllm.tracking.run_files import RoundRecord, epsilon_curves

# three equal shards and one larger one: the equal ones spend exactly the same epsilon
ROUNDS = [
    RoundRecord(round=0),
    RoundRecord(round=1, epsilon={"0": 6.8, "1": 6.8, "2": 6.8, "3": 6.1}),
    RoundRecord(round=2, epsilon={"0": 7.4, "1": 7.4, "2": 7.4, "3": 6.9}),
    RoundRecord(round=3, epsilon={"0": 7.99, "1": 7.99, "2": 7.99, "3": 7.5}),
]


def test_identical_clients_are_one_labelled_curve_and_different_ones_stay_apart():
    assert epsilon_curves(ROUNDS) == [
        ("clients 0, 1, 2", [(1, 6.8), (2, 7.4), (3, 7.99)]),
        ("client 3", [(1, 6.1), (2, 6.9), (3, 7.5)]),
    ]
    assert epsilon_curves([RoundRecord(round=0), RoundRecord(round=1)]) == []  # no DP: nothing to draw


@pytest.fixture
def drawn(monkeypatch) -> list:
    figures: list = []

    def keep(fig, path: Path) -> Path:
        figures.append(fig)
        return path

    monkeypatch.setattr(plots, "_save", keep)
    return figures


def test_the_epsilon_plot_starts_at_zero_with_whole_rounds_and_every_client_named(drawn, tmp_path):
    plots.plot_epsilon(ROUNDS, 8.0, tmp_path / "eps.png")
    (ax,) = drawn[0].axes
    assert ax.get_ylim()[0] == 0  # it started at 6.8: small differences looked like large ones
    assert all(float(tick).is_integer() for tick in ax.get_xticks())  # no round 1.25
    labels = [text.get_text() for text in ax.get_legend().get_texts()]
    assert labels == ["clients 0, 1, 2", "client 3", "target 8"]
    legend_box = ax.get_legend().get_bbox_to_anchor().bounds
    assert legend_box[0] > ax.get_window_extent().x1 - 1  # beside the axes, not over the points


def test_the_privacy_utility_legend_does_not_cover_the_points(drawn, tmp_path):
    points = [
        {"epsilon": 3.0, "accuracy": 0.80, "zero_shot": 0.77, "group": "embedded / rt"},
        {"epsilon": 8.0, "accuracy": 0.84, "zero_shot": 0.77, "group": "embedded / rt"},
        {"epsilon": None, "accuracy": 0.86, "zero_shot": 0.77, "group": "embedded / rt"},
    ]
    plots.plot_privacy_utility(points, tmp_path / "pu.png")
    (ax,) = drawn[0].axes
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["DP-SGD (sample level)", "non-private", "zero-shot"]
    assert ax.get_legend().get_bbox_to_anchor().bounds[0] > ax.get_window_extent().x1 - 1


def test_a_free_form_run_plots_its_perplexity_not_only_its_loss(drawn, tmp_path):
    # issue 29, item 1: a free-form run's evaluation plot showed loss, not perplexity, its headline number
    rounds = [
        RoundRecord(round=0, eval_loss=4.3, eval_perplexity=73.7),
        RoundRecord(round=1, eval_loss=3.9, eval_perplexity=49.4),
    ]
    plots.plot_eval(rounds, tmp_path / "eval.png")
    loss_ax, other = drawn[0].axes
    assert other.get_ylabel() == "held-out perplexity"
    assert list(other.get_lines()[0].get_ydata()) == [73.7, 49.4]


def test_a_sweep_of_free_form_runs_plots_perplexity_against_epsilon(drawn, tmp_path):
    points = [
        {"epsilon": 1.0, "perplexity": 68.8, "zero_shot": 77.0},
        {"epsilon": 8.0, "perplexity": 62.0, "zero_shot": 77.0},
        {"epsilon": None, "perplexity": 50.3, "zero_shot": 77.0},
    ]
    plots.plot_privacy_utility(points, tmp_path / "pu.png", metric="perplexity")
    (ax,) = drawn[0].axes
    assert ax.get_ylabel() == "final held-out perplexity (lower is better)"
    assert list(ax.get_lines()[0].get_ydata()) == [68.8, 62.0]
