"""Every config group composes into a valid ExperimentConfig; bad values name the key."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from fedllm.config import (
    DataConfig,
    ExperimentConfig,
    ModelConfig,
    PrivacyConfig,
    TrainConfig,
    from_hydra,
)
from fedllm.errors import ConfigError

CONF = Path(__file__).resolve().parents[2] / "conf"


def _compose(overrides: list[str]) -> ExperimentConfig:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return from_hydra(compose(config_name="config", overrides=overrides))


def _group_options() -> list[tuple[str, str]]:
    return [(group.name, option.stem) for group in sorted(CONF.iterdir()) if group.is_dir()
            for option in sorted(group.glob("*.yaml"))]


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


@pytest.mark.parametrize(("build", "key"), [
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
])
def test_invalid_values_raise_config_error_naming_the_key(build, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        build()


def test_unknown_override_key_is_a_config_error():
    raw = ExperimentConfig(data=DataConfig(choices=("a", "b"))).to_dict()
    raw["privacy"]["epsilon"] = 3
    with pytest.raises(ConfigError, match="privacy: unknown key"):
        ExperimentConfig.from_dict(raw)


def test_config_sections_are_frozen():
    cfg = ExperimentConfig(data=DataConfig(choices=("a", "b")))
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.privacy.target_epsilon = 100  # type: ignore[misc]


@pytest.mark.parametrize(("overrides", "key"), [
    (["model=pretrained"], "model.name_or_path"),
    (["data=jsonl", "train.objective=token"], "data.path"),
])
def test_required_values_left_unset_name_the_key(overrides, key):
    with pytest.raises(ConfigError, match=rf"{key.replace('.', '[.]')}: required"):
        _compose(overrides)
