"""``fedllm evaluate`` and ``fedllm generate``: use a finished run's adapter.

Both rebuild the run's base model from its ``config.json``, load the final adapter from
``adapter/`` (checked against its manifest; decrypted with the storage key when sealed) and
never train. ``evaluate`` scores the held-out split the server evaluated on (or your own file
in the run's prompt format); ``generate`` answers a prompt in the run's prompt format.

A run folder is data, never code: a base model loaded from a path or hub id loads only when
``--base-model`` names the one the run's ``config.json`` names, and a base's own Python runs only
with ``--trust-remote-code`` (fedllm's built-in bases need neither).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from fedllm.cli.at_rest import storage_key
from fedllm.errors import FedLLMError

KEY_HELP = "file holding the 64-hex-character storage key (default: $FEDLLM_ENCRYPTION_KEY), for sealed adapters"


def _parser(command: str, description: str) -> argparse.ArgumentParser:
    """The arguments both commands share: the run folder and the storage key."""
    parser = argparse.ArgumentParser(prog=f"fedllm {command}", description=description)
    parser.add_argument("run_dir", type=Path, help="a finished run folder, e.g. outputs/<date>/<time>")
    parser.add_argument("--key-file", default=None, help=KEY_HELP)
    parser.add_argument(
        "--base-model",
        default=None,
        metavar="PATH_OR_ID",
        help="load the base model the run names (its model.name_or_path, written exactly as in config.json); "
        "needed for any base but fedllm's built-in ones: a run folder alone never chooses what is loaded",
    )
    parser.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="allow the base model's own Python code to run, when the run used model.trust_remote_code=true "
        "(read that code first: a run folder alone never turns this on)",
    )
    return parser


def _finished_run(args: argparse.Namespace, command: str):
    """The run of ``args.run_dir`` with its adapter loaded, or None after a one-line error."""
    from fedllm.finished_run import LoadConsent, load_finished_run

    consent = LoadConsent(base_model=args.base_model, trust_remote_code=args.trust_remote_code)
    try:
        return load_finished_run(args.run_dir, storage_key(args.key_file, need=False, command=command), consent)
    except (FedLLMError, OSError) as exc:
        print(f"fedllm {command}: {exc}", file=sys.stderr)
        return None


def evaluate_cli(argv: list[str]) -> int:
    """``fedllm evaluate RUN_DIR [--data FILE] [--json]``."""
    parser = _parser(
        "evaluate",
        "Evaluate a finished run's final adapter: held-out loss, perplexity and (for "
        "fixed answers) accuracy, computed as the server computed them each round.",
    )
    parser.add_argument(
        "--data",
        type=Path,
        default=None,
        help="a JSONL/CSV file of records to score instead of the run's held-out split "
        "(same field names and prompt format as the run)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    parser.add_argument(
        "--compare-base", action="store_true", help="also score the base model without the adapter, on the same records"
    )
    args = parser.parse_args(argv)
    from fedllm.finished_run import evaluate_run, records_for

    run = _finished_run(args, "evaluate")
    if run is None:
        return 1
    try:
        records = records_for(run, args.data)
        figures: dict[str, float | int | str] = {**_figures(evaluate_run(run, records))}
        if args.compare_base:
            with run.bundle.model.disable_adapter():
                figures |= {f"base_{name}": value for name, value in _figures(evaluate_run(run, records)).items()}
    except (FedLLMError, OSError) as exc:
        print(f"fedllm evaluate: {exc}", file=sys.stderr)
        return 1
    figures["data"] = str(args.data) if args.data else "held-out split"
    if args.json:
        print(json.dumps(figures, sort_keys=True))
    else:
        for name, value in figures.items():
            print(f"{name:21} {value:.4f}" if isinstance(value, float) else f"{name:21} {value}")
    return 0


def _figures(result) -> dict[str, float | int]:
    """An evaluation as ``fedllm evaluate`` prints it: accuracy only where the task has fixed answers."""
    figures: dict[str, float | int] = {
        "examples": result.examples,
        "eval_loss": result.loss,
        "eval_perplexity": result.perplexity,
    }
    if result.accuracy is not None:
        figures["eval_accuracy"] = result.accuracy
    return figures


def generate_cli(argv: list[str]) -> int:
    """``fedllm generate RUN_DIR PROMPT... [--max-new-tokens N]``."""
    parser = _parser(
        "generate",
        "Answer prompts with a finished run's adapter (greedy decoding). Each prompt is "
        "put into the run's prompt template (data.prompt_template), as during training.",
    )
    parser.add_argument("prompts", nargs="+", help="one or more prompts (the {prompt} part of the template)")
    parser.add_argument(
        "--max-new-tokens", type=int, default=40, help="the most tokens generated per prompt (default: 40)"
    )
    parser.add_argument("--raw", action="store_true", help="send the prompts as they are, without the template")
    parser.add_argument("--compare-base", action="store_true", help="also answer with the base model, no adapter")
    args = parser.parse_args(argv)
    if args.max_new_tokens < 1:
        parser.error(f"--max-new-tokens must be positive, got {args.max_new_tokens}")
    from fedllm.evaluation.generation import generate
    from fedllm.training.precision import use_bf16

    run = _finished_run(args, "generate")
    if run is None:
        return 1
    template = "{prompt}" if args.raw else run.config.data.prompt_template
    inputs = [template.format(prompt=prompt) for prompt in args.prompts]
    print(
        f"fedllm generate: up to {args.max_new_tokens} tokens for each of {len(inputs)} prompt(s)"
        + (", then the same without the adapter" if args.compare_base else "")
        + " (on a CPU, seconds to minutes per prompt)",
        file=sys.stderr,
    )

    def answers() -> list[str]:
        bf16 = use_bf16(run.config.train.precision)
        return generate(run.bundle.model, run.bundle.tokenizer, inputs, max_new_tokens=args.max_new_tokens, bf16=bf16)

    texts = answers()
    base = None
    if args.compare_base:
        with run.bundle.model.disable_adapter():
            base = answers()
    for index, (prompt, text) in enumerate(zip(args.prompts, texts, strict=True)):
        if base is not None:
            print(f"> {prompt}\nadapter: {text}\nbase:    {base[index]}\n")
        else:
            print(f"> {prompt}\n{text}\n" if len(args.prompts) > 1 else text)
    return 0
