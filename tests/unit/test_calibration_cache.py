"""Noise calibrations remembered across processes: reused only when the accountant confirms them."""

from __future__ import annotations

import dataclasses
import json

import pytest

from fedllm.privacy import calibration, calibration_cache
from fedllm.privacy.accounting import epsilon

MECHANISM = dict(target_epsilon=8.0, delta=1e-5, sample_rate=1 / 11, steps=2, accountant="rdp")
QUESTION = calibration_cache.Calibration(**MECHANISM, tolerance=calibration.TOLERANCE)


@pytest.fixture(scope="module")
def honest() -> float:
    """Opacus's real search for :data:`MECHANISM`, once for the module."""
    return calibration.search_noise(**MECHANISM)


@pytest.fixture
def fresh(tmp_path, monkeypatch, honest):
    """An empty cache root and no calibration remembered in this process; the search (tested on its
    own by the pinned plans) answers :func:`honest`'s value, and every call of it is counted."""
    monkeypatch.setenv("FEDLLM_CACHE", str(tmp_path))
    calibration.calibrate_noise.cache_clear()
    searches: list[dict] = []

    def counted(**kwargs):
        searches.append(kwargs)
        assert kwargs == MECHANISM
        return honest

    monkeypatch.setattr(calibration, "search_noise", counted)
    yield searches
    calibration.calibrate_noise.cache_clear()


def _entries() -> dict:
    return json.loads(calibration_cache.cache_file().read_text())


@pytest.mark.slow  # seconds each: kept out of the fast tier (make test runs it)
def test_a_second_process_reuses_the_search_and_gets_the_same_noise(fresh, honest):
    first = calibration.calibrate_noise(**MECHANISM)
    assert first == honest
    assert len(fresh) == 1 and list(_entries().values()) == [first]
    calibration.calibrate_noise.cache_clear()  # what a new process starts with
    assert calibration.calibrate_noise(**MECHANISM) == first and len(fresh) == 1
    reached = epsilon([(first, MECHANISM["sample_rate"], MECHANISM["steps"])], delta=1e-5, accountant="rdp")
    assert 8.0 - calibration.TOLERANCE <= reached <= 8.0


@pytest.mark.parametrize("factor", [0.5, 0.999, 2.0])
def test_an_edited_entry_is_searched_again_and_replaced(fresh, honest, factor):
    # lower noise would overspend the target; higher noise would cost utility for nothing
    assert calibration.calibrate_noise(**MECHANISM) == honest
    (key,) = _entries()
    calibration_cache.store(QUESTION, honest * factor)
    calibration.calibrate_noise.cache_clear()
    assert calibration.calibrate_noise(**MECHANISM) == honest and len(fresh) == 2
    assert _entries()[key] == honest


@pytest.mark.parametrize("content", ["not json", "[1, 2]", '{"%s": "0.5"}', '{"%s": -1}', '{"%s": NaN}'])
def test_an_unusable_cache_is_an_empty_one(fresh, content):
    key = QUESTION.key()
    calibration_cache.cache_file().parent.mkdir(parents=True, exist_ok=True)
    calibration_cache.cache_file().write_text(content.replace("%s", key) if "%s" in content else content)
    noise = calibration.calibrate_noise(**MECHANISM)
    assert len(fresh) == 1 and _entries()[key] == noise


def test_the_key_tells_apart_everything_the_answer_depends_on():
    changes = [
        {"target_epsilon": 3.0},
        {"delta": 1e-6},
        {"sample_rate": 1 / 12},
        {"steps": 3},
        {"accountant": "prv"},
        {"tolerance": 0.02},
    ]
    keys = {dataclasses.replace(QUESTION, **change).key() for change in changes}
    assert QUESTION.key() not in keys and len(keys) == len(changes)
    assert "opacus=" in QUESTION.key()


def test_a_coordinator_varying_its_requests_cannot_grow_the_nodes_cache(tmp_path, monkeypatch):
    # every target a task config names is a new question the node searches and stores
    monkeypatch.setenv("FEDLLM_CACHE", str(tmp_path))
    questions = [
        dataclasses.replace(QUESTION, target_epsilon=1.0 + i / 1000) for i in range(calibration_cache.MAX_ENTRIES + 5)
    ]
    for i, question in enumerate(questions):
        calibration_cache.store(question, 1.0 + i)
    entries = _entries()
    assert len(entries) == calibration_cache.MAX_ENTRIES
    assert list(entries) == [q.key() for q in questions[5:]]  # the oldest went first
    calibration_cache.store(questions[5], 99.0)  # stored again: the newest now
    assert list(_entries())[-1] == questions[5].key() and len(_entries()) == calibration_cache.MAX_ENTRIES
