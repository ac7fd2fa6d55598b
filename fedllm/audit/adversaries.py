"""The audit's two adversaries, each scoring every canary (higher: more likely in the data).

- **The coordinator** (white-box): it sees every update every node sends, every round. A
  canary's score is the sum over rounds of the inner product of its unit gradient direction
  with the descent its client's update took (``-(reply - sent)``), each round's update
  normalised by its RMS so no round dominates. A gradient canary's direction is designed; a
  record canary's is its own gradient at the round's global adapter. When the run's noise is
  ``seeded`` the coordinator knows the seed (it is in the task config it sent), so under plain
  SGD it regenerates each node's noise and subtracts it before scoring: the attack that
  secure, node-side noise exists to stop.
- **The output reader** (black-box): it holds only the final adapter. A gradient canary's
  score is the same inner product with ``initial - final``; a record canary's is how much
  the final adapter lowered its loss compared with the initial one (a likelihood ratio
  against the base model: LoRA starts as the identity).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from fedllm.audit.canaries import CanaryDesign, Layout
from fedllm.privacy.randomness import GaussianNoise, dp_randomness


@dataclass
class Observed:
    """What the coordinator kept of the run: per round, the adapter it sent and each client's reply."""

    sent: dict[int, np.ndarray] = field(default_factory=dict)  # round -> flat global adapter
    replies: dict[tuple[int, int], np.ndarray] = field(default_factory=dict)  # (round, client) -> flat adapter

    def descent(self, server_round: int, client: int) -> np.ndarray | None:
        """``sent - reply``: the direction client ``client`` moved the adapter in ``server_round``."""
        reply = self.replies.get((server_round, client))
        return None if reply is None else self.sent[server_round] - reply


def _normalised(vector: np.ndarray) -> np.ndarray:
    rms = float(np.sqrt(np.mean(vector * vector)))
    return vector / rms if rms > 0 else vector


def coordinator_scores(
    design: CanaryDesign,
    observed: Observed,
    directions: Callable[[int, int], np.ndarray] | None = None,
    denoise: Callable[[int, int, np.ndarray], np.ndarray] | None = None,
) -> np.ndarray:
    """The white-box score of every canary.

    Args:
        design: the canaries.
        observed: the updates the coordinator saw.
        directions: ``(canary, round) -> flat unit direction`` for record canaries (None: the
            designed gradient of a gradient canary).
        denoise: ``(round, client, descent) -> descent without the node's noise`` when the
            coordinator can regenerate that noise (seeded runs), else None.
    """
    scores = np.zeros(len(design.canaries))
    rounds = sorted(observed.sent)
    for server_round in rounds:
        cache: dict[int, np.ndarray | None] = {}
        for canary in design.canaries:
            client = canary.client
            if client not in cache:
                step = observed.descent(server_round, client)
                if step is not None and denoise is not None:
                    step = denoise(server_round, client, step)
                cache[client] = None if step is None else _normalised(step)
            step = cache[client]
            if step is None:
                continue
            if directions is None:
                scores[canary.index] += design.unit_score(canary.index, step)
            else:
                scores[canary.index] += float(np.dot(directions(canary.index, server_round), step))
    return scores


def aggregate_scores(design: CanaryDesign, observed: Observed, final: np.ndarray) -> np.ndarray:
    """Every round's released global adapter (what the other nodes and every reader of the rounds
    see): a canary's score sums its direction against each round's global step."""
    rounds = sorted(observed.sent)
    following = [observed.sent[r] for r in rounds[1:]] + [final]
    steps = [_normalised(observed.sent[r] - after) for r, after in zip(rounds, following, strict=True)]
    return np.array([sum(design.unit_score(c.index, step) for step in steps) for c in design.canaries])


def reader_gradient_scores(design: CanaryDesign, initial: np.ndarray, final: np.ndarray) -> np.ndarray:
    """The black-box score of gradient canaries: their direction against ``initial - final``."""
    moved = _normalised(initial - final)
    return np.array([design.unit_score(c.index, moved) for c in design.canaries])


def reader_loss_scores(losses_initial: np.ndarray, losses_final: np.ndarray) -> np.ndarray:
    """The black-box score of record canaries: the loss the final adapter removed."""
    return np.asarray(losses_initial, dtype=np.float64) - np.asarray(losses_final, dtype=np.float64)


@dataclass(frozen=True)
class SeededNoise:
    """How the coordinator regenerates a seeded node's DP noise for one round (plain SGD only).

    The node drew ``steps`` noise vectors of standard deviation ``noise_multiplier * clip_norm``
    from the noise stream its seed gives, one per trainable tensor in ``param_order``; Opacus
    divided the noised sum by its expected batch size and SGD moved by ``lr`` times that.
    """

    seed_for: Callable[[int, int], int]  # (round, client) -> the node's seed
    param_order: list[tuple[str, tuple[int, ...]]]  # trainable tensors, in the optimizer's order
    layout: Layout
    steps: int
    lr: float
    std_for: Callable[[int], float]  # client -> noise std (noise multiplier x clip norm)

    def noise_sum(self, server_round: int, client: int) -> np.ndarray:
        """The sum of the node's noise over the round's steps, flat in layout order."""
        noise = GaussianNoise(dp_randomness(self.seed_for(server_round, client)).noise)
        std = self.std_for(client)
        total = {name: torch.zeros(shape, dtype=torch.float32) for name, shape in self.param_order}
        for _ in range(self.steps):
            for name, _shape in self.param_order:
                total[name] += noise.like(total[name], std)
        return self.layout.flatten({name: t.numpy() for name, t in total.items()})

    def __call__(self, server_round: int, client: int, descent: np.ndarray) -> np.ndarray:
        """``descent`` with the node's noise removed: ``descent * B / lr - noise``, with the
        expected batch size ``B`` (not public) estimated by least squares against the noise."""
        noise = self.noise_sum(server_round, client)
        scaled = descent / self.lr  # = (clipped sum + noise) / B
        denominator = float(np.dot(noise, scaled))
        if denominator <= 0:
            return descent
        batch = float(np.dot(noise, noise)) / denominator
        return scaled * round(batch) - noise
