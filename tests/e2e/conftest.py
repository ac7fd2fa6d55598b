"""Runs made once per test session through the real `fedllm simulate` command."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

FEDLLM = [sys.executable, "-m", "fedllm.cli.main"]


def fedllm(args: list[str], cwd: Path, env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    """Run the `fedllm` command as a user would; fail with its output when it fails."""
    result = subprocess.run([*FEDLLM, *args], cwd=cwd, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "PYTHONWARNINGS": "ignore::DeprecationWarning", **(env or {})})
    if check:
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory) -> Path:
    """`fedllm simulate debug=smoke`: 3 clients, 2 rounds, DP at epsilon 8."""
    run_dir = tmp_path_factory.mktemp("smoke") / "run"
    fedllm(["simulate", "debug=smoke", f"hydra.run.dir={run_dir}"], cwd=run_dir.parent)
    return run_dir


@pytest.fixture(scope="session")
def smoke_sweep(tmp_path_factory) -> Path:
    """A sweep over target epsilon 3 and 8 plus a non-private baseline, one round each."""
    sweep = tmp_path_factory.mktemp("sweep")
    fedllm(["simulate", "-m", "debug=smoke", "federation.num_rounds=1", "privacy.target_epsilon=3,8",
            f"hydra.sweep.dir={sweep}"], cwd=sweep)
    fedllm(["simulate", "debug=smoke", "federation.num_rounds=1", "privacy=none",
            f"hydra.run.dir={sweep / 'baseline'}"], cwd=sweep)
    return sweep
