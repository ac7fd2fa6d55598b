"""Create a private CA and the SuperLink's TLS certificate.

    python scripts/make_certs.py OUT_DIR [HOST ...]     (default hosts: 127.0.0.1 localhost)

Every HOST the nodes use to reach the SuperLink must be listed (IP addresses or DNS names):
they go into the certificate's subjectAltName. Give every SuperNode and operator ca.crt;
keep ca.key offline.
"""

import sys
from pathlib import Path

from fedllm.deployment.pki import make_tls

if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    files = make_tls(Path(sys.argv[1]), sys.argv[2:] or ["127.0.0.1", "localhost"])
    print(f"CA certificate {files.ca_cert} (to every node), CA key {files.ca_key} (keep offline)\n"
          f"SuperLink certificate {files.server_cert} and key {files.server_key}")
