"""The idle-connection attack of issue 25 (finding 1), for the edge benchmark and its tests.

An outsider needs no certificate or key to open TLS connections to the gateway; each one it
opens and then leaves silent is what this module holds. :func:`honest_calls` meanwhile plays a
node that keeps calling the Fleet API, and reports what it got back.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import uvicorn

HEARTBEAT_PATH = "/v1/fleet/send-node-heartbeat"


@contextlib.contextmanager
def serve_in_thread(config: uvicorn.Config, timeout: float = 30.0) -> Iterator[uvicorn.Server]:
    """Run ``config``'s server in a background thread until the block ends.

    Raises:
        RuntimeError: the server did not start within ``timeout`` seconds.
    """
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the server did not start")
        time.sleep(0.02)
    try:
        yield server
    finally:
        server.should_exit = True
        thread.join(timeout)


def attacker_addresses(count: int) -> list[str]:
    """``count`` loopback source addresses (127.0.x.y, y >= 2): none is 127.0.0.1, the honest node's."""
    return [f"127.0.{i // 250}.{i % 250 + 2}" for i in range(count)]


def hold_idle_connections(
    host: str, port: int, ca_file: str, sources: list[str], per_source: int, handshake: bool = True
) -> list[socket.socket]:
    """Open ``per_source`` connections from each of ``sources`` to ``host:port`` and send nothing.

    Args:
        host, port: the gateway.
        ca_file: the federation CA (to finish the TLS handshake, as anyone holding it can).
        sources: local addresses to connect from (loopback aliases on Linux).
        per_source: connections from each address.
        handshake: finish the TLS handshake (else: a bare TCP connection).

    Returns:
        One socket per connection (the caller closes them). A connection the server dropped
        during the handshake is among them, already closed.
    """
    context = ssl.create_default_context(cafile=ca_file)
    held = []
    for source in sources:
        for _ in range(per_source):
            raw = socket.create_connection((host, port), timeout=10, source_address=(source, 0))
            held.append(_handshake(context, raw, host) if handshake else raw)
    return held


def _handshake(context: ssl.SSLContext, raw: socket.socket, host: str) -> socket.socket:
    try:
        return context.wrap_socket(raw, server_hostname=host)
    except (ssl.SSLError, OSError):  # dropped at once (a limit): the closed socket stands for it
        raw.close()
        return raw


def closed_by_server(sock: socket.socket, wait: float = 0.5) -> bool:
    """Whether the server has closed ``sock`` (it reads end-of-stream or a reset within ``wait`` s)."""
    sock.settimeout(wait)
    try:
        return sock.recv(1) == b""
    except TimeoutError:
        return False
    except (ssl.SSLError, OSError):
        return True


@dataclass(frozen=True)
class CallResults:
    """What an honest node got back from its calls."""

    statuses: tuple[int, ...]  # HTTP status of each call (0: no answer at all)
    seconds: tuple[float, ...]  # how long each took

    @property
    def ok(self) -> int:
        """Calls answered 200."""
        return sum(status == 200 for status in self.statuses)


def honest_calls(base_url: str, ca_file: str, count: int, path: str = HEARTBEAT_PATH) -> CallResults:
    """``count`` Fleet calls from a node on 127.0.0.1, each on a fresh connection."""
    statuses, seconds = [], []
    for _ in range(count):
        start = time.perf_counter()
        try:
            with httpx.Client(verify=ssl.create_default_context(cafile=ca_file), timeout=10) as client:
                statuses.append(client.post(base_url + path, content=b"").status_code)
        except httpx.HTTPError:
            statuses.append(0)
        seconds.append(time.perf_counter() - start)
    return CallResults(tuple(statuses), tuple(seconds))
