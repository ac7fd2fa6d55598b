"""Saving run state safely: atomic writes (a crash leaves the old file or the new one, never
half of one), checksums verified on load, and optional AES-256-GCM encryption."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from fedllm.errors import ConfigError, IntegrityError


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temp file, fsync and rename (and fsync the folder).

    The temp file's name is unique, so two processes writing the same path never write into
    each other's temp file: the last rename wins whole.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            os.fchmod(handle.fileno(), 0o644)  # mkstemp's 0600 would hide outputs from other readers
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)


def write_json(path: Path, payload: dict[str, Any]) -> None:
    """Write ``payload`` as indented, key-sorted JSON, atomically."""
    atomic_write_bytes(path, json.dumps(payload, indent=2, sort_keys=True).encode("utf-8"))


SEAL_MAGIC = b"FEDLLM-SEALED\x01"
KEY_BYTES = 32  # AES-256


def checksum(payload: dict[str, Any]) -> str:
    """SHA-256 of a JSON payload in canonical form (sorted keys), without its own checksum."""
    body = {k: v for k, v in payload.items() if k != "checksum"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode("utf-8")).hexdigest()


def with_checksum(payload: dict[str, Any]) -> dict[str, Any]:
    """``payload`` plus its ``checksum`` field."""
    return {**payload, "checksum": checksum(payload)}


def verify_checksum(payload: dict[str, Any], what: str) -> dict[str, Any]:
    """Return ``payload`` if its ``checksum`` matches.

    Raises:
        IntegrityError: the checksum is missing or does not match (the file was altered).
    """
    if payload.get("checksum") != checksum(payload):
        raise IntegrityError(f"{what}: checksum mismatch; the file is corrupted or was edited, and is not used")
    return payload


def seal(data: bytes, key: bytes | None) -> bytes:
    """``data`` with a SHA-256 header, AES-256-GCM encrypted when ``key`` is given."""
    header = {"sha256": hashlib.sha256(data).hexdigest(), "encrypted": key is not None}
    if key is not None:
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        nonce = os.urandom(12)
        data = nonce + AESGCM(key).encrypt(nonce, data, SEAL_MAGIC)
    return SEAL_MAGIC + json.dumps(header).encode("utf-8") + b"\n" + data


def unseal(blob: bytes, key: bytes | None, what: str) -> bytes:
    """Inverse of :func:`seal`, verifying the checksum.

    Raises:
        IntegrityError: not a sealed file, corrupted, encrypted without a key, or a wrong key.
    """
    try:
        if not blob.startswith(SEAL_MAGIC):
            raise ValueError("no fedllm header")
        header_line, data = blob[len(SEAL_MAGIC):].split(b"\n", 1)
        header = json.loads(header_line)
    except ValueError as exc:
        raise IntegrityError(f"{what}: not a fedllm sealed file or its header is corrupted ({exc})") from exc
    if header["encrypted"]:
        if key is None:
            raise IntegrityError(f"{what}: is encrypted; set storage.encrypt=true with the key that wrote it")
        from cryptography.exceptions import InvalidTag
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        try:
            data = AESGCM(key).decrypt(data[:12], data[12:], SEAL_MAGIC)
        except InvalidTag as exc:
            raise IntegrityError(f"{what}: cannot be decrypted: wrong encryption key, or the file was altered") from exc
    if hashlib.sha256(data).hexdigest() != header["sha256"]:
        raise IntegrityError(f"{what}: checksum mismatch; the file is corrupted and is not used")
    return data


def load_key(key_file: str | None, key_env: str) -> bytes:
    """The 32-byte AES key from ``key_file`` or the environment variable ``key_env`` (64 hex chars).

    Raises:
        ConfigError: no key, or not 32 bytes of hex.
    """
    source = key_file or f"${key_env}"
    if key_file:
        try:
            text = Path(key_file).read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ConfigError(f"storage.key_file: cannot read {key_file} ({exc})") from exc
    else:
        text = os.environ.get(key_env, "").strip()
    try:
        key = bytes.fromhex(text)
    except ValueError:
        key = b""
    if len(key) != KEY_BYTES:
        raise ConfigError(f"storage.encrypt=true needs a 256-bit key as 64 hex characters in {source} "
                          "(e.g. from `openssl rand -hex 32`)")
    return key


ADAPTER_WEIGHTS = "adapter_model.safetensors"
CHECKSUMS_FILE = "checksums.json"


def protect_adapter(folder: Path, key: bytes | None) -> None:
    """Record the SHA-256 of every file of a saved PEFT adapter (``checksums.json``); with a
    key, replace the weights by their encrypted, sealed form (``fedllm decrypt`` restores them)."""
    folder = Path(folder)
    weights = folder / ADAPTER_WEIGHTS
    if key is not None:
        atomic_write_bytes(folder / f"{ADAPTER_WEIGHTS}.sealed", seal(weights.read_bytes(), key))
        weights.unlink()
    sums = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())
            if p.is_file() and p.name != CHECKSUMS_FILE}
    write_json(folder / CHECKSUMS_FILE, with_checksum({"sha256": sums}))


def verify_adapter(folder: Path) -> None:
    """Check a saved adapter against its ``checksums.json``.

    Raises:
        IntegrityError: a file is missing, or differs from what was saved.
    """
    folder = Path(folder)
    try:
        sums = verify_checksum(json.loads((folder / CHECKSUMS_FILE).read_text(encoding="utf-8")),
                               str(folder / CHECKSUMS_FILE))["sha256"]
    except (OSError, ValueError) as exc:
        raise IntegrityError(f"{folder}: no readable {CHECKSUMS_FILE} ({exc})") from exc
    for name, expected in sums.items():
        path = folder / name
        if not path.is_file() or hashlib.sha256(path.read_bytes()).hexdigest() != expected:
            raise IntegrityError(f"{path}: missing or altered since it was saved (checksum mismatch)")
