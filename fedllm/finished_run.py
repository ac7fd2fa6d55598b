"""A finished run, ready to use: its saved config, and the base model with its final adapter.

``fedllm evaluate`` and ``fedllm generate`` start here. Nothing is retrained or re-planned: the
base model is rebuilt from the run's ``config.json`` and the adapter weights come from
``adapter/``, checked against its manifest (and decrypted with the storage key when sealed).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from peft import set_peft_model_state_dict

from fedllm import task
from fedllm.config import ExperimentConfig
from fedllm.data.formatting import TokenizedDataset, tokenize_records
from fedllm.data.sources import load_records
from fedllm.errors import FedLLMError, IntegrityError
from fedllm.evaluation.metrics import EvalResult, evaluate
from fedllm.model.adapter_files import read_adapter_weights
from fedllm.training.precision import use_bf16

CONFIG_FILE = "config.json"
ADAPTER_DIR = "adapter"


@dataclass
class FinishedRun:
    """A run folder's config and its model, the final adapter loaded."""

    path: Path
    config: ExperimentConfig
    bundle: task.ModelBundle


def load_finished_run(run_dir: Path, key: bytes | None) -> FinishedRun:
    """The run in ``run_dir`` with its final adapter loaded into the (cached) PEFT model.

    Raises:
        FedLLMError: the folder holds no run config or no final adapter.
        IntegrityError: the adapter fails its manifest, or does not fit the run's model.
    """
    run_dir = Path(run_dir)
    config_file, adapter = run_dir / CONFIG_FILE, run_dir / ADAPTER_DIR
    if not config_file.is_file() or not adapter.is_dir():
        raise FedLLMError(
            f"{run_dir} is not a finished run: it needs {CONFIG_FILE} and {ADAPTER_DIR}/ "
            "(a failed run saves no adapter)"
        )
    cfg = ExperimentConfig.from_json(config_file.read_text(encoding="utf-8"))
    bundle = task.model_bundle(cfg.model, cfg.lora, cfg.seed)
    weights = read_adapter_weights(adapter, key)
    # PEFT reports every base weight as "missing" (they are not in an adapter file); only an
    # adapter key that is absent or unexpected means the file does not belong to this model
    result: Any = set_peft_model_state_dict(bundle.model, weights)  # torch's _IncompatibleKeys (PEFT leaves it untyped)
    missing, unexpected = [k for k in result.missing_keys if "lora_" in k], result.unexpected_keys
    if missing or unexpected:
        raise IntegrityError(
            f"{adapter}: does not fit the run's model (missing {missing[:3]}, unexpected {list(unexpected)[:3]})"
        )
    return FinishedRun(path=run_dir, config=cfg, bundle=bundle)


def records_for(run: FinishedRun, data_file: Path | None) -> TokenizedDataset:
    """The run's own held-out split, or the records of ``data_file`` in the run's prompt format
    (read with the run's field names and limits; a malformed line is named)."""
    cfg = run.config
    if data_file is None:
        return task.tokenized_test(cfg)
    records = load_records(
        data_file, "auto", cfg.data.prompt_field, cfg.data.response_field, max_record_chars=cfg.data.max_record_chars
    )
    return tokenize_records(records, run.bundle.tokenizer, task.prompt_format(cfg.data))


def evaluate_run(run: FinishedRun, dataset: TokenizedDataset) -> EvalResult:
    """The final adapter's held-out loss (and accuracy for fixed answers) on ``dataset``,
    computed exactly as the server evaluated each round."""
    cfg = run.config
    return evaluate(
        run.bundle.model,
        dataset,
        run.bundle.pad_id,
        task.choice_ids_for(cfg),
        cfg.train.eval_batch_size,
        use_bf16(cfg.train.precision),
    )
