"""``fedllm verify RUN_DIR`` and ``fedllm decrypt FILE [OUT]``: check and open saved run state.

``verify`` checks every checksum of a run directory (final adapter, checkpoint, each node's
ledger) and says which file fails. ``decrypt`` turns a sealed file (an encrypted adapter)
back into the plain file, with the key from ``$FEDLLM_ENCRYPTION_KEY`` or ``--key-file``.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from fedllm.errors import FedLLMError


def verify_run(run_dir: Path, key: bytes | None) -> list[str]:
    """Check everything in ``run_dir`` that carries a checksum; returns what was checked.

    Raises:
        FedLLMError: a file is missing, corrupted, or cannot be decrypted.
    """
    import json

    from fedllm.federation.checkpoint import Checkpointer
    from fedllm.storage import verify_adapter, verify_checksum

    checked = []
    if (run_dir / "adapter").is_dir():
        verify_adapter(run_dir / "adapter")
        checked.append("adapter")
    if (run_dir / "checkpoint").is_dir():
        Checkpointer(run_dir / "checkpoint", key).load()
        checked.append("checkpoint")
    for ledger in sorted(run_dir.glob("nodes/*/privacy_ledger.json")):
        verify_checksum(json.loads(ledger.read_text(encoding="utf-8")), str(ledger))
        checked.append(str(ledger.relative_to(run_dir)))
    if not checked:
        raise FedLLMError(f"{run_dir}: nothing to verify (not a run directory?)")
    return checked


def _key(key_file: str | None, need: bool) -> bytes | None:
    """The key from ``--key-file`` or the storage config's environment variable; None when
    neither is set and the command can do without one."""
    from fedllm.config import StorageConfig
    from fedllm.storage import load_key

    key_env = StorageConfig().key_env
    if not (key_file or need or os.environ.get(key_env)):
        return None
    return load_key(key_file, key_env)


def verify_cli(argv: list[str]) -> int:
    """``fedllm verify RUN_DIR [--key-file F]``."""
    parser = argparse.ArgumentParser(prog="fedllm verify", description=verify_run.__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--key-file", default=None)
    args = parser.parse_args(argv)
    try:
        checked = verify_run(args.run_dir, _key(args.key_file, need=False))
    except FedLLMError as exc:
        print(f"fedllm verify: {exc}", file=sys.stderr)
        return 1
    print(f"ok: {', '.join(checked)}")
    return 0


def decrypt_cli(argv: list[str]) -> int:
    """``fedllm decrypt FILE.sealed [OUT] [--key-file F]``."""
    from fedllm.storage import atomic_write_bytes, unseal

    parser = argparse.ArgumentParser(prog="fedllm decrypt", description="write the plain file of a sealed one")
    parser.add_argument("sealed", type=Path)
    parser.add_argument("out", type=Path, nargs="?")
    parser.add_argument("--key-file", default=None)
    args = parser.parse_args(argv)
    out = args.out or args.sealed.with_suffix("")
    try:
        atomic_write_bytes(out, unseal(args.sealed.read_bytes(), _key(args.key_file, need=True), str(args.sealed)))
    except (FedLLMError, OSError) as exc:
        print(f"fedllm decrypt: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {out}")
    return 0
