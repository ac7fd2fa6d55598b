"""``fedllm plan [overrides]``: print the privacy plan (:mod:`fedllm.planning`) before any training:
DP-SGD's per client (sample level), the server's DP-FedAvg (client level), or both.

Impossible plans end with what to change.
"""

from __future__ import annotations

import logging
import sys

from fedllm.cli.simulate import overrides_help, wants_help
from fedllm.config import compose_experiment
from fedllm.errors import FedLLMError

log = logging.getLogger("fedllm")


def plan_cli(argv: list[str]) -> int:
    """Compose the config with Hydra overrides and print the plan.

    Args:
        argv: Hydra overrides, as for ``fedllm simulate``.

    Returns:
        The exit status: 0, or 1 after a one-line error on stderr.
    """
    if wants_help(argv):
        print(overrides_help("plan"))
        return 0
    try:
        cfg = compose_experiment(argv)  # a bad override: one line and exit 1, as `simulate` does
        if not (cfg.privacy.sample_level or cfg.privacy.client_level):
            raise FedLLMError(f"privacy={cfg.privacy.mode}: no differential privacy in this run, so nothing to plan")
        # the model stack and Opacus (seconds): only once there is a valid config to plan
        from fedllm.planning import build_plan, format_client_plan, format_plan

        if cfg.privacy.sample_level:
            print(format_plan(cfg, build_plan(cfg)))
        if cfg.privacy.client_level:
            print(format_client_plan(cfg))
    except FedLLMError as exc:
        print(f"fedllm plan: {exc}", file=sys.stderr)
        return 1
    return 0
