"""Turn records into token tensors: prompt template, answer tokens, label masking, padding."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.data import Dataset

from fedllm.config import Overlong
from fedllm.data.sources import Record
from fedllm.errors import ConfigError, DataError

IGNORE_INDEX = -100


@dataclass(frozen=True)
class PromptFormat:
    """How a record becomes model input (see ``data.prompt_template`` / ``data.response_template``)."""

    prompt_template: str
    response_template: str
    max_length: int
    choices: tuple[str, ...] = ()
    overlong: Overlong = "truncate"  # or "refuse"
    # "error": a record the format cannot train on (answer not among the choices, answer alone
    # longer than max_length) is an error; "mask": it stays in the data with no training
    # target (zero loss, zero gradient), so whether such a record exists never changes what a
    # node does or says: the server chooses the format, and must not probe records with it
    nonconforming: str = "error"


class TokenizedDataset(Dataset):
    """Records as tuples of tensors ``(input_ids, labels, choice)``.

    ``labels`` masks the prompt with -100 (loss on answer tokens only); ``choice`` is the
    index of the answer in ``choices`` (-1 when the task has no fixed answers). Items are
    plain tensor tuples because Opacus's DP data loader inspects ``dataset[0]``.
    """

    def __init__(self, items: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], truncated: int, masked: int = 0):
        self.items = items
        self.truncated = truncated
        self.masked = masked  # records kept without a training target (see PromptFormat.nonconforming)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.items[index]


def choice_token_ids(tokenizer, fmt: PromptFormat) -> list[int]:
    """The single token of each fixed answer (as it follows the prompt).

    Raises:
        ConfigError: an answer is not exactly one token for this tokenizer.
    """
    ids = []
    for choice in fmt.choices:
        tokens = tokenizer(fmt.response_template.format(response=choice), add_special_tokens=False)["input_ids"]
        if len(tokens) != 1:
            raise ConfigError(
                f"data.choices: answer {choice!r} is {len(tokens)} tokens for this tokenizer; "
                "fixed answers must be single tokens (check data.response_template's leading space)"
            )
        ids.append(tokens[0])
    return ids


def prompt_text(record: Record, fmt: PromptFormat, tokenizer) -> str:
    """The model input before the answer: the prompt template around the prompt or, for a chat
    record, its turns in the model's chat template up to the assistant's turn.

    A tokenizer without a chat template gets the turns as ``role: content`` lines: a node's
    answer must not depend on whether one record is a chat record (no error for it).
    """
    if not record.turns:
        return fmt.prompt_template.format(prompt=record.prompt)
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": role, "content": content} for role, content in record.turns]
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return record.prompt + "\nassistant:"


def adds_special_tokens(record: Record) -> bool:
    """Whether the tokenizer adds its special tokens to :func:`prompt_text`'s text: not for a chat
    record, whose chat template writes its own."""
    return not record.turns


def tokenize_records(records: list[Record], tokenizer, fmt: PromptFormat) -> TokenizedDataset:
    """Tokenize records: prompt tokens (left-truncated to fit) followed by answer tokens and EOS.

    Raises:
        DataError: a record does not fit the format and ``fmt.nonconforming`` is ``error``, or
            ``fmt.overlong`` is ``refuse`` and a record is too long (never quoting the record).
    """
    choice_index = {c: i for i, c in enumerate(fmt.choices)}
    items, truncated, masked = [], 0, 0
    for position, record in enumerate(records):
        where = record.origin or f"record {position}"
        text = prompt_text(record, fmt, tokenizer)
        prompt = tokenizer(text, add_special_tokens=adds_special_tokens(record))["input_ids"]
        answer = tokenizer(fmt.response_template.format(response=record.response), add_special_tokens=False)[
            "input_ids"
        ]
        if not fmt.choices and tokenizer.eos_token_id is not None:
            answer = answer + [tokenizer.eos_token_id]
        problem = _nonconforming(record, answer, fmt, choice_index)
        if problem and fmt.nonconforming == "error":
            raise DataError(f"{where}: {problem}")  # never echo the record's text: errors can reach logs
        if problem:
            items.append(_untrained(prompt, fmt.max_length))
            masked += 1
            continue
        room = fmt.max_length - len(answer)
        if len(prompt) > room and fmt.overlong == "refuse":
            raise DataError(
                f"{where}: {len(prompt) + len(answer)} tokens, longer than data.max_length="
                f"{fmt.max_length}; raise it, shorten the record, or set data.overlong=truncate"
            )
        if len(prompt) > room:
            # keep the end of the prompt: it holds the instruction cue right before the answer
            prompt, truncated = prompt[-room:], truncated + 1
        ids = torch.tensor(prompt + answer, dtype=torch.long)
        labels = torch.tensor([IGNORE_INDEX] * len(prompt) + answer, dtype=torch.long)
        choice = torch.tensor(choice_index.get(record.response, -1), dtype=torch.long)
        items.append((ids, labels, choice))
    return TokenizedDataset(items, truncated, masked)


def _nonconforming(record: Record, answer: list[int], fmt: PromptFormat, choice_index: dict) -> str:
    """Why the format cannot train on ``record`` (empty when it can)."""
    if fmt.choices and record.response not in choice_index:
        return f"the answer is not one of data.choices {list(fmt.choices)}"
    if fmt.max_length - len(answer) < 1:
        return f"the answer alone exceeds data.max_length={fmt.max_length}; raise it"
    return ""


def _untrained(prompt: list[int], max_length: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """An item with no training target: its loss and per-sample gradient are zero."""
    ids = torch.tensor(prompt[-max_length:] or [0], dtype=torch.long)
    return ids, torch.full_like(ids, IGNORE_INDEX), torch.tensor(IGNORE_INDEX, dtype=torch.long)


def make_collate(pad_id: int, prompt_only: bool):
    """Collate ``(input_ids, labels, choice)`` items into a left-padded batch dict.

    The dict has ``input_ids``, ``attention_mask``, ``position_ids``, ``labels`` and
    ``choice``; a plain dict of tensors is what Opacus's Poisson loader can mirror for
    an empty batch.

    With ``prompt_only`` the answer tokens are dropped so the last position predicts the
    answer (the fixed-answer objective and its evaluation).
    """

    def collate(items) -> dict[str, torch.Tensor]:
        rows = []
        for ids, labels, choice in items:
            if prompt_only:
                keep = labels == IGNORE_INDEX
                ids, labels = ids[keep], labels[keep]
            rows.append((ids, labels, choice))
        width = max((len(r[0]) for r in rows), default=1)
        input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for row, (ids, lab, _) in enumerate(rows):
            input_ids[row, width - len(ids) :] = ids
            labels[row, width - len(ids) :] = lab
            mask[row, width - len(ids) :] = 1
        # explicit positions so left padding does not shift the real tokens' positions
        position_ids = (mask.cumsum(dim=1) - 1).clamp(min=0)
        choice = torch.stack([r[2] for r in rows]) if rows else torch.zeros(0, dtype=torch.long)
        return {
            "input_ids": input_ids,
            "attention_mask": mask,
            "position_ids": position_ids,
            "labels": labels,
            "choice": choice,
        }

    return collate
