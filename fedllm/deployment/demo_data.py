"""Stand-in data for demo nodes: each node's own JSONL file, cut from the embedded reviews."""

from __future__ import annotations

import json
from pathlib import Path

from fedllm.data.sources import load_rotten_tomatoes


def write_node_files(paths: list[Path], records: int) -> list[Path]:
    """Write ``records`` disjoint Rotten Tomatoes reviews to each path (taken from the end of the
    corpus), in the JSONL format a node's ``data-path`` expects."""
    pool = load_rotten_tomatoes()[-len(paths) * records :]
    for index, path in enumerate(paths):
        path.parent.mkdir(parents=True, exist_ok=True)
        rows = pool[index * records : (index + 1) * records]
        path.write_text("".join(json.dumps({"prompt": r.prompt, "response": r.response}) + "\n" for r in rows))
    return paths
