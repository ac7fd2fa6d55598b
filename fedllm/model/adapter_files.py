"""The final adapter on disk: PEFT's folder format, with a manifest, and sealed weights when a
key is configured.

Without a key the folder is exactly what ``save_pretrained`` writes, plus ``checksums.json``
(SHA-256 of every file: detects corruption, not tampering). With a key the weights are
serialised in memory and only their sealed form (``adapter_model.safetensors.sealed``,
AES-256-GCM) is ever written: no plaintext weights touch the disk, not even for a moment;
the manifest carries an HMAC instead of a checksum. ``fedllm decrypt`` writes the plain
weights file PEFT loads, byte for byte what ``save_pretrained`` would have written.
"""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

import torch
from peft import PeftModel, get_peft_model_state_dict
from safetensors.torch import load, save

from fedllm.errors import IntegrityError
from fedllm.storage import (
    ROLE_ADAPTER_MANIFEST,
    ROLE_FINAL_ADAPTER,
    atomic_write_bytes,
    file_sha256,
    protect_json,
    seal,
    unseal,
    verify_json,
    write_json,
)

log = logging.getLogger(__name__)

ADAPTER_WEIGHTS = "adapter_model.safetensors"
SEALED_WEIGHTS = f"{ADAPTER_WEIGHTS}.sealed"
CHECKSUMS_FILE = "checksums.json"


def save_adapter(
    model: PeftModel, folder: Path, key: bytes | None, base_name: str | None = None, card: str | None = None
) -> None:
    """Save ``model``'s adapter into ``folder`` in PEFT's format and write its manifest.

    Args:
        model: the PEFT model whose active adapter is saved.
        folder: the adapter folder (created if needed).
        key: the storage key: the weights are then written sealed only.
        base_name: the base model's portable name for ``adapter_config.json``
            (:func:`fedllm.model.base.base_reference`; default: what the model was loaded from).
        card: the model card (``README.md``; default: PEFT's template).
    """
    folder = Path(folder)
    config = model.peft_config[model.active_adapter]
    loaded_from = config.base_model_name_or_path
    if base_name is not None:
        config.base_model_name_or_path = base_name
    try:
        if key is None:
            model.save_pretrained(str(folder), save_embedding_layers=_embeddings_trained(model))
        else:
            _save_sealed(model, folder, key)
    finally:  # the live model is shared (cached): leave its config as it was
        config.base_model_name_or_path = loaded_from
    _sort_target_modules(folder)
    if card is not None:
        atomic_write_bytes(folder / "README.md", card.encode("utf-8"))
    write_manifest(folder, key)


def _save_sealed(model: PeftModel, folder: Path, key: bytes) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    model.create_or_update_model_card(str(folder))
    _save_config(model, folder)
    atomic_write_bytes(
        folder / SEALED_WEIGHTS, seal(weights_bytes(model), key, role=ROLE_FINAL_ADAPTER, name=SEALED_WEIGHTS)
    )
    stale = folder / ADAPTER_WEIGHTS
    if stale.exists():  # plaintext from an earlier, unencrypted save into this folder: not this run's output
        log.warning("%s: removing plain adapter weights left from an earlier save (this run is encrypted)", stale)
        stale.unlink()


def _embeddings_trained(model: PeftModel) -> bool:
    """Whether LoRA targets an embedding. PEFT's default ("auto") otherwise looks up the base
    model's config by its name, on the hub when the name is a hub id: a save never goes online."""
    targets = getattr(model.peft_config[model.active_adapter], "target_modules", None) or ()
    return any("embed" in name or name == "lm_head" for name in targets)


def weights_bytes(model: PeftModel) -> bytes:
    """The adapter weights serialised as ``save_pretrained`` writes them (safetensors, in memory)."""
    state = get_peft_model_state_dict(model, save_embedding_layers=_embeddings_trained(model))
    seen: set[int] = set()
    for name, tensor in state.items():
        storage = tensor.untyped_storage().data_ptr()
        if storage in seen:  # safetensors refuses aliased tensors: PEFT clones them too
            state[name] = tensor.clone()
        seen.add(storage)
    state = {name: tensor.contiguous() for name, tensor in state.items()}
    return save(state, metadata={"format": "pt"})


def _save_config(model: PeftModel, folder: Path) -> None:
    """``adapter_config.json`` as ``save_pretrained`` writes it (for inference, base model named)."""
    config = copy.deepcopy(model.peft_config[model.active_adapter])
    if config.base_model_name_or_path is None:
        config.base_model_name_or_path = model.base_model.model.__dict__.get("name_or_path", None) or None
    config.inference_mode = True
    config.save_pretrained(str(folder))


def _sort_target_modules(folder: Path) -> None:
    """PEFT keeps ``target_modules`` as a set and writes it in the set's iteration order, which
    depends on the string hash seed: sorted, the same adapter gives the same bytes in every process."""
    path = folder / "adapter_config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    if isinstance(config.get("target_modules"), list):
        config["target_modules"] = sorted(config["target_modules"])
        atomic_write_bytes(path, json.dumps(config, indent=2, sort_keys=True).encode("utf-8"))  # PEFT's layout


def write_manifest(folder: Path, key: bytes | None) -> None:
    """Record the SHA-256 of every file of the adapter folder in ``checksums.json`` (with a
    key: authenticated by an HMAC)."""
    folder = Path(folder)
    sums = {p.name: file_sha256(p) for p in sorted(folder.iterdir()) if p.is_file() and p.name != CHECKSUMS_FILE}
    write_json(
        folder / CHECKSUMS_FILE, protect_json({"sha256": sums}, key, role=ROLE_ADAPTER_MANIFEST, name=CHECKSUMS_FILE)
    )


def verify_adapter(folder: Path, key: bytes | None) -> None:
    """Check a saved adapter against its ``checksums.json``.

    A file the manifest does not list is an error (PEFT would load a plain weights file
    swapped in beside the sealed one), except the plain weights ``fedllm decrypt`` writes
    beside the sealed ones, which must then decrypt to the same bytes.

    Raises:
        IntegrityError: the manifest is unreadable or fails its check, or a file is missing,
            altered or unexpected.
    """
    folder = Path(folder)
    manifest_path = folder / CHECKSUMS_FILE
    try:
        payload = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise IntegrityError(f"{folder}: no readable {CHECKSUMS_FILE} ({exc})") from exc
    manifest = verify_json(payload, key, role=ROLE_ADAPTER_MANIFEST, name=CHECKSUMS_FILE, what=str(manifest_path))
    sums = manifest.get("sha256")
    if not (isinstance(sums, dict) and all(isinstance(v, str) for v in sums.values())):
        raise IntegrityError(f"{manifest_path}: no file list; the manifest is corrupted")
    for name, expected in sums.items():
        path = folder / name
        if Path(name).name != name or not path.is_file() or file_sha256(path) != expected:
            raise IntegrityError(f"{path}: missing or altered since it was saved (checksum mismatch)")
    for path in sorted(folder.iterdir()):
        if path.name in sums or path.name == CHECKSUMS_FILE:
            continue
        if path.name == ADAPTER_WEIGHTS and SEALED_WEIGHTS in sums:
            _check_decrypted_copy(folder, key)
        else:
            raise IntegrityError(f"{path}: not part of the saved adapter (not in {CHECKSUMS_FILE}); remove it")


def read_adapter_weights(folder: Path, key: bytes | None) -> dict[str, torch.Tensor]:
    """The weights of a saved adapter folder, checked against its manifest first (PEFT's names,
    as ``set_peft_model_state_dict`` takes them); sealed weights are decrypted in memory.

    Raises:
        IntegrityError: the folder fails :func:`verify_adapter`, or sealed weights need the key.
    """
    folder = Path(folder)
    verify_adapter(folder, key)
    sealed = folder / SEALED_WEIGHTS
    if not sealed.is_file():
        return load((folder / ADAPTER_WEIGHTS).read_bytes())
    if key is None:
        raise IntegrityError(f"{sealed}: the adapter is encrypted; give the storage key")
    return load(unseal(sealed.read_bytes(), key, role=ROLE_FINAL_ADAPTER, name=SEALED_WEIGHTS, what=str(sealed)))


def _check_decrypted_copy(folder: Path, key: bytes | None) -> None:
    plain = folder / ADAPTER_WEIGHTS
    if key is None:
        raise IntegrityError(f"{plain}: a plain copy of the sealed weights cannot be checked without the key")
    sealed = folder / SEALED_WEIGHTS
    content = unseal(sealed.read_bytes(), key, role=ROLE_FINAL_ADAPTER, name=SEALED_WEIGHTS, what=str(sealed))
    if plain.read_bytes() != content:
        raise IntegrityError(f"{plain}: differs from the sealed weights it should be decrypted from; remove it")
