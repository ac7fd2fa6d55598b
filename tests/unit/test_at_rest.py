"""Data at rest under attack (issue 13, problem 7): each test plays someone who can write the
run's files but does not hold the key, and checks that what they write is refused."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save

from fedllm.cli.at_rest import decrypt_cli, verify_run
from fedllm.errors import IntegrityError
from fedllm.federation.checkpoint import STATE_FILE, Checkpointer, ServerState
from fedllm.node.reply_cache import REPLY_FILE, ReplyCache
from fedllm.storage import ROLE_CHECKPOINT_ADAPTER, ROLE_FINAL_ADAPTER, seal, unseal

KEY, OTHER = bytes(range(32)), bytes(32)
KEY_ENV = {"FEDLLM_ENCRYPTION_KEY": KEY.hex()}
V1_MAGIC = b"FEDLLM-SEALED\x01"  # the sealed format fedllm wrote before issue 13


def _state(value: float = 1.0, server_round: int = 1) -> ServerState:
    return ServerState(
        run_id="r", server_round=server_round, arrays={"a": torch.full((4,), value)}, ledger={}, rounds=[], config={}
    )


def _v1_plain(data: bytes) -> bytes:
    """A file in the old sealed format, unencrypted: anyone can write one."""
    header = {"sha256": hashlib.sha256(data).hexdigest(), "encrypted": False}
    return V1_MAGIC + json.dumps(header).encode() + b"\n" + data


def _checkpoint_adapter(folder: Path) -> Path:
    return folder / json.loads((folder / STATE_FILE).read_text())["adapter"]


def test_a_plaintext_adapter_swapped_into_an_encrypted_checkpoint_is_refused(tmp_path):
    Checkpointer(tmp_path, KEY).save(_state(1.0))
    forged = save({"a": torch.full((4,), 666.0)})
    adapter = _checkpoint_adapter(tmp_path)
    adapter.write_bytes(_v1_plain(forged))
    with pytest.raises(IntegrityError, match="not encrypted, but a key is configured"):
        Checkpointer(tmp_path, KEY).load()


@pytest.mark.parametrize("fmt", ["format-1", "format-2"])
def test_a_plaintext_sealed_file_is_refused_where_a_key_is_configured(fmt):
    """Even where no other record names the file (a node's reply cache, a final adapter)."""
    data = b"forged weights"
    blob = _v1_plain(data) if fmt == "format-1" else seal(data, None, role=ROLE_CHECKPOINT_ADAPTER, name="f")
    assert (
        unseal(blob, None, role=ROLE_CHECKPOINT_ADAPTER if fmt == "format-2" else None, name=None, what="f") == data
    )  # readable as what it is: an unencrypted file
    with pytest.raises(IntegrityError, match="not encrypted, but a key is configured"):
        unseal(blob, KEY, role=ROLE_CHECKPOINT_ADAPTER, name="f", what="f")


def test_an_encrypted_checkpoint_adapter_does_not_expose_the_plaintext_digest(tmp_path):
    state = _state(3.0)
    Checkpointer(tmp_path, KEY).save(state)
    plaintext = save({k: v.contiguous() for k, v in state.arrays.items()})
    blob = _checkpoint_adapter(tmp_path).read_bytes()
    assert hashlib.sha256(plaintext).hexdigest().encode() not in blob
    assert hashlib.sha256(plaintext).digest() not in blob


def test_an_edited_state_json_with_a_recomputed_checksum_is_refused_with_a_key(tmp_path):
    Checkpointer(tmp_path, KEY).save(_state())
    path = tmp_path / STATE_FILE
    payload = json.loads(path.read_text())
    payload["server_round"] = 7  # e.g. skip rounds, or roll the server ledger back
    payload.pop("checksum", None)
    payload.pop("mac", None)
    payload["checksum"] = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()
    path.write_text(json.dumps(payload))
    with pytest.raises(IntegrityError, match="unkeyed checksum"):
        Checkpointer(tmp_path, KEY).load()


def test_an_edited_state_json_keeping_its_mac_is_refused(tmp_path):
    Checkpointer(tmp_path, KEY).save(_state())
    path = tmp_path / STATE_FILE
    payload = json.loads(path.read_text())
    payload["server_round"] = 7
    path.write_text(json.dumps(payload))
    with pytest.raises(IntegrityError, match="wrong encryption key, or the file was edited"):
        Checkpointer(tmp_path, KEY).load()


def test_an_older_round_swapped_into_the_checkpoint_is_refused(tmp_path):
    checkpoints = Checkpointer(tmp_path, KEY)
    checkpoints.save(_state(1.0, server_round=1))
    older = _checkpoint_adapter(tmp_path).read_bytes()
    checkpoints.save(_state(2.0, server_round=2))
    _checkpoint_adapter(tmp_path).write_bytes(older)  # authentic, encrypted with the key, but round 1's
    with pytest.raises(IntegrityError, match="sealed as name 'adapter-round-1.sealed'"):
        checkpoints.load()


def test_an_older_copy_of_the_same_round_is_refused(tmp_path):
    checkpoints = Checkpointer(tmp_path, KEY)
    checkpoints.save(_state(1.0, server_round=2))
    older = _checkpoint_adapter(tmp_path).read_bytes()
    checkpoints.save(_state(2.0, server_round=2))  # round 2 saved again (after its evaluation)
    _checkpoint_adapter(tmp_path).write_bytes(older)
    with pytest.raises(IntegrityError, match="does not match the checkpoint's state.json"):
        checkpoints.load()


def _reply(value: float) -> tuple[dict[str, torch.Tensor], dict]:
    return {"lora_B": torch.full((8,), value)}, {"epsilon": 1.5}


def test_the_node_reply_cache_is_encrypted_when_the_node_has_a_key(tmp_path):
    arrays, metrics = _reply(123.456)
    cache_key = ("run", 3, "digest")
    ReplyCache(tmp_path, KEY).save(cache_key, arrays, metrics)
    raw = (tmp_path / REPLY_FILE).read_bytes()
    assert arrays["lora_B"].numpy().tobytes() not in raw and b"epsilon" not in raw
    found = ReplyCache(tmp_path, KEY).find(cache_key)
    assert found is not None and torch.equal(found.arrays["lora_B"], arrays["lora_B"])
    assert found.metrics == metrics
    assert ReplyCache(tmp_path, OTHER).find(cache_key) is None  # wrong key: retrain, never a crash
    assert ReplyCache(tmp_path).find(cache_key) is None


def test_a_forged_plaintext_reply_cache_is_not_replayed_by_a_node_with_a_key(tmp_path):
    arrays, metrics = _reply(9.0)
    cache_key = ("run", 3, "digest")
    ReplyCache(tmp_path).save(cache_key, arrays, metrics)  # what a node without a key (or an intruder) writes
    assert ReplyCache(tmp_path).find(cache_key) is not None
    assert ReplyCache(tmp_path, KEY).find(cache_key) is None


@pytest.mark.parametrize(
    "header",
    [b"{}", b"[]", b"null", b'{"encrypted": "yes", "sha256": 1}', b"[" * 5000, b'{"encrypted": true}', b"\xff\xfe"],
    ids=["empty", "list", "null", "types", "nested", "fields", "not-utf8"],
)
def test_decrypt_of_a_malformed_header_is_a_clean_error(tmp_path, monkeypatch, capsys, header):
    monkeypatch.setenv("FEDLLM_ENCRYPTION_KEY", KEY.hex())
    for magic in (V1_MAGIC, b"FEDLLM-SEALED\x02"):
        sealed = tmp_path / "x.sealed"
        sealed.write_bytes(magic + header + b"\n" + b"\x00" * 40)
        assert decrypt_cli([str(sealed)]) == 1
        err = capsys.readouterr().err
        assert err.startswith("fedllm decrypt: ") and "header" in err and "Traceback" not in err
        assert not (tmp_path / "x").exists()


def test_decrypt_of_a_missing_file_or_without_a_key_is_a_clean_error(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("FEDLLM_ENCRYPTION_KEY", raising=False)
    assert decrypt_cli([str(tmp_path / "absent.sealed"), "--key-file", str(tmp_path / "no-key")]) == 1
    assert capsys.readouterr().err.startswith("fedllm decrypt: ")
    (tmp_path / "present.sealed").write_bytes(seal(b"w", KEY, role=ROLE_FINAL_ADAPTER, name="present.sealed"))
    assert decrypt_cli([str(tmp_path / "present.sealed")]) == 1
    assert "64 hex characters" in capsys.readouterr().err


def test_verify_reports_an_unreadable_node_ledger_cleanly(tmp_path):
    node = tmp_path / "nodes" / "client-0"
    node.mkdir(parents=True)
    (node / "privacy_ledger.json").write_text("{not json")
    with pytest.raises(IntegrityError, match="privacy_ledger.json"):
        verify_run(tmp_path, None)


def test_verify_checks_each_nodes_ledger_salt(tmp_path):
    from fedllm.privacy.node_ledger import NodeLedger, Release, ShardContent
    from fedllm.privacy.record_keys import SALT_FILE

    node, content = tmp_path / "nodes" / "client-0", ShardContent.of([("a", "b")])
    with NodeLedger(node, "d", content, key=KEY).locked() as book:
        book.record(Release("r", 1, 1.0, 0.1, 5, content.fingerprint))
    assert verify_run(tmp_path, KEY) == ["nodes/client-0/privacy_ledger.json", f"nodes/client-0/{SALT_FILE}"]
    raw = bytearray((node / SALT_FILE).read_bytes())
    raw[-1] ^= 1
    (node / SALT_FILE).write_bytes(bytes(raw))
    with pytest.raises(IntegrityError, match=SALT_FILE):
        verify_run(tmp_path, KEY)


# ---------------------------------------------------------------- the final adapter


@pytest.fixture(scope="module")
def peft_model():
    from fedllm.config import LoraSettings, ModelConfig
    from fedllm.model.base import load_model, load_tokenizer
    from fedllm.model.lora import apply_lora

    tiny = ModelConfig(source="tiny")
    model = apply_lora(load_model(tiny, vocab_size=len(load_tokenizer(tiny)), seed=0), LoraSettings(r=4))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:  # recognisable values (B starts at zero)
                param.copy_(torch.linspace(1.25, 2.5, param.numel()).reshape(param.shape))
    return model


def _write_outputs(run_dir: Path, model, key: bytes | None) -> None:
    import time

    from fedllm.federation.outputs import write_outputs
    from fedllm.federation.server_app import new_ledger
    from fedllm.model.adapters import adapter_state
    from fedllm.tracking.run_files import RoundRecord
    from fedllm.tracking.run_log import RunLog
    from tests.conftest import tiny_config

    cfg = tiny_config()
    run_log = RunLog(run_dir, cfg.federation.num_rounds, False)
    run_log.log_round(RoundRecord(round=0, eval_loss=1.0, eval_accuracy=0.5))
    state = ServerState(run_id="r", server_round=0, arrays=adapter_state(model), ledger={}, rounds=[], config={})
    write_outputs(cfg, run_dir, model, state, new_ledger(cfg), run_log, key, started=time.perf_counter())
    run_log.close()


def test_an_encrypted_run_never_writes_the_final_adapter_in_plaintext(tmp_path, monkeypatch, peft_model):
    import peft.peft_model
    import safetensors.torch

    plain_writes = []

    def recording(original):
        def write(tensors, filename, *args, **kwargs):
            plain_writes.append(str(filename))
            return original(tensors, filename, *args, **kwargs)

        return write

    monkeypatch.setattr(peft.peft_model, "safe_save_file", recording(peft.peft_model.safe_save_file))
    monkeypatch.setattr(safetensors.torch, "save_file", recording(safetensors.torch.save_file))
    monkeypatch.setattr(torch, "save", recording(torch.save))
    _write_outputs(tmp_path, peft_model, KEY)
    assert plain_writes == []
    weights = next(p for n, p in peft_model.named_parameters() if "lora_B" in n).detach().numpy().tobytes()
    for path in tmp_path.rglob("*"):
        assert not path.is_file() or weights not in path.read_bytes(), path
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == [
        "README.md",
        "adapter_config.json",
        "adapter_model.safetensors.sealed",
        "checksums.json",
    ]


def test_the_decrypted_final_adapter_is_what_peft_writes(tmp_path, monkeypatch, peft_model, capsys):
    from fedllm.model.adapter_files import save_adapter, verify_adapter

    save_adapter(peft_model, tmp_path / "plain", None)
    save_adapter(peft_model, tmp_path / "sealed", KEY)
    verify_adapter(tmp_path / "plain", None)
    verify_adapter(tmp_path / "sealed", KEY)
    monkeypatch.setenv("FEDLLM_ENCRYPTION_KEY", KEY.hex())
    assert decrypt_cli([str(tmp_path / "sealed" / "adapter_model.safetensors.sealed")]) == 0
    assert "(final-adapter)" in capsys.readouterr().out
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        assert (tmp_path / "sealed" / name).read_bytes() == (tmp_path / "plain" / name).read_bytes(), name
    verify_adapter(tmp_path / "sealed", KEY)  # the decrypted copy beside the sealed one is checked, and fine
    with pytest.raises(IntegrityError, match="authenticated with an encryption key"):
        verify_adapter(tmp_path / "sealed", None)


def test_a_plaintext_adapter_beside_the_sealed_one_fails_verify(tmp_path, peft_model):
    from fedllm.model.adapter_files import save_adapter, verify_adapter, weights_bytes

    save_adapter(peft_model, tmp_path, KEY)
    forged = bytearray(weights_bytes(peft_model))
    forged[-1] ^= 1
    (tmp_path / "adapter_model.safetensors").write_bytes(bytes(forged))  # PEFT would load this one
    with pytest.raises(IntegrityError, match="differs from the sealed weights"):
        verify_adapter(tmp_path, KEY)
    (tmp_path / "adapter_model.safetensors").unlink()
    (tmp_path / "adapter_model.bin").write_bytes(b"x")
    with pytest.raises(IntegrityError, match="not part of the saved adapter"):
        verify_adapter(tmp_path, KEY)


def test_an_adapter_manifest_with_a_recomputed_checksum_is_refused_with_a_key(tmp_path, peft_model):
    from fedllm.model.adapter_files import save_adapter, verify_adapter

    save_adapter(peft_model, tmp_path, KEY)
    (tmp_path / "adapter_config.json").write_text('{"r": 64}')
    manifest = json.loads((tmp_path / "checksums.json").read_text())
    manifest["sha256"]["adapter_config.json"] = hashlib.sha256(b'{"r": 64}').hexdigest()
    del manifest["mac"]
    manifest["checksum"] = hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()
    (tmp_path / "checksums.json").write_text(json.dumps(manifest))
    verify_adapter(tmp_path, None)  # without a key a checksum is all there is: corruption only
    with pytest.raises(IntegrityError, match="unkeyed checksum"):
        verify_adapter(tmp_path, KEY)


def test_verify_checks_an_encrypted_run_and_says_what_is_only_checksummed(tmp_path, peft_model, capsys, monkeypatch):
    from fedllm.cli.at_rest import verify_cli
    from fedllm.model.adapter_files import save_adapter
    from fedllm.privacy.node_ledger import LEDGER_FILE
    from fedllm.storage import ROLE_NODE_LEDGER, dump_json_file

    save_adapter(peft_model, tmp_path / "adapter", KEY)
    Checkpointer(tmp_path / "checkpoint", KEY).save(_state())
    for client, key in ((0, KEY), (1, None)):  # each node decides whether its state is encrypted
        node = tmp_path / "nodes" / f"client-{client}"
        ReplyCache(node, key).save(("r", 1, "d"), *_reply(1.0))
        (node / LEDGER_FILE).write_bytes(dump_json_file({"format": 2}, key, role=ROLE_NODE_LEDGER, name=LEDGER_FILE))
    monkeypatch.setenv("FEDLLM_ENCRYPTION_KEY", KEY.hex())
    assert verify_cli([str(tmp_path)]) == 0
    assert capsys.readouterr().out.strip() == (
        "ok: adapter, checkpoint, nodes/client-0/last_reply.sealed, nodes/client-0/privacy_ledger.json, "
        "nodes/client-1/last_reply.sealed (not encrypted: checksum only), "
        "nodes/client-1/privacy_ledger.json (not encrypted: checksum only)"
    )
    monkeypatch.setenv("FEDLLM_ENCRYPTION_KEY", OTHER.hex())
    assert verify_cli([str(tmp_path)]) == 1
    assert "wrong encryption key" in capsys.readouterr().err


def test_a_crash_between_the_two_saves_of_a_round_leaves_a_valid_checkpoint(tmp_path, monkeypatch):
    """Each round is saved twice (before and after evaluation): the state file still on disk
    must keep vouching for the adapter file if the second save dies before it is replaced."""
    import fedllm.federation.checkpoint as checkpoint

    checkpoints = Checkpointer(tmp_path, KEY)
    checkpoints.save(_state(1.0, server_round=2))
    real_write = checkpoint.write_json

    def crash(path, payload):
        raise KeyboardInterrupt("killed before state.json is replaced")

    monkeypatch.setattr(checkpoint, "write_json", crash)
    second = _state(1.0, server_round=2)
    second.rounds = [{"round": 2}]
    with pytest.raises(KeyboardInterrupt):
        checkpoints.save(second)
    monkeypatch.setattr(checkpoint, "write_json", real_write)
    assert Checkpointer(tmp_path, KEY).load().server_round == 2
