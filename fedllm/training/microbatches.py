"""Fixed-shape micro-batches for DP-SGD: a step's compute follows its Poisson batch size only.

Why (issue 23, item 3): a node's response time is public, and trimming a batch to its longest
record made a step's work follow the records' lengths (one ~3,000-token record among 120 short
ones: replies of 18-43 s against 4 s). Under bf16 autocast the padded width also changed how
other rows were rounded, so adding one record moved its companions' per-sample gradients by up
to 13% (their clipped sum by 1.04 C, against the C the accountant assumes).

Design. Every row of a DP step is left-padded to ``width``, the run's ``data.max_length``
(public, fixed before any record is read; tokenizing already cuts every record to it), and the
rows are cut, in the order the Poisson sampler drew them, into micro-batches of exactly ``rows``
rows; the last one is filled with dummy rows. A step of ``B`` records thus runs
``ceil(B / rows)`` identical ``(rows, width)`` forward/backward passes: its compute depends on
``B`` alone (``B`` is the Poisson batch size, which the DP analysis already covers), and every
kernel sees the same shapes whatever the records are, so a row's rounding cannot follow its
companions' lengths. What stays data-dependent is only what no shape reveals: the values.

A dummy row is a data-independent input (token 0 at every position, all attended, positions
``0..width-1``, no label, no choice, ``real = 0``). Its loss is zero and multiplied by zero, so
the gradient flowing back into it is exactly zero and so is its per-sample gradient
``g^T a`` (fedllm's LoRA sampler and Opacus's hooks alike): Opacus clips it to zero, and it adds
nothing to the clipped sum. It does not count in the batch: the DP optimizer divides by its
*expected* batch size (fixed by the plan, not by the rows computed), the accountant records one
step per Poisson batch as before, and ``examples_seen`` and the loss count real rows only. The
per-sample gradient samplers scale by the rows of the micro-batch (the mean loss over
``rows``), which is exact for every real row.

Padding columns carry token 0 and attention mask 0: a masked key gets exactly zero attention
weight, so neither its token nor its hidden state reaches a real position's output or gradient.

Non-DP training keeps the length-sorted trimming (:func:`fedllm.training.local.split_by_length`):
it makes no privacy claim, and its speed matters more there.
"""

from __future__ import annotations

import math

import torch

from fedllm.data.formatting import IGNORE_INDEX
from fedllm.errors import DataError

REAL = "real"  # batch column added here: 1 for a record of the Poisson batch, 0 for a dummy row
# fill values of a dummy row's per-row columns; any other per-row column gets NO_INDEX
# (the "none" of an index column, e.g. an audit's NOT_A_CANARY)
NO_INDEX = -1
_ROW_FILL = {"choice": IGNORE_INDEX}


def rows_per_micro_batch(batch_size: int, micro_batches: int) -> int:
    """The fixed rows of a DP micro-batch: the expected batch split into ``micro_batches``.

    Args:
        batch_size: the expected Poisson batch size (``train.batch_size``).
        micro_batches: ``train.micro_batches``.

    Returns:
        ``ceil(batch_size / micro_batches)`` (at least 1): a batch of the expected size fills
        ``micro_batches`` micro-batches; a larger one takes more of the same shape.
    """
    return max(1, math.ceil(batch_size / micro_batches))


def fixed_shape_chunks(batch: dict[str, torch.Tensor], rows: int, width: int) -> list[dict[str, torch.Tensor]]:
    """Cut a collated (left-padded) batch into micro-batches of exactly ``rows x width``.

    Args:
        batch: the collated Poisson batch (``input_ids``, ``attention_mask``, ``position_ids``,
            ``labels``, ``choice`` and any other per-row column), at most ``width`` wide.
        rows: rows per micro-batch (:func:`rows_per_micro_batch`).
        width: the padded width of every row (the run's ``data.max_length``).

    Returns:
        ``ceil(B / rows)`` micro-batches (none for an empty batch), in the sampler's order, each
        with a :data:`REAL` column (1 for a record, 0 for a dummy row).

    Raises:
        DataError: a row is wider than ``width`` (tokenizing cuts every record to
            ``data.max_length``, so this is a caller's mistake, never a record's content).
    """
    count = len(batch["input_ids"])
    if count == 0:
        return []
    widened = _widen(batch, width)
    widened[REAL] = torch.ones(count, dtype=torch.long)
    total = math.ceil(count / rows) * rows
    filled = _with_dummy_rows(widened, total - count, width)
    return [{k: v[start : start + rows] for k, v in filled.items()} for start in range(0, total, rows)]


def _widen(batch: dict[str, torch.Tensor], width: int) -> dict[str, torch.Tensor]:
    """Left-pad every 2-D column to ``width`` (masked token 0, label ignored, position 0)."""
    current = batch["input_ids"].shape[1]
    if current > width:
        raise DataError(f"a batch is {current} tokens wide, above the fixed width {width} (data.max_length)")
    out = {}
    for key, value in batch.items():
        if value.dim() == 2 and current < width:
            fill = IGNORE_INDEX if key == "labels" else 0
            pad = torch.full((value.shape[0], width - current), fill, dtype=value.dtype)
            value = torch.cat([pad, value], dim=1)
        out[key] = value
    return out


def _with_dummy_rows(batch: dict[str, torch.Tensor], extra: int, width: int) -> dict[str, torch.Tensor]:
    """Append ``extra`` dummy rows (see the module docstring): finite input, zero gradient."""
    if extra == 0:
        return batch
    dummy = {
        "input_ids": torch.zeros((extra, width), dtype=torch.long),
        "attention_mask": torch.ones((extra, width), dtype=torch.long),
        "position_ids": torch.arange(width).expand(extra, width),
        "labels": torch.full((extra, width), IGNORE_INDEX, dtype=torch.long),
        REAL: torch.zeros(extra, dtype=torch.long),
    }
    out = {}
    for key, value in batch.items():
        if key in dummy:
            filler = dummy[key].to(value.dtype)
        elif value.dim() == 1:
            filler = torch.full((extra,), _ROW_FILL.get(key, NO_INDEX), dtype=value.dtype)
        else:
            raise DataError(f"batch column {key!r}: cannot fill a dummy row of a {value.dim()}-D column")
        out[key] = torch.cat([value, filler], dim=0)
    return out
