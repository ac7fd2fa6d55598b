"""A node config's choices are checked as the experiment's are: one line naming the key and the
choices, whether read from ``--node-config`` or set on a policy directly."""

from __future__ import annotations

import pytest

from fedllm.errors import ConfigError
from fedllm.node.policy import NodePolicy, policy_from_node_config


def _node_config(tmp_path, **extra: str) -> dict[str, str]:
    return {
        "partition-id": "0",
        "state-dir": str(tmp_path),
        "data-path": str(tmp_path / "records.jsonl"),
        "max-epsilon": "8",
        "delta": "1e-5",
        "sampling-size": "1000",
        **extra,
    }


@pytest.mark.parametrize(
    ("key", "value", "choices"),
    [
        ("accountant", "gdp", "rdp, prv"),
        ("data-format", "xml", "auto, jsonl, csv"),  # was read as JSONL whatever it said
        ("overlong", "cut", "truncate, refuse"),
        ("duplicates", "skip", "drop, keep, refuse"),
    ],
)
def test_a_node_config_choice_outside_its_choices_names_the_key(tmp_path, key, value, choices):
    with pytest.raises(ConfigError) as refused:
        policy_from_node_config(_node_config(tmp_path, **{key: value}))
    assert str(refused.value) == f"node config {key}: got {value!r}; choose one of {choices}"


def test_the_node_configs_choices_are_kept():
    policy = policy_from_node_config(
        {
            "partition-id": "0",
            "state-dir": "/tmp/s",
            "data-path": "r.csv",
            "max-epsilon": "8",
            "delta": "1e-5",
            "sampling-size": "1000",
            "accountant": "rdp",
            "data-format": "csv",
            "overlong": "refuse",
            "duplicates": "keep",
        }
    )
    assert (policy.accountant, policy.data_format, policy.overlong, policy.duplicates) == (
        "rdp",
        "csv",
        "refuse",
        "keep",
    )


def test_a_policy_built_directly_is_checked_too(tmp_path):
    with pytest.raises(ConfigError, match="^node config accountant: got 'gdp'; choose one of rdp, prv$"):
        NodePolicy(
            partition_id=0,
            state_dir=tmp_path,
            max_epsilon=8.0,
            delta=1e-5,
            dataset_id="d",
            data_path="r.jsonl",
            sampling_size=1000,
            accountant="gdp",
        )  # type: ignore[arg-type]
