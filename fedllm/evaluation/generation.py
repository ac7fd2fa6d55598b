"""A few greedy generations from the adapter: what perplexity alone does not show.

For the review-writing task (``data=rt_reviews``) a table row reports held-out perplexity and,
beside it, what the adapter actually writes for a few fixed held-out instructions. Greedy
decoding (no sampling) makes the samples a deterministic function of the adapter, so two rows
differ only by what training did.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from peft import PeftModel
from transformers import GenerationConfig

from fedllm.data.formatting import PromptFormat, adds_special_tokens, prompt_text
from fedllm.data.sources import Record
from fedllm.evaluation.progress import Progress
from fedllm.model.device import model_device
from fedllm.training.precision import autocast

DEFAULT_MAX_NEW_TOKENS = 40


@dataclass(frozen=True)
class Sample:
    """One generation: the instruction (the record's prompt), what the adapter wrote, and the
    held-out reference answer."""

    prompt: str
    generated: str
    reference: str

    def to_dict(self) -> dict[str, str]:
        """The JSON object of this sample."""
        return {"prompt": self.prompt, "generated": self.generated, "reference": self.reference}


def normalized_answer(text: str) -> str:
    """An answer as exact match compares it: lower case, spaces collapsed, end punctuation dropped."""
    return " ".join(text.lower().split()).strip(" .!?;:")


def exact_match(samples: list[Sample]) -> float | None:
    """The share of ``samples`` whose generation is the reference answer (:func:`normalized_answer`)."""
    if not samples:
        return None
    return sum(normalized_answer(s.generated) == normalized_answer(s.reference) for s in samples) / len(samples)


def sample_records(records: list[Record], count: int) -> list[Record]:
    """The first ``count`` held-out records with distinct prompts (a fixed choice: the held-out
    split is deterministic in the run's seed, so every run of a table gets the same prompts)."""
    chosen: list[Record] = []
    seen: set[str] = set()
    for record in records:
        if len(chosen) == count:
            break
        if record.prompt not in seen:
            seen.add(record.prompt)
            chosen.append(record)
    return chosen


@torch.no_grad()
def generate(
    model: PeftModel,
    tokenizer,
    prompts: list[str],
    *,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    bf16: bool = False,
    special_tokens: list[bool] | None = None,
) -> list[str]:
    """Greedy continuations of ``prompts`` (full model inputs, templates already applied).

    One prompt at a time: no padding, so each continuation is exactly what the model gives that
    prompt alone. Generation stops at the tokenizer's end-of-sequence token or after
    ``max_new_tokens``.

    Args:
        model: the PEFT causal LM; its train/eval mode is restored afterwards.
        tokenizer: its tokenizer (prompts are tokenized as training tokenizes them).
        prompts: the inputs.
        max_new_tokens: the most tokens generated per prompt.
        bf16: autocast to bf16 (as ``train.precision`` resolves).
        special_tokens: per prompt, whether the tokenizer adds its special tokens (default: all;
            a prompt rendered by a chat template already holds them).

    Returns:
        The generated text of each prompt, special tokens removed, surrounding spaces stripped.

    Raises:
        ValueError: ``max_new_tokens`` is not positive.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens}; must be a positive number of tokens")
    # a fresh config: the base model's own (sampling temperature, top_p) would not apply to greedy
    # decoding and transformers warns about the mismatch
    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        num_beams=1,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    was_training = model.training
    model.eval()
    device = model_device(model)
    texts = []
    progress = Progress(f"generation (up to {max_new_tokens} tokens each)", len(prompts), "prompts")
    try:
        for prompt, special in zip(prompts, special_tokens or [True] * len(prompts), strict=True):
            ids = torch.tensor(
                [tokenizer(prompt, add_special_tokens=special)["input_ids"]], dtype=torch.long, device=device
            )
            with autocast(bf16, device.type):
                out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=config)
            texts.append(tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip())
            progress.advance()
    finally:
        model.train(was_training)
    return texts


def generate_samples(
    model: PeftModel,
    tokenizer,
    records: list[Record],
    fmt: PromptFormat,
    *,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    bf16: bool = False,
) -> list[Sample]:
    """Greedy generations for ``records`` in the run's prompt format (see :func:`generate`).

    Args:
        model: the PEFT causal LM with the adapter to show.
        tokenizer: its tokenizer.
        records: the held-out records to prompt with (e.g. from :func:`sample_records`).
        fmt: the run's prompt format (``task.prompt_format(cfg.data)``).
        max_new_tokens: the most tokens generated per record.
        bf16: autocast to bf16.

    Returns:
        One :class:`Sample` per record, in order.
    """
    prompts = [prompt_text(r, fmt, tokenizer) for r in records]
    special = [adds_special_tokens(r) for r in records]
    texts = generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, bf16=bf16, special_tokens=special)
    return [
        Sample(prompt=r.prompt, generated=text, reference=r.response) for r, text in zip(records, texts, strict=True)
    ]
