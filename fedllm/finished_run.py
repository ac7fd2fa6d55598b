"""A finished run, ready to use: its saved config, and the base model with its final adapter.

``fedllm evaluate`` and ``fedllm generate`` start here. Nothing is retrained or re-planned: the
base model is rebuilt from the run's ``config.json`` and the adapter weights come from
``adapter/``, checked against its manifest (and decrypted with the storage key when sealed).

A run folder is data, never code (issue 25, item 3): whoever can write it chooses its
``config.json``. A built-in base (the embedded SmolLM2 or the tiny test model) is rebuilt by
fedllm itself and needs nothing from the user. A base loaded from a path or hub id named in the
folder is loaded only when the command line names that same base (:class:`LoadConsent`), and a
base's own Python (``trust_remote_code``) runs only with its own, separate flag: otherwise a
folder pointing at a model folder with an ``auto_map`` would run that folder's code.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from peft import set_peft_model_state_dict

from fedllm import task
from fedllm.config import ExperimentConfig, ModelConfig
from fedllm.data.formatting import TokenizedDataset, tokenize_records
from fedllm.data.sources import load_records
from fedllm.errors import FedLLMError, IntegrityError
from fedllm.evaluation.metrics import EvalResult, evaluate
from fedllm.model.adapter_files import read_adapter_weights
from fedllm.tracking.run_manifest import MANIFEST_FILE, verify_run_manifest
from fedllm.training.precision import use_bf16

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
ADAPTER_DIR = "adapter"


@dataclass(frozen=True)
class LoadConsent:
    """What the user allowed on the command line: the only source of a base model path and of
    permission to run a model's own code (a run folder's config cannot grant either)."""

    base_model: str | None = None  # --base-model: must equal the run's model.name_or_path
    trust_remote_code: bool = False  # --trust-remote-code


def consented_model(model: ModelConfig, consent: LoadConsent, config_file: Path) -> ModelConfig:
    """The run's model config, allowed to load only what ``consent`` names.

    Args:
        model: the model section of the run folder's ``config.json`` (untrusted).
        consent: the command line's flags.
        config_file: the run's ``config.json``, named in errors.

    Returns:
        ``model``; a built-in base with ``trust_remote_code`` off (fedllm builds it, no code of its own).

    Raises:
        FedLLMError: the run names a base path or hub id the command line does not, or asks for
            remote code without ``--trust-remote-code``, or ``--base-model`` names another base.
    """
    if model.kind != "pretrained":
        if consent.base_model is not None:
            raise FedLLMError(
                f"--base-model {consent.base_model!r}: {config_file} uses fedllm's built-in {model.kind} model, "
                "which needs no base path; drop --base-model"
            )
        return dataclasses.replace(model, trust_remote_code=False)
    named = str(model.name_or_path)
    if consent.base_model != named:
        given = f"--base-model {consent.base_model!r} names another one" if consent.base_model else "nothing names it"
        raise FedLLMError(
            f"{config_file} loads the base model {named!r} (a folder or hub id, whose files transformers reads), "
            f"and {given} on the command line. A run folder is data: check that base, then pass "
            f"--base-model {named!r} to load it"
        )
    if model.trust_remote_code and not consent.trust_remote_code:
        raise FedLLMError(
            f"{config_file} asks to run the Python code of the base model {named!r} (model.trust_remote_code=true); "
            "fedllm never runs a model's code because a run folder says so. Read that code, then add "
            "--trust-remote-code to allow it"
        )
    return model


@dataclass
class FinishedRun:
    """A run folder's config and its model, the final adapter loaded."""

    path: Path
    config: ExperimentConfig
    bundle: task.ModelBundle


def load_finished_run(run_dir: Path, key: bytes | None, consent: LoadConsent | None = None) -> FinishedRun:
    """The run in ``run_dir`` with its final adapter loaded into the (cached) PEFT model.

    Args:
        run_dir: the run folder.
        key: the storage key (sealed adapters), or None.
        consent: the base model and remote code the command line allows (default: none, so only
            a built-in base loads).

    Raises:
        FedLLMError: the folder holds no run config or no final adapter, or its base model is not
            one ``consent`` allows (see :func:`consented_model`).
        IntegrityError: the adapter fails its manifest, or does not fit the run's model.
    """
    run_dir = Path(run_dir)
    config_file, adapter = run_dir / CONFIG_FILE, run_dir / ADAPTER_DIR
    if not config_file.is_file() or not adapter.is_dir():
        raise FedLLMError(
            f"{run_dir} is not a finished run: it needs {CONFIG_FILE} and {ADAPTER_DIR}/ "
            "(a failed run saves no adapter)"
        )
    _check_manifest(run_dir, key)
    cfg = ExperimentConfig.from_json(config_file.read_text(encoding="utf-8"))
    # checked before anything is loaded: the tokenizer's load reads the base folder too
    cfg = dataclasses.replace(cfg, model=consented_model(cfg.model, consent or LoadConsent(), config_file))
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


def _check_manifest(run_dir: Path, key: bytes | None) -> None:
    """The run's config (and summary, metrics, ledger) as its manifest recorded them; a folder
    without one (written before issue 25) is used with a warning.

    Raises:
        IntegrityError: the manifest fails, or a file it covers was altered.
    """
    if (run_dir / MANIFEST_FILE).exists():
        verify_run_manifest(run_dir, key)
    else:
        log.warning("%s: no %s: its config.json is not verified (run `fedllm verify`)", run_dir, MANIFEST_FILE)


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
