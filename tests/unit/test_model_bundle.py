"""The process's one model: each user gets the adapter it asked for, for as long as it uses it."""

from __future__ import annotations

import threading

import torch

from fedllm import task
from fedllm.model.adapters import adapter_state
from tests.conftest import tiny_config


def _shifted(state: dict[str, torch.Tensor], by: float) -> dict[str, torch.Tensor]:
    return {name: value + by for name, value in state.items()}


def test_a_second_user_waits_instead_of_swapping_the_adapter_under_the_first():
    cfg = tiny_config()
    bundle = task.model_bundle(cfg.model, cfg.lora, cfg.seed)
    first, second = _shifted(bundle.initial_adapter, 1.0), _shifted(bundle.initial_adapter, 2.0)
    inside, release = threading.Event(), threading.Event()
    seen: dict[str, dict] = {}

    def evaluate_first() -> None:  # e.g. the server evaluating while a client of the same process trains
        with bundle.adapter(first) as model:
            inside.set()
            release.wait(timeout=30)
            seen["first"] = adapter_state(model)

    def train_second() -> None:
        with bundle.adapter(second) as model:
            seen["second"] = adapter_state(model)

    one = threading.Thread(target=evaluate_first)
    one.start()
    assert inside.wait(timeout=30)
    two = threading.Thread(target=train_second)
    two.start()
    two.join(timeout=0.5)
    assert two.is_alive()  # waiting for the first user to finish
    release.set()
    one.join(timeout=30)
    two.join(timeout=30)
    assert all(torch.equal(seen["first"][k], first[k]) for k in first)  # never saw the second's weights
    assert all(torch.equal(seen["second"][k], second[k]) for k in second)
