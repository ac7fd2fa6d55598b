"""``manifest.json``: the SHA-256 of every file of a run folder that states what the run did.

``config.json``, ``summary.json``, ``metrics.jsonl``, the server's ``privacy_ledger.json``,
``audit.json`` (after ``fedllm audit``) and the adapter's own manifest (``adapter/checksums.json``,
which covers every adapter file) are what ``fedllm report``, ``evaluate`` and a reader take as the
run's results and epsilons. The manifest is keyed and protected as the adapter's is
(:func:`fedllm.storage.protect_json`): with the storage key an HMAC over its content, role and name,
so no edit of a covered file goes unnoticed; without one a checksum, which catches corruption and
an edit that forgets the manifest, not a forger who recomputes it (issue 25, item 3).

Whoever writes a covered file last writes the manifest after it (the ServerApp's outputs, the
simulate command's failure record, ``fedllm audit``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from fedllm.errors import IntegrityError
from fedllm.storage import ROLE_RUN_MANIFEST, file_sha256, protect_json, verify_json, write_json

MANIFEST_FILE = "manifest.json"
FORMAT = 1
# every file of a run folder whose content is a claim about the run (paths relative to it); the
# adapter's weights are covered through its own manifest, whose digest is listed here
COVERED = (
    "config.json",
    "summary.json",
    "metrics.jsonl",
    "privacy_ledger.json",
    "audit.json",
    "adapter/checksums.json",
)
REQUIRED = ("summary.json",)  # a manifest that does not cover the summary vouches for nothing

Integrity = Literal["authenticated", "checksum only", "unverified", "FAILS verification"]


def write_run_manifest(run_dir: Path, key: bytes | None) -> Path:
    """Record the digest of every covered file present in ``run_dir`` in its ``manifest.json``.

    Args:
        run_dir: the run folder.
        key: the storage key (the manifest then carries an HMAC), or None (a checksum).

    Returns:
        The manifest's path.
    """
    run_dir = Path(run_dir)
    sums = {name: file_sha256(run_dir / name) for name in COVERED if (run_dir / name).is_file()}
    payload = protect_json({"format": FORMAT, "sha256": sums}, key, role=ROLE_RUN_MANIFEST, name=MANIFEST_FILE)
    write_json(run_dir / MANIFEST_FILE, payload)
    return run_dir / MANIFEST_FILE


def verify_run_manifest(run_dir: Path, key: bytes | None) -> list[str]:
    """Check ``run_dir``'s covered files against its ``manifest.json``.

    Returns:
        The files checked, relative to ``run_dir``.

    Raises:
        IntegrityError: no readable manifest; it fails its checksum or MAC (or needs the key); it
            does not cover the summary; a listed file is missing or altered; or a covered file is
            present that the manifest does not list (added after the run).
    """
    run_dir = Path(run_dir)
    path = run_dir / MANIFEST_FILE
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise IntegrityError(
            f"{path}: missing: nothing vouches for this run's config, summary, metrics and privacy ledger "
            "(a run written by fedllm before issue 25, one that is still running or was killed, or files "
            "not written by fedllm)"
        ) from None
    except (OSError, ValueError) as exc:
        raise IntegrityError(f"{path}: unreadable ({exc}); the run's files cannot be verified") from exc
    manifest = verify_json(payload, key, role=ROLE_RUN_MANIFEST, name=MANIFEST_FILE, what=str(path))
    sums = manifest.get("sha256")
    if manifest.get("format") != FORMAT or not (
        isinstance(sums, dict) and set(sums) <= set(COVERED) and all(isinstance(v, str) for v in sums.values())
    ):
        raise IntegrityError(f"{path}: not a run manifest this fedllm writes (format {FORMAT}); it is not used")
    for name in REQUIRED:
        if name not in sums:
            raise IntegrityError(f"{path}: does not cover {name}; the run's results cannot be verified")
    for name, expected in sums.items():
        if not (run_dir / name).is_file() or file_sha256(run_dir / name) != expected:
            raise IntegrityError(f"{run_dir / name}: missing or altered since the run wrote it (not what {path} says)")
    added = [name for name in COVERED if name not in sums and (run_dir / name).exists()]
    if added:
        raise IntegrityError(f"{run_dir / added[0]}: not in {path}; it was added after the run and is not the run's")
    return sorted(sums)


@dataclass(frozen=True)
class RunIntegrity:
    """What can be said of a run folder's figures: authenticated, checksummed, unverified or failed."""

    state: Integrity
    detail: str = ""

    @property
    def trusted(self) -> bool:
        """Whether the figures may be shown as the run's (authenticated, or checksummed without a key)."""
        return self.state in ("authenticated", "checksum only")


def run_integrity(run_dir: Path, key: bytes | None) -> RunIntegrity:
    """:func:`verify_run_manifest` as a verdict that never raises (for reports over many runs).

    A manifest authenticated with a key that was not given is ``unverified`` (not failed): the
    files may be intact, but nothing here can tell.
    """
    path = Path(run_dir) / MANIFEST_FILE
    if not path.exists():
        return RunIntegrity("unverified", f"no {MANIFEST_FILE}: nothing vouches for its figures")
    try:
        keyed = "mac" in json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, TypeError):
        keyed = False
    if keyed and key is None:
        return RunIntegrity("unverified", "authenticated with a storage key: give it (--key-file) to verify")
    try:
        verify_run_manifest(run_dir, key)
    except IntegrityError as exc:
        return RunIntegrity("FAILS verification", str(exc))
    return RunIntegrity("authenticated" if key is not None else "checksum only")
