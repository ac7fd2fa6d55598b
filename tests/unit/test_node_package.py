"""The node's boundary is one Flower-free package: a reviewer reads ``fedllm/node/`` (issue 23)."""

from __future__ import annotations

import subprocess
import sys

import pytest


@pytest.mark.slow  # slow tier: a fresh interpreter imports torch, transformers and the node
def test_the_node_boundary_imports_neither_flower_nor_the_audit():
    code = (
        "import sys, fedllm.node.guard, fedllm.node.release, fedllm.node.extension; "
        "print(sorted(m for m in sys.modules if m == 'flwr' or m.startswith(('flwr.', 'fedllm.audit'))))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert result.stdout.strip() == "[]"
