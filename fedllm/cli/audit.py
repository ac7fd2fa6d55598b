"""``fedllm audit [hydra overrides]``: run the configured experiment with canaries and print
each adversary's empirical epsilon lower bound (:mod:`fedllm.audit.run`).

Hydra stops here, as for ``fedllm simulate``: the run directory and logging are Hydra's, and
everything below receives validated config objects.
"""

from __future__ import annotations

import logging
from pathlib import Path

from fedllm.cli.simulate import JOBS, overrides_help, remove_unused_run_dir, run_hydra, wants_help
from fedllm.config import AuditConfig, from_hydra, with_state_dir
from fedllm.errors import FedLLMError

log = logging.getLogger("fedllm")


def audit_cli(argv: list[str]) -> int:
    """Run ``fedllm audit`` with Hydra overrides (``audit.canaries=...`` etc. for the audit itself)."""
    if wants_help(argv):  # our help, not Hydra's (which dumps the config and names no key's meaning)
        print(overrides_help("audit"))
        return 0
    return run_hydra("audit", argv, _hydra_entry)


def _hydra_entry(dict_cfg) -> None:
    # as in fedllm.cli.simulate: Hydra and the audit (the whole training stack) only when a job runs,
    # so that `fedllm audit --help` answers at once
    from hydra.core.hydra_config import HydraConfig

    from fedllm.audit.run import run_audit

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        try:
            cfg = with_state_dir(from_hydra(dict_cfg), run_dir)
            audit = AuditConfig.from_mapping(dict_cfg.get("audit"))
        except FedLLMError:
            remove_unused_run_dir(run_dir)  # rejected before anything was written: leave no folder
            raise
        run_audit(cfg, audit, run_dir)
    except FedLLMError as exc:
        log.error("%s", exc)
        JOBS.append((str(run_dir), str(exc)))
        return
    JOBS.append((str(run_dir), None))
