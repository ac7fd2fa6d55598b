"""What a run leaves behind: the final adapter, the privacy ledger, ``summary.json``, the plots and
the run folder's ``manifest.json`` (written last: it vouches for the others), and the rules that
decide the run's status (completed, stopped or failed, and why)."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from fedllm.config import ExperimentConfig
from fedllm.errors import FedLLMError
from fedllm.federation.checkpoint import ServerState
from fedllm.model.adapter_files import save_adapter
from fedllm.model.adapters import load_adapter_state
from fedllm.model.base import base_reference
from fedllm.model.model_card import model_card
from fedllm.privacy.ledger import PrivacyLedger
from fedllm.storage import load_key, write_json
from fedllm.tracking.plots import plot_run
from fedllm.tracking.run_files import Guarantee, RoundRecord, RunSummary, write_summary
from fedllm.tracking.run_log import RunLog
from fedllm.tracking.run_manifest import write_run_manifest

log = logging.getLogger(__name__)

LEDGER_FILE = "privacy_ledger.json"
SEEDED_WARNING = (
    "privacy.noise=seeded: DP noise and sampling were derived from the run's seed; the epsilons "
    "below do not hold against anyone who knows the seed (research simulations only)"
)


def write_outputs(
    cfg: ExperimentConfig,
    run_dir: Path,
    model,
    state: ServerState,
    ledger: PrivacyLedger,
    run_log: RunLog,
    key: bytes | None = None,
    *,
    started: float,
    preflight: dict[str, Any] | None = None,
) -> RunSummary:
    """Save the final adapter (PEFT format; sealed when encrypting), the privacy ledger, the
    summary and the plots of a run whose rounds all ran.

    Args:
        started: ``time.perf_counter()`` when the run began in this process (its wall time).
        preflight: the pre-flight's answers, when one ran (the summary's ``preflight`` entry).
    """
    load_adapter_state(model, state.arrays)
    summary = run_summary(cfg, state, ledger, run_log, started=started, preflight=preflight)
    base = base_reference(cfg.model, cfg.seed)  # portable: no cache path of this machine
    # with a key, the weights are only ever written sealed
    save_adapter(model, run_dir / "adapter", key, base_name=base, card=model_card(cfg, summary, base))
    write_json(run_dir / LEDGER_FILE, ledger.to_report())
    write_summary(run_dir, summary)
    plot_run(run_dir, run_log.rounds, summary.target_epsilon)
    write_run_manifest(run_dir, key)
    return summary


def run_storage_key(cfg: ExperimentConfig) -> bytes | None:
    """The storage key ``cfg`` encrypts and authenticates the run's files with (None: checksums only).

    Raises:
        ConfigError: ``storage.encrypt`` is on and no valid key is where it says.
    """
    return load_key(cfg.storage.key_file, cfg.storage.key_env) if cfg.storage.encrypt else None


def write_failure(
    cfg: ExperimentConfig,
    run_dir: Path,
    state: ServerState,
    ledger: PrivacyLedger,
    run_log: RunLog,
    failure: str,
    *,
    started: float,
    preflight: dict[str, Any] | None = None,
) -> RunSummary | None:
    """``summary.json`` (``status: failed``) and the privacy ledger of a run the round loop did
    not finish; no adapter. Never raises: the caller re-raises the failure itself."""
    try:
        write_json(run_dir / LEDGER_FILE, ledger.to_report())
        summary = run_summary(cfg, state, ledger, run_log, started=started, failure=failure, preflight=preflight)
        write_summary(run_dir, summary)
        write_run_manifest(run_dir, run_storage_key(cfg))
        return summary
    except Exception:  # noqa: BLE001 - the original failure is what the caller must see
        log.exception("could not write summary.json for the failed run")
        return None


def run_summary(
    cfg: ExperimentConfig,
    state: ServerState,
    ledger: PrivacyLedger,
    run_log: RunLog,
    *,
    started: float,
    failure: str | None = None,
    preflight: dict[str, Any] | None = None,
) -> RunSummary:
    """The run's summary: the outcome first, then what the run achieved, spent and took."""
    rounds = run_log.rounds
    status, reason = run_outcome(rounds, state.stop_reason, failure)
    sample = cfg.privacy.sample_level
    client_level = ledger.client_level
    empty = RoundRecord(round=0)  # no round ran: every result is None
    first, last = (rounds[0], rounds[-1]) if rounds else (empty, empty)
    return RunSummary(
        status=status,
        failure=reason,
        run_id=state.run_id,
        rounds_completed=max((r.round for r in rounds), default=0),
        rounds_planned=cfg.federation.num_rounds,
        stop_reason=state.stop_reason,
        rounds_without_updates=[r.round for r in rounds[1:] if r.num_clients == 0],
        num_clients=cfg.federation.num_clients,
        privacy_mode=cfg.privacy.mode,
        target_epsilon=cfg.privacy.target_epsilon if sample else None,
        delta=cfg.privacy.delta if sample else None,
        accountant=cfg.privacy.accountant if sample else None,
        noise=cfg.privacy.noise,
        final_max_epsilon=ledger.max_epsilon() if sample else None,
        client_epsilons={str(c): e for c, e in ledger.epsilons().items()} if sample else None,
        guarantees=guarantees(cfg, ledger),
        warning=SEEDED_WARNING if cfg.privacy.noise == "seeded" else None,
        client_level_epsilon=client_level.epsilon() if client_level is not None else None,
        zero_shot_accuracy=first.eval_accuracy,
        final_accuracy=last.eval_accuracy,
        zero_shot_eval_loss=first.eval_loss,
        final_eval_loss=last.eval_loss,
        zero_shot_eval_perplexity=first.eval_perplexity,
        final_eval_perplexity=last.eval_perplexity,
        test_examples=cfg.data.test_size,
        federation_seconds=round(run_log.wall_seconds(), 1),
        wall_seconds=round(time.perf_counter() - started, 1),
        preflight=preflight,
    )


def guarantees(cfg: ExperimentConfig, ledger: PrivacyLedger) -> list[Guarantee]:
    """Each guarantee that ran: what it protects, against whom, its epsilon and delta."""
    found = []
    if cfg.privacy.sample_level:
        found.append(
            Guarantee(
                level="sample",
                protects="any single training record of a node",
                against=(
                    "no one who knows the run's seed"
                    if cfg.privacy.noise == "seeded"
                    else "the coordinator, the other nodes and every reader of the outputs (see docs/threat-model.md)"
                ),
                epsilon=ledger.max_epsilon(),
                delta=cfg.privacy.delta,
                accounts="every use of the node's records recorded in its state directory (its lifetime ledger)",
            )
        )
    accountant = ledger.client_level
    if accountant is not None:
        found.append(
            Guarantee(
                level="client",
                protects="a client's whole dataset (all its records together)",
                against=(
                    "the other nodes and every reader of the outputs, not the coordinator, who adds the noise"
                    if cfg.privacy.client_clipping == "server"
                    else "the other nodes and every reader of the outputs; the coordinator adds the noise and sees "
                    "the clipped updates"
                ),
                epsilon=accountant.epsilon(),
                delta=accountant.delta,
                adjacency=accountant.adjacency,
                noise_multiplier=accountant.noise_multiplier,
                clip_norm=accountant.clip_norm,
            )
        )
    return found


def failure_text(exc: BaseException) -> str:
    """One line saying why a run failed: a fedllm error's own message, else the exception's type and text."""
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted (KeyboardInterrupt)"
    text = " ".join(str(exc).split())
    return text if isinstance(exc, FedLLMError) and text else f"{type(exc).__name__}: {text}".rstrip(": ")


def run_outcome(
    rounds: list[RoundRecord], stop_reason: str | None, failure: str | None = None
) -> tuple[str, str | None]:
    """The run's ``status`` and, when it failed, why.

    ``completed``: every planned round ran; ``stopped``: the privacy stop rule ended it early
    (``stop_reason``); ``failed``: ``failure`` (the round loop or the engine broke), or rounds
    ran and not one of them aggregated a client update (every client failed, refused or was
    rejected), so the adapter is the zero-shot one and no result exists.
    """
    if failure:
        return "failed", failure
    trained = [r for r in rounds[1:] if r.num_clients]
    if len(rounds) > 1 and not trained:
        return "failed", no_update_failure(rounds[1:], stop_reason)
    return ("stopped", None) if stop_reason else ("completed", None)


def no_update_failure(rounds: list[RoundRecord], stop_reason: str | None) -> str:
    """Why no round produced an update, from the rounds' failures, refusals and rejections."""
    failed = [f for r in rounds for f in r.failed]
    refused = sum(len(r.refused) for r in rounds)
    rejected = [x for r in rounds for x in r.rejections]
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
        return f"{who}{sep}...{reason[-(limit - len(who) - 5) :]}"
    return "..." + text[-limit:]
