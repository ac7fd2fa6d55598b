"""The only door nodes get: a TLS front that passes Flower's Fleet API to a SuperLink that
listens on loopback, and nothing else.

Flower 1.42 serves every API of the SuperLink on one HTTPS port: the Fleet API nodes use
(``/v1/fleet/...``), the Control API the ``flwr`` CLI uses (``/v1/control/...``: register a
node key, start or stop a run, read logs) and the Runtime API its ServerApp processes use
(``/v1/runtime/...``). Node authentication guards the Fleet API only, and open-source Flower
has no account authentication for the others, so anyone who can reach that port with the
federation's CA certificate can register a node and start a run (issue 13, problem 1).

So the SuperLink listens on 127.0.0.1 (the coordinator runs ``flwr`` on that host or through
an SSH tunnel), and this gateway listens where nodes connect. It answers ``POST`` on exactly
the Fleet paths Flower's own Fleet router defines, forwards each one to the SuperLink over
TLS (verified against the federation CA) with the node's authentication headers unchanged,
and answers 404 to everything else without contacting the SuperLink. It runs on the same
HTTP stack as the SuperLink (uvicorn, httpx), so it adds no new dependency.

    python -m fedllm.deployment.fleet_gateway --listen 0.0.0.0:9092 --superlink 127.0.0.1:9093 \\
        --root-certificates certs/ca.crt --ssl-certfile certs/server.crt --ssl-keyfile certs/server.key
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import ssl
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path

import httpx
import uvicorn
from flwr.superlink.routers.fleet.router import router
from starlette.routing import Route

from fedllm.deployment.edge import EdgeLimits, edge_protocol, raise_file_limit
from fedllm.deployment.reply_quota import MAX_REPLY_BYTES, ReplyQuota, Ticket
from fedllm.federation.remote_text import escape_remote_text

log = logging.getLogger(__name__)

FLEET_PREFIX = "/v1/fleet/"
PUSH_MESSAGES, PUSH_OBJECT = f"{FLEET_PREFIX}push-messages", f"{FLEET_PREFIX}push-object"
# Flower sends arrays in chunks of at most 5 MiB; the bound (times EdgeLimits.max_in_flight) caps
# the memory anyone who reaches the port can make the gateway hold before the SuperLink checks
# who they are.
MAX_BODY_BYTES = 32 * 2**20
UPSTREAM_TIMEOUT = 120.0  # seconds; longer than any Fleet call Flower's node client waits for
# Hop-by-hop headers (RFC 9110, section 7.6.1) belong to one connection: never forwarded.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
    }
)

Scope = dict
Receive = Callable[[], Awaitable[dict]]
Send = Callable[[dict], Awaitable[None]]


def fleet_paths() -> frozenset[str]:
    """Every path of the installed Flower's Fleet API (``/v1/fleet/<call>``), from its own router.

    Taken from Flower rather than written down here, so that the gateway follows the Fleet API
    of the Flower version that is installed and never opens anything outside it.

    Returns:
        The paths, each starting with ``/v1/fleet/``.

    Raises:
        RuntimeError: when the router has no such path, or one outside ``/v1/fleet/``.
    """
    found = set()
    for route in router.routes:
        if not isinstance(route, Route):  # e.g. a mount: no single path to forward
            raise RuntimeError(f"Flower's Fleet router has an entry that is not a route: {route!r}")
        found.add(route.path)
    paths = frozenset(found)
    if not paths or any(not path.startswith(FLEET_PREFIX) for path in paths):
        raise RuntimeError(f"Flower's Fleet router has unexpected paths: {sorted(paths)}")
    return paths


class FleetGateway:
    """An ASGI application that forwards the Fleet API to one SuperLink and refuses the rest."""

    def __init__(
        self,
        upstream: str,
        verify: ssl.SSLContext,
        paths: Iterable[str] | None = None,
        max_body: int = MAX_BODY_BYTES,
        timeout: float = UPSTREAM_TIMEOUT,
        transport: httpx.AsyncBaseTransport | None = None,
        limits: EdgeLimits | None = None,
        quota: ReplyQuota | None = None,
    ):
        """
        Args:
            upstream: the SuperLink's ``host:port`` (its certificate must name ``host``).
            verify: TLS context that trusts the federation CA.
            paths: the paths to forward (default: :func:`fleet_paths`).
            max_body: the largest request body accepted, in bytes (larger: 413).
            timeout: seconds to wait for the SuperLink.
            transport: httpx transport to the SuperLink (tests; default: a TLS connection).
            limits: the requests served at once and the time a body may take (default: :class:`EdgeLimits`).
            quota: the bytes one node's reply may push (default: :data:`MAX_REPLY_BYTES`).
        """
        self.base_url = f"https://{upstream}"
        self.paths = frozenset(paths) if paths is not None else fleet_paths()
        self.max_body, self.verify, self.timeout, self.transport = max_body, verify, timeout, transport
        self.limits = limits or EdgeLimits()
        self.quota = quota or ReplyQuota()
        self.in_flight = 0
        self.tally = StatusTally()
        self.client: httpx.AsyncClient | None = None

    def _new_client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(
            base_url=self.base_url,
            verify=self.verify,
            timeout=self.timeout,
            transport=self.transport,
            follow_redirects=False,
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
        elif scope["type"] == "http":
            await self._http(scope, receive, send)
        # websockets and anything else: no handler, the server closes the connection

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                self.client = self._new_client()
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                self.tally.flush()  # the last minute's answers, which no later call would log
                if self.client is not None:
                    await self.client.aclose()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def counted(message: dict) -> None:
            if message["type"] == "http.response.start":
                self.tally.add(message["status"], scope["path"])
            await send(message)

        await self._route(scope, receive, counted)

    async def _route(self, scope: Scope, receive: Receive, send: Send) -> None:
        # scope["path"] is already percent-decoded; an exact match leaves no room for
        # "/v1/fleet/../control/..." or encoded variants, and the SuperLink receives this
        # exact string, never the client's raw path or query.
        path = scope["path"]
        if scope["method"] != "POST" or path not in self.paths:
            await _respond(send, 404, b"not found\n")
            return
        # requests, not connections, are what is limited: an idle connection holds no slot
        if self.in_flight >= self.limits.max_in_flight:
            await _respond(send, 503, b"too many requests in flight\n")
            return
        self.in_flight += 1
        try:
            await self._forward(path, scope, receive, send)
        finally:
            self.in_flight -= 1

    async def _forward(self, path: str, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            body = await asyncio.wait_for(_read_body(receive, self.max_body), self.limits.body_timeout)
        except _ClientGone:
            return  # nothing half-received is ever forwarded
        except TimeoutError:
            await _respond(send, 408, b"request body too slow\n")
            return
        if body is None:
            await _respond(send, 413, b"request body too large\n")
            return
        ticket = self.quota.take(body) if path == PUSH_OBJECT else Ticket(None)
        if ticket is None:
            log.warning("push-object refused: the reply would pass %d bytes", self.quota.max_bytes)
            await _respond(send, 413, b"reply larger than this federation accepts\n")
            return
        upstream = await self._post(path, body, scope)
        if upstream is None or upstream.status_code != 200:
            self.quota.refund(ticket)
        if upstream is None:
            await _respond(send, 502, b"superlink unavailable\n")
            return
        if path == PUSH_MESSAGES and upstream.status_code == 200:
            self.quota.announce(body)  # accepted: the SuperLink authenticated the node
        # httpx has decoded any content-encoding into .content: drop the header with the body length
        kept = [
            (k.encode("latin-1"), v.encode("latin-1"))
            for k, v in upstream.headers.multi_items()
            if k.lower() not in HOP_BY_HOP | {"content-encoding"}
        ]
        await _respond(send, upstream.status_code, upstream.content, kept)

    async def _post(self, path: str, body: bytes, scope: Scope) -> httpx.Response | None:
        """The SuperLink's answer to ``body`` on ``path``, with the node's own headers; None if unreachable."""
        headers = [
            (k.decode("latin-1"), v.decode("latin-1"))
            for k, v in scope["headers"]
            if k.decode("latin-1").lower() not in HOP_BY_HOP
        ]
        client = self.client or self._new_client()
        try:
            return await client.post(path, content=body, headers=headers)
        except httpx.HTTPError as exc:
            log.warning("SuperLink unreachable for %s: %s", path, type(exc).__name__)
            return None
        finally:
            if client is not self.client:
                await client.aclose()


class StatusTally:
    """What the gateway answered, logged as one summary line a minute (and at shutdown) instead of
    a line per call: nodes poll every few seconds, and a line per call buried the refusals (593
    lines in 22 minutes). Successful calls are counted by Fleet call, errors by status with a few
    of their paths (escaped: a path is whatever the caller sent)."""

    def __init__(self, every: float = 60.0, clock: Callable[[], float] = time.monotonic):
        self.every, self.clock = every, clock
        self.counts: Counter[tuple[int, str]] = Counter()
        self.since = clock()

    def add(self, status: int, path: str) -> None:
        """Count one answer; log the summary once ``every`` seconds have passed since the last."""
        self.counts[(status, path)] += 1
        if self.clock() - self.since >= self.every:
            self.flush()

    def flush(self) -> None:
        """Log the summary of the answers counted so far, if any, and start a new period."""
        if self.counts:
            ok: Counter[str] = Counter()
            errors: dict[int, Counter[str]] = {}
            for (status, path), n in self.counts.items():
                if status < 400:
                    ok[path.removeprefix(FLEET_PREFIX)] += n
                else:
                    errors.setdefault(status, Counter())[path] += n
            log.log(
                logging.WARNING if errors else logging.INFO,
                "last %.0f s: %d calls answered (%s); errors: %s",
                self.clock() - self.since,
                sum(ok.values()),
                ", ".join(f"{name} {n}" for name, n in sorted(ok.items())) or "none",
                "; ".join(_errors(status, paths) for status, paths in sorted(errors.items())) or "none",
            )
        self.counts.clear()
        self.since = self.clock()


def _errors(status: int, paths: Counter[str]) -> str:
    shown = ", ".join(escape_remote_text(path)[:80] for path, _ in paths.most_common(3))
    more = f" and {len(paths) - 3} more paths" if len(paths) > 3 else ""
    return f"{status} x {sum(paths.values())} ({shown}{more})"


class _ClientGone(Exception):
    """The client disconnected before its request body was complete."""


async def _read_body(receive: Receive, limit: int) -> bytes | None:
    """The request body, or None as soon as it passes ``limit`` bytes (it is not read further)."""
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise _ClientGone
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


async def _respond(send: Send, status: int, body: bytes, headers: list[tuple[bytes, bytes]] | None = None) -> None:
    if headers is None:
        headers = [(b"content-type", b"text/plain; charset=utf-8")]
    headers = [*headers, (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def split_address(address: str) -> tuple[str, int]:
    """``host:port`` or ``[ipv6]:port`` -> (host, port).

    Raises:
        ValueError: when the port is missing or not a number in 1..65535.
    """
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{address!r} is not host:port")
    return host, int(port)


def upstream_context(root_certificates: Path) -> ssl.SSLContext:
    """TLS context for the gateway's connection to the SuperLink: the federation CA only."""
    context = ssl.create_default_context(cafile=str(root_certificates))
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line of ``python -m fedllm.deployment.fleet_gateway``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--listen", required=True, help="host:port nodes connect to, e.g. 0.0.0.0:9092")
    parser.add_argument("--superlink", required=True, help="the SuperLink's host:port, e.g. 127.0.0.1:9093")
    parser.add_argument("--root-certificates", type=Path, required=True, help="the federation CA (ca.crt)")
    parser.add_argument("--ssl-certfile", type=Path, required=True, help="certificate nodes see (server.crt)")
    parser.add_argument("--ssl-keyfile", type=Path, required=True, help="its private key (server.key)")
    parser.add_argument("--max-body-mb", type=float, default=MAX_BODY_BYTES / 2**20, help="largest request body")
    parser.add_argument(
        "--max-reply-mb",
        type=float,
        default=MAX_REPLY_BYTES / 2**20,
        help="bytes one node's reply may push, all its objects together (at least the adapter's size)",
    )
    defaults = EdgeLimits()
    parser.add_argument(
        "--limit-concurrency",
        type=int,
        default=defaults.max_in_flight,
        help="requests served at once; more get 503 (bounds memory: each holds a body). Idle connections do not count",
    )
    parser.add_argument("--max-connections", type=int, default=defaults.max_connections, help="open connections")
    parser.add_argument("--max-per-client", type=int, default=defaults.per_client, help="open connections per IP")
    parser.add_argument(
        "--head-timeout", type=float, default=defaults.head_timeout, help="seconds an idle connection stays open"
    )
    parser.add_argument("--body-timeout", type=float, default=defaults.body_timeout, help="seconds to send a body")
    return parser.parse_args(argv)


def limits_from(args: argparse.Namespace) -> EdgeLimits:
    """The edge limits the command line asks for.

    Raises:
        ValueError: a limit is not positive.
    """
    return EdgeLimits(
        max_connections=args.max_connections,
        per_client=args.max_per_client,
        head_timeout=args.head_timeout,
        body_timeout=args.body_timeout,
        max_in_flight=args.limit_concurrency,
    )


def server_config(
    gateway: FleetGateway, host: str, port: int, certfile: Path, keyfile: Path, log_level: str = "info"
) -> uvicorn.Config:
    """The uvicorn configuration that serves ``gateway`` over TLS with its edge limits."""
    limits = gateway.limits
    return uvicorn.Config(
        gateway,
        host=host,
        port=port,
        ssl_certfile=str(certfile),
        ssl_keyfile=str(keyfile),
        http=edge_protocol(limits),
        ws="none",  # the Fleet API has no websockets: nothing to upgrade to
        limit_concurrency=None,  # uvicorn's counts idle connections: the gateway limits requests itself
        timeout_keep_alive=int(limits.head_timeout) or 1,
        h11_max_incomplete_event_size=limits.max_head_bytes,
        server_header=False,
        date_header=False,
        access_log=False,  # a line per poll: StatusTally logs a summary a minute instead
        log_level=log_level,
    )


def main(argv: list[str] | None = None) -> None:
    """Serve the gateway until interrupted."""
    args = parse_args(argv)
    host, port = split_address(args.listen)
    split_address(args.superlink)
    limits = limits_from(args)
    gateway = FleetGateway(
        args.superlink,
        upstream_context(args.root_certificates),
        max_body=int(args.max_body_mb * 2**20),
        limits=limits,
        quota=ReplyQuota(max_bytes=int(args.max_reply_mb * 2**20)),
    )
    raise_file_limit(limits.max_connections + 256)  # the rest: upstream connections, logs
    log.info(
        "Fleet gateway on %s:%d -> SuperLink %s (%d Fleet paths; everything else: 404); %s",
        host,
        port,
        args.superlink,
        len(gateway.paths),
        limits,
    )
    uvicorn.Server(server_config(gateway, host, port, args.ssl_certfile, args.ssl_keyfile)).run()


if __name__ == "__main__":
    # the gateway logs a summary of its answers a minute (StatusTally), uvicorn no line per
    # request; httpx would log each forwarded call: WARNING and above only
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log.setLevel(logging.INFO)
    main()
