"""The node ledger's identity (the dataset as the node names it) and its lock (check + record
atomic across processes), format-1 migration and failure modes."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import time
import types
from pathlib import Path

import pytest

from fedllm.errors import LedgerError
from fedllm.privacy import node_ledger
from fedllm.privacy.accounting import epsilon
from fedllm.privacy.budget import Budget, check_round
from fedllm.privacy.node_ledger import LEDGER_FILE, V1_BACKUP_FILE, NodeLedger, Release, fingerprint
from fedllm.privacy.record_keys import ShardContent, content_digest
from fedllm.storage import with_checksum

NOISE, RATE, STEPS, DELTA = 0.8, 0.02, 5, 1e-5
PRIOR_ROUNDS = 2  # already spent when the racing runs start
RACERS, TRIALS = 3, 3
WINDOW_S = 0.2  # between a run's budget check and its record: where a second run could slip in
SPAWN = multiprocessing.get_context("spawn")  # fresh interpreters: no lock or file state inherited


def _release(run: str, rnd: int, fp: str = "fp-1", steps: int = STEPS) -> Release:
    return Release(run_id=run, server_round=rnd, noise_multiplier=NOISE, sample_rate=RATE, steps=steps, fingerprint=fp)


def _rounds_epsilon(rounds: int) -> float:
    return epsilon([(NOISE, RATE, STEPS * rounds)], delta=DELTA, accountant="rdp")


# the cap admits exactly one more round after the prior ones
CAP = _rounds_epsilon(PRIOR_ROUNDS + 1)


def _seed_ledger(state_dir: Path) -> None:
    with NodeLedger(state_dir, "dataset").locked() as book:
        for rnd in range(1, PRIOR_ROUNDS + 1):
            book.record(_release("earlier-run", rnd))


def _race(phases: list[tuple[bool, list[str]]], barrier, results, racer: int) -> None:
    """One run on the node: per trial of each phase (with the lock, then without), check the
    budget and, if it allows the round, record it. One set of processes races both phases:
    starting interpreters is most of the cost."""
    try:
        for with_lock, state_dirs in phases:
            if not with_lock:  # the same code with flock made a no-op: what the ledger did before issue 12
                node_ledger.fcntl = types.SimpleNamespace(flock=lambda fd, op: None, LOCK_EX=0, LOCK_NB=0, LOCK_UN=0)
            for trial, state_dir in enumerate(state_dirs):
                barrier.wait(timeout=60)
                with NodeLedger(Path(state_dir), "dataset").locked(timeout=60) as book:
                    decision = check_round(
                        book.history(),
                        noise_multiplier=NOISE,
                        sample_rate=RATE,
                        steps=STEPS,
                        budget=Budget(CAP, DELTA),
                        accountant="rdp",
                    )
                    if decision.allowed:
                        # training would start here (the release is reserved first); staggered per run so
                        # that, without the lock, the writes themselves do not collide
                        time.sleep(WINDOW_S * (1 + racer))
                        book.record(_release(f"run-{racer}", 1))
                results.put((with_lock, trial, racer, decision.allowed))
    except BaseException as exc:  # report it instead of leaving the others at the barrier
        barrier.abort()
        results.put(("error", None, racer, repr(exc)))
        raise


@pytest.fixture(scope="module")
def race(tmp_path_factory) -> dict[bool, tuple[list[Path], dict[int, int]]]:
    """``RACERS`` runs racing for the last round of ``TRIALS`` fresh ledgers, with the lock and
    without it: for each, the ledgers and how many runs each trial let through."""
    root = tmp_path_factory.mktemp("race")
    dirs = {lock: [root / f"{'locked' if lock else 'unlocked'}-{t}" for t in range(TRIALS)] for lock in (True, False)}
    for state_dir in [*dirs[True], *dirs[False]]:
        _seed_ledger(state_dir)
    phases = [(lock, [str(d) for d in dirs[lock]]) for lock in (True, False)]
    barrier, results = SPAWN.Barrier(RACERS), SPAWN.Queue()
    procs = [SPAWN.Process(target=_race, args=(phases, barrier, results, r)) for r in range(RACERS)]
    outcomes = []
    try:
        for proc in procs:
            proc.start()
        while len(outcomes) < 2 * RACERS * TRIALS:
            outcomes.append(results.get(timeout=120))
            assert outcomes[-1][0] != "error", outcomes[-1]
        for proc in procs:
            proc.join(timeout=30)
            assert proc.exitcode == 0
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.kill()
    return {
        lock: (
            dirs[lock],
            {t: sum(ok for phase, trial, _, ok in outcomes if phase == lock and trial == t) for t in range(TRIALS)},
        )
        for lock in (True, False)
    }


# slow: both tests start interpreters (multiprocessing spawn), the race's fixture three of them
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_concurrent_runs_on_one_node_never_spend_past_its_cap(race):
    dirs, successes = race[True]
    for trial, state_dir in enumerate(dirs):
        assert successes[trial] == 1  # exactly one run got the last round; the others saw its record
        ledger = NodeLedger(state_dir, "dataset")
        assert len(ledger.releases) == PRIOR_ROUNDS + 1
        assert ledger.epsilon(delta=DELTA, accountant="rdp") <= CAP


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_without_the_lock_the_same_race_overspends(race):
    # the counter-test: it shows the race is real, so the test above would catch a missing lock
    dirs, successes = race[False]
    overspent = [t for t in range(TRIALS) if successes[t] > 1]
    assert overspent, successes  # every run that checked before the first record was let through
    for trial in overspent:
        released = PRIOR_ROUNDS + successes[trial]
        assert _rounds_epsilon(released) > CAP  # what really left the node
        assert len(NodeLedger(dirs[trial], "dataset").releases) < released  # and the ledger lost a release


def test_appending_or_reordering_records_keeps_the_spent_epsilon(tmp_path):
    records = [("great film", "positive"), ("dull", "negative")]
    versions = [records, records + [("one more", "positive")], list(reversed(records))]
    spent = []
    for rnd, data in enumerate(versions, start=1):
        with NodeLedger(tmp_path, "/srv/node/reviews.jsonl").locked() as book:
            spent.append(book.epsilon(delta=DELTA, accountant="rdp"))
            book.record(_release("run", rnd, fp=fingerprint(data)))
    assert spent == [0.0, _rounds_epsilon(1), _rounds_epsilon(2)]  # never a fresh budget
    ledger = NodeLedger(tmp_path, "/srv/node/reviews.jsonl")
    assert [r.fingerprint for r in ledger.releases] == [fingerprint(v) for v in versions]
    assert len(set(ledger.state_dict()["releases"][i]["fingerprint"] for i in range(3))) == 3


def test_record_outside_the_lock_is_refused(tmp_path):
    ledger = NodeLedger(tmp_path, "dataset")
    with pytest.raises(LedgerError, match="outside `with ledger.locked"):
        ledger.record(_release("r", 1))
    with ledger.locked() as book:
        book.record(_release("r", 1))
    with pytest.raises(LedgerError, match="outside"):  # the lock ended with the block
        ledger.record(_release("r", 2))
    assert not NodeLedger(tmp_path, "dataset").find("r", 2)


def test_the_lock_rereads_what_another_run_recorded(tmp_path):
    stale = NodeLedger(tmp_path, "dataset")  # opened before the other run recorded
    with NodeLedger(tmp_path, "dataset").locked() as other:
        other.record(_release("other-run", 1))
    assert stale.history() == []
    with stale.locked() as book:
        assert book.history() == [(NOISE, RATE, STEPS)]
        book.record(_release("this-run", 1))
    assert len(NodeLedger(tmp_path, "dataset").releases) == 2  # nothing overwritten


def test_a_held_lock_times_out_with_a_clear_error(tmp_path):
    holder = NodeLedger(tmp_path, "dataset")
    with holder.locked():
        start = time.monotonic()
        with pytest.raises(LedgerError, match="another run on this node holds its ledger lock"):
            with NodeLedger(tmp_path, "other-dataset").locked(timeout=0.3):  # one lock per state dir
                pass
        assert time.monotonic() - start >= 0.3
        with pytest.raises(LedgerError, match="not re-entrant"):
            with holder.locked():
                pass
    with NodeLedger(tmp_path, "dataset").locked(timeout=0.3):  # released with the block
        pass


def _hold_lock(state_dir: str, held) -> None:
    with NodeLedger(Path(state_dir), "dataset").locked():
        held.set()
        time.sleep(600)


@pytest.mark.slow  # starts an interpreter that holds the lock, then kills it
@pytest.mark.timeout(120)
def test_a_crashed_run_does_not_leave_the_node_locked(tmp_path):
    held = SPAWN.Event()
    proc = SPAWN.Process(target=_hold_lock, args=(str(tmp_path), held))
    proc.start()
    assert held.wait(timeout=60)
    with pytest.raises(LedgerError, match="holds its ledger lock"):
        with NodeLedger(tmp_path, "dataset").locked(timeout=0.2):
            pass
    os.kill(proc.pid, signal.SIGKILL)
    proc.join(timeout=30)
    with NodeLedger(tmp_path, "dataset").locked(timeout=10):
        pass


def _write_v1(state_dir: Path, books: dict[str, list[Release]]) -> bytes:
    datasets = {
        fp: {"releases": [{k: v for k, v in r.to_dict().items() if k != "fingerprint"} for r in rs]}
        for fp, rs in books.items()
    }
    state_dir.mkdir(parents=True, exist_ok=True)
    (state_dir / LEDGER_FILE).write_text(json.dumps(with_checksum({"format": 1, "datasets": datasets})))
    return (state_dir / LEDGER_FILE).read_bytes()


def test_a_format_1_ledger_keeps_every_release_and_its_own_fingerprint_is_claimed(tmp_path):
    original = _write_v1(
        tmp_path,
        {
            "fp-now": [_release("v1-run", 1, "fp-now"), _release("v1-run", 2, "fp-now")],
            "fp-older": [_release("v1-old", 1, "fp-older", steps=3)],
        },
    )
    now = ShardContent("fp-now", frozenset({content_digest("great film", "positive")}))  # the records of fp-now
    ledger = NodeLedger(tmp_path, "reviews", now)
    # before any claim, nothing says whose records the format-1 histories spent: all count
    assert sum(s for _, _, s in ledger.history()) == 2 * STEPS + 3
    with ledger.locked() as book:
        book.record(_release("v2-run", 1, "fp-now"))
    saved = json.loads((tmp_path / LEDGER_FILE).read_text())
    assert saved["format"] == node_ledger.FORMAT_VERSION
    assert [r["run_id"] for r in saved["datasets"]["reviews"]["releases"]] == ["v1-run", "v1-run", "v2-run"]
    assert [r["run_id"] for r in saved["legacy"]["fp-older"]["releases"]] == ["v1-old"]  # kept, not dropped
    assert (tmp_path / V1_BACKUP_FILE).read_bytes() == original
    reopened = NodeLedger(tmp_path, "reviews")
    assert sum(s for _, _, s in reopened.history()) == 3 * STEPS + 3  # the unclaimed one still counts
    other = NodeLedger(tmp_path, "another-dataset", ShardContent.of([("dull", "negative")]))
    assert [r.fingerprint for r in other.releases] == ["fp-older"]  # the claimed history is fp-now's records' now
    assert {r.records for r in reopened.releases if r.fingerprint == "fp-now"} == {
        saved["datasets"]["reviews"]["releases"][0]["records"]
    }


def test_a_format_1_history_of_another_fingerprint_still_counts(tmp_path):
    # the records changed before the upgrade: the old history may well be (mostly) these records
    _write_v1(tmp_path, {"fp-before-append": [_release("v1-run", 1, "fp-before-append")]})
    with NodeLedger(tmp_path, "reviews").locked() as book:
        assert book.epsilon(delta=DELTA, accountant="rdp") == _rounds_epsilon(1)
        book.record(_release("v2-run", 1, "fp-after-append"))
    assert NodeLedger(tmp_path, "reviews").epsilon(delta=DELTA, accountant="rdp") == _rounds_epsilon(2)


def test_state_dict_round_trips_through_json_and_a_reopened_ledger(tmp_path):
    _write_v1(tmp_path, {"fp-old": [_release("v1", 1, "fp-old")]})
    with NodeLedger(tmp_path, "reviews").locked() as book:
        book.record(_release("run", 1, "fp-new"))
        state = json.loads(json.dumps(book.state_dict()))
    assert NodeLedger(tmp_path, "reviews").state_dict() == state
    assert state["dataset_id"] == "reviews"
    restored = [Release.from_dict(entry) for entry in state["releases"]]
    assert restored == list(NodeLedger(tmp_path, "reviews").releases)
    assert [r.fingerprint for r in restored] == ["fp-old", "fp-new"]


@pytest.mark.parametrize(
    "payload, match",
    [
        ({"format": 4, "datasets": {}, "legacy": {}}, "format 4"),
        ({"format": 2, "datasets": {"d": {"releases": [{"run_id": "r"}]}}, "legacy": {}}, "expected"),
        (
            {
                "format": 2,
                "datasets": {"d": {"releases": [{**_release("r", 1).to_dict(), "steps": "5"}]}},
                "legacy": {},
            },
            "steps",
        ),
        ({"format": 2, "datasets": {}}, "legacy"),
    ],
)
def test_a_ledger_that_cannot_be_understood_is_an_error(tmp_path, payload, match):
    (tmp_path / LEDGER_FILE).write_text(json.dumps(with_checksum(payload)))  # a valid checksum, still refused
    with pytest.raises(LedgerError, match=match):
        NodeLedger(tmp_path, "d")


def test_an_unwritable_state_dir_is_a_ledger_error(tmp_path):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    with pytest.raises(LedgerError, match="lock file"):
        with NodeLedger(blocker, "d").locked():
            pass
