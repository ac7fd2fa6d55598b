"""The console: each Flower line once, through the root logger (Hydra's console and log file)."""

from __future__ import annotations

import logging

import flwr.serverapp  # noqa: F401 - importing Flower attaches its console handler

from fedllm.federation.simulation import route_flower_logs


def test_flower_lines_go_through_the_root_logger_only(caplog, capsys):
    route_flower_logs()
    flower = logging.getLogger("flwr")
    assert not [
        h for h in flower.handlers if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)
    ]
    with caplog.at_level(logging.INFO):
        flower.info("aggregate_train: Received 3 results and 0 failures")
    assert [r.getMessage() for r in caplog.records].count("aggregate_train: Received 3 results and 0 failures") == 1
    assert "aggregate_train" not in capsys.readouterr().err  # Flower's own handler no longer prints it
