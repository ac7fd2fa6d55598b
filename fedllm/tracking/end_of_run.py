"""The block a finished run prints last: what it achieved, what it cost in privacy, where its files are."""

from __future__ import annotations

from pathlib import Path

from fedllm.tracking.run_files import SUMMARY_FILE, RunSummary


def end_of_run_block(summary: RunSummary, run_dir: Path, seconds: float) -> str:
    """A few lines for the console at the end of ``fedllm simulate`` (everything is also in
    ``summary.json``; this is what a researcher reads before opening it)."""
    lines = [
        f"run {summary.status} in {seconds:.0f} s: {summary.rounds_completed} of {summary.rounds_planned} rounds, "
        f"{summary.num_clients} clients",
        f"  utility: {_utility(summary)}",
    ]
    lines += [f"  privacy: {text}" for text in _privacy(summary)]
    if summary.warning:
        lines.append(f"  WARNING: {summary.warning}")
    lines += [
        f"  outputs: {run_dir}",
        f"    adapter/ (PEFT, with its model card), metrics.jsonl, {SUMMARY_FILE}, privacy_ledger.json, plots (*.png)",
        f"    use it: fedllm evaluate {run_dir}   |   fedllm generate {run_dir} 'your prompt'",
    ]
    return "\n".join(lines)


def _utility(summary: RunSummary) -> str:
    examples = f" on {summary.test_examples} held-out examples" if summary.test_examples else ""
    if summary.final_accuracy is not None:
        start = f" (zero-shot {summary.zero_shot_accuracy:.1%})" if summary.zero_shot_accuracy is not None else ""
        return f"accuracy {summary.final_accuracy:.1%}{start}{examples}"
    if summary.final_eval_perplexity is not None:
        start = (
            f" (zero-shot {summary.zero_shot_eval_perplexity:.2f})"
            if summary.zero_shot_eval_perplexity is not None
            else ""
        )
        return f"perplexity {summary.final_eval_perplexity:.2f}{start}{examples}"
    if summary.final_eval_loss is not None:
        return f"loss {summary.final_eval_loss:.4f}{examples}"
    return "not evaluated"


def _privacy(summary: RunSummary) -> list[str]:
    if not summary.guarantees:
        return [f"none (privacy={summary.privacy_mode}): nothing here is differentially private"]
    out = []
    for guarantee in summary.guarantees:
        cost = "epsilon n/a" if guarantee.epsilon is None else f"epsilon {guarantee.epsilon:.3f}"
        if guarantee.delta is not None:
            cost += f" at delta {guarantee.delta:g}"
        if guarantee.level == "sample" and summary.client_epsilons:
            values = sorted(summary.client_epsilons.values())
            spread = f"{values[0]:.3f}-{values[-1]:.3f}" if values[0] != values[-1] else f"{values[0]:.3f}"
            cost = f"{cost} (max over clients; each {spread}"
            cost += f", target {summary.target_epsilon:g}, {summary.accountant})" if summary.target_epsilon else ")"
        out.append(f"{guarantee.level} level, {guarantee.protects}: {cost}")
    return out
