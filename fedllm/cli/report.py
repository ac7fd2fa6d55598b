"""``fedllm report <run or sweep dir>``: print a compact table, write CSV + Markdown (+ plot).

Every job folder below the directory is a row: completed and stopped runs with their results,
failed runs (``summary.json`` says ``status: failed``) and unfinished ones (no summary: killed
or still running) with their status and reason only. Rows are grouped by model and data, and
only finished runs become points of the privacy-utility plot (one line per model and data).
Each run's files are checked against its manifest.json: a run that is unverified or fails
verification shows no results or epsilons (its integrity column and note say why).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fedllm.analysis.report import integrities, privacy_utility_points, report_rows, to_markdown, write_csv
from fedllm.analysis.runs import find_runs
from fedllm.cli.at_rest import storage_key
from fedllm.errors import FedLLMError


def report_cli(argv: list[str]) -> int:
    """Summarise every run in a directory; for several finished runs also plot privacy vs utility."""
    parser = argparse.ArgumentParser(
        prog="fedllm report",
        description=" ".join(__doc__.split("\n\n")[1].replace("``", "").split()),
        epilog="writes report.csv and report.md (and privacy_utility.png) into the directory",
    )
    parser.add_argument(
        "directory",
        type=Path,
        help="a run folder (outputs/<date>/<time>) or a sweep folder (multirun/<date>/<time>), or any folder of runs",
    )
    parser.add_argument(
        "--key-file",
        default=None,
        help="file holding the storage key the runs were written with (default: $FEDLLM_ENCRYPTION_KEY): "
        "their manifests are then authenticated, not only checksummed",
    )
    args = parser.parse_args(argv)
    root = args.directory
    try:
        runs = find_runs(root, include_incomplete=True)
        checked = integrities(runs, storage_key(args.key_file, need=False, command="report"))
    except FedLLMError as exc:
        print(f"fedllm report: {exc}", file=sys.stderr)
        return 1
    rows = report_rows(runs, root, checked)
    markdown = to_markdown(rows)
    print(markdown, end="")
    (root / "report.md").write_text(markdown, encoding="utf-8")
    written = [write_csv(rows, root / "report.csv"), root / "report.md"]
    points = privacy_utility_points(runs, checked)
    # fixed answers: privacy_utility.png (accuracy); free-form: privacy_utility_perplexity.png
    for metric, name in (("accuracy", "privacy_utility.png"), ("perplexity", "privacy_utility_perplexity.png")):
        chosen = [p for p in points if p["metric"] == metric]
        if len(chosen) > 1:
            from fedllm.tracking.plots import plot_privacy_utility  # matplotlib: only to plot

            written.append(plot_privacy_utility(chosen, root / name, metric=metric))
    incomplete = [run for run in runs if not run.finished]
    if incomplete:
        print(f"{len(incomplete)} of {len(runs)} runs failed or did not finish (status column); they are not plotted")
    _say_integrity(rows)
    print("wrote " + ", ".join(str(p) for p in written))
    return 0


def _say_integrity(rows: list[dict]) -> None:
    """One line per kind of run whose figures are not authenticated: unverified or failing runs
    are not plotted and show no results; checksummed ones are shown, with what that is worth."""
    counts = {state: sum(row["integrity"] == state for row in rows) for state in ("FAILS verification", "unverified")}
    for state, count in counts.items():
        if count:
            print(f"{count} of {len(rows)} runs: {state} (see the note column); no results or epsilons shown for them")
    unkeyed = sum(row["integrity"] == "checksum only" for row in rows)
    if unkeyed:
        print(
            f"{unkeyed} of {len(rows)} runs are checked by checksum only (written without a storage key): "
            "that catches corruption and careless edits, not a forger who recomputes the manifest"
        )
