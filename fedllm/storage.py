"""Saving run state safely: atomic writes (a crash leaves the old file or the new one, never
half of one), integrity checked on load, and optional AES-256-GCM encryption.

Two protections, and what each is worth:

* **No key**: a SHA-256 checksum. It detects corruption (a torn write, a flipped bit), not
  tampering: whoever can write the file can recompute it.
* **A key** (256 bits, from a file or an environment variable): sealed files are AES-256-GCM
  encrypted with their header (which names the file's role and name) as associated data;
  readable JSON files carry an HMAC-SHA256 over their content, role and name, and private
  JSON files (:func:`dump_json_file`, e.g. a node's ledger) are sealed. Without the key nobody
  can forge, edit or swap in a file (one of another role or name, or a plaintext one) that
  is accepted. What a key cannot detect is a rollback to an older authentic copy of the
  same file: that takes a record outside the file (see the checkpoint's adapter digest).

The encryption and MAC keys are derived from the configured key with HKDF, one per purpose.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

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


KEY_BYTES = 32  # AES-256

# The role a protected file plays: bound into its MAC or associated data, so a file of one
# role (or name) cannot be passed off as another.
ROLE_CHECKPOINT_ADAPTER = "checkpoint-adapter"
ROLE_CHECKPOINT_STATE = "checkpoint-state"
ROLE_FINAL_ADAPTER = "final-adapter"
ROLE_ADAPTER_MANIFEST = "adapter-manifest"
ROLE_NODE_REPLY = "node-reply"
ROLE_NODE_LEDGER = "node-ledger"
ROLE_RUN_MANIFEST = "run-manifest"

_NEEDS_KEY = "set storage.encrypt=true (on a node: its encryption key) with the key that wrote it"


def file_sha256(path: Path) -> str:
    """The hex SHA-256 of a file's bytes (what the adapter's and a run's manifests record)."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _subkey(key: bytes, purpose: str) -> bytes:
    """A key for one purpose only, derived from the configured key (HKDF-SHA256)."""
    return HKDF(
        algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None, info=f"fedllm/at-rest/2/{purpose}".encode()
    ).derive(key)


# ---------------------------------------------------------------- JSON files: checksum or MAC


def _canonical(body: dict[str, Any]) -> bytes:
    return json.dumps(body, sort_keys=True).encode("utf-8")


def checksum(payload: dict[str, Any]) -> str:
    """SHA-256 of a JSON payload in canonical form (sorted keys), without its own checksum."""
    body = {k: v for k, v in payload.items() if k != "checksum"}
    return hashlib.sha256(_canonical(body)).hexdigest()


def with_checksum(payload: dict[str, Any]) -> dict[str, Any]:
    """``payload`` plus its unkeyed ``checksum`` field (detects corruption, not tampering)."""
    return {**payload, "checksum": checksum(payload)}


def verify_checksum(payload: dict[str, Any], what: str) -> dict[str, Any]:
    """Return ``payload`` if its ``checksum`` matches.

    Raises:
        IntegrityError: not a JSON object, or the checksum is missing or does not match.
    """
    if not isinstance(payload, dict) or payload.get("checksum") != checksum(payload):
        raise IntegrityError(f"{what}: checksum mismatch; the file is corrupted or was edited, and is not used")
    return payload


def _mac(body: dict[str, Any], key: bytes, role: str, name: str) -> str:
    binding = json.dumps({"role": role, "name": name}, sort_keys=True).encode("utf-8")
    message = b"fedllm-json/2\n" + binding + b"\n" + _canonical(body)
    return hmac.new(_subkey(key, "json-mac"), message, hashlib.sha256).hexdigest()


def protect_json(payload: dict[str, Any], key: bytes | None, *, role: str, name: str) -> dict[str, Any]:
    """``payload`` plus a ``checksum`` (no key) or a ``mac`` over content, role and name (key).

    Args:
        payload: the JSON object to protect (an old ``checksum``/``mac`` field is replaced).
        key: the storage key, or None.
        role: what the file is (one of the ``ROLE_*`` constants).
        name: the file's name in its folder.
    """
    body = {k: v for k, v in payload.items() if k not in ("checksum", "mac")}
    if key is None:
        return with_checksum(body)
    return {**body, "mac": _mac(body, key, role, name)}


def verify_json(payload: Any, key: bytes | None, *, role: str, name: str, what: str) -> dict[str, Any]:
    """The content of a JSON object written by :func:`protect_json`, checked.

    Returns:
        ``payload`` without its ``checksum``/``mac`` field.

    Raises:
        IntegrityError: not an object; without a key, a checksum mismatch or a file that needs a
            key; with a key, a file with only an unkeyed checksum, or a MAC that does not match.
    """
    if not isinstance(payload, dict):
        raise IntegrityError(f"{what}: not a JSON object; the file is corrupted and is not used")
    if key is None:
        if "mac" in payload:
            raise IntegrityError(f"{what}: is authenticated with an encryption key; {_NEEDS_KEY}")
        verify_checksum(payload, what)
        return {k: v for k, v in payload.items() if k != "checksum"}
    if "mac" not in payload:
        raise IntegrityError(
            f"{what}: carries only an unkeyed checksum, which anyone who can write the file can recompute (it was "
            "written without encryption, or by fedllm before issue 13); with a key configured it is not trusted. "
            "Use the storage settings it was written with, or start afresh"
        )
    body = {k: v for k, v in payload.items() if k != "mac"}
    if not hmac.compare_digest(str(payload["mac"]).encode("utf-8"), _mac(body, key, role, name).encode("utf-8")):
        raise IntegrityError(
            f"{what}: fails its authentication check: wrong encryption key, or the file was "
            "edited or moved; it is not used"
        )
    return body


# ---------------------------------------------------------------- sealed (binary) files

SEAL_MAGIC = b"FEDLLM-SEALED\x02"
LEGACY_SEAL_MAGIC = b"FEDLLM-SEALED\x01"  # before issue 13: unbound header, plaintext digest
_MAX_HEADER = 1024
_NONCE = 12
_DIGEST = 32


@dataclass(frozen=True)
class SealedHeader:
    """What a sealed file says about itself (authenticated only when encrypted)."""

    version: int
    encrypted: bool
    role: str | None  # None in format 1
    name: str | None
    legacy_sha256: str | None = None  # format 1 only: the plaintext's digest


def _header_line(encrypted: bool, role: str, name: str) -> bytes:
    return json.dumps(
        {"encrypted": encrypted, "role": role, "name": name}, sort_keys=True, separators=(",", ":")
    ).encode("utf-8")


def seal(data: bytes, key: bytes | None, *, role: str, name: str) -> bytes:
    """``data`` in fedllm's sealed format, bound to ``role`` and ``name``.

    With a key the content is AES-256-GCM encrypted and the header (encrypted flag, role,
    name) is its associated data; without one a SHA-256 over header and content follows the
    content (corruption only). The header never holds a digest of the plaintext.
    """
    prefix = SEAL_MAGIC + _header_line(key is not None, role, name) + b"\n"
    if key is None:
        return prefix + data + hashlib.sha256(prefix + data).digest()
    nonce = os.urandom(_NONCE)
    return prefix + nonce + AESGCM(_subkey(key, "seal")).encrypt(nonce, data, prefix)


def is_sealed(blob: bytes) -> bool:
    """Whether ``blob`` starts like a sealed file (any format)."""
    return blob.startswith((SEAL_MAGIC, LEGACY_SEAL_MAGIC))


def read_header(blob: bytes, what: str) -> tuple[SealedHeader, bytes, bytes]:
    """``(header, prefix, body)`` of a sealed file; nothing is verified yet.

    Raises:
        IntegrityError: not a sealed file, or a header that is not exactly what fedllm writes.
    """
    version = 2 if blob.startswith(SEAL_MAGIC) else 1 if blob.startswith(LEGACY_SEAL_MAGIC) else 0
    if not version:
        raise IntegrityError(f"{what}: not a fedllm sealed file (no fedllm header)")
    start = len(SEAL_MAGIC)
    end = blob.find(b"\n", start, start + _MAX_HEADER)
    bad = IntegrityError(f"{what}: the fedllm header is corrupted or not one fedllm writes; the file is not used")
    if end < 0:
        raise bad
    try:
        fields = json.loads(blob[start:end])
    except (ValueError, RecursionError):
        raise bad from None
    expected = {"encrypted": bool, "role": str, "name": str} if version == 2 else {"encrypted": bool, "sha256": str}
    if not (
        isinstance(fields, dict)
        and set(fields) == set(expected)
        and all(isinstance(fields[k], kind) for k, kind in expected.items())
    ):
        raise bad
    if version == 2:
        header = SealedHeader(2, fields["encrypted"], fields["role"], fields["name"])
    else:
        header = SealedHeader(1, fields["encrypted"], None, None, legacy_sha256=fields["sha256"])
    return header, blob[: end + 1], blob[end + 1 :]


def unseal(
    blob: bytes, key: bytes | None, *, role: str | None, name: str | None, what: str, legacy: bool = False
) -> bytes:
    """The content of a sealed file, checked.

    Args:
        blob: the file's bytes.
        key: the storage key, or None. With a key only encrypted files are accepted: a
            plaintext file where an encrypted one is expected may have been swapped in.
        role, name: what the file must be (None: whatever its authenticated header says,
            for ``fedllm decrypt``).
        what: how to name the file in errors.
        legacy: accept an encrypted file of format 1 (no role/name binding) with the key.
            Only for ``fedllm decrypt``; a format-1 plaintext file is read without a key
            either way (it is as trustworthy as a format-2 one: not at all).

    Raises:
        IntegrityError: not a sealed file, corrupted, encrypted without a key, a wrong key or
            altered, plaintext where a key is configured, or of another role or name.
    """
    header, prefix, body = read_header(blob, what)
    if header.encrypted and key is None:
        raise IntegrityError(f"{what}: is encrypted; {_NEEDS_KEY}")
    if not header.encrypted and key is not None:
        raise IntegrityError(
            f"{what}: is not encrypted, but a key is configured: a plaintext file where an encrypted one is expected "
            "is refused (it may have been swapped in). If it was written without encryption, read it with the "
            "settings it was written with"
        )
    if header.version == 1:
        return _unseal_legacy(header, body, key, what, legacy)
    if key is None:
        data, digest = body[:-_DIGEST], body[-_DIGEST:]
        if len(body) < _DIGEST or not hmac.compare_digest(hashlib.sha256(prefix + data).digest(), digest):
            raise IntegrityError(f"{what}: checksum mismatch; the file is corrupted and is not used")
    else:
        data = _decrypt(_subkey(key, "seal"), body, prefix, what)
    for field, wanted, found in (("role", role, header.role), ("name", name, header.name)):
        if wanted is not None and found != wanted:
            raise IntegrityError(
                f"{what}: was sealed as {field} {found!r}, expected {wanted!r}: it was moved or "
                "swapped in from elsewhere, and is not used"
            )
    return data


def _decrypt(key: bytes, body: bytes, associated: bytes, what: str) -> bytes:
    try:
        return AESGCM(key).decrypt(body[:_NONCE], body[_NONCE:], associated)
    except (InvalidTag, ValueError) as exc:
        raise IntegrityError(f"{what}: cannot be decrypted: wrong encryption key, or the file was altered") from exc


def _unseal_legacy(header: SealedHeader, body: bytes, key: bytes | None, what: str, legacy: bool) -> bytes:
    """Format 1: its header was not authenticated and named no role, so an encrypted one is
    opened only on request (``fedllm decrypt``), where the key still proves who wrote it."""
    if key is not None:
        if not legacy:
            raise IntegrityError(
                f"{what}: was written by fedllm before issue 13 (sealed format 1), which does not bind a file to its "
                "role and name, so it is not used with a key configured. `fedllm decrypt` still opens it with its "
                "key; a checkpoint in this format cannot be resumed: start the run afresh"
            )
        data = _decrypt(key, body, LEGACY_SEAL_MAGIC, what)  # format 1 used the key itself
    else:
        data = body
    if not hmac.compare_digest(hashlib.sha256(data).hexdigest().encode(), (header.legacy_sha256 or "").encode()):
        raise IntegrityError(f"{what}: checksum mismatch; the file is corrupted and is not used")
    return data


# ---------------------------------------------------------------- JSON files that may be encrypted


def dump_json_file(payload: dict[str, Any], key: bytes | None, *, role: str, name: str) -> bytes:
    """A JSON state file's bytes: readable JSON with a checksum (no key), or sealed (key).

    For files that are private to their owner, such as a node's privacy ledger.
    """
    if key is None:
        return json.dumps(protect_json(payload, None, role=role, name=name), indent=2, sort_keys=True).encode()
    return seal(_canonical(payload), key, role=role, name=name)


def load_json_file(raw: bytes, key: bytes | None, *, role: str, name: str, what: str) -> dict[str, Any]:
    """Inverse of :func:`dump_json_file`, checked.

    Raises:
        IntegrityError: unreadable, corrupted, plaintext with a key configured, encrypted
            without one, a wrong key, or another role or name.
    """
    if is_sealed(raw):
        try:
            payload = json.loads(unseal(raw, key, role=role, name=name, what=what))
        except (ValueError, RecursionError) as exc:
            raise IntegrityError(f"{what}: decrypted, but not valid JSON ({exc})") from exc
        if not isinstance(payload, dict):
            raise IntegrityError(f"{what}: not a JSON object; the file is not used")
        return payload
    if key is not None:
        raise IntegrityError(
            f"{what}: is not encrypted, but a key is configured: a plaintext file where an encrypted one is expected "
            "is refused (it may have been swapped in)"
        )
    try:
        payload = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise IntegrityError(f"{what}: not valid JSON ({exc}); the file is corrupted and is not used") from exc
    return verify_json(payload, None, role=role, name=name, what=what)


# ---------------------------------------------------------------- keys


def load_key(key_file: str | None, key_env: str, setting: str = "storage.encrypt=true") -> bytes:
    """The 32-byte key from ``key_file`` or the environment variable ``key_env`` (64 hex chars).

    Args:
        key_file: a file holding the key (takes precedence), or None.
        key_env: the environment variable to read otherwise.
        setting: the setting that asked for a key, named in errors.

    Raises:
        ConfigError: no key, or not 32 bytes of hex.
    """
    source = key_file or f"${key_env}"
    if key_file:
        try:
            text = Path(key_file).read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{setting}: cannot read the key file {key_file} ({exc})") from exc
    else:
        text = os.environ.get(key_env, "").strip()
    try:
        key = bytes.fromhex(text)
    except ValueError:
        key = b""
    if len(key) != KEY_BYTES:
        raise ConfigError(
            f"{setting} needs a 256-bit key as 64 hex characters in {source} (e.g. from `openssl rand -hex 32`)"
        )
    return key
