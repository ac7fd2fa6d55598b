"""The Flower ServerApp: FedAvg of adapters (optionally client-level DP), held-out evaluation
each round, a checkpoint after every round, and the run's outputs."""

from __future__ import annotations

import logging
import time
import uuid
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp

from fedllm import task
from fedllm.config import ExperimentConfig
from fedllm.errors import FedLLMError
from fedllm.evaluation.metrics import evaluate
from fedllm.federation import records as keys
from fedllm.federation.checkpoint import Checkpointer, ServerState
from fedllm.federation.protocol import TrainReport
from fedllm.federation.rounds import LoopSettings, ReplyPolicy, RoundReplies, run_rounds
from fedllm.federation.strategy import build_strategy
from fedllm.federation.validation import MechanismCheck
from fedllm.model.adapter_files import save_adapter
from fedllm.model.adapters import load_adapter_state
from fedllm.model.device import usable_cpus
from fedllm.privacy.client_level import ClientLevelAccountant
from fedllm.privacy.ledger import PrivacyLedger
from fedllm.storage import load_key, write_json
from fedllm.tracking.plots import plot_run
from fedllm.tracking.run_log import RunLog
from fedllm.tracking.wandb_sink import WandbSink
from fedllm.training.precision import use_bf16

log = logging.getLogger(__name__)


def build_server_app(cfg: ExperimentConfig, run_dir: Path, resume: bool = False) -> ServerApp:
    """A ServerApp that runs ``cfg`` (or continues it from its checkpoint) into ``run_dir``."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        run_federation(grid, cfg, run_dir, resume=resume)

    return app


class RoundEvaluator:
    """After each round: evaluate the global adapter on the held-out split and log the round."""

    def __init__(self, cfg: ExperimentConfig, ledger: PrivacyLedger, run_log: RunLog, sink: WandbSink | None):
        self.cfg, self.ledger, self.run_log, self.sink = cfg, ledger, run_log, sink
        self.bundle = task.model_bundle(cfg.model, cfg.lora, cfg.seed)
        self.test_set = task.tokenized_test(cfg)
        self.choice_ids = task.choice_ids_for(cfg)
        self.bf16 = use_bf16(cfg.train.precision)

    def __call__(self, server_round: int, arrays: ArrayRecord, replies: RoundReplies | None) -> None:
        started = time.perf_counter()
        load_adapter_state(self.bundle.model, arrays.to_torch_state_dict())
        result = evaluate(self.bundle.model, self.test_set, self.bundle.pad_id, self.choice_ids,
                          self.cfg.train.eval_batch_size, self.bf16)
        eval_seconds = time.perf_counter() - started
        replies = replies or RoundReplies()
        if server_round > 0 and not replies.updates:
            log.error("round %d: no client returned an update (see above); the global adapter is unchanged",
                      server_round)
        client_level = self.ledger.client_level
        record = self.run_log.log_round(
            server_round, eval_loss=result.loss, eval_accuracy=result.accuracy, num_clients=len(replies.updates),
            train_loss=mean_train_loss(replies.reports),
            epsilons=self.ledger.epsilons() if self.cfg.privacy.sample_level else None,
            slowest_client_seconds=max((r.public.train_seconds for r in replies.reports
                                        if r.public.train_seconds is not None), default=None),
            refused=[r.partition_id for r in replies.refusals], failed=replies.failures, rejected=replies.rejected,
            client_level_epsilon=client_level.epsilon() if client_level else None, eval_seconds=eval_seconds,
        )
        if self.sink:
            self.sink.log_round(record)


def mean_train_loss(reports: list[TrainReport]) -> float | None:
    """Mean train loss over the nodes that declared theirs public (None when none did:
    a loss is computed from private records and no DP covers it)."""
    losses = [r.public.train_loss for r in reports if r.public.train_loss is not None]
    return sum(losses) / len(losses) if losses else None


def prepare_run(cfg: ExperimentConfig, run_dir: Path) -> None:
    """Before the first round: save the resolved config, build the model caches once (before
    parallel clients race for them) and log the DP-SGD plan; impossible plans fail here.

    Raises:
        PrivacyPlanError: the target cannot be met.
    """
    from fedllm.planning import build_plan, format_plan

    run_dir.mkdir(parents=True, exist_ok=True)
    write_json(run_dir / "config.json", cfg.to_dict())
    task.model_bundle(cfg.model, cfg.lora, cfg.seed)
    if cfg.privacy.noise == "seeded":
        log.warning(SEEDED_WARNING)
    if cfg.privacy.sample_level:
        plan = format_plan(cfg, build_plan(cfg, accountants=(cfg.privacy.accountant,)))
        log.info("privacy plan (every client in every round):\n%s", plan)


def new_ledger(cfg: ExperimentConfig) -> PrivacyLedger:
    """An empty server ledger for ``cfg`` (with a client-level accountant when that mode runs)."""
    client_level = None
    if cfg.privacy.client_level:
        client_level = ClientLevelAccountant(
            noise_multiplier=cfg.privacy.client_noise_multiplier, clip_norm=cfg.privacy.client_clip_norm,
            delta=cfg.privacy.client_delta, sampled_uniformly=cfg.federation.fraction_train < 1.0)
    return PrivacyLedger(mode=cfg.privacy.mode, accountant=cfg.privacy.accountant, delta=cfg.privacy.delta,
                         target_epsilon=cfg.privacy.target_epsilon if cfg.privacy.sample_level else None,
                         client_level=client_level)


def start_state(cfg: ExperimentConfig, checkpoints: Checkpointer, ledger: PrivacyLedger,
                resume: bool) -> ServerState:
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
    return ServerState(run_id=uuid.uuid4().hex, server_round=-1, arrays=initial, ledger={}, rounds=[],
                       config=cfg.to_dict())


def strategy_for(cfg: ExperimentConfig):
    """The Flower strategy ``cfg`` asks for."""
    fed, privacy = cfg.federation, cfg.privacy
    return build_strategy(aggregation=fed.aggregation, trim_fraction=fed.trim_fraction,
                          fraction_train=fed.fraction_train, num_clients=fed.num_clients,
                          client_level=privacy.client_level, client_clipping=privacy.client_clipping,
                          client_noise_multiplier=privacy.client_noise_multiplier,
                          client_clip_norm=privacy.client_clip_norm, noise=privacy.noise, seed=cfg.seed,
                          node_wait=fed.round_timeout)


def loop_settings(cfg: ExperimentConfig, run_id: str) -> LoopSettings:
    """The round loop's settings and reply policy from ``cfg``."""
    fed, privacy = cfg.federation, cfg.privacy
    client_side = privacy.client_level and privacy.client_clipping == "client"
    return LoopSettings(
        num_rounds=fed.num_rounds, num_clients=fed.num_clients, min_train_clients=fed.min_train_clients,
        timeout=fed.round_timeout,
        train_config=ConfigRecord({keys.TASK_CONFIG: cfg.to_json(), keys.RUN_ID: run_id}),
        policy=ReplyPolicy(num_clients=fed.num_clients, update_norm_ratio=fed.update_norm_ratio,
                           max_update_norm=fed.max_update_norm, require_accounting=privacy.sample_level,
                           uniform_weights=privacy.client_level, client_level=privacy.client_level,
                           client_clip_norm=privacy.client_clip_norm if client_side else None,
                           mechanism=mechanism_check(cfg), node_ids=fed.node_ids))


def mechanism_check(cfg: ExperimentConfig) -> MechanismCheck | None:
    """Under sample-level DP, what a node's reported DP history must match (the run's plan)."""
    if not cfg.privacy.sample_level:
        return None
    return MechanismCheck(cfg)


def run_federation(grid: Grid, cfg: ExperimentConfig, run_dir: Path, resume: bool = False) -> dict:
    """Run (or continue) every round, and write adapter, ledger, metrics and summary.

    Returns:
        The summary (also written to ``summary.json``).
    """
    torch.set_num_threads(usable_cpus())
    run_dir.mkdir(parents=True, exist_ok=True)
    key = load_key(cfg.storage.key_file, cfg.storage.key_env) if cfg.storage.encrypt else None
    checkpoints = Checkpointer(run_dir / "checkpoint", key)
    ledger = new_ledger(cfg)
    state = start_state(cfg, checkpoints, ledger, resume)
    run_log = RunLog(run_dir, cfg.federation.num_rounds, cfg.tracking.progress, previous=state.rounds)
    sink = (WandbSink(project=cfg.tracking.wandb_project, run_dir=run_dir, config=cfg.to_dict())
            if cfg.tracking.wandb else None)
    evaluator = RoundEvaluator(cfg, ledger, run_log, sink)

    def end_round(server_round: int, arrays: ArrayRecord, replies: RoundReplies | None, reason: str | None) -> None:
        evaluator(server_round, arrays, replies)
        # a crash between the evaluation above and this save re-runs the round on resume: nodes
        # replay their updates, but client-level noise is drawn afresh (see docs/threat-model.md)
        state.server_round, state.arrays, state.stop_reason = server_round, arrays.to_torch_state_dict(), reason
        state.ledger, state.rounds = ledger.state_dict(), run_log.rounds
        checkpoints.save(state)

    try:
        if state.server_round < 0:
            end_round(0, ArrayRecord(torch_state_dict=state.arrays), None, None)  # zero-shot
        if state.stop_reason is None and state.server_round < cfg.federation.num_rounds:
            run_rounds(grid, strategy_for(cfg), ledger, loop_settings(cfg, state.run_id),
                       ArrayRecord(torch_state_dict=state.arrays), state.server_round + 1, end_round)
    except BaseException as exc:
        # the run did not finish: say so in summary.json (the checkpoint still resumes it), then re-raise
        run_log.close()
        write_failure(cfg, run_dir, state, ledger, run_log, failure_text(exc))
        raise
    run_log.close()
    summary = write_outputs(cfg, run_dir, evaluator.bundle.model, state, ledger, run_log, key)
    if sink:
        sink.finish(summary)
    return summary


def write_outputs(cfg: ExperimentConfig, run_dir: Path, model, state: ServerState,
                  ledger: PrivacyLedger, run_log: RunLog, key: bytes | None = None) -> dict:
    """Save the final adapter (PEFT format; sealed when encrypting), the privacy ledger and the summary."""
    load_adapter_state(model, state.arrays)
    save_adapter(model, run_dir / "adapter", key)  # with a key, the weights are only ever written sealed
    write_json(run_dir / "privacy_ledger.json", ledger.to_report())
    summary = run_summary(cfg, state, ledger, run_log)
    write_json(run_dir / "summary.json", summary)
    plot_run(run_dir, run_log.rounds, summary["target_epsilon"])
    return summary


def write_failure(cfg: ExperimentConfig, run_dir: Path, state: ServerState, ledger: PrivacyLedger,
                  run_log: RunLog, failure: str) -> dict | None:
    """``summary.json`` (``status: failed``) and the privacy ledger of a run the round loop did
    not finish; no adapter. Never raises: the caller re-raises the failure itself."""
    try:
        write_json(run_dir / "privacy_ledger.json", ledger.to_report())
        summary = run_summary(cfg, state, ledger, run_log, failure=failure)
        write_json(run_dir / "summary.json", summary)
        return summary
    except Exception:  # noqa: BLE001 - the original failure is what the caller must see
        log.exception("could not write summary.json for the failed run")
        return None


def failure_text(exc: BaseException) -> str:
    """One line saying why a run failed: a fedllm error's own message, else the exception's type and text."""
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted (KeyboardInterrupt)"
    text = " ".join(str(exc).split())
    return text if isinstance(exc, FedLLMError) and text else f"{type(exc).__name__}: {text}".rstrip(": ")


def run_outcome(rounds: list[dict], stop_reason: str | None, failure: str | None = None) -> tuple[str, str | None]:
    """The run's ``status`` and, when it failed, why.

    ``completed``: every planned round ran; ``stopped``: the privacy stop rule ended it early
    (``stop_reason``); ``failed``: ``failure`` (the round loop or the engine broke), or rounds
    ran and not one of them aggregated a client update (every client failed, refused or was
    rejected), so the adapter is the zero-shot one and no result exists.
    """
    if failure:
        return "failed", failure
    trained = [r for r in rounds[1:] if r.get("num_clients")]
    if len(rounds) > 1 and not trained:
        return "failed", no_update_failure(rounds[1:], stop_reason)
    return ("stopped", None) if stop_reason else ("completed", None)


def no_update_failure(rounds: list[dict], stop_reason: str | None) -> str:
    """Why no round produced an update, from the rounds' failures, refusals and rejections."""
    failed = [f for r in rounds for f in r.get("failed", [])]
    refused = sum(len(r.get("refused", [])) for r in rounds)
    rejected = [x for r in rounds for x in r.get("rejections", [])]
    counts = []
    if failed:
        counts.append(f"{len(failed)} failed (e.g. {_clip(failed[0])})")
    if refused:
        counts.append(f"{refused} refused (privacy caps or node policy)")
    if rejected:
        counts.append(f"{len(rejected)} rejected (e.g. {_clip(rejected[0])})")
    if not (failed or refused or rejected):
        counts.append("no client was sampled or none replied")
    text = f"no client update in any of the {len(rounds)} round(s) run: " + "; ".join(counts)
    return text + (f"; then stopped: {stop_reason}" if stop_reason else "")


def _clip(text: str, limit: int = 200) -> str:
    """``node N: ...`` with the end of a long reason kept (an error's message is at the end of its traceback)."""
    who, sep, reason = text.partition(": ")
    if sep and "\\n" in reason:  # an escaped remote traceback: its last line says what happened
        reason = [line for line in reason.split("\\n") if line.strip()][-1].strip() if reason.strip("\\n ") else reason
        text = f"{who}: {reason}"
    if len(text) <= limit:
        return text
    if sep and len(who) < limit // 2:
        return f"{who}{sep}...{reason[-(limit - len(who) - 5):]}"
    return "..." + text[-limit:]


def run_summary(cfg: ExperimentConfig, state: ServerState, ledger: PrivacyLedger, run_log: RunLog,
                failure: str | None = None) -> dict:
    """The ``summary.json`` content: the outcome first, then what the run achieved and spent."""
    rounds = run_log.rounds
    status, reason = run_outcome(rounds, state.stop_reason, failure)
    summary = {
        "status": status,
        **({"failure": reason} if reason else {}),
        "run_id": state.run_id,
        "rounds_completed": max((r["round"] for r in rounds), default=0),
        "rounds_planned": cfg.federation.num_rounds,
        "stop_reason": state.stop_reason,
        "rounds_without_updates": [r["round"] for r in rounds[1:] if r["num_clients"] == 0],
        "num_clients": cfg.federation.num_clients,
        "privacy_mode": cfg.privacy.mode,
        **privacy_summary(cfg, ledger),
        "zero_shot_accuracy": rounds[0]["eval_accuracy"] if rounds else None,
        "final_accuracy": rounds[-1]["eval_accuracy"] if rounds else None,
        "zero_shot_eval_loss": rounds[0]["eval_loss"] if rounds else None,
        "final_eval_loss": rounds[-1]["eval_loss"] if rounds else None,
        "test_examples": cfg.data.test_size,
        "federation_seconds": round(run_log.wall_seconds(), 1),
    }
    return summary


SEEDED_WARNING = ("privacy.noise=seeded: DP noise and sampling were derived from the run's seed; the epsilons "
                  "below do not hold against anyone who knows the seed (research simulations only)")


def privacy_summary(cfg: ExperimentConfig, ledger: PrivacyLedger) -> dict:
    """Each guarantee that ran: what it protects, against whom, its epsilon and delta."""
    sample = cfg.privacy.sample_level
    seeded = cfg.privacy.noise == "seeded"
    guarantees: list[dict] = []
    summary: dict = {
        "target_epsilon": cfg.privacy.target_epsilon if sample else None,
        "delta": cfg.privacy.delta if sample else None,
        "accountant": cfg.privacy.accountant if sample else None,
        "noise": cfg.privacy.noise,
        "final_max_epsilon": ledger.max_epsilon() if sample else None,
        "client_epsilons": {str(c): e for c, e in ledger.epsilons().items()} if sample else None,
        "guarantees": guarantees,
    }
    if seeded:
        summary["warning"] = SEEDED_WARNING
    if sample:
        guarantees.append({
            "level": "sample", "protects": "any single training record of a node",
            "against": ("no one who knows the run's seed" if seeded else
                        "the coordinator, the other nodes and every reader of the outputs (see docs/threat-model.md)"),
            "epsilon": ledger.max_epsilon(), "delta": cfg.privacy.delta,
            "accounts": "every use of the node's records recorded in its state directory (its lifetime ledger)"})
    if ledger.client_level is not None:
        accountant = ledger.client_level
        summary["client_level_epsilon"] = accountant.epsilon()
        guarantees.append({
            "level": "client", "protects": "a client's whole dataset (all its records together)",
            "against": ("the other nodes and every reader of the outputs, not the coordinator, who adds the noise"
                        if cfg.privacy.client_clipping == "server" else
                        "the other nodes and every reader of the outputs; the coordinator adds the noise and sees "
                        "the clipped updates"),
            "epsilon": accountant.epsilon(), "delta": accountant.delta, "adjacency": accountant.adjacency,
            "noise_multiplier": accountant.noise_multiplier, "clip_norm": accountant.clip_norm})
    return summary
