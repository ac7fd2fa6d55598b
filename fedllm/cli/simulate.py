"""``fedllm simulate``: compose the Hydra config, plan privacy, run the federation.

Hydra stops here: everything below receives a validated :class:`ExperimentConfig`. The overrides
of every job (each value of a ``-m`` sweep) are checked before Hydra creates a run folder, so a
rejected config is one line and leaves nothing behind. A run that fails (no client update in any
round, an engine or ServerApp failure, an impossible plan) is recorded as ``status: failed`` in its
``summary.json``; a sweep runs every job and the command exits 1 if any failed.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import sys
import textwrap
import time
from pathlib import Path

from omegaconf import OmegaConf

from fedllm.config import (
    _SECTION_TYPES,
    AuditConfig,
    ExperimentConfig,
    NoConfigDir,
    compose_hydra,
    conf_dir,
    from_hydra,
    hydra_error,
    with_state_dir,
)
from fedllm.errors import ConfigError, DataError, FedLLMError
from fedllm.tracking.end_of_run import end_of_run_block
from fedllm.tracking.run_files import SUMMARY_FILE, RunSummary, read_summary, write_summary

# Hydra and the federation (torch, Flower, the model stack: seconds) are imported in the functions
# that run them, so that `--help` and a rejected override answer at once (also for plan and audit)

log = logging.getLogger("fedllm")


def simulate_cli(argv: list[str]) -> int:
    """Run ``fedllm simulate`` with Hydra overrides (``-m`` for sweeps)."""
    if wants_help(argv):
        print(overrides_help("simulate"))
        return 0
    return run_hydra("simulate", argv, _hydra_entry)


def run_hydra(command: str, argv: list[str], entry) -> int:
    """Validate the overrides, then hand them to ``@hydra.main`` with ``entry`` as the task.

    A config Hydra cannot compose, or one :func:`~fedllm.config.from_hydra` rejects, is reported
    in one line here, before Hydra creates a run directory (no stray ``outputs/<date>/<time>``).

    Returns:
        0 when every job succeeded; 1 after a one-line error (a rejected config, a failed job).
    """
    import hydra

    try:
        config_path = str(conf_dir())
        precheck(argv, Path(config_path))
    except FedLLMError as exc:
        print(f"fedllm {command}: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, NoConfigDir) else 1
    from fedllm.federation.simulation import set_quiet_env

    set_quiet_env()  # before Hydra's job starts Flower or Ray
    sys.argv = [f"fedllm-{command}", *argv]
    JOBS.clear()
    hydra.main(version_base="1.3", config_path=config_path, config_name="config")(entry)()
    failed = [job for job in JOBS if job[1] is not None]
    if failed and len(JOBS) > 1:  # a sweep: every job ran; say which failed (each was logged as it did)
        print(
            f"fedllm {command}: {len(failed)} of {len(JOBS)} jobs failed:\n"
            + "\n".join(f"  {job}: {reason}" for job, reason in failed),
            file=sys.stderr,
        )
    return 1 if failed else 0


# (run directory, failure or None) of each job of this command, in order; a failed job is logged
# and the next one of a sweep runs, and the command exits 1 at the end (Hydra would abort a sweep
# with a traceback, or not at all while a Flower thread lived on)
JOBS: list[tuple[str, str | None]] = []


HELP_FLAGS = ("-h", "--help")


def wants_help(argv: list[str]) -> bool:
    """Whether ``argv`` asks for help (Hydra's own ``--hydra-help`` is left to Hydra)."""
    return any(arg in HELP_FLAGS for arg in argv)


# Hydra flags that print something and run no job: the config is not prechecked for them
_INFO_FLAGS = (
    "--cfg",
    "-c",
    "--info",
    "-i",
    "--hydra-help",
    "--version",
    "--shell-completion",
    "-sc",
    "--resolve",
    "--package",
    "-p",
)
MAX_PRECHECKED_JOBS = 256


def precheck(argv: list[str], config_dir: Path) -> None:
    """Compose and validate the config of every job ``argv`` describes (each value of a ``-m``
    sweep), as Hydra will, without creating anything.

    Arguments this cannot interpret (another config folder or name, an info flag, a sweeper
    Hydra expands itself) are left for Hydra to check.

    Raises:
        ConfigError: one line naming the key (unknown keys with a "did you mean").
    """
    from hydra._internal.utils import get_args_parser

    if any(arg.split("=")[0] in _INFO_FLAGS for arg in argv):
        return
    try:
        args = get_args_parser().parse_args(argv)
    except SystemExit:  # argparse already printed its usage error; let Hydra say it again, its way
        return
    if args.config_path or args.config_dir or args.config_name or args.experimental_rerun:
        return
    for overrides in _jobs(list(args.overrides), args.multirun):
        compose_checked(overrides, config_dir)


def _jobs(overrides: list[str], multirun: bool) -> list[list[str]]:
    """The override list of each job (a sweep's values expanded as Hydra's basic sweeper does)."""
    if not multirun:
        return [overrides]
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except HydraException as exc:
        raise hydra_error(exc) from exc
    if any(o.key_or_group.startswith("hydra.sweeper") for o in parsed):
        return [[o for o in overrides if "," not in o]]
    batches = BasicSweeper.split_arguments(parsed, max_batch_size=None)
    jobs = [list(job) for batch in batches for job in batch]
    return jobs[:MAX_PRECHECKED_JOBS]


def compose_checked(overrides: list[str], config_dir: Path):
    """The validated :class:`~fedllm.config.ExperimentConfig` of one job's overrides.

    Raises:
        ConfigError: Hydra cannot compose it, or a value is invalid (one line).
    """
    composed = compose_hydra(overrides, config_dir)
    if composed.get("resume"):
        return None  # the saved config of the run is what counts (checked when it is loaded)
    AuditConfig.from_mapping(composed.get("audit"))  # `fedllm audit`'s own settings, checked as early
    return from_hydra(composed)


def _hydra_entry(dict_cfg) -> None:
    from hydra.core.hydra_config import HydraConfig

    run_dir = hydra_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        try:
            if dict_cfg.get("resume"):
                overrides = [o for o in HydraConfig.get().overrides.task if not o.startswith("resume=")]
                cfg, run_dir = resume_target(Path(str(dict_cfg.resume)), overrides)
            else:
                cfg = with_state_dir(from_hydra(dict_cfg), run_dir)
        except FedLLMError:
            remove_unused_run_dir(hydra_dir)  # rejected before anything was written: leave no folder
            raise
        simulate(cfg, run_dir, resume=bool(dict_cfg.get("resume")))
    except FedLLMError as exc:
        log.error("%s", exc)
        JOBS.append((str(run_dir), str(exc)))
        return
    JOBS.append((str(run_dir), None))


def remove_unused_run_dir(run_dir: Path) -> None:
    """Remove the folder Hydra made for a job whose config was rejected before anything of the
    run was written in it (only Hydra's ``.hydra/`` and its log file), so no empty run is left."""
    try:
        entries = list(run_dir.iterdir())
    except OSError:
        return
    if all(e.name == ".hydra" or (e.is_file() and e.suffix == ".log") for e in entries):
        shutil.rmtree(run_dir, ignore_errors=True)


def resume_target(run_dir: Path, overrides: list[str]):
    """The saved config and folder of an interrupted run.

    Raises:
        FedLLMError: other overrides were given, or the folder holds no resumable run.
    """

    if overrides:
        raise FedLLMError(f"resume continues a run with its saved config; drop the other overrides: {overrides}")
    config_file = run_dir / "config.json"
    if not (config_file.is_file() and (run_dir / "checkpoint" / "state.json").is_file()):
        raise FedLLMError(f"{run_dir} is not a resumable run: it needs config.json and checkpoint/state.json")
    return ExperimentConfig.from_json(config_file.read_text(encoding="utf-8")), run_dir.resolve()


def simulate(cfg, run_dir: Path, resume: bool = False) -> RunSummary:
    """Plan, then run (or continue) the federation described by ``cfg``; outputs go to ``run_dir``.

    Returns:
        The run summary (``status`` completed or stopped).

    Raises:
        FedLLMError: the run failed (its plan was impossible, the engine failed, or no client
            update was aggregated in any round); ``summary.json`` then says ``status: failed``
            and why (``failure``).
    """
    from fedllm import task
    from fedllm.federation.inprocess import run_inprocess
    from fedllm.federation.outputs import failure_text
    from fedllm.federation.server_app import prepare_run
    from fedllm.federation.simulation import run_simulation

    started = time.perf_counter()
    if cfg.model.kind != "pretrained":
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the default run never touches a hub
    try:
        if resume:
            task.model_bundle(cfg.model, cfg.lora, cfg.seed)  # build caches once, before actors race for them
        else:
            prepare_run(cfg, run_dir)
        if cfg.federation.engine == "inprocess":
            run_inprocess(cfg, run_dir, resume=resume)
        else:
            run_simulation(cfg, run_dir, resume=resume)
    except Exception as exc:
        summary = record_failure(run_dir, cfg, failure_text(exc), time.perf_counter() - started)
        raise FedLLMError(f"the run failed: {summary.failure}; see {run_dir / SUMMARY_FILE}") from exc
    summary = written_summary(run_dir, time.perf_counter() - started, cfg)
    if summary.status == "failed":
        raise FedLLMError(f"the run failed: {summary.failure}; see {run_dir / SUMMARY_FILE}")
    log.info("%s", end_of_run_block(summary, run_dir, time.perf_counter() - started))
    if summary.status == "stopped":
        log.warning(
            "the run ended after round %d of %d: %s",
            summary.rounds_completed,
            summary.rounds_planned,
            summary.stop_reason,
        )
    return summary


def written_summary(run_dir: Path, seconds: float, cfg: ExperimentConfig | None = None) -> RunSummary:
    """The summary the ServerApp wrote; a failed one when the engine returned without writing it
    (``seconds``: the time this command ran)."""
    try:
        return read_summary(run_dir)
    except DataError:
        summary = RunSummary(
            status="failed",
            wall_seconds=round(seconds, 1),
            failure="the engine returned without a summary.json (see the log above)",
        )
        write_summary(run_dir, summary)
        seal_run_folder(run_dir, cfg)
        return summary


def record_failure(run_dir: Path, cfg, failure: str, seconds: float) -> RunSummary:
    """Mark the run ``status: failed`` with ``failure`` in its ``summary.json``: the ServerApp's
    summary (the engine failed after it was written) or, when the run ended before the ServerApp
    wrote one, a summary of what is known (``seconds``: the time this command ran)."""
    try:
        summary = read_summary(run_dir)
    except DataError:
        summary = RunSummary(
            rounds_completed=0,
            rounds_planned=cfg.federation.num_rounds,
            num_clients=cfg.federation.num_clients,
            privacy_mode=cfg.privacy.mode,
            wall_seconds=round(seconds, 1),
        )
    if summary.status != "failed":
        summary = dataclasses.replace(summary, status="failed", failure=failure)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_summary(run_dir, summary)
    seal_run_folder(run_dir, cfg)
    return summary


def seal_run_folder(run_dir: Path, cfg: ExperimentConfig | None) -> None:
    """Rewrite the run folder's ``manifest.json`` after this command changed its summary (with
    the run's storage key; without a valid one, none is written and ``fedllm verify`` says so)."""
    from fedllm.federation.outputs import run_storage_key  # torch: loaded only when a summary was rewritten
    from fedllm.tracking.run_manifest import write_run_manifest

    if cfg is None:
        return
    try:
        write_run_manifest(run_dir, run_storage_key(cfg))
    except (ConfigError, OSError) as exc:
        log.warning("%s: no run manifest written (%s)", run_dir, exc)


COMMAND_HELP = {
    "simulate": (
        "fedllm simulate [-m] [OVERRIDE ...]",
        "Run a federated, differentially private LoRA fine-tuning job on this machine: Flower's "
        "simulation engine runs one virtual node per client, each training on its own shard with "
        "DP-SGD; the server averages the adapters and evaluates them on a held-out split every "
        "round. Outputs (adapter/, summary.json with the run's status, metrics.jsonl, "
        "privacy_ledger.json, plots) go to outputs/<date>/<time>/. The command exits 1 when the "
        "config is rejected (nothing is created) or the run fails (summary.json says why).",
    ),
    "plan": (
        "fedllm plan [OVERRIDE ...]",
        "Print the DP-SGD plan of the same config, before any training: the noise multiplier per "
        "client under the RDP and PRV accountants, the epsilon after each round, which client binds, "
        "and what to change when the target cannot be met. Nothing is written.",
    ),
    "audit": (
        "fedllm audit [OVERRIDE ...]",
        "Run the configured experiment with canaries (gradient or record) and print each adversary's "
        "empirical epsilon lower bound (one-run audit, Steinke-Nasr-Jagielski): the coordinator, "
        "which sees every node's update, and a reader of the outputs. audit.* keys set the audit "
        "itself (canaries, kind, confidence, seed). Outputs go to outputs/<date>/<time>/.",
    ),
}

_OPTIONS = {
    "simulate": [
        (
            "-m, --multirun",
            "sweep: a comma-separated value runs one job per value, e.g. "
            "privacy.target_epsilon=3,8; a failed job does not stop the others, the command "
            "then exits 1 (outputs in multirun/<date>/<time>/<job>/)",
        ),
        ("resume=RUN_DIR", "continue an interrupted run from its last checkpoint, with its saved config"),
        ("hydra.run.dir=DIR", "where the outputs go (hydra.sweep.dir=DIR for a sweep)"),
        ("--cfg job", "print the composed config and exit (nothing is run)"),
    ],
    "plan": [],
    "audit": [
        ("audit.canaries=N", "how many canaries (default 1000); each is included with probability 1/2"),
        ("audit.kind=KIND", "gradient (designed per-sample gradients) or record (random-word records)"),
        ("hydra.run.dir=DIR", "where the outputs go"),
    ],
}


_EXAMPLES = {
    "simulate": [
        "fedllm simulate debug=smoke                      3 clients, 2 rounds, a tiny model (minutes)",
        "fedllm simulate privacy.target_epsilon=3 federation.num_rounds=5",
        "fedllm simulate -m privacy.target_epsilon=1,3,8  a sweep; then `fedllm report multirun/...`",
    ],
    "plan": [
        "fedllm plan privacy.target_epsilon=3             the noise that target needs",
        "fedllm plan debug=smoke federation.num_rounds=10",
    ],
    "audit": [
        "fedllm audit model=tiny privacy.target_epsilon=1 audit.canaries=500",
        "fedllm audit privacy=none                        what an attack learns without DP",
    ],
}


def overrides_help(command: str) -> str:
    """``fedllm <command> --help`` for the commands that take Hydra overrides: what the command
    does, its options, the config groups (with the default marked) and each section's keys, read
    from ``conf/`` and the config dataclasses so the list never goes stale."""
    usage, about = COMMAND_HELP[command]
    lines = [
        f"usage: {usage}",
        "",
        *textwrap.wrap(about, 96),
        "",
        *textwrap.wrap(
            "OVERRIDE is KEY=VALUE (privacy.target_epsilon=3) or GROUP=OPTION (model=tiny); "
            "`fedllm simulate --cfg job` prints every value; every key with its default and meaning: "
            "docs/config.md.",
            96,
        ),
        "",
        "options:",
    ]
    lines += _two_columns([("-h, --help", "show this help and exit"), *_OPTIONS[command]])
    try:
        groups = [g for g in _config_groups(conf_dir()) if command == "audit" or g[0] != "audit"]
    except FedLLMError as exc:
        groups = []
        lines += ["", f"(config groups unavailable: {exc})"]
    if groups:
        lines += ["", "config groups (GROUP=OPTION; * marks the default):"]
        lines += _two_columns(groups)
    lines += ["", "keys (SECTION.KEY=VALUE):"]
    lines += _two_columns(_section_keys(command))
    lines += ["", "examples:", *(f"  {example}" for example in _EXAMPLES[command])]
    return "\n".join(lines)


def _two_columns(rows: list[tuple[str, str]], width: int = 22) -> list[str]:
    out = []
    for name, text in rows:
        wrapped = textwrap.wrap(text, 96 - width - 2) or [""]
        out.append(f"  {name:<{width}}{wrapped[0]}" if len(name) < width else f"  {name}\n  {'':<{width}}{wrapped[0]}")
        out += [f"  {'':<{width}}{line}" for line in wrapped[1:]]
    return out


def _config_groups(config_dir: Path) -> list[tuple[str, str]]:
    """(group, its options with the default marked) for every folder of ``config_dir``."""
    defaults: dict[str, object] = {}
    raw = OmegaConf.to_container(OmegaConf.load(config_dir / "config.yaml"))
    for entry in raw.get("defaults", []) if isinstance(raw, dict) else []:
        if isinstance(entry, dict):
            defaults.update({str(k): v for k, v in entry.items()})
    rows = []
    for group in sorted(p for p in config_dir.iterdir() if p.is_dir()):
        options = sorted(p.stem for p in group.glob("*.yaml"))
        marked = [f"{o}*" if defaults.get(group.name) == o else o for o in options]
        rows.append((group.name, ", ".join(marked) + ("" if defaults.get(group.name) else " (none by default)")))
    return rows


def _section_keys(command: str) -> list[tuple[str, str]]:
    """(section, its first docstring line and its keys) for every config section."""
    sections = dict(_SECTION_TYPES)
    if command == "audit":
        sections["audit"] = AuditConfig
    rows = []
    for name, cls in sections.items():
        doc = (cls.__doc__ or "").strip().split("\n\n")[0].replace("\n", " ")
        doc = " ".join(doc.replace("``", "").split())
        keys = ", ".join(f.name for f in dataclasses.fields(cls))
        rows.append((name, f"{doc} Keys: {keys}."))
    rows.append(("seed", "the run's seed (an integer)."))
    return rows
