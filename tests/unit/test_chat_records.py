"""Issue 29: chat data as people have it, JSONL in the ``messages`` format, trained through the
model's own chat template, beside prompt/response records."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedllm import task
from fedllm.data.formatting import IGNORE_INDEX, PromptFormat, prompt_text, tokenize_records
from fedllm.data.sources import Record, chat_record, load_records
from fedllm.errors import DataError
from tests.conftest import tiny_config

CHATS = [
    [
        {"role": "system", "content": "You answer arithmetic questions."},
        {"role": "user", "content": "What is 3 + 4?"},
        {"role": "assistant", "content": "3 + 4 = 7. The answer is 7."},
    ],
    [
        {"role": "user", "content": "Name a primary colour."},
        {"role": "assistant", "content": "Red."},
        {"role": "user", "content": "Another one?"},
        {"role": "assistant", "content": "Blue."},
    ],
    [
        {"role": "user", "content": "What is 3 + 4?"},  # the first chat without its system turn: another record
        {"role": "assistant", "content": "3 + 4 = 7. The answer is 7."},
    ],
]


def _chat_file(tmp_path: Path, chats=CHATS, extra: str = "") -> Path:
    path = tmp_path / "chats.jsonl"
    path.write_text("".join(json.dumps({"messages": c}) + "\n" for c in chats) + extra, encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tokenizer():
    cfg = tiny_config()
    return task.model_bundle(cfg.model, cfg.lora, cfg.seed).tokenizer


def test_a_chat_file_loads_one_record_per_conversation_the_last_turn_its_answer(tmp_path):
    records = load_records(_chat_file(tmp_path), "auto", "prompt", "response")
    assert [r.response for r in records] == ["3 + 4 = 7. The answer is 7.", "Blue.", "3 + 4 = 7. The answer is 7."]
    assert records[1].turns == (("user", "Name a primary colour."), ("assistant", "Red."), ("user", "Another one?"))
    assert records[0] != records[2]  # every turn is part of a record's identity
    assert records[1].origin.endswith("chats.jsonl:2")


def test_a_repeated_conversation_is_a_duplicate(tmp_path):
    records = load_records(_chat_file(tmp_path, CHATS + CHATS[:1]), "auto", "prompt", "response")
    assert len(records) == 3


def test_chat_and_prompt_response_records_mix_in_one_file(tmp_path):
    extra = json.dumps({"prompt": "2 + 2?", "response": "4"}) + "\n"
    records = load_records(_chat_file(tmp_path, extra=extra), "auto", "prompt", "response")
    assert records[-1] == Record("2 + 2?", "4") and records[-1].turns == ()


@pytest.mark.parametrize(
    ("messages", "message"),
    [
        ([{"role": "user", "content": "hi"}], "at least two turns"),
        ("hi", "at least two turns"),
        ([{"role": "user", "content": "hi"}, {"role": "user", "content": "again"}], "last turn must be the assistant"),
        ([{"role": "system", "content": "s"}, {"role": "assistant", "content": "a"}], "no user turn"),
        ([{"role": "robot", "content": "x"}, {"role": "assistant", "content": "a"}], "roles are system, user"),
        ([{"role": "user", "content": ""}, {"role": "assistant", "content": "a"}], "content must be a non-empty"),
        (
            [{"role": "user", "content": "x", "name": "n"}, {"role": "assistant", "content": "a"}],
            "'role' and 'content'",
        ),
    ],
)
def test_a_malformed_conversation_names_file_line_and_turn(tmp_path, messages, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"messages": CHATS[0]}) + "\n" + json.dumps({"messages": messages}) + "\n")
    with pytest.raises(DataError, match=rf"bad\.jsonl:2: field 'messages'.*{message}"):
        load_records(path, "auto", "prompt", "response")


def test_a_chat_record_is_trained_through_the_models_chat_template(tokenizer):
    record = chat_record([("user", "What is 3 + 4?"), ("assistant", "7.")])
    fmt = PromptFormat(prompt_template="### {prompt}", response_template=" {response}", max_length=128)
    text = prompt_text(record, fmt, tokenizer)
    assert text == tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is 3 + 4?"}], add_generation_prompt=True, tokenize=False
    )
    assert text.endswith("<|im_start|>assistant\n") and "### " not in text
    ((ids, labels, _),) = tokenize_records([record], tokenizer, fmt).items
    prompt_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    answer = tokenizer(" 7.", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert ids.tolist() == prompt_ids + answer
    assert labels.tolist() == [IGNORE_INDEX] * len(prompt_ids) + answer  # the loss is on the answer only


def test_a_tokenizer_without_a_chat_template_gets_plain_turns_not_an_error(tokenizer, monkeypatch):
    # a node's answer must not depend on whether one of its records is a chat record
    monkeypatch.setattr(tokenizer, "chat_template", None)
    record = chat_record([("system", "Be brief."), ("user", "Hi?"), ("assistant", "Hello.")])
    fmt = PromptFormat(prompt_template="{prompt}", response_template=" {response}", max_length=128)
    assert prompt_text(record, fmt, tokenizer) == "system: Be brief.\nuser: Hi?\nassistant:"
    assert len(tokenize_records([record], tokenizer, fmt)) == 1


def _arithmetic_chats(count: int) -> list[list[dict]]:
    return [
        [
            {"role": "system", "content": "You add numbers."},
            {"role": "user", "content": f"What is {a} + {a % 7}?"},
            {"role": "assistant", "content": f"{a} + {a % 7} = {a + a % 7}."},
        ]
        for a in range(count)
    ]


@pytest.mark.slow  # a whole in-process federation
def test_a_dp_federation_trains_on_a_chat_file_and_reports_perplexity(tmp_path):
    from fedllm.cli.simulate import simulate
    from fedllm.config import DataConfig, FederationConfig, PrivacyConfig, TrainConfig
    from fedllm.tracking.run_files import read_rounds, read_summary

    data = _chat_file(tmp_path, _arithmetic_chats(180))
    cfg = tiny_config(
        data=DataConfig(name="jsonl", path=str(data), test_size=20, max_length=64, response_template="{response}"),
        federation=FederationConfig(num_clients=3, num_rounds=1, engine="inprocess"),
        train=TrainConfig(objective="token", local_steps=2, batch_size=8),
        privacy=PrivacyConfig(state_dir=str(tmp_path / "nodes")),  # not the shared ~/.fedllm default
    )
    summary = simulate(cfg, tmp_path / "run")
    assert summary.status == "completed" and summary == read_summary(tmp_path / "run")
    assert summary.final_eval_loss is not None and summary.final_max_epsilon is not None
    # issue 29: each round answers a few held-out prompts, the base model's answer beside the adapter's
    rounds = read_rounds(tmp_path / "run")
    assert [len(r.samples) for r in rounds] == [3, 3] and all(r.exact_match is not None for r in rounds)
    assert [s["base"] for s in rounds[1].samples] == [s["generated"] for s in rounds[0].samples]
    assert rounds[1].samples[0]["prompt"].startswith("system: You add numbers.\nuser: What is")


def test_exact_match_compares_normalized_answers():
    from fedllm.evaluation.generation import Sample, exact_match

    samples = [
        Sample(prompt="p", generated="  The answer is 7. ", reference="the answer is 7"),
        Sample(prompt="p", generated="7", reference="The answer is 7."),
    ]
    assert exact_match(samples) == 0.5 and exact_match([]) is None


def _deployed_chat_node(tmp_path: Path, name: str, chats) -> dict:
    from fedllm.federation import records as keys

    folder = tmp_path / name
    folder.mkdir()
    return {
        keys.NODE_PARTITION_ID: 0,
        "state-dir": str(folder / "state"),
        "data-path": str(_chat_file(folder, chats)),
        "max-epsilon": 1e6,  # the cap never binds: only the data differs
        "delta": 1e-5,
        "sampling-size": 100,  # public N: fixes the rate whatever the file holds
        "allowed-models": "tiny",
    }


@pytest.mark.slow  # two DP rounds on a node
def test_a_chat_node_answers_a_hostile_coordinator_alike_for_d_and_d_minus_one_conversation(tmp_path):
    """The coordinator chooses the adapter (large random values) and the format; one conversation
    more or less, or one long conversation in place of a short one, changes nothing it reads
    besides the noised tensors: same metrics, refusal status, tensor names and shapes."""
    import torch

    from fedllm.config import DataConfig, FederationConfig, PrivacyConfig, TrainConfig
    from fedllm.federation import records as keys
    from tests.node_driver import run_round

    chats = _arithmetic_chats(120)
    long_one = [dict(turn) for turn in chats[-1]]
    long_one[1]["content"] = "What is " + " + ".join(["7"] * 400) + "?"  # far past max_length: truncated
    cfg = tiny_config(
        data=DataConfig(name="jsonl", path="ignored-by-a-deployed-node", max_length=48, response_template="{response}"),
        train=TrainConfig(objective="token", local_steps=2, batch_size=8),
        privacy=PrivacyConfig(noise_multiplier=1.0),
        federation=FederationConfig(num_clients=3, num_rounds=1),
    )
    torch.manual_seed(5)
    crafted = {
        k: 10.0 * torch.randn_like(v)  # large, within the node's bound on received entries (100)
        for k, v in task.model_bundle(cfg.model, cfg.lora, cfg.seed).initial_adapter.items()
    }
    seen = []
    for name, data in (("d", chats), ("d-minus-one", chats[:-1]), ("d-long", [*chats[:-1], long_one])):
        reply = run_round(cfg, "probe", 1, node_config=_deployed_chat_node(tmp_path, name, data), arrays=crafted)
        status = dict(reply.content[keys.STATUS]) if keys.STATUS in reply.content.config_records else {}
        tensors = {k: tuple(v.shape) for k, v in reply.content[keys.ARRAYS].items()}
        metrics = {k: v for k, v in dict(reply.content[keys.METRICS]).items() if k != keys.TRAIN_SECONDS}
        seen.append((metrics, status, tensors))
        assert all(torch.isfinite(t).all() for t in reply.content[keys.ARRAYS].to_torch_state_dict().values())
    assert seen[0] == seen[1] == seen[2]
    assert seen[0][0][keys.REFUSED] == 0  # a round trained, not a refusal
