#!/usr/bin/env bash
# Register a SuperNode's public key with a SuperLink that runs with --enable-supernode-auth.
#   scripts/register_node.sh NODE_KEY.pub [CONNECTION]
# CONNECTION is a SuperLink connection in $FLWR_HOME/config.toml (default: its default one).
set -euo pipefail
pub=${1:?usage: register_node.sh NODE_KEY.pub [CONNECTION]}
exec flwr supernode register "$pub" ${2:+"$2"}
