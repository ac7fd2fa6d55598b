"""A node's own, persisted record of every DP-SGD mechanism that touched its data.

One JSON file per node state directory holds, per dataset as the node names it (its
``dataset-id``), every release: noise multiplier, sample rate, steps, run id, round and the
content fingerprint of the records it trained on. The budget belongs to the dataset id, not
to the fingerprint: appending or reordering records keeps the history (the new fingerprint is
recorded for information). Epsilon is always recomputed from this history by a real
accountant, so a node that crashes, restarts, or joins a second run continues from what it
has spent over its whole lifetime; it never starts again at zero.

Check and record are atomic against other processes: :meth:`NodeLedger.locked` takes an
exclusive ``flock`` on a sidecar lock file and re-reads the ledger, so two runs on one node
cannot both spend the last of its budget. Writes are atomic (temp file, fsync, rename), the
file carries a checksum verified on load, and a file that cannot be read is an error, never
a silent reset.

Format 1 (before issue 12) keyed histories by fingerprint. Its histories are kept, never
dropped, in a ``legacy`` section: until a release of a dataset presents the same fingerprint
(and so claims that history for its dataset id), a legacy history is composed into the budget
of every dataset of the state directory, because nothing says whose records it spent.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from fedllm.config import AccountantName
from fedllm.errors import ConfigError, IntegrityError, LedgerError
from fedllm.privacy.accounting import History, epsilon, extend_history
from fedllm.storage import ROLE_NODE_LEDGER, atomic_write_bytes, dump_json_file, load_json_file

LEDGER_FILE = "privacy_ledger.json"
LOCK_FILE = f"{LEDGER_FILE}.lock"
V1_BACKUP_FILE = "privacy_ledger.v1.json"  # the format-1 file as it was, kept when it is first rewritten
FORMAT_VERSION = 2
LOCK_TIMEOUT_S = 600.0
_LOCK_POLL_S = 0.05

_NEVER_RESET = (
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
    fingerprint: str  # content of the records it trained on: information only, not the budget's key

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


def fingerprint(records: Iterable[tuple[str, str]]) -> str:
    """SHA-256 over the node's training records (prompt, response), in order."""
    digest = hashlib.sha256()
    for prompt, response in records:
        for text in (prompt, response):
            data = text.encode("utf-8")
            digest.update(len(data).to_bytes(8, "little"))  # length-prefixed: no ambiguous joins
            digest.update(data)
    return digest.hexdigest()


Books = dict[str, list[Release]]  # key (dataset id, or a format-1 fingerprint) -> releases, oldest first


class NodeLedger:
    """The releases of one dataset (as the node names it) in a node's state directory.

    A new object is a read-only view of the file as it was then. To check a budget and
    record a release, do both inside ``with ledger.locked() as book:``, which re-reads the
    file under an exclusive lock. There is no ``load_state_dict``: the file is the state, and
    loading another one into it would be a way to rewrite a node's history.
    One object serves one thread.
    """

    def __init__(self, state_dir: Path, dataset_id: str, fingerprint: str | None = None, *, key: bytes | None = None):
        """Read the ledger of ``dataset_id`` in ``state_dir`` (no lock taken).

        Args:
            state_dir: the node's state directory.
            dataset_id: the name the node keeps this dataset's budget under.
            fingerprint: the records' content fingerprint now; other datasets' releases of the
                same content (the file renamed or copied under another name) count here too.
            key: the node's storage key: the ledger is then AES-256-GCM encrypted and bound to
                its role and name, and a plaintext ledger is refused. Without one it is JSON
                with a checksum, which detects corruption, not tampering.

        Raises:
            ConfigError: ``dataset_id`` is empty.
            LedgerError: the ledger file exists but cannot be read or fails its checksum.
        """
        if not isinstance(dataset_id, str) or not dataset_id:
            raise ConfigError(f"a node's dataset id must be a non-empty string, got {dataset_id!r}")
        self.state_dir = Path(state_dir)
        self.path = self.state_dir / LEDGER_FILE
        self.dataset_id = dataset_id
        self.fingerprint = fingerprint
        self.key = key
        self._lock_fd: int | None = None
        self._datasets, self._legacy, self._v1_raw = _load(self.path, key)

    @property
    def releases(self) -> tuple[Release, ...]:
        """Every release this dataset's budget composes, oldest first: the format-1 histories no
        dataset has claimed (they may be this dataset's), the releases of other dataset names
        that trained on these very records (same fingerprint), then its own."""
        unclaimed = [r for key in sorted(self._legacy) for r in self._legacy[key]]
        same_records = (
            [
                r
                for key in sorted(self._datasets)
                if key != self.dataset_id and any(x.fingerprint == self.fingerprint for x in self._datasets[key])
                for r in self._datasets[key]
            ]
            if self.fingerprint
            else []
        )
        return tuple(unclaimed + same_records + self._datasets.get(self.dataset_id, []))

    @property
    def recorded(self) -> int:
        """How many releases the file holds, every dataset's and the unclaimed format-1 ones:
        each record adds exactly one (claiming moves releases, never adds them)."""
        return sum(len(r) for r in self._datasets.values()) + sum(len(r) for r in self._legacy.values())

    @contextmanager
    def locked(self, timeout: float = LOCK_TIMEOUT_S) -> Iterator[NodeLedger]:
        """Hold this state directory's ledger lock, with the ledger re-read from disk.

        Args:
            timeout: seconds to wait for another process's lock before giving up.

        Returns:
            A context manager yielding this ledger, current and writable until the block ends.

        Raises:
            LedgerError: the lock is already held by this object, another process held it for
                ``timeout`` seconds, the lock file cannot be opened, or the ledger cannot be read.
        """
        if self._lock_fd is not None:
            raise LedgerError(f"{self.path}: this ledger is already locked by this object (locked() is not re-entrant)")
        fd = _acquire(self.state_dir / LOCK_FILE, timeout)
        try:
            # another run may have recorded since this view was read: check against the file as it is now
            self._datasets, self._legacy, self._v1_raw = _load(self.path, self.key)
            self._lock_fd = fd
            yield self
        finally:
            self._lock_fd = None
            _release(fd)

    def history(self) -> History:
        """The DP-SGD history of every release this dataset's budget composes."""
        history: History = []
        for release in self.releases:
            history = extend_history(
                history, noise_multiplier=release.noise_multiplier, sample_rate=release.sample_rate, steps=release.steps
            )
        return history

    def epsilon(self, *, delta: float, accountant: AccountantName) -> float:
        """Epsilon at ``delta`` spent by this dataset over the node's lifetime."""
        return epsilon(self.history(), delta=delta, accountant=accountant)

    def find(self, run_id: str, server_round: int) -> Release | None:
        """The last release recorded for ``(run_id, server_round)``, if any."""
        matches = [r for r in self.releases if r.run_id == run_id and r.server_round == server_round]
        return matches[-1] if matches else None

    def record(self, release: Release) -> None:
        """Append ``release`` to this dataset and persist the ledger before returning.

        A format-1 history with the release's fingerprint is claimed for this dataset (moved,
        never dropped); a format-1 file is kept as ``privacy_ledger.v1.json`` when first rewritten.

        Raises:
            LedgerError: called outside ``locked()`` (check and record must share one lock), or
                the ledger cannot be written.
        """
        if self._lock_fd is None:
            raise LedgerError(
                "NodeLedger.record outside `with ledger.locked()`: the budget check and the "
                "record must be made under one lock, or two runs can both spend the last of it"
            )
        legacy = dict(self._legacy)
        claimed = legacy.pop(release.fingerprint, [])
        datasets = {**self._datasets, self.dataset_id: claimed + self._datasets.get(self.dataset_id, []) + [release]}
        try:
            if self._v1_raw is not None and not (self.state_dir / V1_BACKUP_FILE).exists():
                atomic_write_bytes(self.state_dir / V1_BACKUP_FILE, self._v1_raw)
            payload = {"format": FORMAT_VERSION, "datasets": _dump(datasets), "legacy": _dump(legacy)}
            atomic_write_bytes(self.path, dump_json_file(payload, self.key, role=ROLE_NODE_LEDGER, name=LEDGER_FILE))
        except OSError as exc:
            raise LedgerError(
                f"{self.path}: cannot write the privacy ledger ({exc}); the release is not "
                "recorded, so nothing may leave the node"
            ) from exc
        self._datasets, self._legacy, self._v1_raw = datasets, legacy, None

    def state_dict(self) -> dict[str, Any]:
        """This dataset's id and every release its budget composes (``releases``), JSON-able."""
        return {
            "format": FORMAT_VERSION,
            "dataset_id": self.dataset_id,
            "releases": [r.to_dict() for r in self.releases],
        }


def _acquire(path: Path, timeout: float) -> int:
    """An open descriptor of ``path`` holding its exclusive ``flock``.

    The kernel drops a flock when its process dies, so a crashed run never leaves a stale
    lock: the lock file is never deleted (deleting it would let two processes lock two files).
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise LedgerError(
            f"{path}: cannot open the ledger lock file ({exc}); the node's state directory must be writable"
        ) from exc
    deadline = time.monotonic() + timeout
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # polled: flock itself cannot time out
            return fd
        except BlockingIOError:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                os.close(fd)
                raise LedgerError(
                    f"another run on this node holds its ledger lock ({path}) and did not release it within "
                    f"{timeout:g} s; try again when it has finished (the lock belongs to a live process: a "
                    "crashed one releases it)"
                ) from None
            time.sleep(min(_LOCK_POLL_S, remaining))
        except OSError as exc:
            os.close(fd)
            raise LedgerError(f"{path}: cannot lock the privacy ledger ({exc})") from exc


def _release(fd: int) -> None:
    # unlock explicitly: a child forked while the lock was held shares the descriptor and would keep it
    try:
        fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _load(path: Path, storage_key: bytes | None) -> tuple[Books, Books, bytes | None]:
    """(datasets, legacy, raw bytes of a format-1 file or None) from the ledger at ``path``.

    Raises:
        LedgerError: unreadable, fails its checksum (or, with a key, its decryption), plaintext
            where a key is configured, malformed, or of an unknown format.
    """
    if not path.exists():
        return {}, {}, None
    try:
        raw = path.read_bytes()
        payload = load_json_file(raw, storage_key, role=ROLE_NODE_LEDGER, name=LEDGER_FILE, what=str(path))
        version = payload.get("format")
        if version == 1:
            # format 1 keyed histories by content fingerprint, and its releases had no fingerprint field
            legacy = {
                key: [{**entry, "fingerprint": key} for entry in book["releases"]]
                for key, book in payload["datasets"].items()
            }
            return {}, _books(legacy), raw
        if version == FORMAT_VERSION:
            datasets = {key: book["releases"] for key, book in payload["datasets"].items()}
            legacy = {key: book["releases"] for key, book in payload["legacy"].items()}
            return _books(datasets), _books(legacy), None
        raise ValueError(f"format {version!r}; this fedllm reads formats 1 and {FORMAT_VERSION}")
    except IntegrityError as exc:
        raise LedgerError(f"{exc}; the privacy ledger {_NEVER_RESET}") from exc
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise LedgerError(f"{path}: the privacy ledger cannot be read ({exc}); {_NEVER_RESET}") from exc


def _books(entries: Mapping[str, Sequence[Mapping[str, Any]]]) -> Books:
    return {str(key): [Release.from_dict(entry) for entry in releases] for key, releases in entries.items()}


def _dump(books: Books) -> dict[str, Any]:
    return {key: {"releases": [r.to_dict() for r in releases]} for key, releases in books.items()}
