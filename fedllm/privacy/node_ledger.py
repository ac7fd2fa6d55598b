"""A node's own, persisted record of every DP-SGD mechanism that touched its records.

The budget follows records, not files (issue 23, item 4). One JSON file per node state
directory holds every release (noise multiplier, sample rate, steps, run id, round, the whole
file's fingerprint for information) and the set of records it trained on, stored once per
distinct set under its content address (:mod:`fedllm.privacy.record_keys`: each record named by
a keyed hash of its normalised content). A release is charged to the records of the shard it
trained on. A dataset's spent epsilon is the worst, over the records it presents now, of the
composed history of the releases each record took part in: a record never seen before starts at
zero; an unchanged record keeps its whole history whatever its file is called, wherever it moved
and in whatever order or format it is stored. **An edited record is a new record** (a fixed typo
starts at zero; the other records of the file still carry their history, so the file's epsilon
does not fall). Records with the same release set share one history, so the accountant runs once
per distinct history, not once per record.

Releases are filed under the dataset id the node names (``dataset-id``, by default the data
file's path): a label for the operator and the reply cache, no longer the budget's key.

Epsilon is always recomputed from this history by a real accountant, so a node that crashes,
restarts, or joins a second run continues from what it has spent over its whole lifetime; it
never starts again at zero.

Check and record are atomic against other processes: :meth:`NodeLedger.locked` takes an
exclusive ``flock`` on a sidecar lock file and re-reads the ledger, so two runs on one node
cannot both spend the last of its budget. Writes are atomic (temp file, fsync, rename), the
file carries a checksum verified on load, and a file that cannot be read is an error, never
a silent reset.

A ledger cannot be lost or rolled back unnoticed (issue 25, item 7): given an anchor
(:mod:`fedllm.privacy.ledger_anchor`, outside the state directory), every version the node
writes is recorded there first, and a ledger that is missing or not the latest version is
refused, never read as empty.

Older formats load and lose nothing. A release that names no record set (every release of a
format-2 file, keyed by dataset id with a whole-file fingerprint only, and the format-1 histories
kept in the ``legacy`` section) is charged to every record of every dataset this state directory
presents, because nothing says whose records it spent. When a node presents records whose
whole-file fingerprint equals such a release's (the very records it trained on), the release is
claimed: it names their record set from then on. A format-1 file is kept as
``privacy_ledger.v1.json`` when first rewritten.
"""

from __future__ import annotations

import fcntl
import os
import time
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from fedllm.config import AccountantName
from fedllm.errors import ConfigError, LedgerError
from fedllm.privacy.accounting import History, epsilon, extend_history
from fedllm.privacy.ledger_anchor import LedgerAnchor
from fedllm.privacy.ledger_file import (
    FORMAT_VERSION,
    LEDGER_FILE,
    NEVER_RESET,
    LedgerState,
    Release,
    dump_ledger,
    parse_ledger,
)
from fedllm.privacy.record_keys import (
    ShardContent,
    create_salt,
    fingerprint,
    load_salt,
    record_names,
    record_set_id,
    salt_check,
)
from fedllm.storage import ROLE_NODE_LEDGER, atomic_write_bytes, dump_json_file

__all__ = [
    "FORMAT_VERSION",
    "LEDGER_FILE",
    "NodeLedger",
    "RecordGroup",
    "Release",
    "ShardContent",
    "fingerprint",
    "record_groups",
]

LOCK_FILE = f"{LEDGER_FILE}.lock"
V1_BACKUP_FILE = "privacy_ledger.v1.json"  # the format-1 file as it was, kept when it is first rewritten
LOCK_TIMEOUT_S = 600.0
_LOCK_POLL_S = 0.05


@dataclass(frozen=True)
class RecordGroup:
    """Presented records that took part in the same releases, and their composed history."""

    records: int
    history: History


def compose(releases: Sequence[Release]) -> History:
    """The DP-SGD history of ``releases``, merged as Opacus merges repeated steps."""
    history: History = []
    for release in releases:
        history = extend_history(
            history, noise_multiplier=release.noise_multiplier, sample_rate=release.sample_rate, steps=release.steps
        )
    return history


def record_groups(
    releases: Sequence[Release], record_sets: Mapping[str, frozenset[str]], presented: frozenset[str]
) -> list[RecordGroup]:
    """The presented records grouped by the releases they took part in, each group's history composed once.

    A record took part in every release whose record set holds it and in every release that
    names no record set (unknown records: charged to all). A record in no set is new: its
    history is that of the unattributed releases alone.

    Args:
        releases: every release of the ledger, oldest first.
        record_sets: content address -> record names.
        presented: the names of the records presented now (at least one).

    Returns:
        A list of :class:`RecordGroup`, one per distinct release set among ``presented``.
    """
    membership: dict[str, list[str]] = {name: [] for name in presented}
    for set_id in sorted({r.records for r in releases if r.records}):
        for name in presented & record_sets[set_id]:
            membership[name].append(set_id)
    counts = Counter(frozenset(sets) for sets in membership.values())
    return [
        RecordGroup(count, compose([r for r in releases if not r.records or r.records in sets]))
        for sets, count in sorted(counts.items(), key=lambda item: sorted(item[0]))
    ]


class NodeLedger:
    """The releases that touched the records a node presents, in its state directory.

    A new object is a read-only view of the file as it was then. To check a budget and
    record a release, do both inside ``with ledger.locked() as book:``, which re-reads the
    file under an exclusive lock. There is no ``load_state_dict``: the file is the state, and
    loading another one into it would be a way to rewrite a node's history.
    One object serves one thread.
    """

    def __init__(
        self,
        state_dir: Path,
        dataset_id: str,
        content: ShardContent | None = None,
        *,
        key: bytes | None = None,
        anchor: Path | None = None,
    ):
        """Read the ledger in ``state_dir`` as it bears on ``content`` (no lock taken).

        Args:
            state_dir: the node's state directory.
            dataset_id: the name the node files this dataset's releases under (a label).
            content: the records presented now (the shard a round trains on). Without it the view
                is by name: the releases filed under ``dataset_id`` and those that name no records.
            key: the node's storage key: the ledger (and its salt) are then AES-256-GCM encrypted
                and bound to their role and name, and a plaintext ledger is refused. Without one
                they are JSON with a checksum, which detects corruption, not tampering.
            anchor: the ledger's anchor file, outside ``state_dir`` (a node's policy always gives
                one: :meth:`~fedllm.node.policy.NodePolicy.anchor_path`). None: not anchored, for
                read-only inspection of a state directory.

        Raises:
            ConfigError: ``dataset_id`` is empty, or ``anchor`` is inside ``state_dir``.
            LedgerError: the ledger or its salt exists but cannot be read, fails its checksum,
                or the salt is not the one the ledger was written with; or the ledger is missing
                or older than its anchor records.
        """
        if not isinstance(dataset_id, str) or not dataset_id:
            raise ConfigError(f"a node's dataset id must be a non-empty string, got {dataset_id!r}")
        self.state_dir = Path(state_dir)
        self.path = self.state_dir / LEDGER_FILE
        self.dataset_id = dataset_id
        self.content = content
        self.key = key
        self.anchor = None if anchor is None else LedgerAnchor(anchor, self.path)
        self._lock_fd: int | None = None
        self._named: tuple[bytes, frozenset[str]] | None = None  # (salt, the presented records' names under it)
        self._read()

    def _read(self, locked: bool = False) -> None:
        raw = self._raw()
        if self.anchor is not None:
            try:
                self.anchor.check(raw, repair=locked)
            except LedgerError:
                if locked:
                    raise
                # unlocked, a run recording now may have replaced the ledger between the two reads
                raw = self._raw()
                self.anchor.check(raw, repair=False)
        self._state = parse_ledger(raw, self.path, self.key)
        self._salt = load_salt(self.state_dir, self.key)
        if self._state.salt_check and (self._salt is None or salt_check(self._salt) != self._state.salt_check):
            found = "is missing" if self._salt is None else "is not the one the ledger was written with"
            raise LedgerError(
                f"{self.state_dir}: the ledger's salt {found}: no record's history can be found without it; "
                f"the privacy ledger {NEVER_RESET}"
            )
        self._names = self._names_under(self._salt)

    def _raw(self) -> bytes | None:
        """The ledger file's bytes (None: no file)."""
        if not self.path.exists():
            return None
        try:
            return self.path.read_bytes()
        except OSError as exc:
            raise LedgerError(f"{self.path}: the privacy ledger cannot be read ({exc}); {NEVER_RESET}") from exc

    def _names_under(self, salt: bytes | None) -> frozenset[str] | None:
        """The presented records' names under ``salt`` (None without content or salt), computed once per salt."""
        if self.content is None or salt is None:
            return None
        if self._named is None or self._named[0] != salt:
            self._named = (salt, record_names(salt, self.content.digests))
        return self._named[1]

    @property
    def releases(self) -> tuple[Release, ...]:
        """The releases this view concerns, oldest first within each dataset: those charged to any
        presented record, those that name no record set, and those filed under this dataset id."""
        names = self._names or frozenset()
        touched = {set_id for set_id, members in self._state.record_sets.items() if names & members}
        own = {id(r) for r in self._state.datasets.get(self.dataset_id, [])}
        return tuple(r for r in self._state.releases() if not r.records or r.records in touched or id(r) in own)

    @property
    def recorded(self) -> int:
        """How many releases the file holds, every dataset's and the unclaimed format-1 ones:
        each record adds exactly one (claiming moves releases, never adds them)."""
        return len(self._state.releases())

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
            self._read(locked=True)
            self._lock_fd = fd
            yield self
        finally:
            self._lock_fd = None
            _release(fd)

    def groups(self) -> list[RecordGroup]:
        """The presented records grouped by the releases they took part in (see :func:`record_groups`).

        Without ``content`` one group (0 records): the history of :attr:`releases`. Before any
        release names a record set, one group of every presented record.
        """
        unattributed = [r for r in self._state.releases() if not r.records]
        if self.content is None:
            return [RecordGroup(0, compose(self.releases))]
        if not self._names:  # no salt yet (so no record set), or no record presented
            return [RecordGroup(len(self.content.digests), compose(unattributed))]
        return record_groups(self._state.releases(), self._state.record_sets, self._names)

    def history(self) -> History:
        """The history of every release of :attr:`releases` (an upper bound on each record's; for
        inspection: the budget is :meth:`worst_history`)."""
        return compose(self.releases)

    def worst_history(
        self, *, delta: float, accountant: AccountantName, then: tuple[float, float, int] | None = None
    ) -> History:
        """The composed history of the worst presented record: the one with the largest epsilon
        after ``then`` (noise multiplier, sample rate, steps of the round about to run, which every
        presented record takes part in), ties broken by the epsilon before it.

        With nested release sets (a file grown, shrunk or edited) that record is also the one that
        spent most; release sets that cross under different mechanisms can rank differently before
        and after a round, and the cap bounds the epsilon after it.
        """

        def rank(group: RecordGroup) -> tuple[float, float]:
            before = epsilon(group.history, delta=delta, accountant=accountant)
            if then is None:
                return before, before
            noise, rate, steps = then
            after = extend_history(group.history, noise_multiplier=noise, sample_rate=rate, steps=steps)
            return epsilon(after, delta=delta, accountant=accountant), before

        return max(self.groups(), key=rank).history

    def epsilon(self, *, delta: float, accountant: AccountantName) -> float:
        """Epsilon at ``delta`` spent over the node's lifetime by the worst presented record."""
        return max(epsilon(g.history, delta=delta, accountant=accountant) for g in self.groups())

    def find(self, run_id: str, server_round: int) -> Release | None:
        """The last release recorded for ``(run_id, server_round)`` among :attr:`releases`, if any."""
        matches = [r for r in self.releases if r.run_id == run_id and r.server_round == server_round]
        return matches[-1] if matches else None

    def record(self, release: Release) -> None:
        """Charge ``release`` to the presented records, file it under this dataset id, and persist
        the ledger before returning.

        The presented record set is stored once (content-addressed); the state directory's salt is
        created with the first one. Releases that name no record set and trained on exactly these
        records (the same whole-file fingerprint) are claimed for them, and a format-1 history with
        the release's fingerprint is moved to this dataset (never dropped); a format-1 file is kept
        as ``privacy_ledger.v1.json`` when first rewritten.

        Raises:
            LedgerError: called outside ``locked()`` (check and record must share one lock), or
                the ledger cannot be written.
        """
        if self._lock_fd is None:
            raise LedgerError(
                "NodeLedger.record outside `with ledger.locked()`: the budget check and the "
                "record must be made under one lock, or two runs can both spend the last of it"
            )
        state, salt = self._state, self._salt
        record_sets, check, set_id = dict(state.record_sets), state.salt_check, ""
        if self.content is not None and self.content.digests:
            salt = salt or create_salt(self.state_dir, self.key)  # persisted before any ledger names a record
            names = self._names_under(salt) or frozenset()
            set_id, check = record_set_id(names), salt_check(salt)
            record_sets.setdefault(set_id, names)
            release = release if release.records else replace(release, records=set_id)
        legacy = dict(state.legacy)
        claimed = legacy.pop(release.fingerprint, [])
        datasets = {**state.datasets, self.dataset_id: claimed + state.datasets.get(self.dataset_id, []) + [release]}
        if self.content is not None and set_id:
            datasets = {k: _claim(v, self.content.fingerprint, set_id) for k, v in datasets.items()}
        new = LedgerState(datasets, legacy, record_sets, check)
        try:
            if state.v1_raw is not None and not (self.state_dir / V1_BACKUP_FILE).exists():
                atomic_write_bytes(self.state_dir / V1_BACKUP_FILE, state.v1_raw)
            data = dump_json_file(dump_ledger(new), self.key, role=ROLE_NODE_LEDGER, name=LEDGER_FILE)
            # announce, write, commit: a crash between any two leaves a ledger the anchor accepts, and
            # no release left the node before its version was committed (fedllm.privacy.ledger_anchor)
            if self.anchor is not None:
                self.anchor.announce(data)
            atomic_write_bytes(self.path, data)
            if self.anchor is not None:
                self.anchor.commit(data)
        except OSError as exc:
            raise LedgerError(
                f"{self.path}: cannot write the privacy ledger ({exc}); the release is not "
                "recorded, so nothing may leave the node"
            ) from exc
        self._state, self._salt = new, salt
        self._names = self._names_under(salt)

    def state_dict(self) -> dict[str, Any]:
        """This dataset's id and every release this view concerns (``releases``), JSON-able."""
        return {
            "format": FORMAT_VERSION,
            "dataset_id": self.dataset_id,
            "releases": [r.to_dict() for r in self.releases],
        }


def _claim(releases: list[Release], shard_fingerprint: str, set_id: str) -> list[Release]:
    """``releases`` with those that name no record set but trained on exactly the shard of
    ``shard_fingerprint`` charged to its record set ``set_id``."""
    return [
        replace(r, records=set_id) if not r.records and shard_fingerprint and r.fingerprint == shard_fingerprint else r
        for r in releases
    ]


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
