"""A trivially learnable sentiment task for training tests (the label is in the words)."""

from __future__ import annotations

import random

from fedllm.data.formatting import PromptFormat, choice_token_ids
from fedllm.data.sources import Record

CHOICES = ("positive", "negative")
FMT = PromptFormat("Review: {prompt}\nSentiment:", " {response}", 32, CHOICES)


def easy_records(n: int, seed: int) -> list[Record]:
    """``n`` reviews whose words give the label away."""
    rng = random.Random(seed)
    good, bad = ["great", "wonderful", "superb", "moving"], ["awful", "boring", "dreadful", "dull"]
    records = []
    for _ in range(n):
        positive = rng.random() < 0.5
        words = rng.choices(good if positive else bad, k=3) + rng.choices(["film", "plot", "cast"], k=2)
        rng.shuffle(words)
        records.append(Record(" ".join(words), "positive" if positive else "negative"))
    return records


def choice_ids(bundle) -> list[int]:
    """The answer tokens of :data:`FMT` for ``bundle``'s tokenizer."""
    return choice_token_ids(bundle.tokenizer, FMT)
