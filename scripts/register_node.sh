#!/usr/bin/env bash
# Register a SuperNode's public key with a SuperLink that runs with --enable-supernode-auth.
#   scripts/register_node.sh NODE_KEY.pub [CONNECTION]
# CONNECTION is a SuperLink connection in $FLWR_HOME/config.toml (default: its default one).
# It must point at the SuperLink itself (127.0.0.1:9093 on the coordinator host, or an SSH
# tunnel to it): the Fleet gateway nodes use answers 404 to registration, by design.
set -euo pipefail
pub=${1:?usage: register_node.sh NODE_KEY.pub [CONNECTION]}
test -f "$pub" || { echo "register_node.sh: no such file: $pub" >&2; exit 2; }
case "$(head -c 20 "$pub")" in
  ecdsa-sha2-nistp384*) ;;
  *) echo "register_node.sh: $pub is not an EC P-384 OpenSSH public key (scripts/make_node_keys.py writes one)" >&2
     exit 2 ;;
esac
exec flwr supernode register "$pub" ${2:+"$2"}
