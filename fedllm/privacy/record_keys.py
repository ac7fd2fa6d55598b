"""What counts as "the same record" in a node's ledger, and the keyed name it is kept under.

A node's budget follows its records, not its files (issue 23, item 4): renaming, copying,
appending to, reordering or exporting a data file must never give the records it still holds
a fresh budget. So the ledger names each record by its content:

* **The same record** is the same (prompt, response) pair *as loaded* (after the node's
  ``prompt-field``/``response-field`` mapping, JSONL or CSV alike), each text in Unicode NFC
  with surrounding whitespace removed. File name, path, format, field names, record order and
  position do not matter. Anything else does: a fixed typo, changed case or inner whitespace
  makes a **new record**, which starts at zero (the old one keeps its history, and stops
  counting for this file only because the file no longer holds it).
* **Keyed names.** In memory a record is the SHA-256 of its normalised content; in the ledger
  file it is HMAC-SHA256 of that digest under a random 256-bit salt of the node's state
  directory (``privacy_ledger.salt``, never sent, sealed with the node's storage key when
  ``encrypt-state`` is on), truncated to 128 bits. The ledger file alone therefore does not let
  anyone test whether a guessed record was trained on. The ledger stores a check value of the
  salt, so a lost or swapped salt file is an error, never a silent reset of every record.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import tempfile
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from fedllm.errors import IntegrityError, LedgerError
from fedllm.storage import ROLE_NODE_LEDGER, dump_json_file, load_json_file

SALT_FILE = "privacy_ledger.salt"
SALT_BYTES = 32
NAME_HEX = 32  # 128 bits of each keyed name: no collision among any node's records in practice
_SALT_CHECK = b"fedllm node ledger: salt check"


def normalise(text: str) -> str:
    """A record text as the ledger compares it: Unicode NFC, surrounding whitespace removed."""
    return unicodedata.normalize("NFC", text).strip()


def content_digest(prompt: str, response: str) -> bytes:
    """SHA-256 of one record's normalised (prompt, response), length-prefixed (no ambiguous joins)."""
    digest = hashlib.sha256()
    for text in (normalise(prompt), normalise(response)):
        data = text.encode("utf-8")
        digest.update(len(data).to_bytes(8, "little"))
        digest.update(data)
    return digest.digest()


def fingerprint(records: Iterable[tuple[str, str]]) -> str:
    """SHA-256 over the node's training records (prompt, response), exactly and in order (information only)."""
    digest = hashlib.sha256()
    for prompt, response in records:
        for text in (prompt, response):
            data = text.encode("utf-8")
            digest.update(len(data).to_bytes(8, "little"))  # length-prefixed: no ambiguous joins
            digest.update(data)
    return digest.hexdigest()


@dataclass(frozen=True)
class ShardContent:
    """The records a node presents for a round: what its ledger charges a release to.

    ``digests`` (unkeyed, see :func:`content_digest`) stay in memory and are never written;
    ``fingerprint`` is the whole file's, kept on each release for information.
    """

    fingerprint: str
    digests: frozenset[bytes]

    @classmethod
    def of(cls, records: Iterable[tuple[str, str]]) -> ShardContent:
        """The content of ``records`` ((prompt, response) pairs as loaded)."""
        pairs = list(records)
        return cls(fingerprint(pairs), frozenset(content_digest(p, r) for p, r in pairs))


def record_names(salt: bytes, digests: Iterable[bytes]) -> frozenset[str]:
    """The ledger's keyed names (hex, 128 bits) of records with content ``digests``."""
    size = NAME_HEX // 2
    return frozenset(hmac.digest(salt, d, "sha256")[:size].hex() for d in digests)  # one-shot, in C


def record_set_id(names: Iterable[str]) -> str:
    """The content address of a set of record names (order and repeats do not matter)."""
    return hashlib.sha256("\n".join(sorted(set(names))).encode("ascii")).hexdigest()[:NAME_HEX]


def salt_check(salt: bytes) -> str:
    """A value the ledger keeps to tell the salt it was written with (reveals nothing of it)."""
    return hmac.new(salt, _SALT_CHECK, hashlib.sha256).hexdigest()[:NAME_HEX]


def load_salt(state_dir: Path, key: bytes | None) -> bytes | None:
    """The state directory's salt, or None when it has none yet.

    Raises:
        LedgerError: the salt file exists but cannot be read, fails its checksum or decryption.
    """
    path = Path(state_dir) / SALT_FILE
    if not path.exists():
        return None
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise LedgerError(f"{path}: cannot read the ledger's salt ({exc})") from exc
    try:
        payload = load_json_file(raw, key, role=ROLE_NODE_LEDGER, name=SALT_FILE, what=str(path))
        salt = bytes.fromhex(payload["salt"])
    except (IntegrityError, KeyError, TypeError, ValueError) as exc:
        raise LedgerError(
            f"{path}: the ledger's salt cannot be read ({exc}); without it no record's history can be "
            "found: restore it from a backup"
        ) from exc
    if len(salt) != SALT_BYTES:
        raise LedgerError(f"{path}: the ledger's salt has {len(salt)} bytes, expected {SALT_BYTES}")
    return salt


def create_salt(state_dir: Path, key: bytes | None) -> bytes:
    """The state directory's salt, drawn from OS entropy and persisted if it has none yet.

    Created whole or not at all (written to a temp file, fsynced, then hard-linked to its name,
    which fails if it exists): two processes never end up with two salts.

    Raises:
        LedgerError: the salt cannot be written or read back.
    """
    state_dir = Path(state_dir)
    existing = load_salt(state_dir, key)
    if existing is not None:
        return existing
    data = dump_json_file({"salt": secrets.token_bytes(SALT_BYTES).hex()}, key, role=ROLE_NODE_LEDGER, name=SALT_FILE)
    try:
        state_dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{SALT_FILE}.", suffix=".tmp", dir=state_dir)
        try:
            with os.fdopen(fd, "wb") as handle:  # mkstemp's 0600: the salt is the node's only
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            try:
                os.link(tmp, state_dir / SALT_FILE)
            except FileExistsError:
                pass  # another process created it first: use that one
        finally:
            Path(tmp).unlink(missing_ok=True)
        dir_fd = os.open(state_dir, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError as exc:
        raise LedgerError(f"{state_dir / SALT_FILE}: cannot create the ledger's salt ({exc})") from exc
    salt = load_salt(state_dir, key)
    if salt is None:
        raise LedgerError(f"{state_dir / SALT_FILE}: the ledger's salt vanished after it was created")
    return salt
