"""Load run directories written by ``fedllm simulate`` (plain files, no live objects)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedllm.errors import DataError
from fedllm.tracking.run_files import (
    METRICS_FILE,
    SUMMARY_FILE,
    RoundRecord,
    RunSummary,
    read_json,
    read_rounds,
    read_summary,
)

RUN_MARKER = SUMMARY_FILE
AUDIT_FILE = "audit.json"  # written by `fedllm audit` only


FINISHED = ("completed", "stopped")  # the statuses whose results mean something
LOG_NAMES = ("simulate.log", "audit.log")  # Hydra's log of the job, named after the command


@dataclass(frozen=True)
class Run:
    """One run directory: its config, per-round metrics, privacy ledger and summary.

    A failed run may lack metrics and ledger (they are then empty); an unfinished one (a job
    folder without ``summary.json``: killed, or still running) has a summary with status
    ``unfinished`` and whatever ``failure`` its log shows.
    """

    path: Path
    config: dict[str, Any]
    rounds: list[RoundRecord]
    ledger: dict[str, Any]
    summary: RunSummary
    audit: dict[str, Any] | None = None  # the run's privacy audit, when `fedllm audit` ran it

    @property
    def status(self) -> str:
        """``completed``, ``stopped`` (the privacy stop rule ended it early), ``failed`` or ``unfinished``."""
        return run_status(self.summary)

    @property
    def finished(self) -> bool:
        """Whether the run produced a result (completed or stopped early), so its numbers mean something."""
        return self.status in FINISHED

    def epsilon_table(self) -> dict[int, dict[str, float]]:
        """Per round, each client's epsilon (``{round: {client: epsilon}}``); empty without DP."""
        return {r.round: r.epsilon for r in self.rounds if r.epsilon}


def run_status(summary: RunSummary) -> str:
    """A summary's status; for summaries written before it was recorded, inferred the same way
    (rounds ran and none aggregated an update: failed; an early stop: stopped)."""
    if summary.status:
        return summary.status
    completed = summary.rounds_completed or 0
    if completed and len(summary.rounds_without_updates) >= completed:
        return "failed"
    return "stopped" if summary.stop_reason else "completed"


def failure_of(run: Run) -> str | None:
    """Why a run failed or stopped early, if it did (a written reason, or for an old summary the inferred one)."""
    if run.summary.failure:
        return run.summary.failure
    if run.status == "failed":
        return "no round aggregated a client update (every client failed, refused or was rejected)"
    return run.summary.stop_reason


def load_run(path: str | Path) -> Run:
    """Read one run directory.

    A failed run's missing metrics, ledger or config read as empty; a finished run needs them all.

    Raises:
        DataError: a file is missing or malformed (the message names it).
    """
    path = Path(path)
    summary = read_summary(path)
    failed = run_status(summary) not in FINISHED

    def needed(name: str) -> bool:
        return (path / name).is_file() or not failed

    audit = read_json(path / AUDIT_FILE) if (path / AUDIT_FILE).is_file() else None
    return Run(
        path=path,
        config=read_json(path / "config.json") if needed("config.json") else {},
        rounds=read_rounds(path) if needed(METRICS_FILE) else [],
        ledger=read_json(path / "privacy_ledger.json") if needed("privacy_ledger.json") else {},
        summary=summary,
        audit=audit,
    )


def unfinished_run(path: Path) -> Run:
    """A job folder without a summary: killed, crashed before writing one, or still running."""
    config = {}
    if (path / "config.json").is_file():
        try:
            config = read_json(path / "config.json")
        except DataError:
            config = {}
    summary = RunSummary(status="unfinished", failure=_last_logged_error(path))
    return Run(path=path, config=config, rounds=[], ledger={}, summary=summary)


def _last_logged_error(path: Path) -> str | None:
    """The last ERROR line of the job's Hydra log, without its timestamp."""
    for name in LOG_NAMES:
        log = path / name
        if log.is_file():
            text = log.read_text(encoding="utf-8", errors="replace")
            lines = [line for line in text.splitlines() if "[ERROR]" in line]
            if lines:
                return lines[-1].split("[ERROR] - ", 1)[-1].strip()
    return None


def _is_job_dir(path: Path) -> bool:
    """A folder a run was started in: fedllm's ``config.json`` or Hydra's ``.hydra/``."""
    return (path / RUN_MARKER).is_file() or (path / "config.json").is_file() or (path / ".hydra").is_dir()


def _resume_only(path: Path) -> bool:
    """Hydra's folder of a ``resume=`` command: its log only; the run itself is the resumed folder."""
    overrides = path / ".hydra" / "overrides.yaml"
    return (
        not (path / RUN_MARKER).is_file()
        and not (path / "config.json").is_file()
        and overrides.is_file()
        and "resume=" in overrides.read_text(encoding="utf-8", errors="replace")
    )


def _job_dirs(path: Path) -> list[Path]:
    """Every job folder at or below ``path`` (never looking inside a job folder), in path order."""
    if _is_job_dir(path):
        return [] if _resume_only(path) else [path]
    found = []
    for child in sorted(p for p in path.iterdir() if p.is_dir()):
        found += _job_dirs(child)
    return found


def find_runs(path: str | Path, include_incomplete: bool = False) -> list[Run]:
    """The run at ``path``, or every run below it (a Hydra sweep directory), in path order.

    Args:
        path: a run folder, or a folder of runs (at any depth).
        include_incomplete: also return failed runs and unfinished job folders (``fedllm
            report`` lists them); by default only runs with a result (completed or stopped).

    Raises:
        DataError: no run is found (or, by default, none that finished).
    """
    path = Path(path)
    if not path.is_dir():
        raise DataError(f"{path}: no such directory")
    runs = [load_run(job) if (job / RUN_MARKER).is_file() else unfinished_run(job) for job in _job_dirs(path)]
    if include_incomplete:
        if not runs:
            raise DataError(
                f"{path}: no finished fedllm run, nor a failed or unfinished one (no {RUN_MARKER} "
                "or job folder) in it or below it"
            )
        return runs
    finished = [run for run in runs if run.finished]
    if not finished:
        raise DataError(
            f"{path}: no finished fedllm run (no {RUN_MARKER} of a completed run) in it or below it"
            + (f"; {len(runs)} failed or unfinished: see `fedllm report {path}`" if runs else "")
        )
    return finished
