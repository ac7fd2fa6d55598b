"""PNG plots of a run: epsilon per client by round; held-out accuracy (or perplexity) and loss by round.

Also the privacy-utility plot of a sweep. Uses matplotlib's non-interactive backend only.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only: never needs a display
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from fedllm.tracking.run_files import RoundRecord, epsilon_curves  # noqa: E402

EPSILON_PNG = "epsilon_per_client.png"
EVAL_PNG = "eval_accuracy_loss.png"
PRIVACY_UTILITY_PNG = "privacy_utility.png"  # fixed answers (accuracy); free-form runs: privacy_utility_perplexity.png
AUDIT_PNG = "audit_scores.png"


def plot_epsilon(rounds: list[RoundRecord], target: float | None, path: Path) -> Path | None:
    """Each client's epsilon after each round (identical clients as one line), with the target;
    None when the run had no DP. The y-axis starts at 0: epsilon is spent from nothing."""
    curves = epsilon_curves(rounds)
    if not curves:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    for label, points in curves:
        ax.plot(*zip(*points, strict=True), marker="o", label=label)
    if target is not None:
        ax.axhline(target, color="black", linestyle="--", label=f"target {target:g}")
    ax.set(xlabel="round", ylabel="epsilon (sample level)", title="Privacy spent per client")
    ax.set_ylim(bottom=0)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if len(curves) <= 12:
        _legend_outside(ax)
    return _save(fig, path)


def plot_eval(rounds: list[RoundRecord], path: Path) -> Path:
    """Held-out accuracy and loss by round for a task with fixed answers; held-out perplexity (the
    headline number of free-form answers) and loss otherwise. Round 0 is zero-shot."""
    fig, loss_ax = plt.subplots(figsize=(6, 4))
    xs = [r.round for r in rounds]
    loss_ax.plot(xs, [_or_nan(r.eval_loss) for r in rounds], color="tab:red", marker="s", label="eval loss")
    loss_ax.set(xlabel="round", ylabel="held-out loss", title="Held-out evaluation of the global adapter")
    loss_ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    accuracies = [r.eval_accuracy for r in rounds]
    perplexities = [r.eval_perplexity for r in rounds]
    if any(a is not None for a in accuracies):
        _second_axis(loss_ax, xs, [100 * _or_nan(a) for a in accuracies], "accuracy", "held-out accuracy (%)")
    elif any(p is not None for p in perplexities):
        _second_axis(loss_ax, xs, [_or_nan(p) for p in perplexities], "perplexity", "held-out perplexity")
    loss_ax.legend(loc="upper right")
    return _save(fig, path)


def _second_axis(ax, xs: list[int], ys: list[float], label: str, ylabel: str) -> None:
    other = ax.twinx()
    other.plot(xs, ys, color="tab:blue", marker="o", label=label)
    other.set_ylabel(ylabel)
    other.legend(loc="lower right")


UTILITY_LABELS = {
    "accuracy": "final held-out accuracy (%)",
    "perplexity": "final held-out perplexity (lower is better)",
}


def plot_privacy_utility(points: list[dict[str, Any]], path: Path, metric: str = "accuracy") -> Path:
    """Final utility against spent epsilon for a sweep: one line per model and data (``group``),
    never joining runs of different models; non-private runs and zero-shot utility as
    horizontal lines in the group's colour.

    Args:
        points: one dict per finished run with ``epsilon`` (None without DP), ``metric``'s value,
            ``zero_shot`` (the same metric before training) and optionally ``group``
            (e.g. "tiny / rotten_tomatoes").
        path: the PNG to write.
        metric: ``accuracy`` (fixed answers; shown in %) or ``perplexity`` (free-form answers).
    """
    scale = 100.0 if metric == "accuracy" else 1.0
    fig, ax = plt.subplots(figsize=(8, 4))
    groups: dict[Any, list[dict[str, Any]]] = {}
    for point in points:
        groups.setdefault(point.get("group"), []).append(point)
    several = len(groups) > 1
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for index, (group, members) in enumerate(sorted(groups.items(), key=lambda item: str(item[0]))):
        color = colors[index % len(colors)]
        prefix = f"{group}: " if several and group else ""
        private = sorted((p["epsilon"], scale * p[metric]) for p in members if p["epsilon"] is not None)
        if private:
            ax.plot(*zip(*private, strict=True), marker="o", color=color, label=f"{prefix}DP-SGD (sample level)")
        for number, baseline in enumerate(p for p in members if p["epsilon"] is None):
            ax.axhline(
                scale * baseline[metric],
                color=color if several else "gray",
                linestyle="--",
                label=f"{prefix}non-private" if number == 0 else None,
            )
        zero_shot = [p["zero_shot"] for p in members if p.get("zero_shot") is not None]
        if zero_shot:
            ax.axhline(
                scale * zero_shot[0], color=color if several else "black", linestyle=":", label=f"{prefix}zero-shot"
            )
    ax.set(
        xlabel="epsilon spent (max over clients)",
        ylabel=UTILITY_LABELS[metric],
        title="Privacy-utility trade-off",
    )
    _legend_outside(ax)
    return _save(fig, path)


def plot_run(run_dir: Path, rounds: list[RoundRecord], target: float | None) -> list[Path]:
    """All of a run's plots into ``run_dir``; returns the files written."""
    written = [plot_eval(rounds, run_dir / EVAL_PNG)]
    eps = plot_epsilon(rounds, target, run_dir / EPSILON_PNG)
    return written + ([eps] if eps else [])


def plot_audit(
    run_dir: Path,
    scores: dict[str, Any],
    included: list[bool],
    bounds: dict[str, float] | None = None,
    accounted: float | None = None,
) -> Path:
    """Each audit adversary's canary scores, included against left out: the further apart the
    two histograms, the more the adversary learns (``fedllm audit``). ``bounds``: each adversary's
    empirical epsilon lower bound, shown in its title beside the ``accounted`` epsilon."""
    fig, axes = plt.subplots(1, len(scores), figsize=(5 * len(scores), 3.6), squeeze=False)
    inside = [bool(flag) for flag in included]
    for ax, (name, values) in zip(axes[0], scores.items(), strict=True):
        values = list(values)
        ins = [v for v, flag in zip(values, inside, strict=True) if flag]
        outs = [v for v, flag in zip(values, inside, strict=True) if not flag]
        edges = _shared_bins(values, max(10, min(60, len(values) // 20)))
        ax.hist(outs, bins=edges, alpha=0.6, label=f"left out ({len(outs)})", color="tab:gray")
        ax.hist(ins, bins=edges, alpha=0.6, label=f"included ({len(ins)})", color="tab:red")
        title = name.replace("_", " ")
        if bounds is not None and name in bounds:
            against = f" vs accounted {accounted:.3g}" if accounted is not None else ""
            title += f"\nlower bound {bounds[name]:.3g}{against}"
        ax.set(xlabel="canary score", ylabel="canaries", title=title)
        ax.legend(fontsize="small")
    return _save(fig, run_dir / AUDIT_PNG)


def _shared_bins(values: list[float], count: int) -> list[float]:
    """Bin edges common to both histograms; a range too narrow for ``count`` finite bins (e.g. scores
    that differ only by rounding, which matplotlib refuses) is widened around its centre."""
    low, high = (min(values), max(values)) if values else (0.0, 1.0)
    if high - low <= 1e-9 * max(1.0, abs(low), abs(high)):
        low, high = low - 0.5, high + 0.5
    return [low + (high - low) * i / count for i in range(count + 1)]


def _legend_outside(ax) -> None:
    """The legend right of the axes: inside, it covers the points it names."""
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)


def _or_nan(value: float | None) -> float:
    """A missing value as NaN, which matplotlib leaves out of a line."""
    return math.nan if value is None else value


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
