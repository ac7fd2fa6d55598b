"""Split records into a held-out test set and one training shard per client."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import numpy as np

from fedllm.config import Partitioner
from fedllm.data.sources import Record
from fedllm.errors import DataError

_DIRICHLET_TRIES = 100


@dataclass(frozen=True)
class Split:
    """The held-out test records and every client's training shard."""

    test: list[Record]
    shards: list[list[Record]]


def split_records(
    records: list[Record],
    *,
    test_size: int,
    num_clients: int,
    partition: Partitioner,
    alpha: float,
    min_shard: int,
    seed: int,
) -> Split:
    """Hold out ``test_size`` records, then partition the rest into ``num_clients`` shards.

    Args:
        records: all records, in a fixed order.
        test_size: held-out records no client ever trains on.
        num_clients: number of shards.
        partition: ``iid`` (equal random shards) or ``dirichlet`` (label skew).
        alpha: Dirichlet concentration; small values give strongly skewed labels.
        min_shard: smallest acceptable shard.
        seed: controls the split completely.

    Raises:
        DataError: there are too few records for the requested split.
    """
    if len(records) < test_size + num_clients * min_shard:
        raise DataError(
            f"{len(records)} records cannot give a test split of {test_size} and "
            f"{num_clients} shards of at least {min_shard}; lower data.test_size or federation.num_clients"
        )
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(records))
    test = [records[i] for i in order[:test_size]]
    pool = [records[i] for i in order[test_size:]]
    if partition == "iid":
        indices = np.array_split(rng.permutation(len(pool)), num_clients)
    elif partition == "dirichlet":
        indices = _dirichlet(pool, num_clients, alpha, min_shard, rng)
    else:
        raise DataError(f"unknown partition {partition!r}; known: iid, dirichlet")
    shards = [[pool[i] for i in sorted(idx)] for idx in indices]
    return Split(test=test, shards=shards)


def _dirichlet(
    pool: list[Record], num_clients: int, alpha: float, min_shard: int, rng: np.random.Generator
) -> list[np.ndarray]:
    """Label-skewed shards: each label's records spread by Dirichlet(alpha) proportions."""
    by_label: dict[str, list[int]] = defaultdict(list)
    for index, record in enumerate(pool):
        by_label[record.response].append(index)
    for _ in range(_DIRICHLET_TRIES):
        shards: list[list[int]] = [[] for _ in range(num_clients)]
        for label in sorted(by_label):
            members = rng.permutation(by_label[label])
            cuts = (np.cumsum(rng.dirichlet([alpha] * num_clients))[:-1] * len(members)).astype(int)
            for shard, part in zip(shards, np.split(members, cuts), strict=True):
                shard.extend(part.tolist())
        if min(len(s) for s in shards) >= min_shard:
            return [np.array(s, dtype=int) for s in shards]
    raise DataError(
        f"dirichlet partition (alpha={alpha}) kept giving a shard under {min_shard} records; "
        "raise data.dirichlet_alpha or lower federation.num_clients"
    )
