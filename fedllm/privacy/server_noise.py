"""The server's randomness: which clients train each round, and the client-level DP noise.

Client-level DP rests on both. The Gaussian noise on the aggregate hides any one client's
clipped update, and the amplification the accountant credits for client sampling
(:mod:`fedllm.privacy.client_level`) holds only if nobody can predict the sample. Flower draws
the first from the global ``np.random`` and the second from the global ``random``, which a run
seeded with its public ``seed`` makes predictable to anyone who knows it.

So both come from :func:`fedllm.privacy.randomness.dp_randomness`, the source the nodes use:
by default 256 fresh bits of OS entropy on every call, independent streams for sampling and
noise, and nothing to store (a resumed run needs no random state). The ``seeded`` research mode
derives each round's streams from the run's seed and the round number instead, so a run and
its resumption reproduce exactly; its guarantee does not hold against anyone who knows the seed.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from fedllm.config import NoiseSource
from fedllm.errors import ConfigError
from fedllm.privacy.randomness import DPRandomness, GaussianNoise, dp_randomness

# domain separation: a seeded server never shares a stream with a seeded node of the same run
_SEED_DOMAIN = "fedllm/server-randomness/v1"


@dataclass(frozen=True)
class ServerRandomness:
    """Where the server's client sampling and client-level noise come from.

    Attributes:
        seed: None (the default) draws OS entropy on every call; an int derives every round's
            draws from it (``privacy.noise=seeded``, research simulations only).
    """

    seed: int | None = None

    @classmethod
    def from_noise(cls, noise: NoiseSource, seed: int) -> ServerRandomness:
        """The randomness a run with ``privacy.noise=noise`` uses.

        Args:
            noise: ``secure`` (OS entropy) or ``seeded`` (derived from ``seed``).
            seed: the run's public seed (used only when ``noise`` is ``seeded``).

        Returns:
            The server's randomness.

        Raises:
            ConfigError: ``noise`` is neither.
        """
        if noise == "secure":
            return cls()
        if noise == "seeded":
            return cls(seed=int(seed))
        raise ConfigError(f"privacy.noise: unknown {noise!r}; known: secure, seeded")

    @property
    def seeded(self) -> bool:
        """Whether the draws are reproducible from the run's seed."""
        return self.seed is not None

    def streams(self, server_round: int) -> DPRandomness:
        """Fresh sampling and noise streams for ``server_round``.

        Args:
            server_round: the round the draws are for (only the seeded mode uses it).

        Returns:
            Two independent streams: fresh OS entropy, or the round's seeded streams.
        """
        if self.seed is None:
            return dp_randomness()
        material = f"{_SEED_DOMAIN}/{self.seed}/{server_round}".encode()
        return dp_randomness(int.from_bytes(hashlib.sha256(material).digest(), "big"))

    def sample(self, nodes: Sequence[int], size: int, server_round: int) -> list[int]:
        """``size`` distinct nodes drawn uniformly at random (without replacement).

        Args:
            nodes: the connected node ids (their order does not matter).
            size: how many to draw.
            server_round: the round the sample is for.

        Returns:
            The sampled node ids.

        Raises:
            ValueError: fewer nodes than ``size``.
        """
        ordered = sorted(nodes)  # a seeded sample must not depend on the order the grid lists them in
        if size > len(ordered):
            raise ValueError(f"cannot sample {size} of {len(ordered)} nodes")
        picks = self.streams(server_round).sampling.choice(len(ordered), size=size, replace=False)
        return [ordered[int(i)] for i in picks]

    def add_noise(self, arrays: Sequence[np.ndarray], std: float, server_round: int) -> list[np.ndarray]:
        """``arrays`` plus independent N(0, std^2) noise on every element.

        The noise is drawn in float64 as a sum of several draws (the floating-point attack
        mitigation of :class:`~fedllm.privacy.randomness.GaussianNoise`) and added in float64;
        each sum is then cast to its array's dtype.

        Args:
            arrays: the aggregated arrays (not modified).
            std: the noise standard deviation (``z * C / k`` for the mean of ``k`` clipped updates).
            server_round: the round the noise is for.

        Returns:
            New noised arrays, in order.
        """
        noise = GaussianNoise(self.streams(server_round).noise)
        noised = []
        for array in arrays:
            draws = noise.like(torch.empty(array.shape, dtype=torch.float64), std).numpy()
            noised.append((array.astype(np.float64) + draws).astype(array.dtype))  # one rounding, at the end
        return noised
