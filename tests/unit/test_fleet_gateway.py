"""The Fleet gateway passes exactly Flower's Fleet API to the SuperLink and nothing else
(issue 13, problem 1: the Control and Runtime APIs must not be reachable by nodes or outsiders)."""

from __future__ import annotations

import asyncio
import logging
import ssl

import httpx
import pytest

from fedllm.deployment.fleet_gateway import FleetGateway, StatusTally, fleet_paths, parse_args, split_address

# importing Flower's router imports typer, which warns about click (not our code)
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:typer")


class Upstream:
    """A stand-in SuperLink that records every request it receives."""

    def __init__(self, status: int = 200, fail: bool = False):
        self.requests: list[httpx.Request] = []
        self.status, self.fail = status, fail

    def __call__(self, request: httpx.Request) -> httpx.Response:
        if self.fail:
            raise httpx.ConnectError("refused", request=request)
        self.requests.append(request)
        return httpx.Response(
            self.status,
            content=b"\x08\x01" + request.content,
            headers={"content-type": "application/protobuf", "connection": "close"},
        )


def call(gateway: FleetGateway, method: str, path: str, **kwargs) -> httpx.Response:
    async def go() -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=gateway), base_url="https://gw") as client:
            return await client.request(method, path, **kwargs)

    return asyncio.run(go())


@pytest.fixture
def upstream() -> Upstream:
    return Upstream()


@pytest.fixture
def gateway(upstream) -> FleetGateway:
    return FleetGateway("127.0.0.1:9093", ssl.create_default_context(), transport=httpx.MockTransport(upstream))


def test_the_fleet_paths_are_flowers_own_and_only_fleet():
    paths = fleet_paths()
    # what a SuperNode calls (flwr/supernode/fleet_http_client.py)
    for call_name in (
        "register-node",
        "activate-node",
        "deactivate-node",
        "unregister-node",
        "send-node-heartbeat",
        "pull-messages",
        "push-messages",
        "get-run",
        "get-fab",
        "push-object",
        "pull-object",
        "confirm-message-received",
    ):
        assert f"/v1/fleet/{call_name}" in paths
    assert all(p.startswith("/v1/fleet/") for p in paths)


def test_a_fleet_call_reaches_the_superlink_with_the_node_signature(gateway, upstream):
    headers = {
        "content-type": "application/protobuf",
        "flwr-public-key": "cHVi",
        "flwr-signature": "c2ln",
        "flwr-timestamp": "2026-11-29T00:00:00+00:00",
        "connection": "keep-alive",
        "te": "trailers",
    }
    response = call(gateway, "POST", "/v1/fleet/pull-messages?debug=1", content=b"\x0a\x02hi", headers=headers)
    assert response.status_code == 200 and response.content == b"\x08\x01\x0a\x02hi"
    assert response.headers["content-type"] == "application/protobuf"
    [sent] = upstream.requests
    assert str(sent.url) == "https://127.0.0.1:9093/v1/fleet/pull-messages"  # no client query string
    for name in ("flwr-public-key", "flwr-signature", "flwr-timestamp", "content-type"):
        assert sent.headers[name] == headers[name]
    assert sent.headers.get("te") is None and sent.headers["host"] == "127.0.0.1:9093"


@pytest.mark.parametrize(
    "path",
    [
        "/v1/control/register-node",
        "/v1/control/start-run",
        "/v1/control/list-runs",
        "/v1/control/stream-logs",
        "/v1/runtime/acquire-task",
        "/v1/runtime/pull-task-input",
        "/v1/runtime/responses",
        "/docs",
        "/openapi.json",
        "/health",
        "/",
        "/v1/fleet/",
        "/v1/fleet/pull-messages/",
        "/v1/fleet/nope",
        "/v1/fleet/pull-messages/../../control/start-run",
        "/v1/fleet/%2e%2e/control/start-run",
        "/v1//fleet/pull-messages",
        "/V1/FLEET/PULL-MESSAGES",
        "/v1/fleet/pull-messages%00",
    ],
)
def test_everything_else_is_refused_without_contacting_the_superlink(gateway, upstream, path):
    response = call(gateway, "POST", path, content=b"x")
    assert response.status_code == 404
    assert upstream.requests == []


@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE", "OPTIONS", "PATCH"])
def test_only_post_is_forwarded(gateway, upstream, method):
    assert call(gateway, method, "/v1/fleet/get-run").status_code == 404
    assert upstream.requests == []


def test_an_oversized_body_is_refused_before_it_is_forwarded(upstream):
    gateway = FleetGateway(
        "127.0.0.1:9093", ssl.create_default_context(), max_body=1000, transport=httpx.MockTransport(upstream)
    )
    assert call(gateway, "POST", "/v1/fleet/push-object", content=b"x" * 1001).status_code == 413
    assert upstream.requests == []
    assert call(gateway, "POST", "/v1/fleet/push-object", content=b"x" * 1000).status_code == 200


def test_the_superlinks_answer_is_passed_back_as_is():
    refusing = Upstream(status=401)
    gateway = FleetGateway("127.0.0.1:9093", ssl.create_default_context(), transport=httpx.MockTransport(refusing))
    response = call(gateway, "POST", "/v1/fleet/activate-node", content=b"")
    assert response.status_code == 401  # node authentication stays the SuperLink's decision


def test_an_unreachable_superlink_is_a_502():
    gateway = FleetGateway(
        "127.0.0.1:9093", ssl.create_default_context(), transport=httpx.MockTransport(Upstream(fail=True))
    )
    assert call(gateway, "POST", "/v1/fleet/get-run", content=b"").status_code == 502


def test_addresses_and_arguments():
    assert split_address("0.0.0.0:9092") == ("0.0.0.0", 9092)
    assert split_address("[::1]:9092") == ("::1", 9092)
    for bad in ("9092", "host:", "host:0", "host:70000", ":9092"):
        with pytest.raises(ValueError, match="host:port"):
            split_address(bad)
    args = parse_args(
        [
            "--listen",
            "0.0.0.0:9092",
            "--superlink",
            "127.0.0.1:9093",
            "--root-certificates",
            "ca.crt",
            "--ssl-certfile",
            "s.crt",
            "--ssl-keyfile",
            "s.key",
        ]
    )
    assert args.max_body_mb == 32


def test_answers_are_logged_as_one_summary_a_minute_not_a_line_per_poll(gateway, caplog):
    # issue 29, item 10: the gateway logged every poll (593 lines in 22 minutes)
    now = [0.0]
    gateway.tally = StatusTally(every=60, clock=lambda: now[0])
    with caplog.at_level(logging.INFO, logger="fedllm.deployment.fleet_gateway"):
        for _ in range(30):
            call(gateway, "POST", "/v1/fleet/send-node-heartbeat", content=b"")
        call(gateway, "GET", "/v1/control/list-runs")
        assert caplog.records == []
        now[0] = 61.0
        call(gateway, "POST", "/v1/fleet/pull-messages", content=b"")
    (record,) = caplog.records
    assert record.levelno == logging.WARNING  # something was refused
    assert record.getMessage() == (
        "last 61 s: 31 calls answered (pull-messages 1, send-node-heartbeat 30); "
        "errors: 404 x 1 (/v1/control/list-runs)"
    )
