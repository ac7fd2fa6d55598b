"""What an outsider can hold at the gateway's port: connection limits for the network edge.

Anyone who can reach the port can open TLS connections: no certificate or key is needed for
that (issue 25, finding 1). Uvicorn counts every open connection against ``limit_concurrency``
and closes none that never sends a request, so 130 idle connections made every node's
heartbeat a 503 for as long as they were held.

Here a connection costs an outsider more than it costs us:

- **Idle connections are closed.** A connection must complete a request head within
  ``head_timeout`` seconds of connecting, or of its previous response (a trickled head, one
  byte at a time, is still incomplete). Headers are bounded by h11 (``max_head_bytes``).
- **Idle connections do not block anyone.** The concurrency limit counts requests in flight
  (:class:`~fedllm.deployment.fleet_gateway.FleetGateway` answers 503 past it), never open
  connections; at ``max_connections`` the connection idle for longest is closed to make room.
- **One address holds at most ``per_client`` connections**; more are closed as they open.

The TLS handshake itself is bounded by asyncio's handshake timeout (60 s). What no process can
hold off alone is an attacker with more addresses than ``max_connections`` (or file
descriptors) who reconnects faster than ``head_timeout``: that needs the network's own
protection (a firewall allow-list of the nodes' addresses), which the README's deployment
section names.
"""

from __future__ import annotations

import asyncio
import logging
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EdgeLimits:
    """Connection limits at the gateway's port (all set by the coordinator's operator)."""

    max_connections: int = 4096  # open TLS connections, all clients together
    per_client: int = 32  # open connections from one IP address (a NATed site shares one)
    head_timeout: float = 10.0  # seconds to a complete request head, from connect or last response
    body_timeout: float = 60.0  # seconds to a complete request body, from its head (32 MiB at 0.5 MiB/s)
    max_in_flight: int = 128  # requests being served at once; more get 503
    max_head_bytes: int = 16 * 1024  # request line and headers together

    def __post_init__(self) -> None:
        for name in ("max_connections", "per_client", "max_in_flight", "max_head_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("head_timeout", "body_timeout"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")


class ConnectionBook:
    """The open connections, by client address, and which of them wait idle."""

    def __init__(self, limits: EdgeLimits, clock: Callable[[], float] = time.monotonic):
        self.limits, self.clock = limits, clock
        self.open: dict[Any, float] = {}  # connection -> when it last became idle
        self.by_client: dict[str, int] = {}
        self.refused = self.evicted = self.expired = 0  # counters, for logs and tests

    def admit(self, connection: Any, client: str, is_idle: Callable[[Any], bool]) -> bool:
        """Whether ``connection`` from ``client`` may stay open; may close an idle one for it."""
        if self.by_client.get(client, 0) >= self.limits.per_client:
            self.refused += 1
            return False
        if len(self.open) >= self.limits.max_connections and not self._evict_one(is_idle):
            self.refused += 1
            return False
        self.open[connection] = self.clock()
        self.by_client[client] = self.by_client.get(client, 0) + 1
        return True

    def forget(self, connection: Any, client: str) -> None:
        """``connection`` closed (idempotent)."""
        if self.open.pop(connection, None) is None:
            return
        left = self.by_client[client] - 1
        if left:
            self.by_client[client] = left
        else:
            del self.by_client[client]

    def now_idle(self, connection: Any) -> None:
        """``connection`` finished a response and waits for the next request."""
        if connection in self.open:
            self.open[connection] = self.clock()

    def _evict_one(self, is_idle: Callable[[Any], bool]) -> bool:
        idle = [(since, id(c), c) for c, since in self.open.items() if is_idle(c) and not c.transport.is_closing()]
        if not idle:
            return False
        _, _, oldest = min(idle)
        oldest.close_idle()
        self.evicted += 1
        return True


def edge_protocol(limits: EdgeLimits, book: ConnectionBook | None = None) -> type[H11Protocol]:
    """Uvicorn's h11 protocol with the limits of ``limits`` (pass it as ``uvicorn.Config(http=...)``).

    Args:
        limits: the limits.
        book: the connection book shared by every connection (default: a new one).

    Returns:
        The protocol class.
    """
    shared = book or ConnectionBook(limits)

    class EdgeProtocol(H11Protocol):
        connection_book = shared

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._idle_timer: asyncio.TimerHandle | None = None
            self._address = self.client[0] if self.client else "?"
            if not shared.admit(self, self._address, _is_idle):
                transport.abort()  # see close_idle
                return
            self._wait_for_request()

        def connection_lost(self, exc: Exception | None) -> None:
            self._cancel_timer()
            shared.forget(self, self._address)
            super().connection_lost(exc)

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                shared.now_idle(self)
                self._wait_for_request()

        def close_idle(self) -> None:
            """Close this connection, which waits for a request (room for a new one, or expired)."""
            self._cancel_timer()
            # abort, not close: close() starts a TLS shutdown that waits up to 30 s for a peer who
            # never reads, keeping the descriptor and its slot; nothing is in flight to be lost
            self.transport.abort()

        def _wait_for_request(self) -> None:
            # uvicorn's own keep-alive timer is cancelled by any byte received, so one byte every
            # few seconds would hold the connection: this one ends only with a complete request head
            self._cancel_timer()
            self._idle_timer = self.loop.call_later(limits.head_timeout, self._expire, self.cycle)

        def _expire(self, cycle_when_armed: object) -> None:
            if self.cycle is cycle_when_armed and _is_idle(self):
                shared.expired += 1
                self.close_idle()

        def _cancel_timer(self) -> None:
            timer = getattr(self, "_idle_timer", None)
            if timer is not None:
                timer.cancel()
                self._idle_timer = None

    return EdgeProtocol


def _is_idle(connection: Any) -> bool:
    """No request of ``connection`` is being served (none yet, or its response is sent)."""
    return connection.cycle is None or connection.cycle.response_complete


def raise_file_limit(wanted: int) -> int:
    """Raise this process's open-file limit towards ``wanted`` (as far as the hard limit allows),
    so that ``max_connections`` is reached before the process runs out of descriptors.

    Returns:
        The soft limit now in force.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    if soft < wanted:
        log.warning("open-file limit %d is below the %d the edge limits need: raise it (ulimit -n)", soft, wanted)
    return soft
