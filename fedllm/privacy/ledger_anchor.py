"""The node ledger's anchor: an append-only record, outside the state directory, of every version
of the ledger the node wrote (issue 25, item 7).

A ledger that is deleted, or replaced by an older authentic copy (a backup restored, a volume
recreated, ``docker compose down -v``), would otherwise read as a ledger with fewer releases, or
none: every record would get a fresh budget. The anchor holds the SHA-256 of each ledger version
the node wrote, so the ledger found on disk must be the latest one; a missing or older ledger is
refused, never taken as empty. The anchor lives where losing the state directory does not lose it
(the node config's ``ledger-anchor``; by default under ``$XDG_STATE_HOME/fedllm/ledger-anchors/``,
i.e. ``~/.local/state``), and it holds digests only: nothing about the records.

Writes are ordered so that a crash at any point leaves a node that starts and a check that stays
sound (:meth:`LedgerAnchor.announce`, then the ledger, then :meth:`LedgerAnchor.commit`):

* crash before the ledger is replaced: the ledger is the last committed version, which is accepted;
* crash after it, before the commit: the ledger is the announced version, which is accepted and
  committed on the next locked read. In either case the release being recorded never left the
  node (the reply is sent only after ``record`` returns), so accepting the committed version in
  place of the announced one forgets only a release that nobody received. Once the node answers
  from a ledger version (a locked read, or ``record`` returning), that version is committed, and
  every older one is refused from then on.

What an anchor does not stop: someone who can write both the ledger and the anchor (delete both,
and the node starts afresh). Keep the anchor out of the state directory's backups and volumes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from fedllm.errors import ConfigError, LedgerError
from fedllm.storage import atomic_write_bytes

log = logging.getLogger(__name__)

ANCHOR_FORMAT = "fedllm-ledger-anchor/1"
ANCHOR_DIR = ("fedllm", "ledger-anchors")
_WRITE, _DONE = "write", "done"


def default_anchor(state_dir: Path) -> Path:
    """Where a node's anchor lives when its config names none: under ``$XDG_STATE_HOME`` (default
    ``~/.local/state``), named after the state directory's absolute path (one anchor per ledger)."""
    base = Path(os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state")
    name = hashlib.sha256(str(Path(state_dir).expanduser().resolve()).encode("utf-8")).hexdigest()[:16]
    return base.joinpath(*ANCHOR_DIR, f"{name}.jsonl")


def digest(data: bytes) -> str:
    """The SHA-256 of a ledger version's bytes, as the anchor records it."""
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class AnchorState:
    """What an anchor file says: the committed versions' digests (oldest first) and an announced one."""

    exists: bool
    committed: tuple[str, ...] = ()
    announced: str | None = None  # written but not (yet) committed: the last step of a crashed record


class LedgerAnchor:
    """The append-only anchor of one ledger file (see the module docstring)."""

    def __init__(self, path: Path, ledger: Path):
        """Anchor ``ledger`` (``<state dir>/privacy_ledger.json``) at ``path``.

        Raises:
            ConfigError: ``path`` is inside the ledger's state directory (lost with it).
        """
        self.path = Path(path).expanduser()
        self.ledger = Path(ledger)
        state_dir = self.ledger.parent.expanduser().resolve()
        if self.path.resolve().is_relative_to(state_dir):
            raise ConfigError(
                f"node config ledger-anchor: {self.path} is inside the state directory {state_dir}; the anchor must "
                "live elsewhere, or losing the state directory loses both"
            )

    def read(self) -> AnchorState:
        """The anchor's content; a missing file is ``exists=False``.

        Raises:
            LedgerError: unreadable, not an anchor, of another ledger, or malformed.
        """
        try:
            text = self.path.read_bytes().decode("utf-8")
        except FileNotFoundError:
            return AnchorState(exists=False)
        except (OSError, UnicodeDecodeError) as exc:
            raise LedgerError(f"{self.path}: the ledger anchor cannot be read ({exc})") from exc
        lines = text.split("\n")
        # a crash mid-append leaves a last line without its newline: that step never happened
        complete = lines[:-1]
        try:
            header, *entries = [json.loads(line) for line in complete]
            if header != {"anchor": ANCHOR_FORMAT, "ledger": str(self.ledger.resolve())}:
                raise ValueError(f"its header names {header.get('ledger')!r}: it is not this ledger's anchor")
            return _replay(entries)
        except (ValueError, TypeError, AttributeError, KeyError) as exc:
            raise LedgerError(
                f"{self.path}: not a valid anchor of {self.ledger} ({exc}); each state directory needs its own "
                "ledger-anchor, and an anchor is never rewritten by hand"
            ) from exc

    def check(self, ledger_bytes: bytes | None, *, repair: bool) -> None:
        """Accept the ledger on disk only if it is the latest version this anchor records.

        Args:
            ledger_bytes: the ledger file's bytes, or None when there is no ledger file.
            repair: the caller holds the ledger lock: commit an announced version found on disk,
                and anchor a ledger that has no anchor yet (its first start with this fedllm).

        Raises:
            LedgerError: the ledger is missing or is not the latest version (names both files and
                what to do), or the anchor cannot be read or written.
        """
        state = self.read()
        found = None if ledger_bytes is None else digest(ledger_bytes)
        if not state.exists:
            if found is not None and repair:  # a ledger written before anchors existed: adopted as it is
                log.warning("%s: no anchor yet; anchoring the ledger as it is now at %s", self.ledger, self.path)
                self._create([_entry(1, found, _WRITE), _entry(1, found, _DONE)])
            return
        latest = state.committed[-1] if state.committed else None
        if found == latest:
            return
        if found is not None and found == state.announced:
            if repair:
                self._append(_entry(len(state.committed) + 1, found, _DONE))
            return
        raise LedgerError(self._refusal(state, found))

    def announce(self, new_bytes: bytes) -> None:
        """Record that the ledger is about to be replaced by ``new_bytes`` (before it is written).

        Raises:
            LedgerError: the anchor cannot be written (nothing may then be recorded).
        """
        state = self.read()
        entry = _entry(len(state.committed) + 1, digest(new_bytes), _WRITE)
        if state.exists:
            self._append(entry)
        else:
            self._create([entry])

    def commit(self, new_bytes: bytes) -> None:
        """Record that the ledger now is ``new_bytes`` (after it was written).

        Raises:
            LedgerError: the anchor cannot be written.
        """
        self._append(_entry(len(self.read().committed) + 1, digest(new_bytes), _DONE))

    def _refusal(self, state: AnchorState, found: str | None) -> str:
        versions = len(state.committed)
        fix = (
            f"Restore the latest ledger (with the rest of the state directory {self.ledger.parent}) from a "
            "backup. Treating it as empty would give every record a fresh budget, so the node refuses to train. "
            f"Only if it is lost for good, and knowing that the privacy it recorded is lost with it, move the "
            f"anchor {self.path} away"
        )
        if found is None:
            return (
                f"{self.ledger}: missing, but its anchor {self.path} records {versions} version(s) of it: the ledger "
                f"was deleted or the state directory lost (a recreated volume, `docker compose down -v`, a wrong "
                f"state-dir). {fix}"
            )
        older = f"version {state.committed.index(found) + 1} of {versions}" if found in state.committed else None
        return (
            f"{self.ledger}: not the latest version its anchor {self.path} records "
            f"({'an older copy: ' + older if older else 'unknown to the anchor'}; it would forget releases the node "
            f"made). {fix}"
        )

    def _create(self, entries: list[dict]) -> None:
        header = {"anchor": ANCHOR_FORMAT, "ledger": str(self.ledger.resolve())}
        text = "".join(json.dumps(e, sort_keys=True) + "\n" for e in [header, *entries])
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            atomic_write_bytes(self.path, text.encode("utf-8"))
        except OSError as exc:
            raise LedgerError(self._unwritable(exc)) from exc

    def _append(self, entry: dict) -> None:
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CLOEXEC)
            try:
                _drop_torn_tail(fd)
                os.write(fd, (json.dumps(entry, sort_keys=True) + "\n").encode("utf-8"))
                os.fsync(fd)  # durable before the ledger is replaced (announce) or the reply leaves (commit)
            finally:
                os.close(fd)
        except OSError as exc:
            raise LedgerError(self._unwritable(exc)) from exc

    def _unwritable(self, exc: OSError) -> str:
        return (
            f"{self.path}: cannot write the ledger anchor ({exc}); the release is not recorded, so nothing may leave "
            "the node. Make its folder writable, or set ledger-anchor in the node config"
        )


def _drop_torn_tail(fd: int) -> None:
    """Cut a last line left without its newline by a crash mid-append (:meth:`LedgerAnchor.read`
    ignores it), so the next entry starts on a line of its own."""
    size = os.fstat(fd).st_size
    if size and os.pread(fd, 1, size - 1) != b"\n":
        tail = os.pread(fd, min(size, 4096), max(0, size - 4096))  # an entry is ~120 bytes
        os.ftruncate(fd, size - len(tail) + tail.rfind(b"\n") + 1)


def _entry(version: int, sha256: str, step: str) -> dict:
    return {"version": version, "sha256": sha256, "step": step}


def _replay(entries: list[dict]) -> AnchorState:
    """The committed digests and the announced one of an anchor's entries, checked in order."""
    committed: list[str] = []
    announced: str | None = None
    for entry in entries:
        if set(entry) != {"version", "sha256", "step"} or entry["version"] != len(committed) + 1:
            raise ValueError(f"entry {entry!r} is out of sequence")
        if entry["step"] == _WRITE:
            announced = str(entry["sha256"])  # a later announcement replaces one that crashed before its commit
        elif entry["step"] == _DONE and announced is not None and entry["sha256"] == announced:
            committed.append(announced)
            announced = None
        else:
            raise ValueError(f"entry {entry!r} commits a version that was not announced")
    return AnchorState(exists=True, committed=tuple(committed), announced=announced)
