"""A simulated node's side of an audit: its canaries join its training data as records, and a
gradient canary's per-sample gradient is the designed one.

Only a node whose config comes from the simulation driver (``audit-canaries``) ever loads
canaries (:class:`~fedllm.node.policy.NodePolicy` refuses the key elsewhere). The canaries
are real members of the shard: Poisson sampling draws them at the same rate as every record,
the plan's sample rate counts them, and under DP-SGD their designed gradient is clipped,
summed and noised with the others by Opacus, so the audit tests the mechanism that ran.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from fedllm.audit.canaries import CanaryDesign
from fedllm.data.formatting import TokenizedDataset
from fedllm.data.sources import Record
from fedllm.node.extension import SizedDataset

NOT_A_CANARY = -1


class CanaryShard(SizedDataset):
    """The node's shard followed by its canary records; items carry a fourth field, the canary
    index (:data:`NOT_A_CANARY` for the node's own records)."""

    def __init__(self, shard: TokenizedDataset, canary_items: list[tuple], design: CanaryDesign):
        self.shard, self.canary_items, self.design = shard, canary_items, design
        self.canary_ids = [c.index for c in design.canaries]

    def __len__(self) -> int:
        return len(self.shard) + len(self.canary_items)

    def __getitem__(self, index: int) -> tuple:
        if index < len(self.shard):
            return (*self.shard[index], torch.tensor(NOT_A_CANARY))
        offset = index - len(self.shard)
        return (*self.canary_items[offset], torch.tensor(self.canary_ids[offset]))


def with_canary_column(collate, sampled_log: Path | None = None):
    """``collate`` for :class:`CanaryShard` items: the batch gains a ``canary`` index column.

    ``sampled_log``: a file to which the canary indices of every batch that holds any are appended
    (one line per batch), so the audit can say how many canaries were ever sampled (its power).
    """

    def collate_canaries(items) -> dict[str, torch.Tensor]:
        batch = collate([item[:3] for item in items])
        batch["canary"] = torch.tensor([int(item[3]) for item in items], dtype=torch.long)
        drawn = [index for index in batch["canary"].tolist() if index != NOT_A_CANARY]
        if sampled_log is not None and drawn:
            with open(sampled_log, "a", encoding="utf-8") as handle:
                handle.write(" ".join(map(str, drawn)) + "\n")
        return batch

    return collate_canaries


def sampled_canaries(logs: list[Path]) -> set[int]:
    """Every canary index the nodes' batches ever held (from their ``sampled_log`` files)."""
    found: set[int] = set()
    for path in logs:
        if path.exists():
            for line in path.read_text(encoding="utf-8").split():
                found.add(int(line))
    return found


class GradientCanaries:
    """Replaces a gradient canary's per-sample gradient with its designed one (norm C).

    Args:
        design: this node's canaries (``kind=gradient``).
        named_params: the adapter's trainable parameters by their adapter (wire) names.
    """

    def __init__(self, design: CanaryDesign, named_params: dict[str, torch.nn.Parameter]):
        spans = design.layout.offsets()
        self.params = named_params
        # canary -> {name: (positions within that tensor, values)}
        self.designed: dict[int, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}
        for canary in design.canaries:
            where, values = design.direction(canary.index)
            parts = {}
            for name, (start, end) in spans.items():
                inside = (where >= start) & (where < end)
                if inside.any():
                    parts[name] = (torch.from_numpy(where[inside] - start), torch.from_numpy(values[inside]))
            self.designed[canary.index] = parts

    def keep(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """1 for rows whose own loss trains, 0 for gradient canaries (their gradient is designed)."""
        return (batch["canary"] == NOT_A_CANARY).to(torch.float32)

    def replace_samples(self, batch: dict[str, torch.Tensor]) -> None:
        """DP-SGD: set each canary row of every ``grad_sample`` to the canary's designed gradient."""
        for row, index in self._rows(batch):
            for name, param in self.params.items():
                sample = _grad_sample(param)[row].reshape(-1)
                sample.zero_()
                if name in self.designed[index]:
                    where, values = self.designed[index][name]
                    sample[where.to(sample.device)] = values.to(sample.device, sample.dtype)

    def add_to_grads(self, batch: dict[str, torch.Tensor], total: int) -> None:
        """Non-private training: add each canary's designed gradient to the batch-mean gradient."""
        for _, index in self._rows(batch):
            for name, (where, values) in self.designed[index].items():
                param = self.params[name]
                if param.grad is None:
                    param.grad = torch.zeros_like(param)
                param.grad.view(-1)[where.to(param.device)] += values.to(param.device, param.dtype) / total

    def _rows(self, batch: dict[str, torch.Tensor]) -> Iterator[tuple[int, int]]:
        for row, index in enumerate(batch["canary"].tolist()):
            if index != NOT_A_CANARY and index in self.designed:
                yield row, index


def canary_items(
    design: CanaryDesign, shard: TokenizedDataset | None, tokenize: Callable[[list[Record]], TokenizedDataset]
) -> list[tuple]:
    """The token items of ``design``'s canaries: record canaries tokenized by ``tokenize``;
    a gradient canary reuses a record of ``shard`` (needed only then), since its own gradient
    never counts."""
    if design.kind == "record":
        records = [Record(prompt=c.prompt, response=c.response, origin=f"canary {c.index}") for c in design.canaries]
        return list(tokenize(records).items)
    if shard is None:
        raise ValueError("gradient canaries reuse a record of the node's shard; none was given")
    return [shard[0] for _ in design.canaries]


def _grad_sample(param: torch.nn.Parameter) -> torch.Tensor:
    """The per-sample gradients Opacus's hooks attach to ``param`` (an attribute torch's types lack)."""
    return param.grad_sample  # type: ignore[attr-defined]


def load_node_canaries(path: str | Path) -> CanaryDesign:
    """This node's canary file (written by the audit driver)."""
    return CanaryDesign.from_json(Path(path).read_text(encoding="utf-8"))


def adapter_parameters(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """The trainable adapter parameters by the names the adapter state (and the wire) uses."""
    suffix = f".{model.active_adapter}"
    return {name.replace(suffix, ""): p for name, p in model.named_parameters() if p.requires_grad}


SAMPLED_SUFFIX = ".sampled"  # beside a node's canary file: the canaries its batches held


class CanaryExtension:
    """A simulated node's canaries as the node's :class:`~fedllm.node.extension.ShardExtension`."""

    def __init__(self, design: CanaryDesign, sampled_log: Path | None = None):
        self.design, self.sampled_log = design, sampled_log

    def extend(self, shard: TokenizedDataset, tokenize: Callable[[list[Record]], TokenizedDataset]) -> CanaryShard:
        """The shard followed by this node's canaries."""
        return CanaryShard(shard, canary_items(self.design, shard, tokenize), self.design)

    def collate(self, collate: Callable) -> Callable:
        """``collate`` with the canary index column."""
        return with_canary_column(collate, self.sampled_log)

    def override(self, model: torch.nn.Module) -> GradientCanaries | None:
        """Gradient canaries' designed per-sample gradients (None for record canaries)."""
        return GradientCanaries(self.design, adapter_parameters(model)) if self.design.kind == "gradient" else None


def node_extension(canary_file: str | None) -> CanaryExtension | None:
    """The extension a virtual node's ``audit-canaries`` file names (None: the node has none)."""
    if not canary_file:
        return None
    return CanaryExtension(load_node_canaries(canary_file), Path(f"{canary_file}{SAMPLED_SUFFIX}"))
