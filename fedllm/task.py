"""Build what a client or the server needs from a validated config, once per process.

Caches are keyed by the (frozen, hashable) config sections they depend on, so a later
call with other settings builds anew instead of silently reusing an old split or model.
A simulation actor serves many clients in turn; it keeps one base model for all of them
and each round overwrites the adapter weights from the global state.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import lru_cache

import torch
from peft import PeftModel

from fedllm.config import DataConfig, ExperimentConfig, LoraSettings, ModelConfig
from fedllm.data.formatting import PromptFormat, TokenizedDataset, choice_token_ids, tokenize_records
from fedllm.data.partition import Split, split_records
from fedllm.data.sources import DataFormat, Record, load_records, load_rotten_tomatoes, load_rt_reviews
from fedllm.errors import ConfigError, DataError
from fedllm.model.adapters import adapter_state, load_adapter_state
from fedllm.model.base import load_model, load_tokenizer
from fedllm.model.lora import apply_lora
from fedllm.privacy.record_keys import ShardContent

log = logging.getLogger(__name__)


@dataclass
class ModelBundle:
    """The PEFT model, its tokenizer, and the adapter weights it was created with.

    One bundle serves the whole process (:func:`model_bundle` caches it): the server's
    evaluation, and each client an actor or the in-process engine runs in turn. Its live
    adapter is therefore whatever its last user left in it; use the model through
    :meth:`adapter`, which loads the adapter the caller means. ``initial_adapter`` is what
    every run starts from.
    """

    model: PeftModel
    tokenizer: object
    pad_id: int
    initial_adapter: dict
    _lock: threading.RLock = field(default_factory=threading.RLock, repr=False, compare=False)

    @contextmanager
    def adapter(self, state: dict[str, torch.Tensor]) -> Iterator[PeftModel]:
        """The shared model with ``state`` loaded as its adapter, for the block's duration; another
        thread of this process that wants the model waits until the block ends.

        Raises:
            ModelError: ``state`` does not fit the model's adapter (names, shapes).
        """
        with self._lock:
            load_adapter_state(self.model, state)
            yield self.model


@lru_cache(maxsize=1)
def model_bundle(model_cfg: ModelConfig, lora_cfg: LoraSettings, seed: int) -> ModelBundle:
    """Base model + LoRA adapters (cached: loading the base model costs seconds)."""
    tokenizer = load_tokenizer(model_cfg)
    base = load_model(model_cfg, vocab_size=len(tokenizer), seed=seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)  # the same initial adapter in every process and every run of a seed
        model = apply_lora(base, lora_cfg)
    return ModelBundle(
        model=model, tokenizer=tokenizer, pad_id=int(tokenizer.pad_token_id), initial_adapter=adapter_state(model)
    )


def load_all_records(data_cfg: DataConfig) -> list[Record]:
    """Every record of the configured dataset, optionally capped by ``data.max_records``."""
    if data_cfg.name == "rotten_tomatoes":
        records = load_rotten_tomatoes()
    elif data_cfg.name == "rt_reviews":
        records = load_rt_reviews(duplicates=data_cfg.duplicates)
    else:
        if not data_cfg.path:  # DataConfig already requires it (data=jsonl); this narrows the type
            raise ConfigError("data=jsonl needs data.path=<file.jsonl or .csv>")
        records = load_records(
            data_cfg.path,
            data_cfg.format,
            data_cfg.prompt_field,
            data_cfg.response_field,
            max_record_chars=data_cfg.max_record_chars,
            duplicates=data_cfg.duplicates,
        )
    return records[: data_cfg.max_records] if data_cfg.max_records else records


@lru_cache(maxsize=2)
def data_split(data_cfg: DataConfig, num_clients: int, min_shard: int, seed: int) -> Split:
    """The held-out test set and every client's shard (deterministic in ``seed``)."""
    return split_records(
        load_all_records(data_cfg),
        test_size=data_cfg.test_size,
        num_clients=num_clients,
        partition=data_cfg.partition,
        alpha=data_cfg.dirichlet_alpha,
        min_shard=min_shard,
        seed=seed,
    )


def prompt_format(data_cfg: DataConfig, nonconforming: str = "error") -> PromptFormat:
    """The prompt/answer layout of ``data_cfg``; a node's training data uses
    ``nonconforming="mask"`` (records the server's format cannot train on get no target
    instead of failing the round: a refusal would tell the server they exist)."""
    return PromptFormat(
        prompt_template=data_cfg.prompt_template,
        response_template=data_cfg.response_template,
        max_length=data_cfg.max_length,
        choices=data_cfg.choices,
        overlong=data_cfg.overlong,
        nonconforming=nonconforming,
    )


def _log_shard(name: str, shard: TokenizedDataset, max_length: int) -> None:
    """The node's own log: records truncated or kept without a target (never sent anywhere)."""
    if shard.truncated:
        log.warning(
            "%s: %d of %d records are longer than data.max_length=%d; their prompts were left-truncated "
            "(overlong=refuse in the node config stops instead)",
            name,
            shard.truncated,
            len(shard),
            max_length,
        )
    if shard.masked:
        log.warning(
            "%s: %d of %d records do not fit the run's task format (answer not among the choices, or "
            "longer than data.max_length): they are kept with no training target",
            name,
            shard.masked,
            len(shard),
        )


def split_for(cfg: ExperimentConfig) -> Split:
    """The split for an experiment: every shard holds at least one batch."""
    return data_split(cfg.data, cfg.federation.num_clients, cfg.train.batch_size, cfg.seed)


@lru_cache(maxsize=128)  # one actor serves many clients in turn; shards are small
def tokenized_shard(cfg: ExperimentConfig, partition_id: int) -> TokenizedDataset:
    """Client ``partition_id``'s tokenized training shard."""
    bundle = model_bundle(cfg.model, cfg.lora, cfg.seed)
    shard = tokenize_records(
        split_for(cfg).shards[partition_id], bundle.tokenizer, prompt_format(cfg.data, nonconforming="mask")
    )
    _log_shard(f"client {partition_id}", shard, cfg.data.max_length)
    return shard


def tokenize_for_node(cfg: ExperimentConfig, records: list[Record]) -> TokenizedDataset:
    """``records`` tokenized as a node's training data is (records the format cannot train on are masked)."""
    bundle = model_bundle(cfg.model, cfg.lora, cfg.seed)
    return tokenize_records(records, bundle.tokenizer, prompt_format(cfg.data, nonconforming="mask"))


@lru_cache(maxsize=1)
def tokenized_test(cfg: ExperimentConfig) -> TokenizedDataset:
    """The held-out test set, tokenized."""
    bundle = model_bundle(cfg.model, cfg.lora, cfg.seed)
    # the held-out records are drawn before the rest is partitioned, so they do not depend on how many
    # clients there are: a server that evaluates never needs the clients' shards (nor enough records for them)
    return tokenize_records(test_records(cfg), bundle.tokenizer, prompt_format(cfg.data))


def test_records(cfg: ExperimentConfig) -> list[Record]:
    """The held-out test records, as read (before tokenization)."""
    return data_split(cfg.data, 1, 1, cfg.seed).test


def choice_ids_for(cfg: ExperimentConfig) -> list[int]:
    """Token ids of the fixed answers (empty when the task has none)."""
    if not cfg.data.choices:
        return []
    return choice_token_ids(model_bundle(cfg.model, cfg.lora, cfg.seed).tokenizer, prompt_format(cfg.data))


@lru_cache(maxsize=128)
def shard_content(cfg: ExperimentConfig, partition_id: int) -> ShardContent:
    """Client ``partition_id``'s training records as its ledger charges them (record hashes, fingerprint)."""
    return ShardContent.of((r.prompt, r.response) for r in split_for(cfg).shards[partition_id])


def node_shard(
    cfg: ExperimentConfig, partition_id: int, data_path: str | None, data_format: DataFormat
) -> tuple[TokenizedDataset, ShardContent]:
    """The node's tokenized training data and its records' content (what its ledger charges a
    release to): its own file when the node config names one (deployment), else its shard of the
    experiment's data (simulation).

    Raises:
        DataError: the file is missing or malformed (the message names file and line).
    """
    if data_path is None:
        return tokenized_shard(cfg, partition_id), shard_content(cfg, partition_id)
    try:
        stat = os.stat(data_path)
    except OSError as exc:
        raise DataError(f"{data_path}: cannot read the node's data file ({exc.strerror})") from exc
    return _local_shard(cfg, data_path, data_format, (stat.st_mtime_ns, stat.st_size))


@lru_cache(maxsize=4)  # a node answers every round of a run with the same file: tokenize it once
def _local_shard(
    cfg: ExperimentConfig, data_path: str, data_format: DataFormat, version: tuple[int, int]
) -> tuple[TokenizedDataset, ShardContent]:
    """``version`` (mtime, size) keys the cache: an edited file is read again, never served stale."""
    records = load_records(
        data_path,
        data_format,
        cfg.data.prompt_field,
        cfg.data.response_field,
        max_record_chars=cfg.data.max_record_chars,
        duplicates=cfg.data.duplicates,
    )
    bundle = model_bundle(cfg.model, cfg.lora, cfg.seed)
    shard = tokenize_records(records, bundle.tokenizer, prompt_format(cfg.data, nonconforming="mask"))
    _log_shard(data_path, shard, cfg.data.max_length)
    return shard, ShardContent.of((r.prompt, r.response) for r in records)
