"""Create a SuperNode's authentication key pair (EC P-384, OpenSSH format).

    python scripts/make_node_keys.py [--force] OUT_DIR NAME

OUT_DIR/NAME (mode 0600) stays on the node (flower-supernode --auth-supernode-private-key);
send OUT_DIR/NAME.pub to the coordinator, who registers it (scripts/register_node.sh).
An existing key is kept unless --force.
"""

import argparse
import sys
from pathlib import Path

from fedllm.deployment.pki import make_node_keys


def main(argv: list[str] | None = None) -> int:
    """Parse the command line, write the key pair, say where it is."""
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="An existing key is never replaced without --force (exit status 1): the SuperLink knows this node "
        "by its registered public key. Send NAME.pub to the coordinator; NAME stays on the node.",
    )
    parser.add_argument("out_dir", type=Path, help="folder for NAME (private, 0600) and NAME.pub")
    parser.add_argument("name", help="the key's file name, e.g. hospital-a (a plain name, no folders)")
    parser.add_argument("--force", action="store_true", help="replace an existing key pair")
    args = parser.parse_args(argv)
    try:
        private, public = make_node_keys(args.out_dir, args.name, overwrite=args.force)
    except (FileExistsError, ValueError) as exc:
        print(f"make_node_keys: {exc}", file=sys.stderr)
        return 1
    print(f"private key {private} (stays on the node), public key {public} (to the coordinator)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
