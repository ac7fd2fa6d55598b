"""The server's evaluation after each round: the global adapter on the held-out split, and the
round's :class:`~fedllm.tracking.run_files.RoundRecord` in ``metrics.jsonl`` (and wandb)."""

from __future__ import annotations

import logging
import time

from flwr.app import ArrayRecord

from fedllm import task
from fedllm.config import ExperimentConfig
from fedllm.evaluation.metrics import EvalResult, evaluate
from fedllm.federation.rounds import RoundReplies
from fedllm.node.release import TrainReport
from fedllm.privacy.ledger import PrivacyLedger
from fedllm.tracking.run_files import RoundRecord, finite_or_none
from fedllm.tracking.run_log import RunLog
from fedllm.tracking.wandb_sink import WandbSink
from fedllm.training.precision import use_bf16

log = logging.getLogger(__name__)


class RoundEvaluator:
    """After each round: evaluate the global adapter on the held-out split and log the round."""

    def __init__(self, cfg: ExperimentConfig, ledger: PrivacyLedger, run_log: RunLog, sink: WandbSink | None):
        self.cfg, self.ledger, self.run_log, self.sink = cfg, ledger, run_log, sink
        self.bundle = task.model_bundle(cfg.model, cfg.lora, cfg.seed)
        self.test_set = task.tokenized_test(cfg)
        self.choice_ids = task.choice_ids_for(cfg)
        self.bf16 = use_bf16(cfg.train.precision)

    def __call__(self, server_round: int, arrays: ArrayRecord, replies: RoundReplies) -> RoundRecord:
        """Evaluate ``arrays`` after ``server_round`` (0: before any training) and log the round.

        Returns:
            The round's record, as written to ``metrics.jsonl``.
        """
        started = time.perf_counter()
        with self.bundle.adapter(arrays.to_torch_state_dict()) as model:
            result = evaluate(
                model, self.test_set, self.bundle.pad_id, self.choice_ids, self.cfg.train.eval_batch_size, self.bf16
            )
        eval_seconds = time.perf_counter() - started
        if server_round > 0 and not replies.updates:
            log.error(
                "round %d: no client returned an update (see above); the global adapter is unchanged", server_round
            )
        record = self.run_log.log_round(
            round_record(
                server_round,
                result,
                replies,
                self.ledger,
                sample_level=self.cfg.privacy.sample_level,
                eval_seconds=eval_seconds,
            )
        )
        if self.sink:
            self.sink.log_round(record)
        return record


def round_record(
    server_round: int,
    result: EvalResult,
    replies: RoundReplies,
    ledger: PrivacyLedger,
    *,
    sample_level: bool,
    eval_seconds: float | None = None,
) -> RoundRecord:
    """The record of one round: its held-out evaluation, its replies and the privacy spent so far.

    Args:
        server_round: the round (0: the zero-shot evaluation).
        result: the global adapter's held-out evaluation after the round.
        replies: the round's sorted replies (empty for round 0).
        ledger: the server ledger, with the round recorded.
        sample_level: whether sample-level DP runs (each client's epsilon is then reported).
        eval_seconds: how long the evaluation took.

    Returns:
        The record, not yet stamped with the run's wall time (:meth:`RunLog.log_round` does that).
    """
    epsilons = ledger.epsilons() if sample_level else None
    client_level = ledger.client_level
    return RoundRecord(
        round=server_round,
        eval_loss=finite_or_none(result.loss),
        eval_accuracy=result.accuracy,
        # a task with fixed answers is measured by accuracy; perplexity is for free-form answers
        eval_perplexity=finite_or_none(result.perplexity) if result.accuracy is None else None,
        train_loss=finite_or_none(mean_train_loss(replies.reports)),
        epsilon={str(k): v for k, v in sorted(epsilons.items())} if epsilons is not None else None,
        max_epsilon=max(epsilons.values(), default=0.0) if epsilons is not None else None,
        num_clients=len(replies.updates),
        refused=sorted(r.partition_id for r in replies.refusals),
        failed=list(replies.failures),
        rejected_updates=len(replies.rejected),
        rejections=list(replies.rejected),
        client_level_epsilon=client_level.epsilon() if client_level else None,
        slowest_client_seconds=finite_or_none(
            max((r.public.train_seconds for r in replies.reports if r.public.train_seconds is not None), default=None)
        ),
        eval_seconds=finite_or_none(eval_seconds),
    )


def mean_train_loss(reports: list[TrainReport]) -> float | None:
    """Mean train loss over the nodes that declared theirs public (None when none did:
    a loss is computed from private records and no DP covers it)."""
    losses = [r.public.train_loss for r in reports if r.public.train_loss is not None]
    return sum(losses) / len(losses) if losses else None
