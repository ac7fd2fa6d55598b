"""Issue 25, finding 1: idle TLS connections, which need no certificate or key, stopped every
heartbeat at the gateway (uvicorn counted them against its concurrency limit and closed none).

A real uvicorn server with TLS on loopback and the real gateway in front of a stand-in SuperLink;
the attacker connects from other loopback addresses (127.0.x.y), the honest node from 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import ssl
import time

import httpx
import pytest

from fedllm.deployment.edge import EdgeLimits
from fedllm.deployment.edge_probe import (
    attacker_addresses,
    closed_by_server,
    hold_idle_connections,
    honest_calls,
    serve_in_thread,
)
from fedllm.deployment.fleet_gateway import FleetGateway, server_config
from fedllm.deployment.pki import make_tls

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:typer")


def ok(request: httpx.Request) -> httpx.Response:
    return httpx.Response(200, content=b"", headers={"content-type": "application/protobuf"})


@pytest.fixture(scope="module")
def tls(tmp_path_factory):
    return make_tls(tmp_path_factory.mktemp("edge") / "certs", ["127.0.0.1", "localhost"])


@contextlib.contextmanager
def gateway_at(tls, limits: EdgeLimits):
    gateway = FleetGateway(
        "127.0.0.1:9093", ssl.create_default_context(), transport=httpx.MockTransport(ok), limits=limits
    )
    config = server_config(gateway, "127.0.0.1", 0, tls.server_cert, tls.server_key, log_level="critical")
    with serve_in_thread(config) as server:
        port = server.servers[0].sockets[0].getsockname()[1]
        yield gateway, port, server.config.http_protocol_class.connection_book


def close_all(socks):
    for sock in socks:
        sock.close()


@pytest.mark.slow  # seconds each: kept out of the fast tier (make test runs it)
def test_honest_heartbeats_get_through_while_hundreds_of_idle_connections_are_held(tls):
    # the finding: 130 idle connections made every heartbeat a 503; here 300 from 30 addresses
    with gateway_at(tls, EdgeLimits()) as (_, port, book):
        idle = hold_idle_connections("127.0.0.1", port, str(tls.ca_cert), attacker_addresses(30), 10)
        try:
            results = honest_calls(f"https://127.0.0.1:{port}", str(tls.ca_cert), 5)
            assert results.statuses == (200,) * 5
            assert len(book.open) >= 300  # held open, yet no obstacle
        finally:
            close_all(idle)


@pytest.mark.slow  # seconds each: kept out of the fast tier (make test runs it)
def test_an_idle_connection_is_closed_after_the_head_timeout_even_if_it_trickles_bytes(tls):
    with gateway_at(tls, EdgeLimits(head_timeout=1.0)) as (_, port, book):
        silent, trickling = hold_idle_connections("127.0.0.1", port, str(tls.ca_cert), attacker_addresses(1), 2)
        try:
            start, cut_after = time.monotonic(), None
            for byte in b"POST /v1/fleet/send-node-heartbeat HTTP/1.1\r\nhost: gw\r\n":  # never a complete head
                try:
                    trickling.sendall(bytes([byte]))
                except OSError:  # ssl.SSLError included: the server dropped the connection
                    cut_after = time.monotonic() - start
                    break
                time.sleep(0.1)
            assert cut_after is not None and cut_after >= 0.9  # one byte per 0.1 s did not keep it open
            assert closed_by_server(silent, wait=1.0)
            assert closed_by_server(trickling, wait=1.0)
            assert book.expired >= 2
        finally:
            close_all([silent, trickling])


@pytest.mark.slow  # seconds each: kept out of the fast tier (make test runs it)
def test_one_address_holds_at_most_its_share_of_connections(tls):
    with gateway_at(tls, EdgeLimits(per_client=5)) as (_, port, book):
        held = hold_idle_connections("127.0.0.1", port, str(tls.ca_cert), attacker_addresses(1), 8)
        try:
            assert sum(closed_by_server(sock) for sock in held) == 3
            assert book.refused == 3
            assert honest_calls(f"https://127.0.0.1:{port}", str(tls.ca_cert), 2).ok == 2
        finally:
            close_all(held)


def test_at_the_connection_limit_the_longest_idle_connection_makes_room(tls):
    with gateway_at(tls, EdgeLimits(max_connections=20)) as (_, port, book):
        held = hold_idle_connections("127.0.0.1", port, str(tls.ca_cert), attacker_addresses(10), 3)
        try:
            assert honest_calls(f"https://127.0.0.1:{port}", str(tls.ca_cert), 3).ok == 3
            assert book.evicted >= 10  # 30 opened against a limit of 20 (more for the honest calls)
            assert closed_by_server(held[0])  # the oldest went first
        finally:
            close_all(held)


def test_requests_in_flight_are_what_is_limited(tls):
    async_limits = EdgeLimits(max_in_flight=1)
    with gateway_at(tls, async_limits) as (gateway, port, _):
        gateway.in_flight = 1  # one request being served
        assert honest_calls(f"https://127.0.0.1:{port}", str(tls.ca_cert), 1).statuses == (503,)
        gateway.in_flight = 0
        assert honest_calls(f"https://127.0.0.1:{port}", str(tls.ca_cert), 1).statuses == (200,)
