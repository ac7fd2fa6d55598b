"""``fedllm verify RUN_DIR`` and ``fedllm decrypt FILE [OUT]``: check and open saved run state.

``verify`` checks every protected file of a run directory (the run manifest, which covers its
config, summary, metrics, privacy ledger and audit; the final adapter; checkpoint; each simulated
node's ledger and reply cache) and says which file fails; with the key it checks their MACs and
encryption, without one only their checksums (corruption, not tampering).
``decrypt`` turns a sealed file (an encrypted adapter) back into the plain file, with the key
from ``$FEDLLM_ENCRYPTION_KEY`` or ``--key-file``; the content is authenticated by the key
before anything is written.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from fedllm.config import StorageConfig
from fedllm.errors import FedLLMError
from fedllm.storage import (
    ROLE_NODE_LEDGER,
    ROLE_NODE_REPLY,
    atomic_write_bytes,
    is_sealed,
    load_json_file,
    load_key,
    read_header,
    unseal,
)

# The modules that read a run's adapter, checkpoint and node files load torch, PEFT or Opacus
# (seconds): imported in `verify` only, so that `decrypt` and `--help` answer at once


def verify_run(run_dir: Path, key: bytes | None) -> list[str]:
    """Check everything in ``run_dir`` that carries a checksum or MAC; returns what was checked.

    Raises:
        FedLLMError: a file is missing, corrupted, altered, or cannot be decrypted.
        OSError: a file cannot be read.
    """
    from fedllm.federation.checkpoint import Checkpointer
    from fedllm.model.adapter_files import verify_adapter
    from fedllm.tracking.run_manifest import COVERED, MANIFEST_FILE, verify_run_manifest

    checked = []
    if (run_dir / "adapter").is_dir():
        verify_adapter(run_dir / "adapter", key)
        checked.append("adapter")
    if (run_dir / "checkpoint").is_dir():
        Checkpointer(run_dir / "checkpoint", key).load()
        checked.append("checkpoint")
    # a folder with any of the run's own files claims to be a run: then its manifest must vouch for it
    # (an adapter or checkpoint alone is checked by its own manifest)
    claims = [name for name in COVERED if "/" not in name]
    if (run_dir / MANIFEST_FILE).exists() or any((run_dir / name).exists() for name in claims):
        files = verify_run_manifest(run_dir, key)
        label = f"{MANIFEST_FILE} ({', '.join(files)})"
        checked.append(label if key is not None else f"{label} (not encrypted: checksum only)")
    checked += _verify_nodes(run_dir, key)
    checked += _verify_anchors(run_dir)
    if not checked:
        raise FedLLMError(f"{run_dir}: nothing to verify (not a run directory?)")
    return checked


def _verify_nodes(run_dir: Path, key: bytes | None) -> list[str]:
    """The ledgers (with their record-name salts) and reply caches of the run's simulated nodes (``nodes/*``).

    Each node decides whether its state is encrypted: an encrypted file is checked with the
    key, a plain one by its checksum only, and the list says so.
    """
    from fedllm.node.reply_cache import REPLY_FILE
    from fedllm.privacy.node_ledger import LEDGER_FILE
    from fedllm.privacy.record_keys import SALT_FILE

    checked = []
    names = (LEDGER_FILE, SALT_FILE, REPLY_FILE)
    for path in sorted(path for name in names for path in run_dir.glob(f"nodes/*/{name}")):
        raw = path.read_bytes()
        if path.name in (LEDGER_FILE, SALT_FILE):
            encrypted = is_sealed(raw)
            load_json_file(raw, key if encrypted else None, role=ROLE_NODE_LEDGER, name=path.name, what=str(path))
        else:
            encrypted = read_header(raw, str(path))[0].encrypted
            unseal(raw, key if encrypted else None, role=ROLE_NODE_REPLY, name=REPLY_FILE, what=str(path))
        label = str(path.relative_to(run_dir))
        checked.append(label if encrypted else f"{label} (not encrypted: checksum only)")
    return checked


def _verify_anchors(run_dir: Path) -> list[str]:
    """Each simulated node's ledger against its anchor (``nodes/client-N.ledger-anchor``, beside its
    state directory): a deleted ledger, or an older copy put back, fails here as it fails on the node."""
    from fedllm.privacy.ledger_anchor import LedgerAnchor
    from fedllm.privacy.node_ledger import LEDGER_FILE

    checked = []
    for anchor in sorted(run_dir.glob("nodes/*.ledger-anchor")):
        ledger = anchor.with_name(anchor.name.removesuffix(".ledger-anchor")) / LEDGER_FILE
        LedgerAnchor(anchor, ledger).check(ledger.read_bytes() if ledger.exists() else None, repair=False)
        checked.append(f"{anchor.relative_to(run_dir)} (the ledger is its latest version)")
    return checked


def storage_key(key_file: str | None, need: bool, command: str) -> bytes | None:
    """The key from ``--key-file`` or the storage config's environment variable; None when
    neither is set and the command can do without one."""
    key_env = StorageConfig().key_env
    if not (key_file or need or os.environ.get(key_env)):
        return None
    return load_key(key_file, key_env, setting=f"fedllm {command}")


def verify_cli(argv: list[str]) -> int:
    """``fedllm verify RUN_DIR [--key-file F]``."""
    parser = argparse.ArgumentParser(
        prog="fedllm verify",
        description="Check every protected file of a run directory (its manifest, covering config, summary, "
        "metrics, privacy ledger and audit; final adapter; checkpoint; each simulated "
        "node's ledger and reply cache) and say which one fails. With the key (--key-file or "
        "$FEDLLM_ENCRYPTION_KEY) encrypted files are authenticated; without it only checksums are "
        "checked (corruption, not tampering).",
    )
    parser.add_argument("run_dir", type=Path, help="a run directory, e.g. outputs/<date>/<time>")
    parser.add_argument("--key-file", default=None, help="file holding the 64-hex-character storage key")
    args = parser.parse_args(argv)
    try:
        checked = verify_run(args.run_dir, storage_key(args.key_file, need=False, command="verify"))
    except (FedLLMError, OSError) as exc:
        print(f"fedllm verify: {exc}", file=sys.stderr)
        return 1
    print(f"ok: {', '.join(checked)}")
    return 0


def decrypt_cli(argv: list[str]) -> int:
    """``fedllm decrypt FILE.sealed [OUT] [--key-file F]``."""
    parser = argparse.ArgumentParser(
        prog="fedllm decrypt",
        description="Write the plain file of a sealed (encrypted) one, e.g. an adapter saved with "
        "storage.encrypt=true; the content is authenticated with the key before anything is written.",
    )
    parser.add_argument("sealed", type=Path, help="the sealed file (e.g. adapter/adapter_model.safetensors.sealed)")
    parser.add_argument("out", type=Path, nargs="?", help="where to write the plain file (default: without .sealed)")
    parser.add_argument(
        "--key-file", default=None, help="file holding the 64-hex-character key (default: $FEDLLM_ENCRYPTION_KEY)"
    )
    args = parser.parse_args(argv)
    out = args.out or args.sealed.with_suffix("")
    try:
        blob = args.sealed.read_bytes()
        header = read_header(blob, str(args.sealed))[0]  # a malformed file is named before a key is asked for
        # role and name: whatever the file's authenticated header says; format 1 only here, on request
        data = unseal(
            blob,
            storage_key(args.key_file, need=True, command="decrypt"),
            role=None,
            name=None,
            what=str(args.sealed),
            legacy=True,
        )
        atomic_write_bytes(out, data)
    except (FedLLMError, OSError) as exc:
        print(f"fedllm decrypt: {exc}", file=sys.stderr)
        return 1
    what = f" ({header.role})" if header.role else " (sealed format 1: not bound to a role)"
    print(f"wrote {out}{what}")
    return 0
