"""Run outputs for people: PNG plots, `fedllm report`, `fedllm plan`, wandb offline, notebooks."""

from __future__ import annotations

import csv
import dataclasses
import json
import os
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from tests.conftest import tiny_config

from .conftest import fedllm

NOTEBOOKS = Path(__file__).resolve().parents[2] / "notebooks"


def _is_png(path: Path) -> bool:
    return path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5_000


def test_every_run_writes_its_plots(smoke_run, smoke_sweep):
    assert _is_png(smoke_run / "epsilon_per_client.png")
    assert _is_png(smoke_run / "eval_accuracy_loss.png")
    baseline = smoke_sweep / "baseline"
    assert _is_png(baseline / "eval_accuracy_loss.png")
    assert not (baseline / "epsilon_per_client.png").exists()  # no DP, no epsilon to plot


def test_a_run_without_wandb_creates_no_wandb_directory(smoke_run):
    assert not (smoke_run / "wandb").exists()


def test_report_on_a_sweep_writes_table_and_privacy_utility_plot(smoke_sweep):
    result = fedllm(["report", str(smoke_sweep)], cwd=smoke_sweep)
    assert "| run | privacy | target_epsilon | spent_epsilon |" in result.stdout
    with (smoke_sweep / "report.csv").open() as handle:
        rows = {row["run"]: row for row in csv.DictReader(handle)}
    assert set(rows) == {"0", "1", "baseline"}
    assert rows["baseline"]["privacy"] == "none" and rows["baseline"]["spent_epsilon"] == ""
    for job in ("0", "1"):
        summary = json.loads((smoke_sweep / job / "summary.json").read_text())
        assert float(rows[job]["spent_epsilon"]) == pytest.approx(summary["final_max_epsilon"])
        assert float(rows[job]["final_accuracy"]) == pytest.approx(summary["final_accuracy"])
    assert (smoke_sweep / "report.md").read_text().count("\n") == 5  # header, rule, 3 runs
    assert _is_png(smoke_sweep / "privacy_utility.png")


def test_report_on_a_directory_without_runs_says_so(tmp_path):
    result = fedllm(["report", str(tmp_path)], cwd=tmp_path, check=False)
    assert result.returncode == 1 and "no finished fedllm run" in result.stderr


def test_wandb_offline_run_logs_per_round_metrics(tmp_path):
    run_dir = tmp_path / "run"
    fedllm(
        [
            "simulate",
            "debug=smoke",
            "tracking=wandb",
            "federation.num_rounds=1",
            "federation.engine=inprocess",  # what wandb receives does not depend on the engine: no Ray here
            f"hydra.run.dir={run_dir}",
        ],
        cwd=tmp_path,
        env={"WANDB_MODE": "offline", "WANDB_SILENT": "true"},
    )
    offline_runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(offline_runs) == 1
    history = list(offline_runs[0].glob("*.wandb"))
    assert history and history[0].stat().st_size > 0
    content = history[0].read_bytes()
    assert b"epsilon/client_0" in content and b"eval_accuracy" in content


def _execute(notebook: Path, env: dict[str, str]) -> nbformat.NotebookNode:
    book = nbformat.read(notebook, as_version=4)
    assert all(not cell.get("outputs") for cell in book.cells if cell.cell_type == "code"), (
        f"{notebook.name} is committed with outputs"
    )
    previous = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        NotebookClient(
            book, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOKS)}}
        ).execute()
    finally:
        for key, value in previous.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    return book


def _text_and_images(book) -> tuple[str, int]:
    text, images = [], 0
    for cell in book.cells:
        for output in cell.get("outputs", []):
            text.append(output.get("text", ""))
            data = output.get("data", {})
            text.append(data.get("text/plain", ""))
            images += "image/png" in data
    return "\n".join(text), images


def test_planning_notebook_runs_and_matches_fedllm_plan(tmp_path):
    book = _execute(NOTEBOOKS / "privacy_budget_planning.ipynb", {"FEDLLM_PLAN_OVERRIDES": "debug=smoke"})
    text, images = _text_and_images(book)
    assert images >= 4
    assert "Warning" not in text  # issue 29, item 8: tqdm warned that ipywidgets was missing
    plan = fedllm(["plan", "debug=smoke"], cwd=tmp_path).stdout.strip()
    assert plan and plan in text
    client_level = fedllm(["plan", "debug=smoke", "privacy=client"], cwd=tmp_path).stdout.strip()
    assert client_level.startswith("client level (DP-FedAvg") and client_level in text
    assert "epsilon after the last round" in text  # the client-level noise planned for targets


def test_run_analysis_notebook_reads_a_sweep(smoke_sweep):
    # relative to the repository root, as a user types it there (the kernel itself runs in notebooks/)
    relative = os.path.relpath(smoke_sweep, NOTEBOOKS.parent)
    book = _execute(NOTEBOOKS / "run_analysis.ipynb", {"FEDLLM_RUN_DIR": relative})
    text, images = _text_and_images(book)
    assert images >= 3
    assert "baseline: no DP" in text


def test_run_analysis_notebook_reads_a_free_form_sweep(tmp_path):
    # issue 29, item 1: it crashed on free-form runs (KeyError: ['epsilon']) and plotted accuracy only
    from tests.free_form_runs import write_free_form_sweep

    book = _execute(NOTEBOOKS / "run_analysis.ipynb", {"FEDLLM_RUN_DIR": str(write_free_form_sweep(tmp_path))})
    text, images = _text_and_images(book)
    assert "perplexity" in text and "62.0" in text and "final_perplexity" in text
    assert images >= 4  # epsilon per run (3 with DP), loss and perplexity, the privacy-utility plot


def test_run_analysis_notebook_shows_an_audit(tmp_path):
    from fedllm.audit.run import run_audit
    from fedllm.config import AuditConfig

    cfg = tiny_config()
    cfg = dataclasses.replace(
        cfg,
        privacy=dataclasses.replace(cfg.privacy, state_dir=str(tmp_path / "nodes")),
        tracking=dataclasses.replace(cfg.tracking, progress=False),
    )
    audit = run_audit(cfg, AuditConfig(canaries=50, seed=1), tmp_path / "audited")
    book = _execute(NOTEBOOKS / "run_analysis.ipynb", {"FEDLLM_RUN_DIR": str(tmp_path / "audited")})
    text, images = _text_and_images(book)
    assert f"{audit['canaries']} gradient canaries" in text
    assert "coordinator" in text and "output_reader" in text
    assert images >= 4  # the run's own plots and the audit's score histograms
