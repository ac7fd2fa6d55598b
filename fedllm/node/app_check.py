"""Which app bundles a node accepts: its own installed fedllm, byte for byte, or a hash its operator approved.

In Flower's Deployment Engine the coordinator submits an app bundle (FAB: a zip holding
``pyproject.toml`` and the package files) with ``flwr run``. A node started with ``fedllm node
run`` never imports the bundle's files (:mod:`fedllm.deployment.node_process`); it only decides
here whether the bundle is the code it already runs. Both sides are hashed the same way: every
``fedllm/**/*.py`` file (the set ``[tool.flwr.app] fab-include`` puts in a FAB), by its path
relative to the package's parent with ``/`` separators, caches (``__pycache__``, ``*.pyc``)
ignored. The node config's ``approved-app-hashes`` lists hashes of other bundles its operator
reviewed (``fedllm node hash bundle.fab`` prints one). Flower-free.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import re
import tomllib
import zipfile
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

from fedllm.errors import ConfigError
from fedllm.node.policy import APPROVED_APP_HASHES

log = logging.getLogger(__name__)

PACKAGE = "fedllm"
# the one ClientApp a node runs: its own (pyproject.toml [tool.flwr.app.components])
CLIENTAPP = "fedllm.federation.client_app:app"
HASH_PREFIX = "sha256:"
_HASH = re.compile(r"^sha256:[0-9a-f]{64}$")
# set by `fedllm node run` in its own process: the ClientApp it loads is the installed one
PINNED_ENV = "FEDLLM_PINNED_APP"

# why a bundle was accepted or refused (the node's log and audit log; the server learns only `policy`)
IDENTICAL, APPROVED, DIFFERS, COMPONENT, UNREADABLE = "identical", "approved", "differs", "component", "unreadable"

Digests = dict[str, str]  # package file path (``fedllm/...``, ``/`` separators) -> SHA-256 of its bytes


def _package_path(name: str) -> str | None:
    """The normalised path of a package source file, or None for anything the hash ignores."""
    path = name.replace("\\", "/").lstrip("/")
    while path.startswith("./"):
        path = path[2:]
    parts = path.split("/")
    if parts[0] != PACKAGE or not path.endswith(".py") or "__pycache__" in parts:
        return None
    return path


def installed_digests(package_dir: Path | None = None) -> Digests:
    """The digests of the installed package's source files.

    Args:
        package_dir: the ``fedllm`` package directory (default: the one this module was imported from).

    Returns:
        ``fedllm/...`` path -> SHA-256 (hex) of the file's bytes.
    """
    root = Path(package_dir) if package_dir is not None else Path(__file__).resolve().parents[1]
    digests: Digests = {}
    for file in sorted(root.rglob("*.py")):
        path = _package_path(f"{PACKAGE}/{file.relative_to(root).as_posix()}")
        if path is not None and file.is_file():
            digests[path] = hashlib.sha256(file.read_bytes()).hexdigest()
    return digests


@dataclass(frozen=True)
class Bundle:
    """What the node reads from an app bundle: its package digests and its declared ClientApp."""

    digests: Digests
    clientapp: str | None  # [tool.flwr.app.components] clientapp of its pyproject.toml


def read_bundle(fab: bytes) -> Bundle:
    """The package digests and the ClientApp component of a FAB, read in memory (nothing is extracted).

    Raises:
        ConfigError: the bytes are not a zip, a package path occurs twice (after normalisation),
            or ``pyproject.toml`` is missing or malformed.
    """
    try:
        with zipfile.ZipFile(io.BytesIO(fab)) as archive:
            digests: Digests = {}
            pyproject = None
            for info in archive.infolist():
                if info.is_dir():
                    continue
                if info.filename.replace("\\", "/").lstrip("./") == "pyproject.toml":
                    pyproject = archive.read(info)
                path = _package_path(info.filename)
                if path is None:
                    continue
                if path in digests:  # two entries for one file: which one would a loader pick?
                    raise ConfigError(f"the app bundle holds {path} twice")
                digests[path] = hashlib.sha256(archive.read(info)).hexdigest()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError) as exc:
        raise ConfigError(f"the app bundle is not a readable zip: {exc}") from exc
    if pyproject is None:
        raise ConfigError("the app bundle has no pyproject.toml")
    try:
        config = tomllib.loads(pyproject.decode("utf-8"))
        clientapp = config.get("tool", {}).get("flwr", {}).get("app", {}).get("components", {}).get("clientapp")
    except (tomllib.TOMLDecodeError, UnicodeDecodeError, AttributeError) as exc:
        raise ConfigError(f"the app bundle's pyproject.toml is malformed: {exc}") from exc
    return Bundle(digests=digests, clientapp=None if clientapp is None else str(clientapp))


def app_hash(digests: Digests) -> str:
    """The content hash of a package: ``sha256:`` over its files' paths and digests, in path order.

    Computed identically from a FAB (:func:`read_bundle`) and from the installed package
    (:func:`installed_digests`): a file added, removed, renamed or changed by one byte changes it.
    """
    lines = "".join(f"{path}\0{digest}\n" for path, digest in sorted(digests.items()))
    return HASH_PREFIX + hashlib.sha256(lines.encode("utf-8")).hexdigest()


def first_difference(bundle: Digests, installed: Digests) -> str | None:
    """The first file (in path order) that differs, is missing from, or is added by the bundle; None if none."""
    for path in sorted(set(bundle) | set(installed)):
        if bundle.get(path) != installed.get(path):
            return path
    return None


def approved_hashes(node_config: Mapping) -> frozenset[str]:
    """The app hashes the node's operator approved (node config ``approved-app-hashes``).

    Raises:
        ConfigError: an entry is not ``sha256:`` and 64 lowercase hex digits.
    """
    value = str(node_config.get(APPROVED_APP_HASHES) or "")
    hashes = frozenset(h for h in re.split(r"[,\s]+", value.strip()) if h)
    malformed = sorted(h for h in hashes if not _HASH.match(h))
    if malformed:
        raise ConfigError(
            f"node config {APPROVED_APP_HASHES}: {', '.join(malformed)} is not a hash as `fedllm node hash` prints "
            f'it; e.g. {APPROVED_APP_HASHES}="sha256:<64 hex digits>,sha256:<...>"'
        )
    return hashes


@dataclass(frozen=True)
class AppVerdict:
    """The node's decision on one app bundle (its log and audit log; the server learns only ``policy``)."""

    accepted: bool
    reason: str  # identical | approved | differs | component | unreadable
    app_hash: str | None  # the bundle's package hash (None: unreadable)
    installed_hash: str
    first_difference: str | None = None  # the first differing file (``fedllm/...``), when the code differs
    clientapp: str | None = None  # the ClientApp the bundle declares
    detail: str = ""  # why an unreadable bundle could not be read

    def describe(self) -> str:
        """One line for the node's console."""
        bundle = self.app_hash or "(unreadable)"
        if self.reason == IDENTICAL:
            return f"app bundle {bundle} is this node's installed fedllm: running the installed ClientApp"
        if self.reason == APPROVED:
            return (
                f"app bundle {bundle} differs from the installed fedllm ({self.installed_hash}) but its hash is "
                f"in {APPROVED_APP_HASHES}: running the installed ClientApp (never the bundle's files)"
            )
        if self.reason == COMPONENT:
            return f"refusing app bundle {bundle}: it declares ClientApp {self.clientapp!r}, this node runs {CLIENTAPP}"
        if self.reason == UNREADABLE:
            return f"refusing an app bundle that cannot be read: {self.detail}"
        return (
            f"refusing app bundle {bundle}: its fedllm code is not this node's installed fedllm "
            f"({self.installed_hash}); first differing file: {self.first_difference}. Approve a reviewed "
            f"bundle by adding its hash to the node config's {APPROVED_APP_HASHES}"
        )

    def to_dict(self) -> dict:
        """The verdict as an audit-log entry."""
        return asdict(self)


def check_app(fab: bytes, installed: Digests, approved: frozenset[str]) -> AppVerdict:
    """Accept an app bundle only if it declares fedllm's ClientApp and its fedllm code is the installed
    one, or its hash is approved. Reads only the bundle and the node config's list (never the node's
    data, plan or ledger), and runs nothing from the bundle.

    Args:
        fab: the FAB's bytes, as the coordinator submitted them.
        installed: the installed package's digests (:func:`installed_digests`).
        approved: the node config's approved hashes (:func:`approved_hashes`).

    Returns:
        The verdict; ``accepted`` False means refuse the message with category ``policy``.
    """
    installed_hash = app_hash(installed)
    try:
        bundle = read_bundle(fab)
    except ConfigError as exc:
        return AppVerdict(False, UNREADABLE, None, installed_hash, detail=str(exc))
    bundle_hash = app_hash(bundle.digests)
    if bundle.clientapp != CLIENTAPP:  # another app: running ours under its name would mislead its coordinator
        return AppVerdict(False, COMPONENT, bundle_hash, installed_hash, clientapp=bundle.clientapp)
    if bundle_hash == installed_hash:
        return AppVerdict(True, IDENTICAL, bundle_hash, installed_hash, clientapp=bundle.clientapp)
    difference = first_difference(bundle.digests, installed)
    reason = APPROVED if bundle_hash in approved else DIFFERS
    return AppVerdict(reason == APPROVED, reason, bundle_hash, installed_hash, difference, bundle.clientapp)


def warn_if_not_pinned() -> None:
    """Warn on the node's console when this ClientApp was loaded by Flower from the coordinator's
    bundle (``--isolation subprocess``), not by ``fedllm node run``: then the code that enforces the
    node's cap, noise and ledger is whatever the coordinator submitted."""
    if os.environ.get(PINNED_ENV) != "1":
        log.warning(
            "this node runs the coordinator's code: Flower loaded this ClientApp from the app bundle the "
            "coordinator submitted, so nothing guarantees that the code enforcing this node's cap, noise and "
            "ledger is the fedllm this node installed. Start the SuperNode with --isolation process and "
            "`fedllm node run` (README, 'Run a node')"
        )
