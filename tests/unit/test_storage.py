"""Data at rest: atomic writes, checksums verified on load, AES-256-GCM with clear key errors."""

from __future__ import annotations

import json

import pytest
import torch

from fedllm.errors import ConfigError, IntegrityError, LedgerError
from fedllm.federation.checkpoint import Checkpointer, ServerState
from fedllm.privacy.node_ledger import LEDGER_FILE, NodeLedger, Release
from fedllm.storage import load_key, protect_adapter, seal, unseal, verify_adapter

KEY, OTHER = bytes(range(32)), bytes(32)


def test_sealed_data_round_trips_plain_and_encrypted():
    assert unseal(seal(b"weights", None), None, "f") == b"weights"
    sealed = seal(b"weights", KEY)
    assert b"weights" not in sealed
    assert unseal(sealed, KEY, "f") == b"weights"


@pytest.mark.parametrize(("key", "message"), [(OTHER, "wrong encryption key"), (None, "is encrypted")])
def test_a_wrong_or_missing_key_is_a_clear_error(key, message):
    with pytest.raises(IntegrityError, match=message):
        unseal(seal(b"weights", KEY), key, "f")


def test_a_flipped_byte_is_detected():
    sealed = bytearray(seal(b"weights" * 10, None))
    sealed[-3] ^= 1
    with pytest.raises(IntegrityError, match="checksum mismatch"):
        unseal(bytes(sealed), None, "f")
    with pytest.raises(IntegrityError, match="not a fedllm sealed file"):
        unseal(b"plain bytes", None, "f")


def test_keys_come_from_a_file_or_the_environment(tmp_path, monkeypatch):
    (tmp_path / "key").write_text(KEY.hex() + "\n")
    assert load_key(str(tmp_path / "key"), "UNSET_VAR") == KEY
    monkeypatch.setenv("MY_KEY", OTHER.hex())
    assert load_key(None, "MY_KEY") == OTHER
    monkeypatch.setenv("MY_KEY", "abcd")
    with pytest.raises(ConfigError, match="64 hex characters"):
        load_key(None, "MY_KEY")


def test_an_encrypted_checkpoint_needs_its_key(tmp_path):
    state = ServerState(run_id="r", server_round=1, arrays={"a": torch.ones(3)}, ledger={}, rounds=[], config={})
    Checkpointer(tmp_path, KEY).save(state)
    assert torch.equal(Checkpointer(tmp_path, KEY).load().arrays["a"], torch.ones(3))
    with pytest.raises(IntegrityError, match="wrong encryption key"):
        Checkpointer(tmp_path, OTHER).load()
    with pytest.raises(IntegrityError, match="is encrypted"):
        Checkpointer(tmp_path, None).load()


def test_an_edited_checkpoint_state_is_detected(tmp_path):
    Checkpointer(tmp_path).save(ServerState(run_id="r", server_round=1, arrays={"a": torch.ones(1)}, ledger={},
                                            rounds=[], config={}))
    state = json.loads((tmp_path / "state.json").read_text())
    state["server_round"] = 5
    (tmp_path / "state.json").write_text(json.dumps(state))
    with pytest.raises(IntegrityError, match="checksum mismatch"):
        Checkpointer(tmp_path).load()


def test_an_edited_node_ledger_is_detected_and_kept(tmp_path):
    with NodeLedger(tmp_path, "fp").locked() as ledger:
        ledger.record(Release("r", 1, 0.8, 0.02, 5, "fp"))
    payload = json.loads((tmp_path / LEDGER_FILE).read_text())
    payload["datasets"]["fp"]["releases"][0]["steps"] = 1  # someone tries to shrink the spend
    (tmp_path / LEDGER_FILE).write_text(json.dumps(payload))
    with pytest.raises(LedgerError, match="checksum mismatch"):
        NodeLedger(tmp_path, "fp")


def test_adapter_checksums_and_encryption(tmp_path):
    (tmp_path / "adapter_model.safetensors").write_bytes(b"w" * 10)
    (tmp_path / "adapter_config.json").write_text("{}")
    protect_adapter(tmp_path, KEY)
    assert not (tmp_path / "adapter_model.safetensors").exists()
    assert unseal((tmp_path / "adapter_model.safetensors.sealed").read_bytes(), KEY, "f") == b"w" * 10
    verify_adapter(tmp_path)
    (tmp_path / "adapter_config.json").write_text('{"r": 64}')
    with pytest.raises(IntegrityError, match="adapter_config.json: missing or altered"):
        verify_adapter(tmp_path)
