"""The processes a command started, found by a tag in their environment: every child inherits
it, so it still finds them once they have been re-parented away (Ray workers of a shut-down or
killed driver, Flower's SuperExec processes)."""

from __future__ import annotations

import psutil


def tagged_processes(name: str, value: str) -> list[psutil.Process]:
    """Live (non-zombie) processes whose environment sets ``name=value``."""
    found = []
    for proc in psutil.process_iter(["status"]):
        if proc.info["status"] == psutil.STATUS_ZOMBIE:
            continue  # already exited; only waiting for its parent to reap it
        try:
            if proc.environ().get(name) == value:
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found
