"""Issue 25, item 7, end to end on a node: a ledger restored from an older copy, or deleted, gave the
node's records a fresh budget (16 spent against a cap of 8). Now the node refuses to train."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from fedllm.config import FederationConfig, PrivacyConfig
from fedllm.federation import records as keys
from fedllm.privacy.node_ledger import LEDGER_FILE
from tests.conftest import tiny_config
from tests.node_driver import run_round


@pytest.mark.slow  # seconds each: kept out of the fast tier (make test runs it)
@pytest.mark.parametrize("loss", ["restored", "deleted"])
def test_a_node_whose_ledger_was_rolled_back_or_deleted_trains_no_more(tmp_path, loss, caplog):
    # the plan spends the whole budget (target 8) over the run's 2 rounds
    cfg = tiny_config(
        privacy=PrivacyConfig(state_dir=str(tmp_path / "nodes")),
        federation=FederationConfig(num_clients=3, num_rounds=2),
    )
    ledger = Path(cfg.privacy.state_dir) / "client-0" / LEDGER_FILE
    assert run_round(cfg, "run-a", 1).content[keys.METRICS][keys.REFUSED] == 0
    after_one = ledger.read_bytes()
    assert run_round(cfg, "run-a", 2).content[keys.METRICS][keys.REFUSED] == 0
    if loss == "restored":
        ledger.write_bytes(after_one)  # an authentic backup from before round 2
    else:
        ledger.unlink()
    with caplog.at_level(logging.ERROR):
        reply = run_round(cfg, "run-b", 1)
    assert reply.content[keys.METRICS][keys.REFUSED] == 1 and keys.ARRAYS not in reply.content.array_records
    assert reply.content[keys.STATUS][keys.CATEGORY] == "error"  # the reason stays in the node's own log
    assert "client-0.ledger-anchor" in caplog.text and str(ledger) in caplog.text
    assert ledger.exists() == (loss == "restored")  # no fresh ledger written in its place
