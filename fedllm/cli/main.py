"""The ``fedllm`` command: ``fedllm <subcommand> ...`` (see :data:`USAGE`)."""

from __future__ import annotations

import sys

from fedllm import __version__
from fedllm.cli.completion import HYDRA_COMMANDS, completion_request, completion_script
from fedllm.library_noise import quiet_libraries

USAGE = """usage: fedllm <command> [arguments]   (fedllm <command> --help for each; fedllm --version)

commands:
  simulate   run a federated DP fine-tuning job on this machine (Flower simulation engine);
             e.g. `fedllm simulate privacy.target_epsilon=3`, or sweep with `-m`
  plan       print the DP-SGD plan (noise per client under RDP and PRV, epsilon per round)
             for the same overrides, before any training
  audit      run the experiment with canaries and measure each adversary's epsilon lower bound
             (one-run audit); e.g. `fedllm audit model=tiny audit.canaries=500`
  report     summarise a run or sweep directory: table (CSV/Markdown), privacy-utility plot
  verify     check the checksums of a run directory (adapter, checkpoint, node ledgers)
  decrypt    write the plain file of an encrypted (sealed) adapter or checkpoint file
  node-status  a node's spent epsilon, cap and last rounds, from its own --node-config string
  node       the node operator's process: `fedllm node run` (the SuperNode's ClientApp, installed
             fedllm only) and `fedllm node hash [bundle.fab]` (the hash to approve a bundle)
  evaluate   score a finished run's adapter: held-out loss, perplexity, accuracy (or on your file)
  generate   answer a prompt with a finished run's adapter, in the run's prompt format
  flower-local  `status` or `stop` the local SuperLink that `flwr run .` leaves running

simulate, plan and audit take Hydra overrides (KEY=VALUE, GROUP=OPTION); a rejected override is
reported in one line and creates nothing.
"""


def main(argv: list[str] | None = None) -> int:
    """Dispatch to a subcommand; each subcommand parses its own arguments."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        if argv[1:2] and argv[0] == "help":  # `fedllm help simulate` is `fedllm simulate --help`
            return main([argv[1], "--help"])
        print(USAGE, file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    if argv[0] in ("-V", "--version"):
        print(f"fedllm {__version__}")
        return 0
    command, rest = argv[0], argv[1:]
    quiet_libraries()
    request = completion_request(rest) if command in HYDRA_COMMANDS else None
    if request is not None:
        return _print_completion(command, request)
    # each subcommand's module is imported only when it runs: `fedllm --help` and a subcommand's
    # `--help` stay instant instead of loading torch, Flower and Hydra for every command
    if command == "simulate":
        from fedllm.cli.simulate import simulate_cli

        return simulate_cli(rest)
    if command == "plan":
        from fedllm.cli.plan import plan_cli

        return plan_cli(rest)
    if command == "audit":
        from fedllm.cli.audit import audit_cli

        return audit_cli(rest)
    if command == "report":
        from fedllm.cli.report import report_cli

        return report_cli(rest)
    if command == "node-status":
        from fedllm.cli.node_status import node_status_cli

        return node_status_cli(rest)
    if command == "node":
        from fedllm.cli.node import node_cli

        return node_cli(rest)
    if command == "flower-local":
        from fedllm.cli.flower_local import flower_local_cli

        return flower_local_cli(rest)
    if command in ("evaluate", "generate"):
        from fedllm.cli import use

        return (use.evaluate_cli if command == "evaluate" else use.generate_cli)(rest)
    if command in ("verify", "decrypt"):
        from fedllm.cli import at_rest

        return (at_rest.verify_cli if command == "verify" else at_rest.decrypt_cli)(rest)
    print(f"fedllm: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
    return 2


def _print_completion(command: str, request: str) -> int:
    """``fedllm <command> -sc install=bash``: fedllm's own completion script (see :mod:`fedllm.cli.completion`)."""
    try:
        print(completion_script(request), end="")
    except ValueError as exc:
        print(f"fedllm {command}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
