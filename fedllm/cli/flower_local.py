"""``fedllm flower-local {status,stop}``: the local SuperLink that ``flwr run .`` leaves running.

Flower starts a detached ``flower-superlink --simulation`` the first time ``flwr run .`` needs
one and keeps it (and the SuperExec it spawns) for the next run: ~280 MB that stay after the
command. ``pkill -f flower-superlink`` would also stop any other SuperLink on the machine (a
deployment's, another user's). Here only the one Flower manages for this user is touched: a
``flower-superlink`` process of this user whose ``--log-file`` is the managed one under
``$FLWR_HOME/local-superlink``, with every process it started.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path

import psutil

LOCAL_DIR = "local-superlink"  # under $FLWR_HOME: where Flower keeps its managed SuperLink's files
STOP_WAIT_S = 10.0


def managed_log_file(flwr_home: Path | None = None) -> Path:
    """The log file Flower gives the SuperLink it manages for ``flwr run .``."""
    if flwr_home is None:
        from flwr.supercore.utils import get_flwr_home

        flwr_home = get_flwr_home()
    return Path(flwr_home) / LOCAL_DIR / "superlink.log"


@dataclass(frozen=True)
class Found:
    """The managed SuperLink and the processes it started."""

    superlink: psutil.Process
    children: tuple[psutil.Process, ...]

    def resident_mb(self) -> float:
        """Their resident memory together, in MB (processes gone meanwhile count 0)."""
        total = 0
        for process in (self.superlink, *self.children):
            try:
                total += process.memory_info().rss
            except psutil.Error:
                pass
        return total / 1e6


def find_managed(log_file: Path) -> list[Found]:
    """This user's ``flower-superlink`` processes whose ``--log-file`` is ``log_file``."""
    found = []
    for process in psutil.process_iter(["pid", "uids", "cmdline"]):
        try:
            if process.info["uids"] is None or process.info["uids"].real != os.getuid():
                continue
            if _is_managed(process.info["cmdline"] or [], log_file):
                found.append(Found(process, tuple(process.children(recursive=True))))
        except psutil.Error:  # gone, or not ours to read
            continue
    return found


def _is_managed(cmdline: list[str], log_file: Path) -> bool:
    names = [Path(arg).name for arg in cmdline[:3]]  # the script itself, or `python <script>`
    if "flower-superlink" not in names:
        return False
    for flag, value in zip(cmdline, cmdline[1:], strict=False):
        if flag == "--log-file" and Path(value) == log_file:
            return True
    return any(arg == f"--log-file={log_file}" for arg in cmdline)


def stop(found: list[Found], wait: float = STOP_WAIT_S) -> list[int]:
    """Terminate each managed SuperLink and its processes (killed if still there after ``wait`` s).

    Returns:
        The process ids stopped.
    """
    processes = [p for item in found for p in (*item.children, item.superlink)]
    for process in processes:
        try:
            process.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(processes, timeout=wait)
    for process in alive:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=wait)
    return [process.pid for process in processes]


def flower_local_cli(argv: list[str]) -> int:
    """``fedllm flower-local status|stop``."""
    parser = argparse.ArgumentParser(prog="fedllm flower-local", description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=("status", "stop"))
    args = parser.parse_args(argv)
    log_file = managed_log_file()
    found = find_managed(log_file)
    if not found:
        print(f"no local SuperLink of `flwr run .` is running (none logs to {log_file})")
        return 0
    for item in found:
        print(
            f"local SuperLink pid {item.superlink.pid} with {len(item.children)} process(es) it started, "
            f"{item.resident_mb():.0f} MB resident (log: {log_file})"
        )
    if args.action == "stop":
        print(f"stopped pids {' '.join(map(str, stop(found)))}")
    return 0
