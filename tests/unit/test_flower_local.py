"""Issue 29, item 7: `flwr run .` leaves Flower's local SuperLink running, and the README's remedy
(`pkill -f flower-superlink`) also killed any other SuperLink on the machine."""

from __future__ import annotations

import subprocess
import sys
import time

import psutil
import pytest

from fedllm.cli.flower_local import find_managed, flower_local_cli, managed_log_file, stop

# a stand-in with the command line of Flower's console script: `python .../flower-superlink --simulation ...`;
# it starts one process of its own, as the SuperLink starts its SuperExec
SLEEPER = (
    "import subprocess, sys, time\n"
    "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])\n"
    "time.sleep(120)\n"
)


def _superlink(log_file) -> subprocess.Popen:
    script = log_file.parent / "bin" / "flower-superlink"
    script.parent.mkdir(parents=True, exist_ok=True)
    script.write_text(SLEEPER, encoding="utf-8")
    return subprocess.Popen([sys.executable, str(script), "--simulation", "--log-file", str(log_file)])


def _wait_for_child(process: subprocess.Popen) -> None:
    deadline = time.monotonic() + 20
    while not psutil.Process(process.pid).children() and time.monotonic() < deadline:
        time.sleep(0.05)


@pytest.fixture
def superlinks(tmp_path):
    ours = managed_log_file(tmp_path / "flwr-home")
    other = tmp_path / "deployment" / "superlink.log"  # a deployment's SuperLink on the same machine
    started = [_superlink(ours), _superlink(other)]
    for process in started:
        _wait_for_child(process)
    yield ours, started
    for process in started:
        for child in psutil.Process(process.pid).children(recursive=True) if process.poll() is None else []:
            child.kill()
        process.kill()
        process.wait()


@pytest.mark.slow  # seconds each: kept out of the fast tier (make test runs it)
def test_only_the_managed_superlink_and_what_it_started_are_stopped(superlinks):
    log_file, (managed, deployment) = superlinks
    found = find_managed(log_file)
    assert [item.superlink.pid for item in found] == [managed.pid]
    assert len(found[0].children) == 1 and found[0].resident_mb() > 0
    child = found[0].children[0]
    stopped = stop(found, wait=5)
    assert set(stopped) == {managed.pid, child.pid}
    assert managed.wait(timeout=10) is not None and not child.is_running()
    assert deployment.poll() is None  # the other SuperLink runs on


@pytest.mark.slow  # seconds each: kept out of the fast tier (make test runs it)
def test_the_command_reports_and_stops(superlinks, monkeypatch, capsys):
    log_file, (managed, deployment) = superlinks
    monkeypatch.setenv("FLWR_HOME", str(log_file.parent.parent))
    assert flower_local_cli(["status"]) == 0
    assert f"local SuperLink pid {managed.pid} with 1 process(es)" in capsys.readouterr().out
    assert flower_local_cli(["stop"]) == 0
    assert "stopped pids" in capsys.readouterr().out
    assert managed.wait(timeout=10) is not None and deployment.poll() is None
    assert flower_local_cli(["status"]) == 0
    assert "no local SuperLink" in capsys.readouterr().out
