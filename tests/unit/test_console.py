"""The researcher's console: expected library noise filtered (and nothing else), the run's last
block, the progress bar only where it can be drawn, wandb runs named for what ran."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import pytest

from fedllm import library_noise
from fedllm.config import PrivacyConfig
from fedllm.tracking.end_of_run import end_of_run_block
from fedllm.tracking.run_files import Guarantee, RunSummary
from fedllm.tracking.run_log import RunLog
from fedllm.tracking.wandb_sink import wandb_run_name
from tests.conftest import tiny_config


def test_expected_library_warnings_are_filtered_and_others_still_show():
    with warnings.catch_warnings(record=True) as seen:
        warnings.resetwarnings()
        library_noise.quiet_libraries()
        warnings.warn(
            "`is_gradient_checkpointing` is deprecated and will be removed in v6.", FutureWarning, stacklevel=1
        )
        warnings.warn(
            "Tip: In future versions of Ray, Ray will no longer override accelerator visible",
            FutureWarning,
            stacklevel=1,
        )
        warnings.warn("`is_gradient_checkpointing` is deprecated", UserWarning, stacklevel=1)  # another category: shown
        warnings.warn("something else is deprecated", FutureWarning, stacklevel=1)
    assert [str(w.message) for w in seen] == [
        "`is_gradient_checkpointing` is deprecated",
        "something else is deprecated",
    ]


def test_expected_flower_lines_are_dropped_and_others_kept(caplog):
    library_noise.quiet_libraries()
    library_noise.quiet_libraries()  # idempotent: one filter
    flower = logging.getLogger("flwr")
    assert sum(isinstance(f, library_noise._DropExpected) for f in flower.filters) == 1
    with caplog.at_level(logging.INFO, logger="flwr"):
        flower.warning("DEPRECATED FEATURE: The `run_simulation` function is deprecated and will be removed")
        flower.warning("Manually terminating ClientAppActor")
        flower.warning("fraction_evaluate is set to 0.0. Federated evaluation will be skipped.")
        flower.info("aggregate_train: Received 3 results and 0 failures")
        flower.error("a node failed: out of memory")
    assert [r.getMessage() for r in caplog.records] == [
        "aggregate_train: Received 3 results and 0 failures",
        "a node failed: out of memory",
    ]
    assert logging.getLogger("alembic").getEffectiveLevel() == logging.WARNING


SAMPLE = Guarantee(
    level="sample",
    protects="any single training record of a node",
    against="the coordinator",
    epsilon=7.9919,
    delta=1e-5,
)


def test_the_last_block_says_what_the_run_achieved_cost_and_left(tmp_path):
    summary = RunSummary(
        status="completed",
        rounds_completed=3,
        rounds_planned=3,
        num_clients=10,
        final_accuracy=0.842,
        zero_shot_accuracy=0.77,
        test_examples=1000,
        guarantees=[SAMPLE],
        client_epsilons={"0": 7.9919, "1": 7.95},
        target_epsilon=8.0,
        accountant="prv",
    )
    block = end_of_run_block(summary, tmp_path / "run", 283.6).splitlines()
    assert block[0] == "run completed in 284 s: 3 of 3 rounds, 10 clients"
    assert block[1] == "  utility: accuracy 84.2% (zero-shot 77.0%) on 1000 held-out examples"
    assert block[2] == (
        "  privacy: sample level, any single training record of a node: epsilon 7.992 at delta 1e-05 "
        "(max over clients; each 7.950-7.992, target 8, prv)"
    )
    assert block[3] == f"  outputs: {tmp_path / 'run'}" and "fedllm evaluate" in block[-1]


def test_the_last_block_of_a_generative_or_non_private_run(tmp_path):
    summary = RunSummary(
        status="stopped",
        rounds_completed=2,
        rounds_planned=3,
        num_clients=4,
        final_eval_perplexity=62.04,
        zero_shot_eval_perplexity=77.0,
        privacy_mode="none",
        warning="seeded noise: reproducible by whoever holds the seed",
    )
    text = end_of_run_block(summary, tmp_path, 10)
    assert "utility: perplexity 62.04 (zero-shot 77.00)" in text
    assert "privacy: none (privacy=none): nothing here is differentially private" in text
    assert "WARNING: seeded noise" in text


def test_the_progress_bar_is_drawn_only_on_a_terminal(tmp_path, capsys):
    run_log = RunLog(tmp_path, 3, show_progress=True)  # pytest captures stderr: not a terminal
    assert run_log.bar.disable and run_log._redirect is None
    run_log.close()


@pytest.mark.parametrize(
    "privacy, folder, name",
    [
        (PrivacyConfig(target_epsilon=3.0), "run", "tiny rotten_tomatoes DP eps 3"),
        (PrivacyConfig(mode="none"), "2", "tiny rotten_tomatoes non-private #2"),
        (
            PrivacyConfig(mode="both", client_noise_multiplier=1.5),
            "0",
            "tiny rotten_tomatoes DP eps 8 client DP z 1.5 #0",
        ),
    ],
)
def test_a_wandb_run_is_named_for_what_ran(privacy, folder, name):
    cfg = tiny_config(privacy=privacy)
    assert wandb_run_name(cfg, Path("/runs") / folder) == name
