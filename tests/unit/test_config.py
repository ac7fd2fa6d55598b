"""Every config group composes into a valid ExperimentConfig; bad values name the key."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from fedllm.config import (
    DataConfig,
    ExperimentConfig,
    ModelConfig,
    PrivacyConfig,
    TrainConfig,
    compose_experiment,
)
from fedllm.errors import ConfigError

CONF = Path(__file__).resolve().parents[2] / "conf"


def _compose(overrides: list[str]) -> ExperimentConfig:
    return compose_experiment(overrides, CONF)


def _group_options() -> list[tuple[str, str]]:
    return [
        (group.name, option.stem)
        for group in sorted(CONF.iterdir())
        if group.is_dir()
        for option in sorted(group.glob("*.yaml"))
    ]


def test_default_config_is_the_documented_default_run():
    cfg = _compose([])
    assert cfg.model.kind == "embedded"
    assert cfg.data.name == "rotten_tomatoes" and cfg.data.choices == ("positive", "negative")
    assert cfg.federation.num_clients == 10
    assert cfg.privacy.mode == "sample" and cfg.privacy.target_epsilon == 8.0
    assert cfg.privacy.delta == 1e-5


@pytest.mark.parametrize(("group", "option"), _group_options())
def test_every_config_group_option_composes(group, option):
    overrides = [f"{group}={option}"]
    if option == "pretrained":
        overrides.append("model.name_or_path=/some/local/model")
    if option == "jsonl":
        overrides += ["data.path=/some/records.jsonl", "train.objective=token"]
    cfg = _compose(overrides)
    assert isinstance(cfg, ExperimentConfig)


def test_smoke_preset_is_tiny_and_short():
    cfg = _compose(["debug=smoke"])
    assert cfg.model.kind == "tiny"
    assert (cfg.federation.num_clients, cfg.federation.num_rounds) == (3, 2)


def test_name_or_path_selects_pretrained_loading():
    assert _compose(["model.name_or_path=/models/x"]).model.kind == "pretrained"


def test_json_round_trip_is_exact():
    cfg = _compose(["privacy.target_epsilon=3", "data.partition=dirichlet"])
    assert ExperimentConfig.from_json(cfg.to_json()) == cfg


@pytest.mark.parametrize(
    ("build", "key"),
    [
        (lambda: PrivacyConfig(target_epsilon=0), "privacy.target_epsilon"),
        (lambda: PrivacyConfig(delta=1.5), "privacy.delta"),
        (lambda: PrivacyConfig(mode="local"), "privacy.mode"),
        (lambda: PrivacyConfig(accountant="gdp"), "privacy.accountant"),
        (lambda: TrainConfig(batch_size=0), "train.batch_size"),
        (lambda: TrainConfig(objective="dpo"), "train.objective"),
        (lambda: DataConfig(name="jsonl"), "data.path"),
        (lambda: DataConfig(prompt_template="no placeholder"), "data.prompt_template"),
        (lambda: ModelConfig(source="pretrained"), "model.name_or_path"),
        (lambda: ModelConfig(hidden_size=65, num_heads=4), "model.hidden_size"),
        (lambda: ExperimentConfig(data=DataConfig(choices=())), "train.objective"),
    ],
)
def test_invalid_values_raise_config_error_naming_the_key(build, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        build()


def test_unknown_override_key_is_a_config_error():
    raw = ExperimentConfig(data=DataConfig(choices=("a", "b"))).to_dict()
    raw["privacy"]["epsilon"] = 3
    with pytest.raises(ConfigError, match="^privacy.epsilon: unknown key; did you mean privacy.target_epsilon"):
        ExperimentConfig.from_dict(raw)


def test_config_sections_are_frozen():
    cfg = ExperimentConfig(data=DataConfig(choices=("a", "b")))
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.privacy.target_epsilon = 100  # type: ignore[misc]


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["model=pretrained"], "model.name_or_path"),
        (["data=jsonl", "train.objective=token"], "data.path"),
    ],
)
def test_required_values_left_unset_name_the_key(overrides, key):
    with pytest.raises(ConfigError, match=rf"{key.replace('.', '[.]')}: required"):
        _compose(overrides)


# Issue 13, problem 9: every numeric setting finite and of its declared type, booleans strict,
# and `fedllm plan` errors as cleanly as `fedllm simulate`.


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("privacy.max_grad_norm=inf", "privacy.max_grad_norm"),
        ("train.lr=inf", "train.lr"),
        ("train.local_steps=1.5", "train.local_steps"),
        ("train.batch_size=2.5", "train.batch_size"),
        ("train.batch_size=1.5", "train.batch_size"),  # issue 15: these ran as if nothing were wrong
        ("federation.num_rounds=three", "federation.num_rounds"),
        ("privacy.target_epsilon=inf", "privacy.target_epsilon"),
        ("privacy.delta=nan", "privacy.delta"),
        ("seed=abc", "seed"),
        ("seed=1.0", "seed"),
        ("storage.encrypt=no", "storage.encrypt"),
        ("tracking.progress=1", "tracking.progress"),
        ("train.local_steps=true", "train.local_steps"),
        ("data.choices=[1,2]", "data.choices"),
        ("model.name_or_path=2024", "model.name_or_path"),
        ("privacy.client_caps=[{client: 1, max_epsilon: inf}]", "privacy.client_caps.max_epsilon"),
        ("privacy.client_caps=[{client: 1.5}]", "privacy.client_caps.client"),
    ],
)
def test_overrides_of_the_wrong_type_or_not_finite_name_the_key(override, key):
    with pytest.raises(ConfigError, match=rf"^{key.replace('.', '[.]')}(\[\d+\])?: "):
        _compose([override])


def _sections():
    from fedllm import config as module

    return [(prefix, cls) for prefix, cls in module._SECTION_TYPES.items()] + [
        ("privacy.client_caps", module.ClientCap),
        ("", ExperimentConfig),
    ]


def _fields_of(kind: type) -> list[tuple[str, type, str]]:
    import typing

    out = []
    for prefix, cls in _sections():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if typing.get_origin(hints[f.name]) is tuple:
                continue  # a list of values, not a scalar field
            options = set(typing.get_args(hints[f.name])) or {hints[f.name]}
            if kind in options:
                out.append((prefix, cls, f.name))
    return out


def _minimal(cls: type, **values):
    """A valid instance of ``cls`` with ``values`` set (ClientCap needs its client)."""
    from fedllm.config import ClientCap

    base = {"client": 0} if cls is ClientCap else {}
    return cls(**{**base, **values})


@pytest.mark.parametrize(("prefix", "cls", "name"), _fields_of(float))
@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan"), "1.0", True])
def test_every_float_setting_must_be_a_finite_number(prefix, cls, name, bad):
    key = f"{prefix}.{name}" if prefix else name
    with pytest.raises(ConfigError, match=rf"^{key.replace('.', '[.]')}: "):
        _minimal(cls, **{name: bad})


@pytest.mark.parametrize(("prefix", "cls", "name"), _fields_of(int))
@pytest.mark.parametrize("bad", [1.5, 2.0, "3", False, float("inf")])
def test_every_integer_setting_must_be_an_integer(prefix, cls, name, bad):
    key = f"{prefix}.{name}" if prefix else name
    with pytest.raises(ConfigError, match=rf"^{key.replace('.', '[.]')}: expected an integer"):
        _minimal(cls, **{name: bad})


@pytest.mark.parametrize(("prefix", "cls", "name"), _fields_of(bool))
@pytest.mark.parametrize("bad", ["no", "false", 0, 1, None])
def test_every_boolean_setting_is_strict(prefix, cls, name, bad):
    key = f"{prefix}.{name}" if prefix else name
    with pytest.raises(ConfigError, match=rf"^{key.replace('.', '[.]')}: expected true or false"):
        _minimal(cls, **{name: bad})


def test_the_type_checks_cover_every_kind_of_numeric_and_boolean_setting():
    # the generic check must see the fields the issue names, not just some
    floats = {f"{p}.{n}" for p, _, n in _fields_of(float)}
    ints = {f"{p}.{n}" if p else n for p, _, n in _fields_of(int)}
    assert {
        "privacy.max_grad_norm",
        "train.lr",
        "privacy.target_epsilon",
        "federation.round_timeout",
        "federation.max_update_norm",
        "privacy.noise_multiplier",
    } <= floats
    assert {"train.local_steps", "train.batch_size", "seed", "data.max_records"} <= ints
    assert {"storage.encrypt", "tracking.wandb"} <= {f"{p}.{n}" for p, _, n in _fields_of(bool)}


def test_an_integer_where_a_number_belongs_becomes_a_float():
    cfg = _compose(["privacy.target_epsilon=3", "train.lr=1", "federation.client_cpus=2"])
    assert type(cfg.privacy.target_epsilon) is float and cfg.privacy.target_epsilon == 3.0
    assert type(cfg.train.lr) is float and type(cfg.federation.client_cpus) is float
    assert type(cfg.train.local_steps) is int and type(cfg.seed) is int
    assert ExperimentConfig.from_json(cfg.to_json()) == cfg


def test_a_boolean_setting_accepts_true_and_false():
    assert _compose(["storage.encrypt=true", "storage.key_env=K"]).storage.encrypt is True
    assert _compose(["tracking.progress=false"]).tracking.progress is False


def test_from_json_rejects_a_float_seed_and_a_string_flag():
    raw = ExperimentConfig(data=DataConfig(choices=("a", "b"))).to_dict()
    with pytest.raises(ConfigError, match="^seed: expected an integer"):
        ExperimentConfig.from_dict({**raw, "seed": 1.5})
    with pytest.raises(ConfigError, match="^storage.encrypt: expected true or false"):
        ExperimentConfig.from_dict({**raw, "storage": {**raw["storage"], "encrypt": "no"}})
    with pytest.raises(ConfigError, match="^privacy.client_caps: "):
        ExperimentConfig.from_dict({**raw, "privacy": {**raw["privacy"], "client_caps": [3]}})


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("privacy.epsilon=3", "privacy.epsilon: unknown key; did you mean privacy.target_epsilon?"),
        ("privacy.zzz=3", "privacy.zzz: unknown key; known keys of privacy: accountant,"),
        ("nogroup=x", "nogroup: unknown key"),
        ("privacy.client_caps.x=1", "cannot apply the overrides"),
        ("privacy=nonexistent", "privacy/nonexistent"),
        ("train.lr=[1", "train.lr=[1"),
        ("seed=abc", "seed: expected an integer"),
        ("train.lr=inf", "train.lr: must be a finite number"),
        ("seed=${oops}", "oops"),
    ],
)
def test_plan_reports_config_errors_in_one_line_and_fails(override, expected, capsys):
    from fedllm.cli.plan import plan_cli

    assert plan_cli([override]) != 0
    err = capsys.readouterr().err
    assert err.startswith("fedllm plan: ") and expected in err
    assert err.count("\n") == 1 and "Traceback" not in err


# Issue 15, item 5: key typos get a "did you mean", from the compose API as from the CLI.


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("privacy.target_epsilion=3", "privacy.target_epsilion: unknown key; did you mean privacy.target_epsilon?"),
        ("train.batchsize=4", "train.batchsize: unknown key; did you mean train.batch_size?"),
        ("sed=1", "sed: unknown key; did you mean seed?"),
        ("+federation.num_round=2", "federation.num_round: unknown key; did you mean federation.num_rounds?"),
    ],
)
def test_a_key_typo_suggests_the_key(override, expected):
    from hydra.errors import HydraException

    from fedllm.config import hydra_error

    try:
        _compose([override])
    except HydraException as exc:  # Hydra's own refusal, as `fedllm simulate` reports it
        message = str(hydra_error(exc))
    except ConfigError as exc:  # an added key reaches the dataclasses
        message = str(exc)
    assert message == expected


def test_wrong_types_name_the_key_and_the_expected_type():
    with pytest.raises(ConfigError, match=r"^train[.]batch_size: expected an integer, got 1[.]5$"):
        _compose(["train.batch_size=1.5"])
    with pytest.raises(ConfigError, match=r"^federation[.]num_rounds: expected an integer, got 'three'$"):
        _compose(["federation.num_rounds=three"])


# Issue 16: federation.ray_address joins a running Ray cluster (null: a local Ray, as before).


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("null", None),
        ("auto", "auto"),
        ("127.0.0.1:6379", "127.0.0.1:6379"),
        ("head-node.example.org:10001", "head-node.example.org:10001"),
        ("'[::1]:6379'", "[::1]:6379"),  # quoted: unquoted brackets are a list to Hydra
    ],
)
def test_ray_address_takes_null_auto_or_host_and_port(value, expected):
    assert _compose([f"federation.ray_address={value}"]).federation.ray_address == expected
    assert _compose([]).federation.ray_address is None  # the default starts a local Ray, as before


@pytest.mark.parametrize(
    "value",
    [
        "localhost",
        "10.0.0.1",
        "10.0.0.1:",
        ":6379",
        "10.0.0.1:0",
        "10.0.0.1:65536",
        "10.0.0.1:63a",
        "10.0.0.1:6379:1",
        "head node:6379",
        "AUTO",
        "local",
        "",
        "http://10.0.0.1:6379",
    ],
)
def test_ray_address_that_is_not_an_address_names_the_key_and_the_forms(value):
    with pytest.raises(ConfigError) as err:
        _compose([f"federation.ray_address='{value}'"])
    assert str(err.value) == (
        f"federation.ray_address: got {value!r}; use null (start a local Ray for this run), auto (the Ray "
        "cluster `ray start` runs on this machine, or RAY_ADDRESS) or the cluster head's <host>:<port>, "
        "e.g. 10.0.0.1:6379"
    )


def test_ray_client_addresses_are_refused_with_the_reason():
    with pytest.raises(
        ConfigError,
        match=r"^federation[.]ray_address: got 'ray://10[.]0[.]0[.]1:10001': Ray "
        r"Client addresses \(ray://\) are not supported",
    ):
        _compose(["federation.ray_address='ray://10.0.0.1:10001'"])


def test_ray_address_needs_the_ray_engine():
    with pytest.raises(
        ConfigError,
        match=r"^federation[.]ray_address: joins a Ray cluster, but "
        r"federation[.]engine=inprocess runs without Ray",
    ):
        _compose(["federation.ray_address=auto", "federation.engine=inprocess"])


def test_every_config_field_can_be_overridden_from_the_default_config():
    """A field the dataclass has but the YAML lacks cannot be set on the command line (Hydra's
    struct mode): the README's `federation.node_ids=[...]` failed that way."""
    import dataclasses

    from fedllm.config import _SECTION_TYPES, compose_hydra

    composed = compose_hydra([])
    tiny_only = {"hidden_size", "intermediate_size", "num_heads", "num_layers"}  # model=tiny's architecture
    for section, section_type in _SECTION_TYPES.items():
        missing = {f.name for f in dataclasses.fields(section_type)} - set(composed[section].keys())
        assert missing <= (tiny_only if section == "model" else set()), (section, missing)


def test_a_field_the_chosen_option_lacks_is_not_suggested_as_its_own_typo():
    from fedllm.config import compose_experiment
    from fedllm.errors import ConfigError

    with pytest.raises(ConfigError) as refused:
        compose_experiment(["model.hidden_size=32"])
    assert "did you mean" not in str(refused.value) and "model=tiny" in str(refused.value)


def test_own_records_train_free_form_answers_unless_fixed_answers_are_asked_for():
    from fedllm.config import compose_experiment

    assert compose_experiment(["data=jsonl", "data.path=r.jsonl"]).train.objective == "token"
    fixed = compose_experiment(["data=jsonl", "data.path=r.jsonl", "data.choices=[yes,no]", "train.objective=choices"])
    assert fixed.train.objective == "choices" and fixed.data.choices == ("yes", "no")
    assert compose_experiment([]).train.objective == "choices"  # the default sentiment task keeps its own


# Issue 14: every mode is a Literal; the allowed values come from it, and a wrong value (from YAML,
# so possibly not even text) is refused in one line naming the key and the choices.


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("privacy.mode=local", "privacy.mode: got 'local'; choose one of sample, client, both, none"),
        ("train.optimizer=adam", "train.optimizer: got 'adam'; choose one of adamw, sgd"),
        ("federation.engine=1", "federation.engine: got 1; choose one of ray, inprocess"),
        ("data.duplicates=skip", "data.duplicates: got 'skip'; choose one of drop, keep, refuse"),
    ],
)
def test_a_mode_outside_its_choices_names_the_key_and_the_choices(override, expected):
    with pytest.raises(ConfigError) as refused:
        _compose([override])
    assert str(refused.value) == expected


def _mode_fields() -> list[tuple[str, type, str, tuple[str, ...]]]:
    import typing

    return [
        (prefix, cls, f.name, typing.get_args(hint))
        for prefix, cls in _sections()
        for f in dataclasses.fields(cls)
        if typing.get_origin(hint := typing.get_type_hints(cls)[f.name]) is typing.Literal
    ]


def test_the_modes_of_every_section_are_literals():
    modes = {f"{prefix}.{name}" for prefix, _, name, _ in _mode_fields()}
    assert {
        "model.source",
        "model.dtype",
        "model.quantization",
        "data.name",
        "data.format",
        "data.partition",
        "data.overlong",
        "data.duplicates",
        "train.objective",
        "train.precision",
        "train.optimizer",
        "privacy.mode",
        "privacy.accountant",
        "privacy.grad_sample_mode",
        "privacy.noise",
        "privacy.client_clipping",
        "federation.aggregation",
        "federation.engine",
    } <= modes


@pytest.mark.parametrize(("prefix", "cls", "name", "choices"), _mode_fields())
def test_every_mode_refuses_a_value_outside_its_literal(prefix, cls, name, choices):
    with pytest.raises(ConfigError, match=rf"^{prefix}[.]{name}: got 'nope'; choose one of {', '.join(choices)}$"):
        _minimal(cls, **{name: "nope"})


def test_the_audit_kind_is_checked_like_the_experiments_modes():
    from fedllm.config import AuditConfig

    assert AuditConfig(kind="record").kind == "record"
    with pytest.raises(ConfigError, match=r"^audit[.]kind: got 'label'; choose one of gradient, record$"):
        AuditConfig.from_mapping({"kind": "label"})
