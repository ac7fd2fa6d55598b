"""The node ledger's file: its releases, record sets and salt check, in every format it was written in.

Format 3 (issue 23) holds ``record_sets`` (content address -> keyed record names, see
:mod:`fedllm.privacy.record_keys`), a ``salt_check``, releases filed per dataset id (each naming
the record set it is charged to, or none) and the format-1 ``legacy`` section. Format 2 (keyed by
dataset id, whole-file fingerprints only) and format 1 (keyed by fingerprint) load with every
release naming no record set. Writers and readers share this module, so they cannot drift.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from fedllm.errors import IntegrityError, LedgerError
from fedllm.privacy.record_keys import NAME_HEX, record_set_id
from fedllm.storage import ROLE_NODE_LEDGER, load_json_file

LEDGER_FILE = "privacy_ledger.json"
FORMAT_VERSION = 3
_NAME = re.compile(f"[0-9a-f]{{{NAME_HEX}}}")

NEVER_RESET = (
    "it is never reset automatically: restore it from a backup or, knowing the privacy it "
    "recorded is lost, move it away"
)


@dataclass(frozen=True)
class Release:
    """One round of DP-SGD on the node's records whose result left (or may leave) the node."""

    run_id: str
    server_round: int
    noise_multiplier: float
    sample_rate: float
    steps: int
    fingerprint: str  # the whole file it trained on, in order: information only
    records: str = ""  # content address of the record set it is charged to; "": unknown, charged to every record

    def to_dict(self) -> dict[str, Any]:
        """JSON-able fields."""
        return asdict(self)

    @classmethod
    def from_dict(cls, entry: Mapping[str, Any]) -> Release:
        """Inverse of :meth:`to_dict`.

        Raises:
            ValueError: a field is missing, unknown or of the wrong type.
        """
        # the annotations' text (this module postpones their evaluation): "str", "int" or "float"
        expected = {f.name: str(f.type) for f in fields(cls)}
        if set(entry) != set(expected):
            raise ValueError(f"a release has fields {sorted(entry)}, expected {sorted(expected)}")
        types = {"str": (str,), "int": (int,), "float": (int, float)}
        for name, kind in expected.items():
            value = entry[name]
            if isinstance(value, bool) or not isinstance(value, types[kind]):
                raise ValueError(f"release field {name!r} is {value!r}, expected {kind}")
        return cls(**entry)


Books = dict[str, list[Release]]  # key (dataset id, or a format-1 fingerprint) -> releases, oldest first
RecordSets = dict[str, frozenset[str]]  # content address -> keyed record names


@dataclass
class LedgerState:
    """The ledger file's content."""

    datasets: Books = field(default_factory=dict)
    legacy: Books = field(default_factory=dict)  # format-1 histories no dataset has claimed, by fingerprint
    record_sets: RecordSets = field(default_factory=dict)
    salt_check: str = ""  # "" until a release names a record set
    v1_raw: bytes | None = None  # the bytes of a format-1 file, backed up when first rewritten

    def releases(self) -> list[Release]:
        """Every release of the file: the unclaimed format-1 ones, then each dataset's, oldest first."""
        books = [self.legacy[k] for k in sorted(self.legacy)] + [self.datasets[k] for k in sorted(self.datasets)]
        return [r for book in books for r in book]


def load_ledger(path: Path, storage_key: bytes | None) -> LedgerState:
    """The ledger at ``path`` (empty when there is none), in any format this fedllm reads.

    Raises:
        LedgerError: unreadable, fails its checksum (or, with a key, its decryption), plaintext
            where a key is configured, malformed, or of an unknown format.
    """
    if not path.exists():
        return LedgerState()
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise LedgerError(f"{path}: the privacy ledger cannot be read ({exc}); {NEVER_RESET}") from exc
    return parse_ledger(raw, path, storage_key)


def parse_ledger(raw: bytes | None, path: Path, storage_key: bytes | None) -> LedgerState:
    """The ledger whose file bytes are ``raw`` (None: no file, an empty ledger), as :func:`load_ledger`
    reads it; for callers that check the very bytes they parse (the ledger's anchor).

    Raises:
        LedgerError: as :func:`load_ledger`.
    """
    if raw is None:
        return LedgerState()
    try:
        payload = load_json_file(raw, storage_key, role=ROLE_NODE_LEDGER, name=LEDGER_FILE, what=str(path))
        version = payload.get("format")
        if version == 1:
            # format 1 keyed histories by content fingerprint, and its releases had no fingerprint field
            legacy = {
                key: [{**entry, "fingerprint": key, "records": ""} for entry in book["releases"]]
                for key, book in payload["datasets"].items()
            }
            return LedgerState(legacy=_books(legacy), v1_raw=raw)
        if version == 2:
            # format 2 keyed budgets by dataset id: its releases name no record set (charged to every record)
            return LedgerState(_books(_unattributed(payload["datasets"])), _books(_unattributed(payload["legacy"])))
        if version == FORMAT_VERSION:
            state = LedgerState(
                _books({key: book["releases"] for key, book in payload["datasets"].items()}),
                _books({key: book["releases"] for key, book in payload["legacy"].items()}),
                _record_sets(payload["record_sets"]),
                _salt_check(payload["salt_check"]),
            )
            _check_references(state)
            return state
        raise ValueError(f"format {version!r}; this fedllm reads formats 1 to {FORMAT_VERSION}")
    except IntegrityError as exc:
        raise LedgerError(f"{exc}; the privacy ledger {NEVER_RESET}") from exc
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise LedgerError(f"{path}: the privacy ledger cannot be read ({exc}); {NEVER_RESET}") from exc


def _unattributed(section: Mapping[str, Mapping[str, Sequence[Mapping[str, Any]]]]) -> dict[str, list[dict]]:
    """A format-2 section's releases, each naming no record set."""
    return {key: [{**entry, "records": ""} for entry in book["releases"]] for key, book in section.items()}


def _record_sets(entries: Mapping[str, Sequence[str]]) -> RecordSets:
    sets = {}
    for set_id, names in entries.items():
        if not _NAME.fullmatch(set_id) or not all(isinstance(n, str) and _NAME.fullmatch(n) for n in names):
            raise ValueError(f"record set {set_id!r} holds a name that is not {NAME_HEX} hex digits")
        if record_set_id(names) != set_id:
            raise ValueError(f"record set {set_id!r} does not hold the records its address names")
        sets[set_id] = frozenset(names)
    return sets


def _salt_check(value: Any) -> str:
    if not isinstance(value, str) or (value and not _NAME.fullmatch(value)):
        raise ValueError(f"salt_check is {value!r}, expected {NAME_HEX} hex digits or empty")
    return value


def _check_references(state: LedgerState) -> None:
    """Every release names a stored record set or none, and stored sets need the salt's check value."""
    missing = sorted({r.records for r in state.releases() if r.records and r.records not in state.record_sets})
    if missing:
        raise ValueError(f"releases name record sets the file does not hold: {', '.join(missing)}")
    if state.record_sets and not state.salt_check:
        raise ValueError("the file holds record sets but no salt_check")


def _books(entries: Mapping[str, Sequence[Mapping[str, Any]]]) -> Books:
    return {str(key): [Release.from_dict(entry) for entry in releases] for key, releases in entries.items()}


def dump_ledger(state: LedgerState) -> dict[str, Any]:
    def books(of: Books) -> dict[str, Any]:
        return {key: {"releases": [r.to_dict() for r in releases]} for key, releases in of.items()}

    return {
        "format": FORMAT_VERSION,
        "salt_check": state.salt_check,
        "record_sets": {set_id: sorted(names) for set_id, names in state.record_sets.items()},
        "datasets": books(state.datasets),
        "legacy": books(state.legacy),
    }
