"""Create a private CA and the SuperLink's TLS certificate.

    python scripts/make_certs.py [--force] [--days N] OUT_DIR [HOST ...]

List every HOST nodes use to reach the federation (the Fleet gateway's public DNS name or IP):
they go into the certificate's subjectAltName. 127.0.0.1 and localhost are always added: the
SuperLink listens there, and the gateway and the coordinator's `flwr` (on the host or through
an SSH tunnel) connect to it with this same certificate. Give every SuperNode and operator
ca.crt; keep ca.key offline. Keys are written with mode 0600; existing files are kept unless
--force.
"""

import argparse
import sys
from pathlib import Path

from fedllm.deployment.pki import make_tls

LOOPBACK = ("127.0.0.1", "localhost")


def main(argv: list[str] | None = None) -> int:
    """Parse the command line, write the files, say where they are."""
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="An existing CA or certificate is never replaced without --force (exit status 1): every node "
        "already trusts that CA. Give ca.crt to every node and operator; keep ca.key offline.",
    )
    parser.add_argument("out_dir", type=Path, help="folder for ca.crt, ca.key, server.crt, server.key (keys 0600)")
    parser.add_argument(
        "hosts",
        nargs="*",
        default=[],
        help="every DNS name or IP address nodes use to reach the federation (subjectAltName; "
        "127.0.0.1 and localhost are always added)",
    )
    parser.add_argument("--days", type=int, default=365, help="validity of both certificates (default: 365)")
    parser.add_argument("--force", action="store_true", help="replace an existing CA and certificate")
    args = parser.parse_args(argv)
    try:
        hosts = [*args.hosts, *(h for h in LOOPBACK if h not in args.hosts)]
        files = make_tls(args.out_dir, hosts, days=args.days, overwrite=args.force)
    except (FileExistsError, ValueError) as exc:
        print(f"make_certs: {exc}", file=sys.stderr)
        return 1
    print(
        f"CA certificate {files.ca_cert} (to every node), CA key {files.ca_key} (keep offline)\n"
        f"SuperLink certificate {files.server_cert} and key {files.server_key} (mode 0600)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
