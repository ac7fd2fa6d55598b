"""The server's run: wire the ledger, the strategy, the round loop, the evaluator and the
checkpoint together, play every round, and write the outputs.

Who does what: :mod:`~fedllm.federation.preflight` asks every node, before the rounds, how many
of them it can train under its own cap (it informs; the rounds still run as planned),
:mod:`~fedllm.federation.rounds` plays each round (and returns its result),
:mod:`~fedllm.federation.evaluator` evaluates and logs it, :mod:`~fedllm.federation.checkpoint`
saves it, and :mod:`~fedllm.federation.outputs` writes what the run leaves behind. The engines
call :func:`run_federation` (:mod:`~fedllm.federation.simulation`,
:mod:`~fedllm.federation.inprocess`, :mod:`~fedllm.federation.deployment_server_app`).
"""

from __future__ import annotations

import dataclasses
import logging
import time
import uuid
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord
from flwr.serverapp import Grid

from fedllm import task
from fedllm.config import ExperimentConfig
from fedllm.federation import records as keys
from fedllm.federation.checkpoint import Checkpointer, ServerState
from fedllm.federation.evaluator import RoundEvaluator
from fedllm.federation.outputs import SEEDED_WARNING, failure_text, write_failure, write_outputs
from fedllm.federation.preflight import run_preflight
from fedllm.federation.rounds import LoopSettings, ReplyPolicy, RoundReplies, RoundResult, run_rounds
from fedllm.federation.strategy import build_strategy
from fedllm.federation.validation import MechanismCheck
from fedllm.model.device import usable_cpus
from fedllm.privacy.client_level import ClientLevelAccountant
from fedllm.privacy.ledger import PrivacyLedger
from fedllm.storage import load_key, write_json
from fedllm.tracking.run_files import RoundRecord, RunSummary
from fedllm.tracking.run_log import RunLog
from fedllm.tracking.wandb_sink import WandbSink, wandb_run_name

log = logging.getLogger(__name__)


def prepare_run(cfg: ExperimentConfig, run_dir: Path) -> None:
    """Before the first round: save the resolved config, build the model caches once (before
    parallel clients race for them) and log the DP-SGD plan; impossible plans fail here.

    Raises:
        PrivacyPlanError: the target cannot be met.
    """
    from fedllm.planning import build_plan, format_client_plan, format_plan

    run_dir.mkdir(parents=True, exist_ok=True)
    write_json(run_dir / "config.json", cfg.to_dict())
    task.model_bundle(cfg.model, cfg.lora, cfg.seed)
    if cfg.privacy.noise == "seeded":
        log.warning(SEEDED_WARNING)
    if cfg.privacy.sample_level:
        plan = format_plan(cfg, build_plan(cfg, accountants=(cfg.privacy.accountant,)))
        log.info("privacy plan (every client in every round):\n%s", plan)
    if cfg.privacy.client_level:
        log.info("privacy plan:\n%s", format_client_plan(cfg))


def new_ledger(cfg: ExperimentConfig) -> PrivacyLedger:
    """An empty server ledger for ``cfg`` (with a client-level accountant when that mode runs)."""
    client_level = None
    if cfg.privacy.client_level:
        client_level = ClientLevelAccountant(
            noise_multiplier=cfg.privacy.client_noise_multiplier,
            clip_norm=cfg.privacy.client_clip_norm,
            delta=cfg.privacy.client_delta,
            sampled_uniformly=cfg.federation.fraction_train < 1.0,
        )
    return PrivacyLedger(
        mode=cfg.privacy.mode,
        accountant=cfg.privacy.accountant,
        delta=cfg.privacy.delta,
        target_epsilon=cfg.privacy.target_epsilon if cfg.privacy.sample_level else None,
        client_level=client_level,
    )


def start_state(cfg: ExperimentConfig, checkpoints: Checkpointer, ledger: PrivacyLedger, resume: bool) -> ServerState:
    """A fresh run's state, or the checkpointed state of an interrupted one.

    No global random generator is seeded or restored: client sampling and client-level noise
    come from the strategy's own :class:`~fedllm.privacy.server_noise.ServerRandomness`.
    """
    if resume:
        state = checkpoints.load()
        ledger.load_state_dict(state.ledger)
        log.info("resuming run %s after round %d", state.run_id, state.server_round)
        return state
    initial = task.model_bundle(cfg.model, cfg.lora, cfg.seed).initial_adapter
    return ServerState(
        run_id=uuid.uuid4().hex, server_round=-1, arrays=initial, ledger={}, rounds=[], config=cfg.to_dict()
    )


def strategy_for(cfg: ExperimentConfig):
    """The Flower strategy ``cfg`` asks for."""
    fed, privacy = cfg.federation, cfg.privacy
    return build_strategy(
        aggregation=fed.aggregation,
        trim_fraction=fed.trim_fraction,
        fraction_train=fed.fraction_train,
        num_clients=fed.num_clients,
        client_level=privacy.client_level,
        client_clipping=privacy.client_clipping,
        client_noise_multiplier=privacy.client_noise_multiplier,
        client_clip_norm=privacy.client_clip_norm,
        noise=privacy.noise,
        seed=cfg.seed,
        node_wait=fed.round_timeout,
    )


def task_record(cfg: ExperimentConfig, run_id: str) -> ConfigRecord:
    """What every message to a node carries: the whole task config and the run id (a fresh record:
    the strategy adds each round's number to its own)."""
    return ConfigRecord({keys.TASK_CONFIG: cfg.to_json(), keys.RUN_ID: run_id})


def loop_settings(cfg: ExperimentConfig, run_id: str) -> LoopSettings:
    """The round loop's settings and reply policy from ``cfg``."""
    fed, privacy = cfg.federation, cfg.privacy
    client_side = privacy.client_level and privacy.client_clipping == "client"
    return LoopSettings(
        num_rounds=fed.num_rounds,
        num_clients=fed.num_clients,
        min_train_clients=fed.min_train_clients,
        timeout=fed.round_timeout,
        train_config=task_record(cfg, run_id),
        min_updates=fed.min_updates,
        policy=ReplyPolicy(
            num_clients=fed.num_clients,
            update_norm_ratio=fed.update_norm_ratio,
            max_update_norm=fed.max_update_norm,
            require_accounting=privacy.sample_level,
            uniform_weights=privacy.client_level,
            client_level=privacy.client_level,
            client_clip_norm=privacy.client_clip_norm if client_side else None,
            mechanism=mechanism_check(cfg),
            node_ids=fed.node_ids,
        ),
    )


def mechanism_check(cfg: ExperimentConfig) -> MechanismCheck | None:
    """Under sample-level DP, what a node's reported DP history must match (the run's plan)."""
    if not cfg.privacy.sample_level:
        return None
    return MechanismCheck(cfg)


def run_federation(
    grid: Grid, cfg: ExperimentConfig, run_dir: Path, resume: bool = False, *, started: float | None = None
) -> RunSummary:
    """Run (or continue) every round, and write adapter, ledger, metrics and summary.

    Args:
        grid: the engine's grid (Flower's, or :class:`~fedllm.federation.inprocess.InProcessGrid`).
        cfg: the experiment.
        run_dir: where the outputs go.
        resume: continue from the checkpoint in ``run_dir``.
        started: ``time.perf_counter()`` when the run began in this process (e.g. before
            :func:`prepare_run`); the summary's ``wall_seconds`` counts from it (default: now).

    Before the first round still to play, the pre-flight (:func:`run_preflight`) asks every node how
    many of the rounds it can train under its own cap; its answers go to the log and to the
    summary's ``preflight`` entry, and the rounds then run as planned (the plan never adapts).

    Returns:
        The summary (also written to ``summary.json``).
    """
    started = time.perf_counter() if started is None else started
    torch.set_num_threads(usable_cpus())
    run_dir.mkdir(parents=True, exist_ok=True)
    key = load_key(cfg.storage.key_file, cfg.storage.key_env) if cfg.storage.encrypt else None
    checkpoints = Checkpointer(run_dir / "checkpoint", key)
    ledger = new_ledger(cfg)
    state = start_state(cfg, checkpoints, ledger, resume)
    run_log = RunLog(
        run_dir,
        cfg.federation.num_rounds,
        cfg.tracking.progress,
        previous=[RoundRecord.from_dict(r) for r in state.rounds],
    )
    sink = (
        WandbSink(
            project=cfg.tracking.wandb_project,
            run_dir=run_dir,
            config=cfg.to_dict(),
            name=wandb_run_name(cfg, run_dir),
        )
        if cfg.tracking.wandb
        else None
    )
    evaluator = RoundEvaluator(cfg, ledger, run_log, sink)
    preflight = None
    try:
        if state.stop_reason is None and state.server_round < cfg.federation.num_rounds:
            preflight = run_preflight(grid, cfg, task_record(cfg, state.run_id), max(state.server_round, 0) + 1)
        if state.server_round < 0:  # round 0: the zero-shot evaluation
            zero_shot = RoundResult(0, ArrayRecord(torch_state_dict=state.arrays), RoundReplies())
            state = end_round(state, zero_shot, evaluator, ledger, checkpoints)
        if state.stop_reason is None and state.server_round < cfg.federation.num_rounds:
            rounds = run_rounds(
                grid,
                strategy_for(cfg),
                ledger,
                loop_settings(cfg, state.run_id),
                ArrayRecord(torch_state_dict=state.arrays),
                state.server_round + 1,
            )
            for result in rounds:
                state = end_round(state, result, evaluator, ledger, checkpoints)
    except BaseException as exc:
        # the run did not finish: say so in summary.json (the checkpoint still resumes it), then re-raise
        run_log.close()
        answers = preflight.to_dict() if preflight else None
        write_failure(cfg, run_dir, state, ledger, run_log, failure_text(exc), started=started, preflight=answers)
        raise
    run_log.close()
    summary = write_outputs(
        cfg,
        run_dir,
        evaluator.bundle.model,
        state,
        ledger,
        run_log,
        key,
        started=started,
        preflight=preflight.to_dict() if preflight else None,
    )
    if sink:
        sink.finish(summary)
    return summary


def end_round(
    state: ServerState, result: RoundResult, evaluator: RoundEvaluator, ledger: PrivacyLedger, checkpoints: Checkpointer
) -> ServerState:
    """Evaluate and log a finished round, then checkpoint it; returns the state after it."""
    record = evaluator(result.server_round, result.arrays, result.replies)
    # a crash between the evaluation above and this save re-runs the round on resume: nodes
    # replay their updates, but client-level noise is drawn afresh (see docs/threat-model.md)
    state = dataclasses.replace(
        state,
        server_round=result.server_round,
        arrays=result.arrays.to_torch_state_dict(),
        stop_reason=result.stop_reason,
        ledger=ledger.state_dict(),
        rounds=[*state.rounds, record.to_dict()],
    )
    checkpoints.save(state)
    return state
