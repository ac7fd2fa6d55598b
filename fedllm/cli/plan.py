"""``fedllm plan [overrides]``: print the DP-SGD plan (:mod:`fedllm.planning`) before any training.

Impossible plans end with what to change.
"""

from __future__ import annotations

import logging
import sys

from fedllm.errors import FedLLMError

log = logging.getLogger("fedllm")


def plan_cli(argv: list[str]) -> int:
    """Compose the config with Hydra overrides and print the plan.

    Args:
        argv: Hydra overrides, as for ``fedllm simulate``.

    Returns:
        The exit status: 0, or 1 after a one-line error on stderr.
    """
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from fedllm.cli.simulate import conf_dir, overrides_help, wants_help
    from fedllm.config import from_hydra, hydra_error
    from fedllm.planning import build_plan, format_plan

    if wants_help(argv):
        print(overrides_help("plan"))
        return 0
    try:
        with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
            try:
                composed = compose(config_name="config", overrides=argv)
            except (HydraException, OmegaConfBaseException, ValueError, TypeError, KeyError) as exc:
                # an unknown key, a missing option or an unparsable override (some of which Hydra
                # lets surface as a bare ValueError): one line and exit 1, as `simulate` does
                raise hydra_error(exc) from exc
            cfg = from_hydra(composed)
        if not cfg.privacy.sample_level:
            raise FedLLMError(f"privacy={cfg.privacy.mode}: no DP-SGD on the nodes, so there is no noise to plan")
        print(format_plan(cfg, build_plan(cfg)))
    except FedLLMError as exc:
        print(f"fedllm plan: {exc}", file=sys.stderr)
        return 1
    return 0
