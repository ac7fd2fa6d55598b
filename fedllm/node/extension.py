"""The node's one hook for code outside its package: records a simulation driver adds to a virtual
node's shard.

``fedllm audit`` trains each simulated node on its shard plus canaries (records, or rows whose
per-sample gradient is designed), so that the audit tests the mechanism that ran. The guard never
imports the audit: the ClientApp builds the extension from the node's policy (the
``audit-canaries`` key, which :class:`~fedllm.node.policy.NodePolicy` accepts from the simulation
driver only) and hands it in. A deployed node never has one.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Protocol

import torch
from torch.utils.data import Dataset

from fedllm.data.formatting import TokenizedDataset
from fedllm.data.sources import Record
from fedllm.training.local import GradientOverride


class SizedDataset(Dataset, ABC):
    """A dataset with a length (what the node plans its sample rate over)."""

    @abstractmethod
    def __len__(self) -> int:
        """The number of items."""


class ShardExtension(Protocol):
    """What a simulation driver may add to a virtual node's round."""

    def extend(self, shard: TokenizedDataset, tokenize: Callable[[list[Record]], TokenizedDataset]) -> SizedDataset:
        """The node's shard with the extra records (Poisson-sampled, clipped and noised like every record)."""

    def collate(self, collate: Callable) -> Callable:
        """The batch builder for the extended shard's items."""

    def override(self, model: torch.nn.Module) -> GradientOverride | None:
        """Designed per-sample gradients for some rows of ``model``'s adapter (None: every row trains)."""
