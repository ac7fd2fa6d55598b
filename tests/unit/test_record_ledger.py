"""The node ledger keyed by record (issue 23, item 4): what counts as the same record, keyed
names, the worst record over crossing histories, and migration from a format-2 ledger."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import dp_accounting
import pytest

from fedllm.data.sources import load_records
from fedllm.errors import LedgerError
from fedllm.privacy import node_ledger
from fedllm.privacy.accounting import epsilon, extend_history
from fedllm.privacy.node_ledger import LEDGER_FILE, NodeLedger, Release
from fedllm.privacy.record_keys import (
    SALT_FILE,
    ShardContent,
    content_digest,
    load_salt,
    record_names,
)
from fedllm.storage import is_sealed

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "ledger_format2" / LEDGER_FILE
DELTA = 1e-5
KEY = bytes(range(32))


def _release(run: str, rnd: int, noise: float, rate: float, steps: int, fp: str = "") -> Release:
    return Release(run_id=run, server_round=rnd, noise_multiplier=noise, sample_rate=rate, steps=steps, fingerprint=fp)


# ---------------------------------------------------------------- what counts as the same record


def test_the_same_record_is_the_same_normalised_pair():
    base = content_digest("Caf\u00e9 scene was dull", "negative")
    assert content_digest("Cafe\u0301 scene was dull", "negative") == base  # NFD as some editors save it
    assert content_digest("  Caf\u00e9 scene was dull\n", " negative\t") == base  # surrounding whitespace
    for prompt, response in [
        ("Caf\u00e9 scene  was dull", "negative"),  # inner whitespace: an edit
        ("caf\u00e9 scene was dull", "negative"),  # case: an edit
        ("Caf\u00e9 scene was dul", "negative"),  # a fixed typo: a new record
        ("negative", "Caf\u00e9 scene was dull"),  # prompt and response are not interchangeable
        ("Caf\u00e9 scene was dull negative", ""),  # no ambiguous join
    ]:
        assert content_digest(prompt, response) != base, (prompt, response)


def test_jsonl_and_a_reordered_csv_export_with_other_field_names_are_the_same_records(tmp_path):
    rows = [("great film", "positive"), ("Cafe\u0301 was dull ", "negative"), ("fine cast", "positive")]
    jsonl = tmp_path / "reviews.jsonl"
    jsonl.write_text("".join(json.dumps({"prompt": p, "response": r}) + "\n" for p, r in rows), encoding="utf-8")
    exported = tmp_path / "export" / "Reviews Final.csv"
    exported.parent.mkdir()
    with exported.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["answer", "question"])
        writer.writerows([r, p.strip()] for p, r in reversed(rows))
    first = ShardContent.of((r.prompt, r.response) for r in load_records(jsonl, "auto", "prompt", "response"))
    second = ShardContent.of((r.prompt, r.response) for r in load_records(exported, "auto", "question", "answer"))
    assert first.digests == second.digests and len(first.digests) == 3
    assert first.fingerprint != second.fingerprint  # the whole-file fingerprint is only information


def test_the_ledger_file_names_records_only_by_a_keyed_hash(tmp_path):
    content = ShardContent.of([("a secret diagnosis", "yes"), ("another record", "no")])
    with NodeLedger(tmp_path, "d", content).locked() as book:
        book.record(_release("r", 1, 1.0, 0.1, 5, content.fingerprint))
    text = (tmp_path / LEDGER_FILE).read_text()
    salt = load_salt(tmp_path, None)
    assert salt is not None and len(salt) == 32
    names = record_names(salt, content.digests)
    assert all(name in text and len(name) == 32 for name in names)
    # neither the text nor its unkeyed digest: a guessed record cannot be tested against the file alone
    assert "secret diagnosis" not in text and not any(d.hex()[:32] in text for d in content.digests)
    assert record_names(bytes(32), content.digests).isdisjoint(names)  # another salt, other names


def test_a_lost_or_swapped_salt_is_an_error_never_a_fresh_budget(tmp_path):
    content = ShardContent.of([("a", "b")])
    with NodeLedger(tmp_path, "d", content).locked() as book:
        book.record(_release("r", 1, 1.0, 0.1, 5, content.fingerprint))
    kept = (tmp_path / SALT_FILE).read_bytes()
    (tmp_path / SALT_FILE).unlink()
    with pytest.raises(LedgerError, match="salt is missing"):
        NodeLedger(tmp_path, "d", content)
    other = tmp_path / "other"
    with NodeLedger(other, "d", content).locked() as book:  # a second state dir: its own salt
        book.record(_release("r", 1, 1.0, 0.1, 5, content.fingerprint))
    shutil.copy(other / SALT_FILE, tmp_path / SALT_FILE)
    with pytest.raises(LedgerError, match="not the one the ledger was written with"):
        NodeLedger(tmp_path, "d", content)
    (tmp_path / SALT_FILE).write_bytes(kept)
    assert NodeLedger(tmp_path, "d", content).history() == [(1.0, 0.1, 5)]


def test_with_a_storage_key_the_salt_is_sealed_too(tmp_path):
    content = ShardContent.of([("a", "b")])
    with NodeLedger(tmp_path, "d", content, key=KEY).locked() as book:
        book.record(_release("r", 1, 1.0, 0.1, 5, content.fingerprint))
    assert is_sealed((tmp_path / SALT_FILE).read_bytes()) and is_sealed((tmp_path / LEDGER_FILE).read_bytes())
    with pytest.raises(LedgerError):
        load_salt(tmp_path, None)
    assert NodeLedger(tmp_path, "d", content, key=KEY).history() == [(1.0, 0.1, 5)]


# ---------------------------------------------------------------- the worst record


R1, R2, R3, U = (0.8, 0.02, 50), (1.5, 0.1, 100), (0.6, 0.01, 30), (1.0, 0.05, 10)  # (noise, rate, steps)


def _dp_accounting_rdp(*mechanisms: tuple[float, float, int]) -> float:
    """Epsilon of the composition, by dp-accounting (independent of Opacus and of the ledger)."""
    accountant = dp_accounting.rdp.RdpAccountant()
    for noise, rate, steps in mechanisms:
        event = dp_accounting.PoissonSampledDpEvent(rate, dp_accounting.GaussianDpEvent(noise))
        accountant.compose(dp_accounting.SelfComposedDpEvent(event, steps))
    return accountant.get_epsilon(DELTA)


def _crossing_ledger(tmp_path: Path, records: dict[str, tuple[str, str]]) -> None:
    """Releases R1 on {a, b}, R2 on {b, c}, R3 on {c} and U naming no records (a format-2 release)."""
    for rnd, (members, (noise, rate, steps)) in enumerate([("ab", R1), ("bc", R2), ("c", R3)], start=1):
        content = ShardContent.of(records[m] for m in members)
        with NodeLedger(tmp_path, f"file-{rnd}", content).locked() as book:
            book.record(_release("run", rnd, noise, rate, steps, content.fingerprint))
    with NodeLedger(tmp_path, "old").locked() as book:  # no content: charged to every record
        book.record(_release("old-run", 1, *U))


@pytest.mark.slow  # seconds each: kept out of the fast tier (make test runs it)
def test_a_datasets_epsilon_is_its_worst_records_composed_history(tmp_path, monkeypatch):
    records = {m: (f"record {m}", "positive") for m in "abcd"}
    _crossing_ledger(tmp_path, records)
    ledger = NodeLedger(tmp_path, "now", ShardContent.of(records.values()))  # d never trained on
    per_record = {"a": [R1, U], "b": [R1, R2, U], "c": [R2, R3, U], "d": [U]}
    expected = {m: epsilon(_compose(h), delta=DELTA, accountant="rdp") for m, h in per_record.items()}
    for name, mechanisms in per_record.items():  # the existing accountant agrees with dp-accounting
        assert expected[name] == pytest.approx(_dp_accounting_rdp(*mechanisms), rel=2e-3)
    assert sorted(g.records for g in ledger.groups()) == [1, 1, 1, 1]
    worst = max(expected.values())
    assert ledger.epsilon(delta=DELTA, accountant="rdp") == worst
    assert worst == pytest.approx(max(_dp_accounting_rdp(*h) for h in per_record.values()), rel=2e-3)
    assert epsilon(ledger.worst_history(delta=DELTA, accountant="rdp"), delta=DELTA, accountant="rdp") == worst
    # one accountant call per distinct history, however many records share it
    many = {**records, **{f"b{i}": (f"record b{i}", "x") for i in range(200)}}  # new records: one group
    calls = []
    monkeypatch.setattr(node_ledger, "epsilon", lambda h, **kw: calls.append(h) or epsilon(h, **kw))
    assert NodeLedger(tmp_path, "now", ShardContent.of(many.values())).epsilon(delta=DELTA, accountant="rdp") == worst
    assert len(calls) == 4


def test_the_worst_record_is_ranked_after_the_round_about_to_run(tmp_path):
    # crossing histories can rank differently before and after a round (found by a small search):
    # one full-batch step at noise 0.9 against 3000 steps at rate 0.02 and noise 1.2
    full, long = (0.9, 1.0, 1), (1.2, 0.02, 3000)
    records = {"x": ("record x", "positive"), "y": ("record y", "negative")}
    for name, (noise, rate, steps) in (("x", full), ("y", long)):
        content = ShardContent.of([records[name]])
        with NodeLedger(tmp_path, name, content).locked() as book:
            book.record(_release("run", 1, noise, rate, steps, content.fingerprint))
    ledger = NodeLedger(tmp_path, "both", ShardContent.of(records.values()))
    then = (0.8, 0.05, 200)

    def after(history):
        extended = extend_history(history, noise_multiplier=then[0], sample_rate=then[1], steps=then[2])
        return epsilon(extended, delta=DELTA, accountant="rdp")

    assert epsilon([long], delta=DELTA, accountant="rdp") > epsilon([full], delta=DELTA, accountant="rdp")
    assert after([full]) > after([long])  # the order flips
    assert ledger.epsilon(delta=DELTA, accountant="rdp") == epsilon([long], delta=DELTA, accountant="rdp")
    assert ledger.worst_history(delta=DELTA, accountant="rdp") == [long]
    assert ledger.worst_history(delta=DELTA, accountant="rdp", then=then) == [full]  # what the cap bounds


def _compose(mechanisms) -> list[tuple[float, float, int]]:
    history: list[tuple[float, float, int]] = []
    for noise, rate, steps in mechanisms:
        history = extend_history(history, noise_multiplier=noise, sample_rate=rate, steps=steps)
    return history


# ---------------------------------------------------------------- migration from format 2

REVIEWS = [("great film", "positive"), ("dull", "negative"), ("a fine cast", "positive")]  # make_fixture.py
OTHER = [("the hospital opened a ward", "news")]
RUN_A, RUN_B, V1 = (0.8, 0.02, 5), (1.3, 0.02, 4), (1.1, 0.05, 3)


def test_a_format_2_ledger_written_by_the_previous_fedllm_loses_no_release(tmp_path):
    shutil.copy(FIXTURE, tmp_path / LEDGER_FILE)
    everything = epsilon(_compose([V1, RUN_B, RUN_A, RUN_A]), delta=DELTA, accountant="rdp")
    for records in (REVIEWS, OTHER, [("a record never seen", "x")]):
        # nothing says which records a format-2 release spent: each counts for every record of every dataset
        ledger = NodeLedger(tmp_path, "/anywhere/renamed.csv", ShardContent.of(records))
        assert ledger.recorded == 4 and len(ledger.releases) == 4
        assert ledger.epsilon(delta=DELTA, accountant="rdp") == pytest.approx(everything, rel=1e-12)
    # the reviews come back (moved, as CSV): the releases of exactly these records are claimed for them
    moved = ShardContent.of(REVIEWS)
    with NodeLedger(tmp_path, "/data/reviews.csv", moved).locked() as book:
        book.record(_release("run-c", 1, *RUN_A, moved.fingerprint))
    saved = json.loads((tmp_path / LEDGER_FILE).read_text())
    assert saved["format"] == node_ledger.FORMAT_VERSION and len(saved["record_sets"]) == 1
    assert NodeLedger(tmp_path, "x").recorded == 5  # every release kept, one added
    [set_id] = saved["record_sets"]
    old_reviews = saved["datasets"]["/srv/node/reviews.jsonl"]["releases"]
    assert [r["records"] for r in old_reviews] == [set_id, set_id]  # claimed, still filed under the old name
    assert saved["datasets"]["/srv/node/other.jsonl"]["releases"][0]["records"] == ""  # not claimed yet: for all
    assert saved["legacy"]["fp-of-a-lost-version"]["releases"][0]["records"] == ""  # format 1, kept
    reviews = NodeLedger(tmp_path, "y", ShardContent.of(REVIEWS)).epsilon(delta=DELTA, accountant="rdp")
    assert reviews == pytest.approx(epsilon(_compose([V1, RUN_B, RUN_A, RUN_A, RUN_A]), delta=DELTA, accountant="rdp"))
    other = NodeLedger(tmp_path, "z", ShardContent.of(OTHER)).epsilon(delta=DELTA, accountant="rdp")
    assert other == pytest.approx(epsilon(_compose([V1, RUN_B]), delta=DELTA, accountant="rdp"))
    # the fixture itself is the previous format (a regenerated file would be format 3)
    assert json.loads(FIXTURE.read_text())["format"] == 2
