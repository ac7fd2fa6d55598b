"""A node's state at rest (issue 13, problem 7): with a key, its ledger and reply cache are
encrypted, and plaintext or edited copies are refused; the key never enters a config."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedllm.config import ExperimentConfig, FederationConfig, PrivacyConfig, StorageConfig
from fedllm.errors import ConfigError, LedgerError
from fedllm.federation import records as keys
from fedllm.node.policy import policy_from_node_config, simulated_node_config
from fedllm.node.reply_cache import REPLY_FILE
from fedllm.privacy.node_ledger import LEDGER_FILE, NodeLedger, Release
from fedllm.storage import with_checksum
from tests.conftest import tiny_config
from tests.node_driver import run_round

KEY = bytes(range(32))


def _cfg(state_dir: Path, encrypt: bool) -> ExperimentConfig:
    return tiny_config(
        privacy=PrivacyConfig(state_dir=str(state_dir)),
        storage=StorageConfig(encrypt=encrypt),
        federation=FederationConfig(num_clients=3, num_rounds=2),
    )


def test_an_encrypted_simulation_encrypts_each_nodes_ledger_and_reply_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDLLM_ENCRYPTION_KEY", KEY.hex())
    cfg = _cfg(tmp_path, encrypt=True)
    node_config = simulated_node_config(cfg, 0)
    assert KEY.hex() not in json.dumps(node_config)  # where the key is, never the key
    first = run_round(cfg, "run-a", 1)
    state = tmp_path / "client-0"
    for name in (LEDGER_FILE, REPLY_FILE):
        raw = (state / name).read_bytes()
        assert raw.startswith(b"FEDLLM-SEALED\x02") and b"run-a" not in raw, name
    again = run_round(cfg, "run-a", 1)  # replayed from the encrypted cache: no new privacy cost
    assert again.content[keys.METRICS][keys.REPLAYED] == 1
    assert again.content[keys.METRICS][keys.EPSILON] == first.content[keys.METRICS][keys.EPSILON]
    assert len(NodeLedger(state, "simulated-shard-0", key=KEY).releases) == 1
    with pytest.raises(LedgerError, match="is encrypted"):
        NodeLedger(state, "simulated-shard-0")


def test_an_encrypted_node_without_its_key_fails_locally(tmp_path, monkeypatch):
    monkeypatch.delenv("FEDLLM_ENCRYPTION_KEY", raising=False)
    reply = run_round(_cfg(tmp_path, encrypt=True), "run-a", 1)
    assert reply.content[keys.STATUS][keys.CATEGORY] == "error"  # the detail stays in the node's log
    assert not (tmp_path / "client-0" / LEDGER_FILE).exists()


def test_a_plaintext_ledger_with_a_recomputed_checksum_is_refused_with_a_key(tmp_path):
    with NodeLedger(tmp_path, "d", key=KEY).locked() as ledger:
        ledger.record(Release("r", 1, 0.8, 0.02, 5, "fp"))
    forged = {"format": 2, "datasets": {"d": {"releases": []}}, "legacy": {}}  # the spend wiped
    (tmp_path / LEDGER_FILE).write_text(json.dumps(with_checksum(forged)))
    assert NodeLedger(tmp_path, "d").releases == ()  # without a key a checksum is all there is
    with pytest.raises(LedgerError, match="not encrypted, but a key is configured"):
        NodeLedger(tmp_path, "d", key=KEY)


def test_a_deployed_node_reads_its_key_from_its_own_variable_or_file(tmp_path, monkeypatch):
    base = {"partition-id": 0, "state-dir": str(tmp_path), "data-path": "x.jsonl", "max-epsilon": 8, "delta": 1e-5}
    base["sampling-size"] = 100
    assert policy_from_node_config(base).state_key() is None
    policy = policy_from_node_config({**base, "encrypt-state": "true"})
    monkeypatch.delenv("FEDLLM_NODE_KEY", raising=False)
    with pytest.raises(ConfigError, match="node config encrypt-state=true needs a 256-bit key .* \\$FEDLLM_NODE_KEY"):
        policy.state_key()
    monkeypatch.setenv("FEDLLM_NODE_KEY", KEY.hex())
    assert policy.state_key() == KEY
    (tmp_path / "key").write_text(bytes(32).hex())
    assert policy_from_node_config(
        {**base, "encrypt-state": "true", "state-key-file": str(tmp_path / "key")}
    ).state_key() == bytes(32)
