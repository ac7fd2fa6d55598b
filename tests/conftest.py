"""Shared fixtures: an offline, quiet environment and tiny configs built from code."""

from __future__ import annotations

import os

import pytest

# Never reach a hub, never phone home, never let Flower install anything.
for _key, _value in {
    "HF_HUB_OFFLINE": "1",
    "WANDB_MODE": "offline",
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "RAY_DISABLE_USAGE_STATS": "1",
    "TOKENIZERS_PARALLELISM": "false",
}.items():
    os.environ.setdefault(_key, _value)


def _one_cpu_per_worker() -> None:
    """Under pytest-xdist, pin this worker, and so every process it starts, to a CPU of its own.

    fedllm sizes its torch threads by the CPUs a process may use (``usable_cpus``: its affinity),
    and so do the Ray workers and CLIs a test starts. Two workers each running two threads per
    model on two cores spin against each other (OpenMP waits busily): in-process federations ran
    up to 10x slower than alone. Pinned, each worker's runs use one thread on their own core.
    """
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")  # gw0, gw1, ...; unset without xdist
    if not worker.startswith("gw") or not hasattr(os, "sched_setaffinity"):
        return
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) > 1:
        os.sched_setaffinity(0, {cpus[int(worker[2:]) % len(cpus)]})


_one_cpu_per_worker()

from fedllm.config import (  # noqa: E402
    DataConfig,
    ExperimentConfig,
    FederationConfig,
    ModelConfig,
    TrainConfig,
)

RT_PROMPT = "Review: {prompt}\nSentiment:"


# The slow tier: engines (Ray, the Deployment Engine), subprocess CLIs, notebooks and benchmark
# scripts. `make test-fast` (pytest -m "not slow") runs everything else.
SLOW_PATHS = ("tests/e2e/", "tests/unit/test_benchmarks.py")
# `make test` and `make test-fast` spread the tests over one pytest-xdist worker per CPU
# (`--dist loadgroup`). Each worker builds its own module and session fixtures, so a file's
# tests stay on one worker, and the e2e files that share the session's smoke runs
# (tests/e2e/conftest.py) stay together: no run is made twice.
SHARED_E2E_RUNS = ("tests/e2e/test_simulation.py", "tests/e2e/test_tracking.py")


def xdist_group(nodeid: str) -> str:
    """The worker group of a test: its file, or one group for the files sharing the smoke runs."""
    path = nodeid.split("::", 1)[0]
    return "e2e-smoke-runs" if path in SHARED_E2E_RUNS else path


# first: pytest-xdist's own hook reads the xdist_group markers to group the tests
@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """Mark the slow tier (:data:`SLOW_PATHS` and tests marked ``slow``) and each test's
    pytest-xdist group (:func:`xdist_group`); tests marked ``gpu`` need CUDA: skipped, with the
    reason, on CPU-only machines (and in CI)."""
    import torch

    for item in items:
        if any(part in item.nodeid for part in SLOW_PATHS):
            item.add_marker(pytest.mark.slow)
        item.add_marker(pytest.mark.xdist_group(xdist_group(item.nodeid)))
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (marker gpu)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def _flower_home(tmp_path_factory):
    os.environ.setdefault("FLWR_HOME", str(tmp_path_factory.mktemp("flwr-home")))


@pytest.fixture(scope="session", autouse=True)
def _node_anchor_home(tmp_path_factory):
    """Deployed nodes' default ledger anchors (fedllm.privacy.ledger_anchor) go under $XDG_STATE_HOME:
    the session's own folder, never the user's ~/.local/state (subprocesses inherit it)."""
    os.environ["XDG_STATE_HOME"] = str(tmp_path_factory.mktemp("xdg-state"))


def tiny_config(**overrides) -> ExperimentConfig:
    """The smoke configuration (tiny random Llama, Rotten Tomatoes subset, 3 clients)."""
    sections = {
        "model": ModelConfig(source="tiny"),
        "data": DataConfig(prompt_template=RT_PROMPT, choices=("positive", "negative"), max_records=600, test_size=100),
        "federation": FederationConfig(num_clients=3, num_rounds=2),
        "train": TrainConfig(local_steps=3),
    }
    sections.update(overrides)
    return ExperimentConfig(**sections)


@pytest.fixture
def tiny_cfg() -> ExperimentConfig:
    """See :func:`tiny_config`."""
    return tiny_config()


@pytest.fixture
def uncached_calibration(tmp_path, monkeypatch):
    """Calibrations searched for real: an empty on-disk cache and none remembered in this process
    (a pinned noise must come from Opacus's search, not from an earlier run's answer)."""
    from fedllm.privacy.calibration import calibrate_noise

    monkeypatch.setenv("FEDLLM_CACHE", str(tmp_path / "fedllm-cache"))
    calibrate_noise.cache_clear()
    yield
    calibrate_noise.cache_clear()
