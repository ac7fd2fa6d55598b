"""The Flower ServerApp: FedAvg of adapters, held-out evaluation each round, run outputs."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

from fedllm import task
from fedllm.config import ExperimentConfig
from fedllm.evaluation.metrics import evaluate
from fedllm.federation import records as keys
from fedllm.federation.strategy import AdapterFedAvg, mean_train_loss
from fedllm.model.adapters import load_adapter_state
from fedllm.privacy.ledger import PrivacyLedger
from fedllm.tracking.plots import plot_run
from fedllm.tracking.run_log import RunLog, write_json
from fedllm.tracking.wandb_sink import WandbSink
from fedllm.training.precision import use_bf16

log = logging.getLogger(__name__)


def build_server_app(cfg: ExperimentConfig, run_dir: Path) -> ServerApp:
    """A ServerApp that runs ``cfg`` and writes its outputs into ``run_dir``."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        run_federation(grid, cfg, run_dir)

    return app


class RoundEvaluator:
    """Flower's ``evaluate_fn``: after each round, evaluate the global adapter on the held-out
    split, update the privacy ledger from the clients' reports, and log the round."""

    def __init__(self, cfg: ExperimentConfig, strategy: AdapterFedAvg, ledger: PrivacyLedger,
                 run_log: RunLog, sink: WandbSink | None):
        self.cfg, self.strategy, self.ledger, self.run_log, self.sink = cfg, strategy, ledger, run_log, sink
        self.bundle = task.model_bundle(cfg.model, cfg.lora, cfg.seed)
        self.test_set = task.tokenized_test(cfg)
        self.choice_ids = task.choice_ids_for(cfg)
        self.bf16 = use_bf16(cfg.train.precision)

    def __call__(self, server_round: int, arrays: ArrayRecord) -> MetricRecord:
        load_adapter_state(self.bundle.model, arrays.to_torch_state_dict())
        result = evaluate(self.bundle.model, self.test_set, self.bundle.pad_id, self.choice_ids,
                          self.cfg.train.eval_batch_size, self.bf16)
        reports = self.strategy.reports.get(server_round, [])
        if server_round > 0 and not reports:
            log.error("round %d: no client returned an update (their errors are logged above); "
                      "the global adapter is unchanged", server_round)
        if self.cfg.privacy.enabled:
            for report in reports:
                self.ledger.record(report.partition_id, report.history, server_round)
        record = self.run_log.log_round(
            server_round, eval_loss=result.loss, eval_accuracy=result.accuracy, num_clients=len(reports),
            train_loss=mean_train_loss(reports),
            epsilons=self.ledger.epsilons() if self.cfg.privacy.enabled else None,
            slowest_client_seconds=max((r.train_seconds for r in reports), default=None),
        )
        if self.sink:
            self.sink.log_round(record)
        metrics = {"eval-loss": result.loss}
        if result.accuracy is not None:
            metrics["eval-accuracy"] = result.accuracy
        return MetricRecord(metrics)


def run_federation(grid: Grid, cfg: ExperimentConfig, run_dir: Path) -> dict:
    """Run every round, evaluate after each, and write adapter, ledger, metrics and summary.

    Returns:
        The summary (also written to ``summary.json``).
    """
    torch.set_num_threads(os.cpu_count() or 1)
    run_dir.mkdir(parents=True, exist_ok=True)
    initial = task.model_bundle(cfg.model, cfg.lora, cfg.seed).initial_adapter
    strategy = AdapterFedAvg(
        fraction_train=cfg.federation.fraction_train,
        min_train_nodes=max(1, round(cfg.federation.fraction_train * cfg.federation.num_clients)),
        min_available_nodes=cfg.federation.num_clients,
    )
    ledger = PrivacyLedger(level=cfg.privacy.mode, accountant=cfg.privacy.accountant, delta=cfg.privacy.delta,
                           target_epsilon=cfg.privacy.target_epsilon if cfg.privacy.enabled else None)
    run_log = RunLog(run_dir, cfg.federation.num_rounds, cfg.tracking.progress)
    sink = (WandbSink(project=cfg.tracking.wandb_project, run_dir=run_dir, config=cfg.to_dict())
            if cfg.tracking.wandb else None)
    evaluator = RoundEvaluator(cfg, strategy, ledger, run_log, sink)
    try:
        result = strategy.start(
            grid=grid, initial_arrays=ArrayRecord(torch_state_dict=initial),
            num_rounds=cfg.federation.num_rounds,
            train_config=ConfigRecord({keys.TASK_CONFIG: cfg.to_json()}), evaluate_fn=evaluator,
        )
    finally:
        run_log.close()
    final = result.arrays.to_torch_state_dict() if result.arrays else initial
    summary = write_outputs(cfg, run_dir, evaluator.bundle.model, final, ledger, run_log)
    if sink:
        sink.finish(summary)
    return summary


def write_outputs(cfg: ExperimentConfig, run_dir: Path, model, final_state: dict,
                  ledger: PrivacyLedger, run_log: RunLog) -> dict:
    """Save the final adapter (PEFT format), the privacy ledger and the summary."""
    load_adapter_state(model, final_state)
    model.save_pretrained(str(run_dir / "adapter"))
    write_json(run_dir / "privacy_ledger.json", ledger.to_report())
    rounds = run_log.rounds
    summary = {
        "rounds_completed": max((r["round"] for r in rounds), default=0),
        "rounds_without_updates": [r["round"] for r in rounds[1:] if r["num_clients"] == 0],
        "num_clients": cfg.federation.num_clients,
        "privacy_mode": cfg.privacy.mode,
        "target_epsilon": cfg.privacy.target_epsilon if cfg.privacy.enabled else None,
        "delta": cfg.privacy.delta if cfg.privacy.enabled else None,
        "accountant": cfg.privacy.accountant if cfg.privacy.enabled else None,
        "final_max_epsilon": ledger.max_epsilon() if cfg.privacy.enabled else None,
        "zero_shot_accuracy": rounds[0]["eval_accuracy"] if rounds else None,
        "final_accuracy": rounds[-1]["eval_accuracy"] if rounds else None,
        "zero_shot_eval_loss": rounds[0]["eval_loss"] if rounds else None,
        "final_eval_loss": rounds[-1]["eval_loss"] if rounds else None,
        "test_examples": cfg.data.test_size,
        "federation_seconds": round(run_log.wall_seconds(), 1),
    }
    write_json(run_dir / "summary.json", summary)
    plot_run(run_dir, rounds, summary["target_epsilon"])
    return summary
