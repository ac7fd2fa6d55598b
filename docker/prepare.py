"""Create what docker/compose.yaml mounts: the CA and SuperLink certificate, two node key pairs,
and each node's data file (a slice of the embedded Rotten Tomatoes reviews; point it at real
data instead).

    .venv/bin/python docker/prepare.py [DOCKER_DIR] [--host PUBLIC_NAME ...] [--force]

The certificate names the compose services that present it (`fleet-gateway` for nodes,
`superlink` for the ServerApp and the gateway), localhost and 127.0.0.1 (the coordinator's
`flwr` on this host or through an SSH tunnel), plus every --host: the name or IP address
remote nodes use to reach the gateway. Private keys are written 0600 for whoever runs this;
the compose file's `keys` service hands each one to the container user that reads it.
Existing certificates and keys are kept unless --force.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fedllm.deployment.demo_data import write_node_files
from fedllm.deployment.pki import make_node_keys, make_tls

SERVICE_NAMES = ["fleet-gateway", "superlink", "localhost", "127.0.0.1"]
NODES = ("node1", "node2")


def prepare(folder: Path, records: int = 500, hosts: list[str] | None = None, overwrite: bool = False) -> None:
    """Write ``certs/``, ``keys/``, ``node-data/`` and ``node-anchors/`` under ``folder``.

    Args:
        folder: the docker folder (or any folder laid out like it).
        records: records in each node's demo data file.
        hosts: public names or IP addresses of the gateway, added to the certificate.
        overwrite: replace existing certificates and keys.

    Raises:
        FileExistsError: when a certificate or key exists and ``overwrite`` is false.
    """
    make_tls(folder / "certs", [*(hosts or []), *SERVICE_NAMES], overwrite=overwrite)
    for name in NODES:
        make_node_keys(folder / "keys", name, overwrite=overwrite)
    write_node_files([folder / "node-data" / name / "data.jsonl" for name in NODES], records)
    # each node's ledger anchor: a host folder, so that no `docker compose down` (with or without -v)
    # takes it with the state volume; compose's `keys` service hands each to the node's user
    for name in NODES:
        (folder / "node-anchors" / name).mkdir(parents=True, exist_ok=True)


def main(argv: list[str] | None = None) -> int:
    """Parse the command line and prepare the folder."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path, nargs="?", default=Path(__file__).resolve().parent)
    parser.add_argument("--host", action="append", default=[], help="a public name or IP of the gateway")
    parser.add_argument("--force", action="store_true", help="replace existing certificates and keys")
    args = parser.parse_args(argv)
    try:
        prepare(args.folder, hosts=args.host, overwrite=args.force)
    except FileExistsError as exc:
        print(f"prepare: {exc}", file=sys.stderr)
        return 1
    print(
        f"wrote {args.folder}/certs, {args.folder}/keys (private keys 0600), {args.folder}/node-data, "
        f"{args.folder}/node-anchors (the nodes' ledger anchors: keep them)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
