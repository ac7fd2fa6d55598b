"""The review-writing task (data=rt_reviews): its loader, preset, per-token perplexity and generations."""

from __future__ import annotations

import bz2
import dataclasses
import importlib.util
import math
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

from fedllm import task
from fedllm.config import ExperimentConfig, LoraSettings, ModelConfig, compose_experiment
from fedllm.data.formatting import IGNORE_INDEX, PromptFormat, choice_token_ids, tokenize_records
from fedllm.data.sources import Record, load_rt_reviews, movie_title
from fedllm.errors import ConfigError, DataError
from fedllm.evaluation.generation import generate, generate_samples, sample_records
from fedllm.evaluation.metrics import evaluate, mean_stderr, ratio_stderr
from fedllm.model.base import load_model
from fedllm.model.lora import apply_lora

ROOT = Path(__file__).resolve().parents[2]
CONF = ROOT / "conf"
FMT = PromptFormat(prompt_template="{prompt}\nReview:", response_template=" {response}", max_length=96)


@pytest.fixture(scope="module")
def bundle():
    return task.model_bundle(ModelConfig(source="tiny"), LoraSettings(), 0)


@pytest.fixture(scope="module")
def sharp(bundle):
    """A tiny model of its own (not the shared cached one) whose predictions are far from uniform:
    its tied embeddings scaled up, so records differ in per-token loss and averages can be told apart."""
    model = apply_lora(load_model(ModelConfig(source="tiny"), vocab_size=len(bundle.tokenizer), seed=1), LoraSettings())
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(8.0)
    return model


# --- loader -------------------------------------------------------------------------------------


def test_reviews_come_from_the_packaged_corpus_as_instructions_and_snippets():
    records = load_rt_reviews()
    assert len(records) == 12_808 - 18  # labelled snippets, less the corpus's 18 exact copies
    assert records[0] == Record(
        "Write a positive review of the movie A Grin Without A Cat.", "A three-hour cinema master class."
    )
    sentiments = Counter(r.prompt.split()[2] for r in records)
    assert set(sentiments) == {"positive", "negative"} and sentiments["positive"] > sentiments["negative"]
    assert all(
        r.prompt.startswith("Write a ") and r.prompt.endswith(".") and r.response.strip() == r.response and r.response
        for r in records
    )
    assert len({r.prompt.split(" movie ", 1)[1] for r in records}) == 508  # every movie kept
    assert len(load_rt_reviews(duplicates="keep")) == 12_808


def test_titles_are_readable_and_a_missing_movie_has_none():
    assert movie_title("a_grin_without_a_cat") == "A Grin Without A Cat"
    assert movie_title("s1m0ne") == "S1m0ne"  # str.title would give "S1M0Ne"
    assert movie_title(float("nan")) == "" and movie_title("  ") == ""


def _corpus(tmp_path, rows, header="category,text,movie_name"):
    path = tmp_path / "corpus.csv.bz2"
    path.write_bytes(bz2.compress(("\n".join([header, *rows]) + "\n").encode()))
    return path


def test_rows_are_skipped_as_the_sentiment_loader_skips_them(tmp_path):
    path = _corpus(
        tmp_path,
        [
            "plot,A summary.,film_one",
            "fresh,,film_one",
            "rotten,   ,film_one",
            "fresh,Lovely.,",
            "rotten, Dull. ,film_two",
            "fresh,Fine.,film_two",
        ],
    )
    assert load_rt_reviews(path) == [
        Record("Write a negative review of the movie Film Two.", "Dull."),
        Record("Write a positive review of the movie Film Two.", "Fine."),
    ]


def test_a_missing_column_names_the_file_and_column(tmp_path):
    path = _corpus(tmp_path, ["fresh,SECRET REVIEW"], header="category,text")
    with pytest.raises(DataError, match=r"corpus\.csv\.bz2: missing column movie_name") as error:
        load_rt_reviews(path)
    assert "SECRET" not in str(error.value)


def test_an_unreadable_corpus_is_a_data_error(tmp_path):
    path = tmp_path / "corpus.csv.bz2"
    path.write_text("not bz2 at all")
    with pytest.raises(DataError, match=r"corpus\.csv\.bz2: cannot read the Rotten Tomatoes corpus"):
        load_rt_reviews(path)


def test_copies_follow_the_duplicates_policy_without_quoting_the_record(tmp_path, caplog):
    path = _corpus(tmp_path, ["fresh,SECRET,film", "fresh,other,film", "fresh,SECRET,film"])
    with caplog.at_level("WARNING", logger="fedllm.data.sources"):
        assert len(load_rt_reviews(path)) == 2
    assert "1 duplicate records" in caplog.text and "records 2" in caplog.text and "SECRET" not in caplog.text
    with pytest.raises(DataError, match="record 2: the same prompt and response as .*record 0") as error:
        load_rt_reviews(path, duplicates="refuse")
    assert "SECRET" not in str(error.value)


# --- preset -------------------------------------------------------------------------------------


def test_the_preset_composes_a_generative_task_with_the_token_objective():
    cfg = compose_experiment(["data=rt_reviews"], CONF)
    assert (cfg.data.name, cfg.data.choices, cfg.train.objective) == ("rt_reviews", (), "token")
    assert (cfg.data.test_size, cfg.data.max_length) == (500, 96)
    assert cfg.train.lr == compose_experiment([], CONF).train.lr  # only the objective changes
    smoke = compose_experiment(["data=rt_reviews", "debug=smoke", "train.lr=0.003"], CONF)
    assert (smoke.model.kind, smoke.data.test_size, smoke.train.objective, smoke.train.lr) == (
        "tiny",
        100,
        "token",
        0.003,
    )
    default = compose_experiment([], CONF)  # the sentiment task keeps its fixed-answer objective
    assert (default.data.name, default.train.objective) == ("rotten_tomatoes", "choices")


def test_the_fixed_answer_objective_on_free_form_data_says_what_to_set():
    expected = "train.objective: objective=choices needs data.choices.*use train.objective=token"
    with pytest.raises(ConfigError, match=expected):
        compose_experiment(["data=rt_reviews", "train.objective=choices"], CONF)


@pytest.mark.slow  # slow tier: tokenizes the whole corpus
def test_the_preset_max_length_fits_every_record(bundle):
    data = compose_experiment(["data=rt_reviews"], CONF).data
    fmt = dataclasses.replace(task.prompt_format(data), overlong="refuse")
    dataset = tokenize_records(load_rt_reviews(), bundle.tokenizer, fmt)  # raises on any overlong record
    assert dataset.truncated == 0 and max(len(item[0]) for item in dataset) <= data.max_length


def test_the_config_round_trips_for_a_node():
    cfg = compose_experiment(["data=rt_reviews"], CONF)
    assert ExperimentConfig.from_json(cfg.to_json()) == cfg


# --- perplexity ---------------------------------------------------------------------------------


def _records():
    # answers of very different lengths: a per-record mean and a per-token mean then differ
    return [
        Record("Write a positive review of the movie Up.", "Fine."),
        Record(
            "Write a negative review of the movie Down.",
            "A long, tedious and thoroughly confused picture that never finds its footing at all.",
        ),
        Record("Write a positive review of the movie Side.", "A quiet, lovely film about memory."),
    ]


def _per_record_nll(model, dataset) -> list[tuple[float, int]]:
    """Independently: each record alone (no padding), log-softmax in float64, answer tokens only."""
    out = []
    with torch.no_grad():
        for ids, labels, _ in dataset:
            logp = torch.log_softmax(model(input_ids=ids[None]).logits[0].double(), dim=-1)
            targets = [t for t in range(1, len(ids)) if labels[t] != IGNORE_INDEX]
            out.append((-sum(float(logp[t - 1, ids[t]]) for t in targets), len(targets)))
    return out


def test_perplexity_is_per_answer_token_over_all_records(bundle, sharp):
    dataset = tokenize_records(_records(), bundle.tokenizer, FMT)
    result = evaluate(sharp, dataset, bundle.pad_id, [], batch_size=2, bf16=False)  # padding exercised
    nll = _per_record_nll(sharp, dataset)
    total, tokens = sum(s for s, _ in nll), sum(c for _, c in nll)
    assert result.tokens == tokens and result.examples == 3
    assert result.loss == pytest.approx(total / tokens, rel=1e-5)
    assert result.perplexity == pytest.approx(math.exp(total / tokens), rel=1e-4)
    per_record_mean = sum(s / c for s, c in nll) / len(nll)
    # the two averages differ far more than the tolerance above: the test tells them apart
    assert abs(per_record_mean - result.loss) > 500 * 1e-5 * result.loss
    # the ratio estimator's standard error over records, and the delta method for perplexity
    loss = total / tokens
    expected = math.sqrt(sum((s - loss * c) ** 2 for s, c in nll) / (3 * 2)) / (tokens / 3)
    assert result.loss_stderr == pytest.approx(expected, rel=1e-4)
    assert result.perplexity_stderr == pytest.approx(result.perplexity * expected, rel=1e-4)


def test_the_fixed_answer_evaluation_is_still_the_mean_over_records(bundle, sharp):
    fmt = PromptFormat(
        prompt_template="Review: {prompt}\nSentiment:",
        response_template=" {response}",
        max_length=64,
        choices=("positive", "negative"),
    )
    records = [Record("Great.", "positive"), Record("Awful and long-winded.", "negative"), Record("Meh.", "negative")]
    dataset = tokenize_records(records, bundle.tokenizer, fmt)
    ids = choice_token_ids(bundle.tokenizer, fmt)
    result = evaluate(sharp, dataset, bundle.pad_id, ids, batch_size=2, bf16=False)
    losses, correct = [], 0
    with torch.no_grad():
        for item_ids, labels, choice in dataset:
            prompt = item_ids[labels == IGNORE_INDEX]
            scores = sharp(input_ids=prompt[None]).logits[0, -1, ids].double()
            losses.append(float(-torch.log_softmax(scores, dim=0)[choice]))
            correct += int(scores.argmax() == choice)
    assert result.loss == pytest.approx(sum(losses) / 3, rel=1e-5) and result.accuracy == correct / 3
    assert result.tokens is None
    mean = sum(losses) / 3
    assert result.loss_stderr == pytest.approx(math.sqrt(sum((x - mean) ** 2 for x in losses) / 2 / 3), rel=1e-4)


def test_standard_errors_by_hand():
    # sums 1 and 6 over 1 and 2 tokens: L = 7/3, residuals -4/3 and 4/3, sqrt((32/9) / 2) / 1.5 = 8/9
    loss, stderr = ratio_stderr(torch.tensor([1.0, 6.0]), torch.tensor([1, 2]))
    assert loss == pytest.approx(7 / 3) and stderr == pytest.approx(8 / 9)
    assert ratio_stderr(torch.tensor([2.0]), torch.tensor([4]))[1] is None
    mean, stderr = mean_stderr(torch.tensor([1.0, 2.0, 3.0]))
    assert mean == pytest.approx(2.0) and stderr == pytest.approx(1 / math.sqrt(3))


# --- generation ---------------------------------------------------------------------------------


def test_greedy_generation_returns_text_deterministically_and_restores_the_mode(bundle, sharp):
    records = sample_records(_records() + _records(), 2)
    sharp.train()
    samples = generate_samples(sharp, bundle.tokenizer, records, FMT, max_new_tokens=8)
    assert sharp.training
    assert [s.prompt for s in samples] == [r.prompt for r in records]
    assert [s.reference for s in samples] == [r.response for r in records]
    assert all(isinstance(s.generated, str) and s.generated for s in samples)
    again = generate_samples(sharp, bundle.tokenizer, records, FMT, max_new_tokens=8)
    assert [s.generated for s in again] == [s.generated for s in samples]  # greedy: no sampling
    assert set(samples[0].to_dict()) == {"prompt", "generated", "reference"}


def test_generation_is_bounded_by_max_new_tokens(bundle, sharp):
    short, long = (
        generate(sharp, bundle.tokenizer, ["Write a review.\nReview:"], max_new_tokens=n)[0] for n in (2, 12)
    )
    assert long.startswith(short) and len(long) > len(short)
    with pytest.raises(ValueError, match="max_new_tokens=0"):
        generate(sharp, bundle.tokenizer, ["x"], max_new_tokens=0)


def test_sample_records_takes_the_first_distinct_prompts_in_order():
    records = [Record("a", "1"), Record("a", "2"), Record("b", "3"), Record("c", "4")]
    assert sample_records(records, 2) == [Record("a", "1"), Record("b", "3")]
    assert sample_records(records, 10) == [Record("a", "1"), Record("b", "3"), Record("c", "4")]


# --- the benchmark preset -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_utility", ROOT / "scripts" / "bench_utility.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_utility"] = module  # dataclasses look their module up while being built
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow  # seconds each: kept out of the fast tier (make test runs it)
def test_the_reviews_table_runs_every_row_on_the_generative_task(bench):
    args = bench.parse_args(["--task", "reviews"])
    names = args.presets.split(",")
    assert names[0] == "nonprivate" and {
        "dp_eps1",
        "dp_eps3",
        "dp_eps8",
        "ffa_dp_eps1",
        "ffa_dp_eps3",
        "ffa_dp_eps8",
    } <= set(names)
    for name in names:
        overrides = bench.overrides_for(bench.PRESETS[name], "embedded", 10, 3, 5, [], bench.TASKS["reviews"].overrides)
        assert "data=rt_reviews" in overrides
        compose_experiment(overrides, CONF)  # each row composes
    assert bench.parse_args([]).presets == bench.DEFAULT_PRESETS  # the sentiment table is unchanged


def test_the_reviews_table_refuses_runs_that_disagree_on_zero_shot(bench):
    figures = {
        "perplexity": 50.0,
        "perplexity_se": 1.0,
        "loss": math.log(50),
        "loss_se": 0.02,
        "tokens": 10,
        "examples": 2,
        "samples": [],
    }
    row = bench.zero_shot_review_row([{"zero_shot_perplexity": 50.0}], figures)
    assert row["final_perplexity"] == 50.0 and row["perplexity_se"] == 1.0
    with pytest.raises(SystemExit, match="disagree"):
        bench.zero_shot_review_row([{"zero_shot_perplexity": 50.0}, {"zero_shot_perplexity": 51.0}], figures)
    with pytest.raises(SystemExit, match="base model scores"):
        bench.zero_shot_review_row([{"zero_shot_perplexity": 60.0}], figures)
