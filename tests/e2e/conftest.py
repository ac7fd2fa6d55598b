"""Runs made once per test session through the real `fedllm simulate` command."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import psutil
import pytest

from fedllm.processes import tagged_processes

FEDLLM = [sys.executable, "-m", "fedllm.cli.main"]
# Every process our commands start (Ray's included) inherits this tag, so leftover checks
# see only this session's processes, not another Ray on the same machine.
SESSION_TAG = ("FEDLLM_TEST_SESSION", uuid.uuid4().hex)


def fedllm(args: list[str], cwd: Path, env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    """Run the `fedllm` command as a user would; fail with its output when it fails."""
    result = subprocess.run(
        [*FEDLLM, *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=600,
        env={
            **os.environ,
            "PYTHONWARNINGS": "ignore::DeprecationWarning",
            SESSION_TAG[0]: SESSION_TAG[1],
            **(env or {}),
        },
    )
    if check:
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result


def run_demo(args: list[str], timeout: int) -> dict:
    """Run ``scripts/demo_federation.py`` with ``args`` (this session's processes); its JSON report."""
    root = Path(__file__).resolve().parents[2]
    result = subprocess.run(
        [sys.executable, str(root / "scripts" / "demo_federation.py"), *args],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, SESSION_TAG[0]: SESSION_TAG[1], "PYTHONPATH": str(root)},
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return json.loads(result.stdout.split("\noutputs:")[0])


def stray_processes() -> list[str]:
    """Live (non-zombie) processes started by this test session's commands."""
    found = []
    for proc in tagged_processes(*SESSION_TAG):
        try:
            found.append(f"{proc.pid}: {' '.join(proc.cmdline())[:80]}")
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory) -> Path:
    """`fedllm simulate debug=smoke`: 3 clients, 2 rounds, DP at epsilon 8."""
    run_dir = tmp_path_factory.mktemp("smoke") / "run"
    result = fedllm(["simulate", "debug=smoke", f"hydra.run.dir={run_dir}"], cwd=run_dir.parent)
    # what the researcher saw, for the console tests (beside the run, not in it)
    (run_dir.parent / "console.out").write_text(result.stdout)
    (run_dir.parent / "console.err").write_text(result.stderr)
    return run_dir


@pytest.fixture(scope="session")
def smoke_sweep(tmp_path_factory) -> Path:
    """A sweep over target epsilon 3 and 8 plus a non-private baseline, one round each."""
    sweep = tmp_path_factory.mktemp("sweep")
    fedllm(
        [
            "simulate",
            "-m",
            "debug=smoke",
            "federation.num_rounds=1",
            "privacy.target_epsilon=3,8",
            f"hydra.sweep.dir={sweep}",
        ],
        cwd=sweep,
    )
    fedllm(
        ["simulate", "debug=smoke", "federation.num_rounds=1", "privacy=none", f"hydra.run.dir={sweep / 'baseline'}"],
        cwd=sweep,
    )
    return sweep
