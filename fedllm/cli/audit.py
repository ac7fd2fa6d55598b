"""``fedllm audit [hydra overrides]``: run the configured experiment with canaries and print
each adversary's empirical epsilon lower bound (:mod:`fedllm.audit.run`).

Hydra stops here, as for ``fedllm simulate``: the run directory and logging are Hydra's, and
everything below receives validated config objects.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from fedllm.cli.simulate import with_state_dir
from fedllm.config import conf_dir
from fedllm.errors import FedLLMError
from fedllm.federation.simulation import set_quiet_env

log = logging.getLogger("fedllm")


def audit_cli(argv: list[str]) -> int:
    """Run ``fedllm audit`` with Hydra overrides (``audit.canaries=...`` etc. for the audit itself)."""
    import hydra

    from fedllm.cli.simulate import overrides_help, wants_help

    if wants_help(argv):  # our help, not Hydra's (which dumps the config and names no key's meaning)
        print(overrides_help("audit"))
        return 0
    set_quiet_env()
    try:
        config_path = str(conf_dir())
    except FedLLMError as exc:
        print(f"fedllm: {exc}", file=sys.stderr)
        return 2
    sys.argv = ["fedllm-audit", *argv]
    hydra.main(version_base="1.3", config_path=config_path, config_name="config")(_hydra_entry)()
    return 0


def _hydra_entry(dict_cfg) -> None:
    from hydra.core.hydra_config import HydraConfig

    from fedllm.audit.run import run_audit
    from fedllm.config import AuditConfig, from_hydra

    try:
        run_dir = Path(HydraConfig.get().runtime.output_dir)
        cfg = with_state_dir(from_hydra(dict_cfg), run_dir)
        run_audit(cfg, AuditConfig.from_mapping(dict_cfg.get("audit")), run_dir)
    except FedLLMError as exc:
        log.error("%s", exc)
        raise SystemExit(1) from exc
