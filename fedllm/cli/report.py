"""``fedllm report <run or sweep dir>``: print a compact table, write CSV + Markdown (+ plot)."""

from __future__ import annotations

import sys
from pathlib import Path

from fedllm.errors import FedLLMError

USAGE = "usage: fedllm report <run or sweep directory>"


def report_cli(argv: list[str]) -> int:
    """Summarise every finished run in a directory; for several runs also plot privacy vs utility."""
    if len(argv) != 1 or argv[0] in ("-h", "--help"):
        print(USAGE, file=sys.stderr)
        return 2
    from fedllm.analysis.report import privacy_utility_points, report_rows, to_markdown, write_csv
    from fedllm.analysis.runs import find_runs
    from fedllm.tracking.plots import PRIVACY_UTILITY_PNG, plot_privacy_utility

    root = Path(argv[0])
    try:
        runs = find_runs(root)
    except FedLLMError as exc:
        print(f"fedllm report: {exc}", file=sys.stderr)
        return 1
    rows = report_rows(runs, root)
    markdown = to_markdown(rows)
    print(markdown, end="")
    (root / "report.md").write_text(markdown, encoding="utf-8")
    written = [write_csv(rows, root / "report.csv"), root / "report.md"]
    points = privacy_utility_points(runs)
    if len(runs) > 1 and points:
        written.append(plot_privacy_utility(points, root / PRIVACY_UTILITY_PNG))
    print("wrote " + ", ".join(str(p) for p in written))
    return 0
