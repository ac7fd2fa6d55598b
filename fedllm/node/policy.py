"""A node's own rules, from its own node config: the server's message can only tighten them.

An institution starts its SuperNode with ``--node-config 'state-dir=... data-path=...
max-epsilon=... delta=...'``. Everything that decides the node's privacy comes from there:
where its ledger and state live, which records it trains on (its budget follows them) and
the label its releases are filed under, its cap, whether it may train without DP-SGD, which base models it may
load (and whether remote code may run), and what besides the adapter it reveals. Nothing
the server sends can change any of these; :func:`check_request` refuses requests that
would need more than the node allows.

In simulation there is no operator: the simulation driver (the researcher's own process)
builds each virtual node's config from the experiment (``privacy.client_caps``,
``privacy.state_dir``, ...) with :func:`simulated_node_config` and marks it ``simulated``,
which alone permits a missing data path (the node trains on its shard of the experiment's
data) and, when the researcher's experiment asks for it, the reproducible
``privacy.noise=seeded`` research mode (``noise=seeded`` in that node config).
"""

from __future__ import annotations

import json
import math
import os
import string
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from fedllm.config import (
    ACCOUNTANTS,
    NOISE_SOURCES,
    OVERLONG_POLICIES,
    AccountantName,
    ExperimentConfig,
    Overlong,
)
from fedllm.data.sources import (
    DATA_FORMATS,
    DEFAULT_DUPLICATES,
    DEFAULT_MAX_RECORD_CHARS,
    DUPLICATE_POLICIES,
    DataFormat,
    DuplicatePolicy,
)
from fedllm.errors import ConfigError
from fedllm.node.received import DEFAULT_MAX_ABS, DEFAULT_MAX_NORM
from fedllm.privacy.ledger_anchor import default_anchor
from fedllm.storage import load_key

# node_config keys an operator may set (``flower-supernode --node-config``)
PARTITION_ID = "partition-id"
STATE_DIR = "state-dir"
DATA_PATH = "data-path"
DATA_FORMAT = "data-format"
DATASET_ID = "dataset-id"
MAX_EPSILON = "max-epsilon"
DELTA = "delta"
ACCOUNTANT = "accountant"
ALLOW_NONPRIVATE = "allow-nonprivate"
ALLOWED_MODELS = "allowed-models"
TRUST_REMOTE_CODE = "trust-remote-code"
PUBLIC_SIZE = "public-size"
PUBLIC_METRICS = "public-metrics"
OVERLONG = "overlong"
MAX_RECORD_CHARS = "max-record-chars"
DUPLICATES = "duplicates"
PROMPT_FIELD = "prompt-field"
RESPONSE_FIELD = "response-field"
# bounds on what the server may ask this node to compute: a coordinator that sends num_rounds=1e9 would
# otherwise make the node plan (and account) a billion-step mechanism before refusing anything
MAX_ROUNDS = "max-rounds"
MAX_LOCAL_STEPS = "max-local-steps"
MAX_BATCH_SIZE = "max-batch-size"
MAX_LENGTH = "max-length"
# bounds on what the server may ask this node to build (issue 25): a random model of any size,
# a LoRA of any rank or a prompt template of any length cost a node gigabytes and minutes per
# message, pre-flight included, before anything else is checked
MAX_MODEL_PARAMS = "max-model-params"
MAX_LORA_RANK = "max-lora-rank"
MAX_TEMPLATE_CHARS = "max-template-chars"
# bounds on the global adapter the server sends (fedllm.node.received): entries and L2 norm
MAX_ADAPTER_ABS = "max-adapter-abs"
MAX_ADAPTER_NORM = "max-adapter-norm"
ANSWER_PREFLIGHT = "answer-preflight"  # false: decline every pre-flight (it costs the node no budget)
# the public record count N the node's DP plan and Poisson sampling are fixed from (never its records' number)
SAMPLING_SIZE = "sampling-size"
SIMULATED = "simulated"
NOISE = "noise"  # simulated nodes only: "seeded" lets the researcher's run reproduce its noise
# simulated nodes only: the file of audit canaries this node trains on besides its shard (`fedllm audit`)
AUDIT_CANARIES = "audit-canaries"
# data at rest: encrypt the ledger and reply cache with a 256-bit key (64 hex characters) read
# from a file or an environment variable: never from the node config itself (process listings)
ENCRYPT_STATE = "encrypt-state"
STATE_KEY_FILE = "state-key-file"
STATE_KEY_ENV = "state-key-env"
DEFAULT_STATE_KEY_ENV = "FEDLLM_NODE_KEY"
# the ledger's append-only anchor, outside the state directory: a deleted or rolled-back ledger is
# refused (fedllm.privacy.ledger_anchor); default: under $XDG_STATE_HOME (~/.local/state)/fedllm
LEDGER_ANCHOR = "ledger-anchor"
# app bundles besides the installed fedllm that this node's operator reviewed (fedllm.node.app_check)
APPROVED_APP_HASHES = "approved-app-hashes"
KNOWN_KEYS = (
    PARTITION_ID,
    "num-partitions",
    STATE_DIR,
    DATA_PATH,
    DATA_FORMAT,
    DATASET_ID,
    MAX_EPSILON,
    DELTA,
    ACCOUNTANT,
    ALLOW_NONPRIVATE,
    ALLOWED_MODELS,
    TRUST_REMOTE_CODE,
    PUBLIC_SIZE,
    PUBLIC_METRICS,
    OVERLONG,
    MAX_RECORD_CHARS,
    DUPLICATES,
    PROMPT_FIELD,
    RESPONSE_FIELD,
    MAX_ROUNDS,
    MAX_LOCAL_STEPS,
    MAX_BATCH_SIZE,
    MAX_LENGTH,
    MAX_MODEL_PARAMS,
    MAX_LORA_RANK,
    MAX_TEMPLATE_CHARS,
    MAX_ADAPTER_ABS,
    MAX_ADAPTER_NORM,
    ANSWER_PREFLIGHT,
    SAMPLING_SIZE,
    SIMULATED,
    NOISE,
    AUDIT_CANARIES,
    ENCRYPT_STATE,
    STATE_KEY_FILE,
    STATE_KEY_ENV,
    APPROVED_APP_HASHES,
    LEDGER_ANCHOR,
)
# the packaged SmolLM2 only: the random test model (``tiny``) has weights that follow from the
# coordinator's seed, so a coordinator could craft adapters against it (issue 23); a node that wants
# it for a smoke test names it in its own allowed-models
DEFAULT_ALLOWED_MODELS = ("embedded",)
# Defaults of the bounds above: far beyond any useful run (the default runs 3 rounds of 5 steps of
# 16 records of 96 tokens) yet small enough that planning the largest run allowed takes a node
# minutes, not hours, and no memory it does not have for the accountant.
DEFAULT_MAX_ROUNDS, DEFAULT_MAX_LOCAL_STEPS, DEFAULT_MAX_BATCH_SIZE, DEFAULT_MAX_LENGTH = 1000, 1000, 1024, 4096
# The random test model (``tiny``) may have at most this many parameters (the default one has 3.2
# million, the packaged SmolLM2 135 million); a pretrained model's size is the operator's choice,
# made by naming it in allowed-models. LoRA ranks in use are 4-64; templates are a line of text.
DEFAULT_MAX_MODEL_PARAMS, DEFAULT_MAX_LORA_RANK, DEFAULT_MAX_TEMPLATE_CHARS = 200_000_000, 256, 2000
# the tiny model's vocabulary: it is built with the packaged tokenizer's (fedllm.model.base)
TINY_VOCAB_SIZE = 49152

# How the simulation driver hands each virtual node its config: a JSON file named by this
# environment variable (set in the driver's process, inherited by Ray's workers; never sent).
SIMULATED_NODES_ENV = "FEDLLM_SIMULATED_NODES"

# refusal categories: the only thing a refusal tells the server besides epsilon numbers
# (error: the node failed unexpectedly; the exception stays in its log, never in the reply)
BUDGET, DATA, POLICY, ERROR = "budget", "data", "policy", "error"
REFUSAL_CATEGORIES = (BUDGET, DATA, POLICY, ERROR)
# a pre-flight may also be declined (answer-preflight=false): the node says nothing about this run
# before its rounds; a budget shortfall is told by rounds-affordable, never as a refusal
DECLINED = "declined"
PREFLIGHT_REFUSAL_CATEGORIES = (DATA, POLICY, ERROR, DECLINED)


# Why a deployed node cannot start without it (rather than refusing DP rounds later): every release
# of a node (plan, rate, refusals, pre-flight answers, public size) is computed from N, and there is
# no safe default: the record count would leak, and any fixed number would silently misfit most
# datasets (delta >= 1/N refused, or batches far from the planned size). A ConfigError at start is
# data-independent, tells the operator at once, and is how the other required keys behave.
SAMPLING_SIZE_REQUIRED = (
    f"node config {SAMPLING_SIZE}: required; the record count this node's DP plan and Poisson sampling are "
    "computed from, a public round figure near the size of its dataset (its real count is never sent), "
    f"e.g. {SAMPLING_SIZE}=1000 for about a thousand records"
)


class PolicyViolation(Exception):
    """The server asked for something this node's policy does not allow (detail stays local)."""


@dataclass(frozen=True)
class NodePolicy:
    """Everything a node decides for itself (see the module docstring)."""

    partition_id: int
    state_dir: Path
    max_epsilon: float
    delta: float
    dataset_id: str
    data_path: str | None = None  # None only in simulation: the node's shard of the experiment's data
    data_format: DataFormat = "auto"
    accountant: AccountantName = "prv"
    allow_nonprivate: bool = False
    allowed_models: tuple[str, ...] = DEFAULT_ALLOWED_MODELS
    trust_remote_code: bool = False
    public_size: bool = False
    public_metrics: bool = False
    overlong: Overlong = "truncate"
    max_record_chars: int = DEFAULT_MAX_RECORD_CHARS
    duplicates: DuplicatePolicy = DEFAULT_DUPLICATES
    prompt_field: str = "prompt"  # the node's file's own field names: the server cannot probe which fields exist
    response_field: str = "response"
    max_rounds: int = DEFAULT_MAX_ROUNDS
    max_local_steps: int = DEFAULT_MAX_LOCAL_STEPS
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE
    max_length: int = DEFAULT_MAX_LENGTH
    max_model_params: int = DEFAULT_MAX_MODEL_PARAMS
    max_lora_rank: int = DEFAULT_MAX_LORA_RANK
    max_template_chars: int = DEFAULT_MAX_TEMPLATE_CHARS
    max_adapter_abs: float = DEFAULT_MAX_ABS
    max_adapter_norm: float = DEFAULT_MAX_NORM
    answer_preflight: bool = True
    # N: what the node's DP plan, sample rate q = 1 / ceil(N / b), delta check and public size are
    # computed from, so that none of them follows the records it holds; None only in simulation
    # (the shard's own size: the researcher split the data and knows it)
    sampling_size: int | None = None
    simulated: bool = False
    seeded_noise: bool = False  # simulation only: the researcher chose reproducible noise
    audit_canaries: str | None = None  # simulation only: `fedllm audit`'s canaries for this node
    encrypt_state: bool = False
    state_key_file: str | None = None
    state_key_env: str = DEFAULT_STATE_KEY_ENV
    ledger_anchor: Path | None = None  # None: default_anchor(state_dir)

    def __post_init__(self) -> None:
        if not (math.isfinite(self.max_epsilon) and self.max_epsilon > 0):
            raise ConfigError(f"node config {MAX_EPSILON}: must be a positive number, got {self.max_epsilon}")
        if not 0 < self.delta < 1:
            raise ConfigError(f"node config {DELTA}: must be in (0, 1), got {self.delta}")
        # checked again here (not only when read from a node config): a policy can be built directly
        _choice(self.data_format, DATA_FORMAT, DATA_FORMATS)
        _choice(self.accountant, ACCOUNTANT, ACCOUNTANTS)
        _choice(self.overlong, OVERLONG, OVERLONG_POLICIES)
        for key, bound in (
            (MAX_RECORD_CHARS, self.max_record_chars),
            (MAX_ROUNDS, self.max_rounds),
            (MAX_LOCAL_STEPS, self.max_local_steps),
            (MAX_BATCH_SIZE, self.max_batch_size),
            (MAX_LENGTH, self.max_length),
            (MAX_MODEL_PARAMS, self.max_model_params),
            (MAX_LORA_RANK, self.max_lora_rank),
            (MAX_TEMPLATE_CHARS, self.max_template_chars),
        ):
            if bound < 1:
                raise ConfigError(f"node config {key}: must be a positive whole number, got {bound}")
        for key, value in ((MAX_ADAPTER_ABS, self.max_adapter_abs), (MAX_ADAPTER_NORM, self.max_adapter_norm)):
            if not (math.isfinite(value) and value > 0):
                raise ConfigError(f"node config {key}: must be a positive number, got {value}")
        _choice(self.duplicates, DUPLICATES, DUPLICATE_POLICIES)
        if self.data_path is None and not self.simulated:
            raise ConfigError(f"node config {DATA_PATH}: required: the node's own training file (JSONL or CSV)")
        if self.sampling_size is None and not self.simulated:
            raise ConfigError(SAMPLING_SIZE_REQUIRED)
        if self.sampling_size is not None and self.sampling_size < 1:
            raise ConfigError(f"node config {SAMPLING_SIZE}: must be a positive whole number, got {self.sampling_size}")
        if self.seeded_noise and not self.simulated:
            raise ConfigError(f"node config {NOISE}=seeded: a deployed node always draws its noise from OS entropy")
        if self.audit_canaries and not self.simulated:
            raise ConfigError(f"node config {AUDIT_CANARIES}: only `fedllm audit`'s virtual nodes train on canaries")

    def anchor_path(self) -> Path:
        """The ledger's anchor: ``ledger-anchor``; by default, for a deployed node, one under
        ``$XDG_STATE_HOME`` (:func:`~fedllm.privacy.ledger_anchor.default_anchor`), and for a simulated
        node ``<state dir>.ledger-anchor`` beside its state directory: where the researcher keeps the
        state (shared storage for a Ray cluster), so every machine that runs the node finds it."""
        if self.ledger_anchor is not None:
            return self.ledger_anchor
        if self.simulated:
            return self.state_dir.with_name(f"{self.state_dir.name}.ledger-anchor")
        return default_anchor(self.state_dir)

    def state_key(self) -> bytes | None:
        """The key that encrypts this node's ledger and reply cache (None: not encrypted).

        Raises:
            ConfigError: encryption is on and the key file or variable holds no 256-bit key.
        """
        if not self.encrypt_state:
            return None
        return load_key(self.state_key_file, self.state_key_env, setting=f"node config {ENCRYPT_STATE}=true")


_Choice = TypeVar("_Choice", bound=str)


def _choice(value: object, key: str, allowed: tuple[_Choice, ...]) -> _Choice:
    """``value`` as the one of ``allowed`` it equals (typed as that choice).

    Raises:
        ConfigError: it equals none of them (names the key and the choices).
    """
    for option in allowed:
        if value == option:
            return option
    raise ConfigError(f"node config {key}: got {value!r}; choose one of {', '.join(allowed)}")


def _flag(value: object, key: str) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "1", "yes"):
        return True
    if text in ("false", "0", "no", ""):
        return False
    raise ConfigError(f"node config {key}: expected true or false, got {value!r}")


def _required(node_config: Mapping, key: str, example: str) -> object:
    value = node_config.get(key)
    if value is None or str(value) == "":
        raise ConfigError(f"node config {key}: required; set it in --node-config, e.g. {key}={example}")
    return value


def _number(node_config: Mapping, key: str, example: str) -> float:
    value = _required(node_config, key, example)
    try:
        if not isinstance(value, int | float | str):  # what a node config holds (Flower's UserConfigValue)
            raise TypeError(type(value).__name__)
        return float(value)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"node config {key}: expected a number, got {value!r}") from exc


def _optional_number(node_config: Mapping, key: str, default: float) -> float:
    return _number(node_config, key, str(default)) if key in node_config else default


def _integer(node_config: Mapping, key: str, default: int) -> int:
    value = node_config.get(key, default)
    if isinstance(value, bool) or not (isinstance(value, int) or str(value).strip().isdigit()):
        raise ConfigError(f"node config {key}: expected a whole number, got {value!r}")
    return int(value)


def policy_from_node_config(node_config: Mapping, *, simulated: bool = False) -> NodePolicy:
    """The node's policy from its node config; every value is the operator's.

    Args:
        node_config: the SuperNode's ``--node-config`` (or the simulation driver's node config).
        simulated: the config comes from the simulation driver (:func:`node_config_for`); only
            then may it mark the node simulated or ask for seeded noise.

    Raises:
        ConfigError: a required key is missing or a value is malformed (names the key).
    """
    unknown = sorted(set(node_config) - set(KNOWN_KEYS))
    if unknown:
        raise ConfigError(f"node config: unknown key(s) {', '.join(unknown)}; known: {', '.join(KNOWN_KEYS)}")
    driver_only = sorted({SIMULATED, NOISE, AUDIT_CANARIES} & set(node_config))
    if driver_only and not simulated:
        raise ConfigError(
            f"node config: {', '.join(driver_only)} can only be set by `fedllm simulate` / `fedllm "
            "audit` for their virtual nodes; a deployed node always draws its noise from OS entropy "
            "and trains on its own data only"
        )
    data_path = node_config.get(DATA_PATH)
    data_path = None if data_path in (None, "") else str(data_path)
    models = str(node_config.get(ALLOWED_MODELS, ",".join(DEFAULT_ALLOWED_MODELS)))
    return NodePolicy(
        partition_id=int(_number(node_config, PARTITION_ID, "0")),
        state_dir=Path(str(_required(node_config, STATE_DIR, '"/var/lib/fedllm"'))).expanduser(),
        max_epsilon=_number(node_config, MAX_EPSILON, "8"),
        delta=_number(node_config, DELTA, "1e-5"),
        dataset_id=str(node_config.get(DATASET_ID) or _default_dataset_id(data_path, node_config)),
        data_path=data_path,
        data_format=_choice(node_config.get(DATA_FORMAT, "auto"), DATA_FORMAT, DATA_FORMATS),
        accountant=_choice(node_config.get(ACCOUNTANT, "prv"), ACCOUNTANT, ACCOUNTANTS),
        allow_nonprivate=_flag(node_config.get(ALLOW_NONPRIVATE, False), ALLOW_NONPRIVATE),
        allowed_models=tuple(m.strip() for m in models.split(",") if m.strip()),
        trust_remote_code=_flag(node_config.get(TRUST_REMOTE_CODE, False), TRUST_REMOTE_CODE),
        public_size=_flag(node_config.get(PUBLIC_SIZE, False), PUBLIC_SIZE),
        public_metrics=_flag(node_config.get(PUBLIC_METRICS, False), PUBLIC_METRICS),
        overlong=_choice(node_config.get(OVERLONG, "truncate"), OVERLONG, OVERLONG_POLICIES),
        max_record_chars=_integer(node_config, MAX_RECORD_CHARS, DEFAULT_MAX_RECORD_CHARS),
        duplicates=_choice(node_config.get(DUPLICATES, DEFAULT_DUPLICATES), DUPLICATES, DUPLICATE_POLICIES),
        prompt_field=str(node_config.get(PROMPT_FIELD, "prompt")),
        response_field=str(node_config.get(RESPONSE_FIELD, "response")),
        max_rounds=_integer(node_config, MAX_ROUNDS, DEFAULT_MAX_ROUNDS),
        max_local_steps=_integer(node_config, MAX_LOCAL_STEPS, DEFAULT_MAX_LOCAL_STEPS),
        max_batch_size=_integer(node_config, MAX_BATCH_SIZE, DEFAULT_MAX_BATCH_SIZE),
        max_length=_integer(node_config, MAX_LENGTH, DEFAULT_MAX_LENGTH),
        max_model_params=_integer(node_config, MAX_MODEL_PARAMS, DEFAULT_MAX_MODEL_PARAMS),
        max_lora_rank=_integer(node_config, MAX_LORA_RANK, DEFAULT_MAX_LORA_RANK),
        max_template_chars=_integer(node_config, MAX_TEMPLATE_CHARS, DEFAULT_MAX_TEMPLATE_CHARS),
        max_adapter_abs=_optional_number(node_config, MAX_ADAPTER_ABS, DEFAULT_MAX_ABS),
        max_adapter_norm=_optional_number(node_config, MAX_ADAPTER_NORM, DEFAULT_MAX_NORM),
        answer_preflight=_flag(node_config.get(ANSWER_PREFLIGHT, True), ANSWER_PREFLIGHT),
        sampling_size=_sampling_size(node_config, simulated),
        simulated=simulated,
        seeded_noise=_noise_is_seeded(node_config.get(NOISE, "secure")),
        audit_canaries=str(node_config.get(AUDIT_CANARIES) or "") or None,
        encrypt_state=_flag(node_config.get(ENCRYPT_STATE, False), ENCRYPT_STATE),
        state_key_file=str(node_config.get(STATE_KEY_FILE) or "") or None,
        state_key_env=str(node_config.get(STATE_KEY_ENV) or DEFAULT_STATE_KEY_ENV),
        ledger_anchor=Path(str(node_config[LEDGER_ANCHOR])).expanduser() if node_config.get(LEDGER_ANCHOR) else None,
    )


def _sampling_size(node_config: Mapping, simulated: bool) -> int | None:
    """The node's public sampling size N; absent only for a simulated node (its shard's size).

    Raises:
        ConfigError: a deployed node's config lacks it, or it is not a whole number.
    """
    if node_config.get(SAMPLING_SIZE) in (None, ""):
        if simulated:
            return None
        raise ConfigError(SAMPLING_SIZE_REQUIRED)
    return _integer(node_config, SAMPLING_SIZE, 0)


def _noise_is_seeded(value: object) -> bool:
    return _choice(value, NOISE, NOISE_SOURCES) == "seeded"


def _default_dataset_id(data_path: str | None, node_config: Mapping) -> str:
    """The label a node files its releases under when the operator gives none: the data file's
    absolute path, or the simulated shard's index. Only a label: the budget follows the records
    themselves (:mod:`fedllm.privacy.node_ledger`), so a renamed or moved file keeps it."""
    if data_path is not None:
        return str(Path(data_path).expanduser().resolve())
    return f"simulated-shard-{node_config.get(PARTITION_ID)}"


def check_request(policy: NodePolicy, cfg: ExperimentConfig) -> None:
    """Refuse a server request that needs more than the node allows.

    Raises:
        PolicyViolation: with the detail for the node's own log (the server learns only "policy").
    """
    _check_bounds(policy, cfg)
    if not cfg.privacy.sample_level and not policy.allow_nonprivate:
        raise PolicyViolation(
            f"the run trains without DP-SGD (privacy.mode={cfg.privacy.mode}); this node allows it only with "
            f"{ALLOW_NONPRIVATE}=true in its node config"
        )
    if cfg.privacy.noise != "secure" and not policy.seeded_noise:
        raise PolicyViolation(
            f"the server asked for privacy.noise={cfg.privacy.noise}: noise the server could reproduce; this node "
            "draws its noise from its own OS entropy"
        )
    for key, template, field in (
        ("data.prompt_template", cfg.data.prompt_template, "prompt"),
        ("data.response_template", cfg.data.response_template, "response"),
    ):
        if not bare_placeholders(template, field):
            raise PolicyViolation(
                f"{key} may hold only the bare placeholder {{{field}}} (no format spec, conversion, "
                "index or other field): a format spec would quote a record's text in an error"
            )
    model = model_name(cfg)
    if model not in policy.allowed_models:
        raise PolicyViolation(
            f"model {model!r} is not in this node's {ALLOWED_MODELS} ({', '.join(policy.allowed_models) or 'none'})"
        )
    if cfg.model.trust_remote_code and not policy.trust_remote_code:
        raise PolicyViolation(
            "the server asked to run the model's remote code (model.trust_remote_code=true); "
            f"this node allows it only with {TRUST_REMOTE_CODE}=true in its node config"
        )


def _check_bounds(policy: NodePolicy, cfg: ExperimentConfig) -> None:
    """Refuse a task larger than the node's bounds, before any plan or data is computed for it."""
    for key, asked, node_key, bound in (
        ("federation.num_rounds", cfg.federation.num_rounds, MAX_ROUNDS, policy.max_rounds),
        ("train.local_steps", cfg.train.local_steps, MAX_LOCAL_STEPS, policy.max_local_steps),
        ("train.batch_size", cfg.train.batch_size, MAX_BATCH_SIZE, policy.max_batch_size),
        ("data.max_length", cfg.data.max_length, MAX_LENGTH, policy.max_length),
        ("lora.r", cfg.lora.r, MAX_LORA_RANK, policy.max_lora_rank),
        ("data.prompt_template's length", len(cfg.data.prompt_template), MAX_TEMPLATE_CHARS, policy.max_template_chars),
        (
            "data.response_template's length",
            len(cfg.data.response_template),
            MAX_TEMPLATE_CHARS,
            policy.max_template_chars,
        ),
        ("model=tiny's parameter count", tiny_parameters(cfg), MAX_MODEL_PARAMS, policy.max_model_params),
    ):
        if asked > bound:
            raise PolicyViolation(
                f"the server asked for {key}={asked}, above this node's bound {node_key}={bound} "
                "(raise it in the node config to allow such runs)"
            )


def tiny_parameters(cfg: ExperimentConfig) -> int:
    """The parameter count of the random model ``cfg`` asks for (0 for any other model).

    Computed from its four sizes before anything is built (a Llama with tied embeddings, as
    :func:`fedllm.model.base.load_model` builds it): per layer four attention projections, three
    MLP matrices and two norms; the shared embedding; the final norm.
    """
    model = cfg.model
    if model.kind != "tiny":
        return 0
    hidden, inner = model.hidden_size, model.intermediate_size
    per_layer = 4 * hidden * hidden + 3 * hidden * inner + 2 * hidden
    return model.num_layers * per_layer + TINY_VOCAB_SIZE * hidden + hidden


def bare_placeholders(template: str, field: str) -> bool:
    """Whether every replacement field of ``template`` is exactly ``{field}``."""
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError:
        return False
    return all(
        name is None or (name == field and not spec and conversion is None) for _, name, spec, conversion in parsed
    )


def model_name(cfg: ExperimentConfig) -> str:
    """How an allow-list names the base model ``cfg`` loads: ``embedded``, ``tiny``, or its path/hub id."""
    kind = cfg.model.kind
    return str(cfg.model.name_or_path) if kind == "pretrained" else kind


def simulated_node_config(cfg: ExperimentConfig, partition_id: int) -> dict[str, object]:
    """A virtual node's config, built by the simulation driver from the researcher's experiment.

    The researcher is operator and coordinator at once here, so the experiment's choices
    (privacy mode, noise source, caps) become each node's own. It sets no :data:`SAMPLING_SIZE`:
    a virtual node samples at its shard's own size (audit canaries included), which the researcher
    who split the data knows, so plans and pinned epsilons are those of a node whose N is its n.
    """
    cap = cfg.privacy.cap_for(partition_id)
    root = Path(cfg.privacy.state_dir) if cfg.privacy.state_dir else Path.home() / ".fedllm" / "node-state"
    config: dict[str, object] = {
        PARTITION_ID: partition_id,
        STATE_DIR: str(root / f"client-{partition_id}"),
        MAX_EPSILON: cap.max_epsilon if cap and cap.max_epsilon is not None else cfg.privacy.target_epsilon,
        DELTA: cap.delta if cap and cap.delta is not None else cfg.privacy.delta,
        ACCOUNTANT: cfg.privacy.accountant,
        ALLOW_NONPRIVATE: not cfg.privacy.sample_level,
        ALLOWED_MODELS: model_name(cfg),
        TRUST_REMOTE_CODE: cfg.model.trust_remote_code,
        PUBLIC_SIZE: cfg.privacy.public_metrics,
        PUBLIC_METRICS: cfg.privacy.public_metrics,
        OVERLONG: cfg.data.overlong,
        MAX_RECORD_CHARS: cfg.data.max_record_chars,
        DUPLICATES: cfg.data.duplicates,
        PROMPT_FIELD: cfg.data.prompt_field,
        RESPONSE_FIELD: cfg.data.response_field,
        # the researcher chose the schedule: its own bounds are at least what it asks
        MAX_ROUNDS: max(cfg.federation.num_rounds, DEFAULT_MAX_ROUNDS),
        MAX_LOCAL_STEPS: max(cfg.train.local_steps, DEFAULT_MAX_LOCAL_STEPS),
        MAX_BATCH_SIZE: max(cfg.train.batch_size, DEFAULT_MAX_BATCH_SIZE),
        MAX_LENGTH: max(cfg.data.max_length, DEFAULT_MAX_LENGTH),
        MAX_MODEL_PARAMS: max(tiny_parameters(cfg), DEFAULT_MAX_MODEL_PARAMS),
        MAX_LORA_RANK: max(cfg.lora.r, DEFAULT_MAX_LORA_RANK),
        MAX_TEMPLATE_CHARS: max(
            len(cfg.data.prompt_template), len(cfg.data.response_template), DEFAULT_MAX_TEMPLATE_CHARS
        ),
        SIMULATED: True,
        NOISE: cfg.privacy.noise,
        # the researcher's storage key protects the virtual nodes' state too: the config names where
        # the key is (a file, or a variable Ray's workers inherit from the driver), never the key
        ENCRYPT_STATE: cfg.storage.encrypt,
        STATE_KEY_FILE: cfg.storage.key_file or "",
        STATE_KEY_ENV: cfg.storage.key_env,
    }
    if cap is not None and cap.max_epsilon is not None and not cfg.privacy.sample_level:
        config[ALLOW_NONPRIVATE] = False  # a node with its own cap never trains without DP-SGD
    return config


def write_simulated_nodes(cfg: ExperimentConfig, path: Path, extra=None) -> None:
    """Write every virtual node's config to ``path`` and point :data:`SIMULATED_NODES_ENV` at it.

    ``extra(partition)``, if given, adds driver-only keys (e.g. :data:`AUDIT_CANARIES`) to a node's config.
    """
    nodes = {
        str(p): {**simulated_node_config(cfg, p), **(extra(p) if extra else {})}
        for p in range(cfg.federation.num_clients)
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(nodes, indent=1), encoding="utf-8")
    os.environ[SIMULATED_NODES_ENV] = str(path)


def node_policy(engine_config: Mapping) -> NodePolicy:
    """The policy to enforce: the simulation driver's node config for a virtual node (when this
    process was started by ``fedllm simulate``), else the SuperNode's own ``--node-config``.

    Raises:
        ConfigError: the node config is incomplete or malformed.
    """
    if os.environ.get(SIMULATED_NODES_ENV):
        return policy_from_node_config(node_config_for(engine_config), simulated=True)
    return policy_from_node_config(engine_config)


def node_config_for(engine_config: Mapping) -> Mapping:
    """The simulation driver's node config for the virtual node ``engine_config`` names (or
    ``engine_config`` itself outside a simulation)."""
    path = os.environ.get(SIMULATED_NODES_ENV)
    if not path:
        return engine_config
    nodes = json.loads(Path(path).read_text(encoding="utf-8"))
    partition = str(engine_config.get(PARTITION_ID))
    if partition not in nodes:
        raise ConfigError(f"{path}: no simulated node config for partition {partition}")
    return nodes[partition]
