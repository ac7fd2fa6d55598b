"""Create what docker/compose.yaml mounts: the CA and SuperLink certificate (valid for the
`superlink` service name, localhost and 127.0.0.1), two node key pairs, and each node's data
file (a slice of the embedded Rotten Tomatoes reviews; point it at real data instead).

    .venv/bin/python docker/prepare.py [DOCKER_DIR]
"""

import sys
from pathlib import Path

from fedllm.deployment.demo_data import write_node_files
from fedllm.deployment.pki import make_node_keys, make_tls


def prepare(folder: Path, records: int = 500) -> None:
    make_tls(folder / "certs", ["superlink", "localhost", "127.0.0.1"])
    names = ("node1", "node2")
    for name in names:
        make_node_keys(folder / "keys", name)
    write_node_files([folder / "node-data" / name / "data.jsonl" for name in names], records)


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent
    prepare(target)
    print(f"wrote {target}/certs, {target}/keys, {target}/node-data")
