"""A real SuperLink on loopback and the Fleet gateway in front of it (issue 13, problem 1).

The SuperLink serves its Control and Runtime APIs to anyone who reaches its port (the
problem, reproduced here so that a Flower upgrade that changes it is noticed); through the
gateway only the Fleet API is left, and node authentication still decides there.
"""

from __future__ import annotations

import os
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from fedllm.deployment.pki import make_tls

BIN = Path(sys.executable).parent
PROTOBUF = {"content-type": "application/protobuf", "accept": "application/protobuf"}

pytestmark = pytest.mark.slow  # a real SuperLink in a subprocess


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(port: int, proc: subprocess.Popen, log: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text()[-3000:]
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise AssertionError(f"nothing on port {port}: {log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    """(SuperLink port, gateway port, CA certificate); both processes stopped afterwards."""
    folder = tmp_path_factory.mktemp("gateway")
    tls = make_tls(folder / "certs", ["127.0.0.1", "localhost"])
    link_port, gateway_port = free_port(), free_port()
    env = {**os.environ, "FLWR_HOME": str(folder / "flwr-home"), "PYTHONWARNINGS": "ignore::DeprecationWarning"}
    commands = {
        # --isolation process: no SuperExec child to clean up; the Runtime API is served all the same
        "superlink": [
            str(BIN / "flower-superlink"),
            "--ssl-ca-certfile",
            str(tls.ca_cert),
            "--ssl-certfile",
            str(tls.server_cert),
            "--ssl-keyfile",
            str(tls.server_key),
            "--enable-supernode-auth",
            "--disable-runtime-dependency-installation",
            "--isolation",
            "process",
            "--host",
            "127.0.0.1",
            "--port",
            str(link_port),
        ],
        "gateway": [
            sys.executable,
            "-m",
            "fedllm.deployment.fleet_gateway",
            "--listen",
            f"127.0.0.1:{gateway_port}",
            "--superlink",
            f"127.0.0.1:{link_port}",
            "--root-certificates",
            str(tls.ca_cert),
            "--ssl-certfile",
            str(tls.server_cert),
            "--ssl-keyfile",
            str(tls.server_key),
        ],
    }
    procs = {}
    try:
        for name, command in commands.items():
            log = folder / f"{name}.log"
            with log.open("w") as out:  # the child keeps its own copy of the descriptor
                procs[name] = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT)
            wait_for(link_port if name == "superlink" else gateway_port, procs[name], log)
        yield link_port, gateway_port, tls.ca_cert
    finally:
        for proc in procs.values():
            proc.terminate()
        for proc in procs.values():
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)


def post(port: int, ca_cert: Path, path: str) -> httpx.Response:
    with httpx.Client(verify=ssl.create_default_context(cafile=str(ca_cert)), timeout=30) as client:
        return client.post(f"https://127.0.0.1:{port}{path}", content=b"", headers=PROTOBUF)


def test_the_superlink_itself_serves_its_control_and_runtime_apis_to_anyone(federation):
    link, _, ca_cert = federation
    # no key, no account: this is why the SuperLink must listen on loopback only
    assert post(link, ca_cert, "/v1/control/list-runs").status_code == 200
    assert post(link, ca_cert, "/v1/runtime/acquire-task").status_code == 200


@pytest.mark.parametrize(
    "path",
    [
        "/v1/control/list-runs",
        "/v1/control/register-node",
        "/v1/control/start-run",
        "/v1/runtime/acquire-task",
        "/v1/runtime/pull-task-input",
    ],
)
def test_through_the_gateway_the_control_and_runtime_apis_are_gone(federation, path):
    _, gateway, ca_cert = federation
    assert post(gateway, ca_cert, path).status_code == 404


def test_through_the_gateway_the_fleet_api_is_the_superlinks_and_needs_a_node_key(federation):
    _, gateway, ca_cert = federation
    response = post(gateway, ca_cert, "/v1/fleet/get-run")
    assert response.status_code == 401 and "SuperNode authentication" in response.text


def test_the_gateway_presents_the_federation_certificate(federation):
    _, gateway, _ = federation
    with pytest.raises(httpx.ConnectError):  # an unrelated trust store does not accept it
        with httpx.Client(timeout=10) as client:
            client.post(f"https://127.0.0.1:{gateway}/v1/fleet/get-run")
