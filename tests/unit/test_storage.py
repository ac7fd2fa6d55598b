"""Data at rest: atomic writes, checksums verified on load, AES-256-GCM with clear key errors.

Attacks on these files (swaps, forged checksums, plaintext in place of ciphertext) are in
test_at_rest.py."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch

from fedllm.errors import ConfigError, IntegrityError, LedgerError
from fedllm.federation.checkpoint import Checkpointer, ServerState
from fedllm.model.adapter_files import verify_adapter, write_manifest
from fedllm.privacy.node_ledger import LEDGER_FILE, NodeLedger, Release
from fedllm.storage import (
    ROLE_NODE_LEDGER,
    ROLE_NODE_REPLY,
    dump_json_file,
    load_json_file,
    load_key,
    protect_json,
    seal,
    unseal,
    verify_json,
)

KEY, OTHER = bytes(range(32)), bytes(32)
BOUND = {"role": ROLE_NODE_REPLY, "name": "f"}


def _seal(data: bytes, key: bytes | None) -> bytes:
    return seal(data, key, **BOUND)


def _unseal(blob: bytes, key: bytes | None) -> bytes:
    return unseal(blob, key, **BOUND, what="f")


def test_sealed_data_round_trips_plain_and_encrypted():
    assert _unseal(_seal(b"weights", None), None) == b"weights"
    sealed = _seal(b"weights", KEY)
    assert b"weights" not in sealed
    assert _unseal(sealed, KEY) == b"weights"
    assert _seal(b"weights", KEY) != sealed  # a fresh nonce every time


@pytest.mark.parametrize(("key", "message"), [(OTHER, "wrong encryption key"), (None, "is encrypted")])
def test_a_wrong_or_missing_key_is_a_clear_error(key, message):
    with pytest.raises(IntegrityError, match=message):
        _unseal(_seal(b"weights", KEY), key)


@pytest.mark.parametrize("key", [None, KEY])
def test_a_flipped_byte_is_detected(key):
    sealed = bytearray(_seal(b"weights" * 10, key))
    sealed[-40] ^= 1
    with pytest.raises(IntegrityError, match="checksum mismatch" if key is None else "the file was altered"):
        _unseal(bytes(sealed), key)
    with pytest.raises(IntegrityError, match="not a fedllm sealed file"):
        _unseal(b"plain bytes", key)


@pytest.mark.parametrize("key", [None, KEY])
def test_a_sealed_file_is_bound_to_its_role_and_name(key):
    sealed = _seal(b"weights", key)
    with pytest.raises(IntegrityError, match="sealed as role 'node-reply', expected 'node-ledger'"):
        unseal(sealed, key, role=ROLE_NODE_LEDGER, name="f", what="f")
    with pytest.raises(IntegrityError, match="sealed as name 'f', expected 'g'"):
        unseal(sealed, key, role=ROLE_NODE_REPLY, name="g", what="f")
    assert unseal(sealed, key, role=None, name=None, what="f") == b"weights"  # fedllm decrypt


def test_an_edited_header_of_an_encrypted_file_is_detected():
    sealed = _seal(b"weights", KEY)
    forged = sealed.replace(b'"name":"f"', b'"name":"g"')
    assert forged != sealed
    with pytest.raises(IntegrityError, match="wrong encryption key, or the file was altered"):
        unseal(forged, KEY, role=ROLE_NODE_REPLY, name="g", what="f")


def test_format_1_files_are_read_only_where_that_is_safe():
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    data, magic = b"weights", b"FEDLLM-SEALED\x01"
    header = json.dumps({"sha256": hashlib.sha256(data).hexdigest(), "encrypted": True}).encode()
    nonce = bytes(12)
    old = magic + header + b"\n" + nonce + AESGCM(KEY).encrypt(nonce, data, magic)  # as fedllm wrote it before
    with pytest.raises(IntegrityError, match="sealed format 1"):
        _unseal(old, KEY)
    assert unseal(old, KEY, role=None, name=None, what="f", legacy=True) == data  # fedllm decrypt still opens it
    with pytest.raises(IntegrityError, match="wrong encryption key"):
        unseal(old, OTHER, role=None, name=None, what="f", legacy=True)


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
    with pytest.raises(IntegrityError, match="authenticated with an encryption key"):
        Checkpointer(tmp_path, None).load()


def test_an_edited_checkpoint_state_is_detected(tmp_path):
    Checkpointer(tmp_path).save(
        ServerState(run_id="r", server_round=1, arrays={"a": torch.ones(1)}, ledger={}, rounds=[], config={})
    )
    state = json.loads((tmp_path / "state.json").read_text())
    state["server_round"] = 5
    (tmp_path / "state.json").write_text(json.dumps(state))
    with pytest.raises(IntegrityError, match="checksum mismatch"):
        Checkpointer(tmp_path).load()


def test_a_checkpoint_written_before_issue_13_still_resumes_without_a_key(tmp_path):
    from safetensors.torch import save

    data = save({"a": torch.full((2,), 4.0)})
    header = json.dumps({"sha256": hashlib.sha256(data).hexdigest(), "encrypted": False}).encode()
    (tmp_path / "adapter-round-3.sealed").write_bytes(b"FEDLLM-SEALED\x01" + header + b"\n" + data)
    state = {
        "run_id": "r",
        "server_round": 3,
        "adapter": "adapter-round-3.sealed",
        "ledger": {},
        "rounds": [],
        "config": {},
        "stop_reason": None,
    }
    (tmp_path / "state.json").write_text(
        json.dumps({**state, "checksum": hashlib.sha256(json.dumps(state, sort_keys=True).encode()).hexdigest()})
    )
    loaded = Checkpointer(tmp_path).load()
    assert loaded.server_round == 3 and torch.equal(loaded.arrays["a"], torch.full((2,), 4.0))
    with pytest.raises(IntegrityError, match="unkeyed checksum"):
        Checkpointer(tmp_path, KEY).load()


def test_a_checkpoint_state_cannot_point_outside_its_folder(tmp_path):
    Checkpointer(tmp_path).save(
        ServerState(run_id="r", server_round=1, arrays={"a": torch.ones(1)}, ledger={}, rounds=[], config={})
    )
    state = json.loads((tmp_path / "state.json").read_text())
    state["adapter"] = "../../etc/passwd"
    (tmp_path / "state.json").write_text(
        json.dumps(protect_json(state, None, role="checkpoint-state", name="state.json"))
    )
    with pytest.raises(IntegrityError, match="names no checkpoint adapter"):
        Checkpointer(tmp_path).load()


def test_an_edited_node_ledger_is_detected_and_kept(tmp_path):
    with NodeLedger(tmp_path, "fp").locked() as ledger:
        ledger.record(Release("r", 1, 0.8, 0.02, 5, "fp"))
    payload = json.loads((tmp_path / LEDGER_FILE).read_text())
    payload["datasets"]["fp"]["releases"][0]["steps"] = 1  # someone tries to shrink the spend
    (tmp_path / LEDGER_FILE).write_text(json.dumps(payload))
    with pytest.raises(LedgerError, match="checksum mismatch"):
        NodeLedger(tmp_path, "fp")


@pytest.mark.parametrize("key", [None, KEY])
def test_json_files_round_trip_and_refuse_the_other_mode(key):
    payload = {"format": 2, "datasets": {"d": [1, 2.5, "x"]}}
    raw = dump_json_file(payload, key, role=ROLE_NODE_LEDGER, name="l.json")
    assert (b'"datasets"' in raw) == (key is None)  # readable without a key, encrypted with one
    assert load_json_file(raw, key, role=ROLE_NODE_LEDGER, name="l.json", what="l") == payload
    other = KEY if key is None else None
    with pytest.raises(
        IntegrityError, match="not encrypted, but a key is configured" if key is None else "is encrypted"
    ):
        load_json_file(raw, other, role=ROLE_NODE_LEDGER, name="l.json", what="l")
    with pytest.raises(IntegrityError, match="not valid JSON"):
        load_json_file(b"{oops", None, role=ROLE_NODE_LEDGER, name="l.json", what="l")


def test_a_json_mac_binds_role_and_name():
    signed = protect_json({"a": 1}, KEY, role=ROLE_NODE_LEDGER, name="x.json")
    assert verify_json(signed, KEY, role=ROLE_NODE_LEDGER, name="x.json", what="x") == {"a": 1}
    for role, name in ((ROLE_NODE_LEDGER, "y.json"), ("checkpoint-state", "x.json")):
        with pytest.raises(IntegrityError, match="wrong encryption key, or the file was edited or moved"):
            verify_json(signed, KEY, role=role, name=name, what="x")
    with pytest.raises(IntegrityError, match="wrong encryption key"):
        verify_json(signed, OTHER, role=ROLE_NODE_LEDGER, name="x.json", what="x")


def test_adapter_checksums_and_encryption(tmp_path):
    (tmp_path / "adapter_model.safetensors.sealed").write_bytes(_seal(b"w" * 10, KEY))
    (tmp_path / "adapter_config.json").write_text("{}")
    write_manifest(tmp_path, KEY)
    verify_adapter(tmp_path, KEY)
    (tmp_path / "adapter_config.json").write_text('{"r": 64}')
    with pytest.raises(IntegrityError, match="adapter_config.json: missing or altered"):
        verify_adapter(tmp_path, KEY)
