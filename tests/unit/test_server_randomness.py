"""The server's client sampling and client-level DP noise come from OS entropy, not from the
run's public seed (issue 12), except in the seeded research mode, where they reproduce; and a
resumed run needs no random state.

Strategies are driven with hand-built replies against a fake grid (:mod:`tests.flower_fakes`).
"""

from __future__ import annotations

import itertools
import json
import random
from collections import Counter
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord

from fedllm.errors import ConfigError
from fedllm.federation.checkpoint import STATE_FILE, Checkpointer, ServerState
from fedllm.federation.strategy import build_strategy, connected_nodes
from fedllm.privacy.server_noise import ServerRandomness
from fedllm.storage import with_checksum, write_json
from tests.flower_fakes import FakeGrid, act_as_server_process, arrays_record, train_reply

SEED = 2024  # the run's seed: public, in the config every node receives
NODES = list(range(101, 121))  # 20 connected nodes


@pytest.fixture(autouse=True)
def _server_process(monkeypatch):
    act_as_server_process(monkeypatch)


def _strategy(
    noise: str,
    *,
    fraction_train: float = 0.5,
    client_level: bool = True,
    client_clipping: str = "server",
    noise_multiplier: float = 1.0,
    clip_norm: float = 0.5,
    seed: int = SEED,
):
    return build_strategy(
        aggregation="fedavg",
        trim_fraction=0.1,
        fraction_train=fraction_train,
        num_clients=len(NODES),
        client_level=client_level,
        client_clipping=client_clipping,
        client_noise_multiplier=noise_multiplier,
        client_clip_norm=clip_norm,
        noise=noise,
        seed=seed,
    )


def _seed_globals(value: int) -> None:
    """What the server did before issue 12 (and what anyone who knows the seed can redo)."""
    random.seed(value)
    np.random.seed(value)


def _samples(strategy, rounds: range, globals_seed: int | None = None) -> list[list[int]]:
    if globals_seed is not None:
        _seed_globals(globals_seed)
    arrays = arrays_record({"w": np.zeros(3, dtype=np.float32)})
    return [
        sorted(m.metadata.dst_node_id for m in strategy.configure_train(r, arrays, ConfigRecord(), FakeGrid(NODES)))
        for r in rounds
    ]


def _noised_aggregate(
    strategy, *, size: int = 64, server_round: int = 1, globals_seed: int | None = None
) -> np.ndarray:
    """One round of client-level DP on zero updates: the aggregate is the noise alone."""
    zeros = {"w": np.zeros(size, dtype=np.float32)}
    arrays = arrays_record(zeros)
    sent = list(strategy.configure_train(server_round, arrays, ConfigRecord(), FakeGrid(NODES)))
    replies = [train_reply(m.metadata.dst_node_id, zeros, server_round) for m in sent]
    if globals_seed is not None:
        _seed_globals(globals_seed)
    aggregated, _ = strategy.aggregate_train(server_round, replies)
    return aggregated["w"].numpy()


# --- client sampling -------------------------------------------------------------------------


def test_knowing_the_seed_does_not_predict_the_client_sample():
    # the curious party seeds the global generators exactly as the server once did
    first = _samples(_strategy("secure"), range(1, 6), globals_seed=SEED)
    second = _samples(_strategy("secure"), range(1, 6), globals_seed=SEED)
    assert all(len(s) == 10 and len(set(s)) == 10 for s in first + second)
    assert first != second  # 5 rounds of 10 of 20: equal by chance with probability 184756**-5


def test_seeded_mode_reproduces_the_sample_whatever_the_global_generators_say():
    first = _samples(_strategy("seeded"), range(1, 6), globals_seed=1)
    second = _samples(_strategy("seeded"), range(1, 6), globals_seed=2)
    assert first == second
    assert len({tuple(s) for s in first}) > 1  # a different sample each round
    assert _samples(_strategy("seeded", seed=SEED + 1), range(1, 6)) != first


def test_a_seeded_resume_draws_what_the_uninterrupted_run_would_have():
    whole = _samples(_strategy("seeded"), range(1, 7))
    resumed = _samples(_strategy("seeded"), range(4, 7))  # a new process, no random state restored
    assert resumed == whole[3:]


def test_the_sample_does_not_depend_on_the_order_the_grid_lists_nodes():
    randomness = ServerRandomness(seed=SEED)
    assert randomness.sample(NODES, 5, 3) == randomness.sample(NODES[::-1], 5, 3)


@pytest.mark.slow  # seconds each: kept out of the fast tier (make test runs it)
def test_the_sample_is_uniform_over_subsets():
    randomness = ServerRandomness(seed=SEED)
    counts = Counter(tuple(sorted(randomness.sample([1, 2, 3, 4], 2, r))) for r in range(6000))
    assert set(counts) == set(itertools.combinations([1, 2, 3, 4], 2))
    # 1000 expected per pair, standard deviation ~29: 150 is more than 5 of them
    assert all(abs(count - 1000) < 150 for count in counts.values())


def test_every_node_is_sampled_with_full_participation():
    assert _samples(_strategy("secure", fraction_train=1.0), range(1, 3)) == [NODES, NODES]


def test_sampling_waits_for_enough_nodes():
    grid = FakeGrid([1])
    calls = []

    def growing() -> list[int]:
        calls.append(1)
        if len(calls) == 3:
            grid.nodes = [1, 2, 3]
        return list(grid.nodes)

    grid.get_node_ids = growing
    assert connected_nodes(grid, 3, poll_seconds=0.0) == [1, 2, 3] and len(calls) == 3


# --- client-level noise ----------------------------------------------------------------------


@pytest.mark.parametrize("clipping", ["server", "client"])
def test_knowing_the_seed_does_not_predict_the_client_level_noise(clipping):
    first = _noised_aggregate(_strategy("secure", client_clipping=clipping), globals_seed=SEED)
    second = _noised_aggregate(_strategy("secure", client_clipping=clipping), globals_seed=SEED)
    assert np.all(first != 0) and not np.array_equal(first, second)


@pytest.mark.parametrize("clipping", ["server", "client"])
def test_seeded_mode_reproduces_the_noise_whatever_the_global_generators_say(clipping):
    first = _noised_aggregate(_strategy("seeded", client_clipping=clipping), globals_seed=1)
    second = _noised_aggregate(_strategy("seeded", client_clipping=clipping), globals_seed=2)
    assert np.all(first != 0) and np.array_equal(first, second)
    other_round = _noised_aggregate(_strategy("seeded", client_clipping=clipping), server_round=2)
    assert not np.array_equal(first, other_round)


@pytest.mark.parametrize("noise", ["secure", "seeded"])
def test_noise_has_the_calibrated_standard_deviation(noise):
    # all 20 clients, z = 1.2, C = 0.5: std of the mean is z * C / 20 = 0.03
    size = 200_000
    values = _noised_aggregate(
        _strategy(noise, fraction_train=1.0, noise_multiplier=1.2, clip_norm=0.5), size=size
    ).astype(np.float64)
    expected = 1.2 * 0.5 / 20
    # the sample std's standard error is std / sqrt(2n) (0.16%): 1% is over 6 of them
    assert values.std() == pytest.approx(expected, rel=0.01)
    assert abs(values.mean()) < 6 * expected / np.sqrt(size)
    # Gaussian tails: P(|x| > 2 std) = 4.55%
    assert np.mean(np.abs(values) > 2 * expected) == pytest.approx(0.0455, abs=0.003)


def test_noise_std_scales_with_the_updates_that_arrived():
    # all 20 sampled, 4 updates arrive: the noise is calibrated to the 4 aggregated (z * C / 4)
    strategy = _strategy("seeded", fraction_train=1.0, noise_multiplier=1.0, clip_norm=1.0)
    zeros = {"w": np.zeros(100_000, dtype=np.float32)}
    strategy.configure_train(1, arrays_record(zeros), ConfigRecord(), FakeGrid(NODES))
    aggregated, _ = strategy.aggregate_train(1, [train_reply(n, zeros, 1) for n in NODES[:4]])
    assert aggregated["w"].numpy().std() == pytest.approx(1.0 / 4, rel=0.02)


def test_an_unknown_noise_source_is_refused():
    with pytest.raises(ConfigError, match="privacy.noise"):
        _strategy("fixed")


# --- resume ----------------------------------------------------------------------------------


def _state(server_round: int = 2) -> ServerState:
    return ServerState(
        run_id="r",
        server_round=server_round,
        arrays={"a": torch.arange(3.0)},
        ledger={"x": 1},
        rounds=[{"round": 0}],
        config={"seed": SEED},
    )


def test_a_checkpoint_holds_no_random_state(tmp_path):
    checkpoints = Checkpointer(tmp_path)
    checkpoints.save(_state())
    saved = json.loads((tmp_path / STATE_FILE).read_text(encoding="utf-8"))
    assert "rng" not in saved
    loaded = checkpoints.load()
    assert (loaded.run_id, loaded.server_round, loaded.ledger) == ("r", 2, {"x": 1})


def test_a_checkpoint_written_with_random_state_still_loads(tmp_path):
    checkpoints = Checkpointer(tmp_path)
    checkpoints.save(_state())
    saved = json.loads((tmp_path / STATE_FILE).read_text(encoding="utf-8"))
    saved.pop("checksum")
    saved["rng"] = {"python": [3, [0] * 625, None], "numpy": ["MT19937", [0] * 624, 624, 0, 0.0]}
    write_json(tmp_path / STATE_FILE, with_checksum(saved))  # as the old format wrote it
    loaded = checkpoints.load()
    assert loaded.server_round == 2 and torch.equal(loaded.arrays["a"], torch.arange(3.0))


@pytest.mark.parametrize("resume", [False, True])
def test_starting_or_resuming_a_run_leaves_the_global_generators_alone(tmp_path, monkeypatch, tiny_cfg, resume):
    from fedllm.federation import server_app
    from fedllm.privacy.ledger import PrivacyLedger

    monkeypatch.setattr(
        server_app.task, "model_bundle", lambda *args: SimpleNamespace(initial_adapter={"a": torch.zeros(3)})
    )
    ledger = PrivacyLedger(accountant="rdp", delta=1e-5, target_epsilon=8.0)
    checkpoints = Checkpointer(tmp_path)
    state = _state()
    state.ledger = ledger.state_dict()
    checkpoints.save(state)
    _seed_globals(7)
    before = (random.getstate(), np.random.get_state()[1].copy())
    started = server_app.start_state(tiny_cfg, checkpoints, ledger, resume=resume)
    assert started.server_round == (2 if resume else -1)
    assert random.getstate() == before[0] and np.array_equal(np.random.get_state()[1], before[1])
