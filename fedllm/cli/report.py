"""``fedllm report <run or sweep dir>``: print a compact table, write CSV + Markdown (+ plot).

Every job folder below the directory is a row: completed and stopped runs with their results,
failed runs (``summary.json`` says ``status: failed``) and unfinished ones (no summary: killed
or still running) with their status and reason only. Rows are grouped by model and data, and
only finished runs become points of the privacy-utility plot (one line per model and data).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fedllm.analysis.report import privacy_utility_points, report_rows, to_markdown, write_csv
from fedllm.analysis.runs import find_runs
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
    args = parser.parse_args(argv)
    root = args.directory
    try:
        runs = find_runs(root, include_incomplete=True)
    except FedLLMError as exc:
        print(f"fedllm report: {exc}", file=sys.stderr)
        return 1
    rows = report_rows(runs, root)
    markdown = to_markdown(rows)
    print(markdown, end="")
    (root / "report.md").write_text(markdown, encoding="utf-8")
    written = [write_csv(rows, root / "report.csv"), root / "report.md"]
    points = privacy_utility_points(runs)
    if len(points) > 1:
        from fedllm.tracking.plots import PRIVACY_UTILITY_PNG, plot_privacy_utility  # matplotlib: only to plot

        written.append(plot_privacy_utility(points, root / PRIVACY_UTILITY_PNG))
    incomplete = [run for run in runs if not run.finished]
    if incomplete:
        print(f"{len(incomplete)} of {len(runs)} runs failed or did not finish (status column); they are not plotted")
    print("wrote " + ", ".join(str(p) for p in written))
    return 0
