"""``fedllm node``: the node operator's commands.

``fedllm node run`` is the ClientApp process of a SuperNode started with ``--isolation process``:
it runs the fedllm installed on this machine and refuses app bundles whose code is not it
(:mod:`fedllm.deployment.node_process`). ``fedllm node hash`` prints the content hash of an app
bundle (a ``.fab`` file, e.g. from ``flwr build``) or of the installed package, for the node
config's ``approved-app-hashes``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fedllm.errors import ConfigError
from fedllm.node.app_check import app_hash, first_difference, installed_digests, read_bundle
from fedllm.node.policy import APPROVED_APP_HASHES

DESCRIPTION = """The node operator's commands.

  run    the SuperNode's ClientApp process (start `flower-supernode --isolation process`, then this):
         runs the fedllm installed here, never the coordinator's app bundle, and refuses (category
         `policy`) a bundle whose fedllm code is not the installed one nor listed in the node config's
         approved-app-hashes
  hash   the content hash of an app bundle (.fab) or, without a file, of the installed fedllm
"""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedllm node", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser(
        "run",
        prog="fedllm node run",
        help="the SuperNode's ClientApp process (installed fedllm only)",
        description="Answer the SuperNode's ClientApp tasks with the installed fedllm (SuperNode in "
        "--isolation process). An app bundle whose fedllm code differs from the installed one is refused "
        f"unless its hash is in the node config's {APPROVED_APP_HASHES}.",
    )
    run.add_argument(
        "--runtime-api-address",
        "--clientappio-api-address",
        dest="address",
        default="127.0.0.1:9094",
        help="the SuperNode's Runtime (ClientAppIo) API: flower-supernode's --host:--port (default: 127.0.0.1:9094)",
    )
    run.add_argument(
        "--root-certificates",
        type=Path,
        default=None,
        help="CA certificate of a Runtime API served over TLS (default: plain HTTP on loopback)",
    )
    run.add_argument("--max-tasks", type=int, default=None, help=argparse.SUPPRESS)  # tests: stop after N tasks
    digest = commands.add_parser(
        "hash",
        prog="fedllm node hash",
        help="the content hash of an app bundle or of the installed fedllm",
        description="Print the content hash of the fedllm code in an app bundle (.fab), the value the node "
        f"config's {APPROVED_APP_HASHES} lists, and the first file where it differs from the installed "
        "fedllm. Without a file: the installed fedllm's hash.",
    )
    digest.add_argument("fab", type=Path, nargs="?", default=None, help="a .fab file (e.g. from `flwr build`)")
    return parser


def hash_report(fab: Path | None) -> str:
    """The lines ``fedllm node hash`` prints.

    Raises:
        ConfigError: the file cannot be read as an app bundle.
    """
    installed = installed_digests()
    if fab is None:
        return f"{app_hash(installed)}  installed fedllm ({len(installed)} files)"
    try:
        bundle = read_bundle(fab.read_bytes())
    except OSError as exc:
        raise ConfigError(f"{fab}: {exc.strerror}") from exc
    lines = [f"{app_hash(bundle.digests)}  {fab} ({len(bundle.digests)} fedllm files, ClientApp {bundle.clientapp})"]
    difference = first_difference(bundle.digests, installed)
    lines.append(
        "identical to the installed fedllm"
        if difference is None
        else f"differs from the installed fedllm ({app_hash(installed)}); first differing file: {difference}"
    )
    return "\n".join(lines)


def node_cli(argv: list[str]) -> int:
    """``fedllm node run|hash``; returns the exit status."""
    args = _parser().parse_args(argv)
    if args.command == "hash":
        try:
            print(hash_report(args.fab))
        except ConfigError as exc:
            print(f"fedllm node hash: {exc}", file=sys.stderr)
            return 1
        return 0
    from fedllm.deployment.node_process import serve

    certificates = args.root_certificates.read_bytes() if args.root_certificates else None
    try:
        serve(args.address, certificates, max_tasks=args.max_tasks)
    except KeyboardInterrupt:
        return 0
    return 0
