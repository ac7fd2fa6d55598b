"""How many idle attackers the Fleet gateway survives (issue 25, finding 1).

For each attack size, an outsider (no certificate or key) holds that many idle TLS connections to
the gateway from many loopback addresses, while an honest node on 127.0.0.1 sends heartbeats on
fresh connections. Two servers, side by side on the same machine: uvicorn as the gateway ran it
before (``limit_concurrency=128``, which counts idle connections) and the edge limits of
:mod:`fedllm.deployment.edge`. The SuperLink is a stand-in that answers 200 at once, so the
latency is the gateway's own.

    .venv/bin/python scripts/bench_edge.py --attackers 0,130,1000,3000

Prints a table and writes JSON (default ``outputs/bench/edge.json``).
"""

from __future__ import annotations

import argparse
import json
import ssl
import statistics
import tempfile
import time
from pathlib import Path

import httpx
import uvicorn

from fedllm.deployment.edge import EdgeLimits, raise_file_limit
from fedllm.deployment.edge_probe import attacker_addresses, hold_idle_connections, honest_calls, serve_in_thread
from fedllm.deployment.fleet_gateway import FleetGateway, server_config
from fedllm.deployment.pki import TlsFiles, make_tls

PER_ADDRESS = 10  # idle connections from each attacker address (under the edge's per-client cap)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The benchmark's command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--attackers", default="0,130,1000,3000", help="idle connections held, comma-separated")
    parser.add_argument("--calls", type=int, default=20, help="honest heartbeats per attack size")
    parser.add_argument("--out", type=Path, default=Path("outputs/bench/edge.json"))
    return parser.parse_args(argv)


def stand_in_superlink(request: httpx.Request) -> httpx.Response:
    """Answers every forwarded call at once."""
    return httpx.Response(200, content=b"", headers={"content-type": "application/protobuf"})


def configs(tls: TlsFiles) -> dict[str, uvicorn.Config]:
    """The gateway served as before (uvicorn's limits) and with the edge limits."""

    def gateway() -> FleetGateway:
        upstream = httpx.MockTransport(stand_in_superlink)
        return FleetGateway("127.0.0.1:9093", ssl.create_default_context(), transport=upstream)

    before = uvicorn.Config(
        gateway(),
        host="127.0.0.1",
        port=0,
        ssl_certfile=str(tls.server_cert),
        ssl_keyfile=str(tls.server_key),
        limit_concurrency=128,
        timeout_keep_alive=30,
        ws="none",
        log_level="critical",
    )
    edge = server_config(gateway(), "127.0.0.1", 0, tls.server_cert, tls.server_key, log_level="critical")
    return {"before (uvicorn limit_concurrency=128)": before, "edge limits": edge}


def measure(config: uvicorn.Config, ca: str, attackers: int, calls: int) -> dict:
    """Hold ``attackers`` idle connections and time ``calls`` honest heartbeats."""
    with serve_in_thread(config) as server:
        port = server.servers[0].sockets[0].getsockname()[1]
        sources = attacker_addresses(-(-attackers // PER_ADDRESS))
        start = time.perf_counter()
        held = hold_idle_connections("127.0.0.1", port, ca, sources, PER_ADDRESS)[:attackers] if attackers else []
        opened = time.perf_counter() - start
        open_during = len(server.server_state.connections)  # as the server counts them
        try:
            results = honest_calls(f"https://127.0.0.1:{port}", ca, calls)
        finally:
            for sock in held:
                sock.close()
    answered = [s for s, status in zip(results.seconds, results.statuses, strict=True) if status == 200]
    return {
        "attackers": attackers,
        "attack_seconds": round(opened, 2),
        "open_when_called": open_during,
        "honest_ok": results.ok,
        "honest_calls": calls,
        "honest_statuses": sorted(set(results.statuses)),
        "median_ms": round(1000 * statistics.median(answered), 1) if answered else None,
    }


def main(argv: list[str] | None = None) -> None:
    """Run every attack size against both servers; print the table and write the JSON."""
    args = parse_args(argv)
    sizes = [int(n) for n in args.attackers.split(",")]
    raise_file_limit(max(sizes) * 2 + EdgeLimits().max_connections + 512)
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        tls = make_tls(Path(folder) / "certs", ["127.0.0.1"])
        for name, config in configs(tls).items():
            for size in sizes:
                row = {"server": name, **measure(config, str(tls.ca_cert), size, args.calls)}
                rows.append(row)
                print(
                    f"{name:40s} {size:6d} idle  honest {row['honest_ok']:3d}/{args.calls} "
                    f"statuses {row['honest_statuses']}  median {row['median_ms']} ms  "
                    f"({row['open_when_called']} open; attack opened in {row['attack_seconds']} s)",
                    flush=True,
                )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"per_address": PER_ADDRESS, "rows": rows}, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
