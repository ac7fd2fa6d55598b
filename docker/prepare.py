"""Create what docker/compose.yaml mounts: the CA and SuperLink certificate (valid for the
`superlink` service name, localhost and 127.0.0.1), two node key pairs, and each node's data
file (a slice of the embedded Rotten Tomatoes reviews; point it at real data instead).

    .venv/bin/python docker/prepare.py [DOCKER_DIR]
"""

import json
import sys
from pathlib import Path

from fedllm.data.sources import load_rotten_tomatoes
from fedllm.deployment.pki import make_node_keys, make_tls


def prepare(folder: Path, records: int = 500) -> None:
    make_tls(folder / "certs", ["superlink", "localhost", "127.0.0.1"])
    pool = load_rotten_tomatoes()[-2 * records:]
    for index, name in enumerate(("node1", "node2")):
        make_node_keys(folder / "keys", name)
        data = folder / "node-data" / name / "data.jsonl"
        data.parent.mkdir(parents=True, exist_ok=True)
        rows = pool[index * records:(index + 1) * records]
        data.write_text("".join(json.dumps({"prompt": r.prompt, "response": r.response}) + "\n" for r in rows))


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent
    prepare(target)
    print(f"wrote {target}/certs, {target}/keys, {target}/node-data")
