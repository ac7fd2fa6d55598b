"""Create a SuperNode's authentication key pair (EC P-384, OpenSSH format).

    python scripts/make_node_keys.py OUT_DIR NAME

OUT_DIR/NAME stays on the node (flower-supernode --auth-supernode-private-key); send
OUT_DIR/NAME.pub to the coordinator, who registers it (scripts/register_node.sh).
"""

import sys
from pathlib import Path

from fedllm.deployment.pki import make_node_keys

if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    private, public = make_node_keys(Path(sys.argv[1]), sys.argv[2])
    print(f"private key {private} (stays on the node), public key {public} (to the coordinator)")
