"""A node's ledger cannot be lost or rolled back unnoticed (issue 25, item 7): its anchor, outside the
state directory, records every version written, so a missing or older ledger is refused, never read
as empty; a first start, an honest restart and a crash between the writes all still work."""

from __future__ import annotations

import pytest

from fedllm.errors import ConfigError, LedgerError
from fedllm.node.policy import policy_from_node_config
from fedllm.privacy import node_ledger
from fedllm.privacy.ledger_anchor import LedgerAnchor, default_anchor
from fedllm.privacy.node_ledger import LEDGER_FILE, NodeLedger, Release
from fedllm.privacy.record_keys import ShardContent, content_digest

KEY = bytes(range(32))
CONTENT = ShardContent(fingerprint="fp", digests=tuple(content_digest(f"record {i}", "positive") for i in range(20)))


class _Killed(BaseException):
    """The node process dying at a given point (no handler may catch it)."""


def _release(server_round: int) -> Release:
    return Release(
        run_id="run", server_round=server_round, noise_multiplier=0.8, sample_rate=0.05, steps=5, fingerprint="fp"
    )


def _ledger(tmp_path, key=None) -> NodeLedger:
    return NodeLedger(tmp_path / "state", "data", CONTENT, key=key, anchor=tmp_path / "anchor" / "ledger.jsonl")


def _record(tmp_path, server_round: int, key=None) -> None:
    with _ledger(tmp_path, key).locked() as book:
        book.record(_release(server_round))


@pytest.mark.parametrize("key", [None, KEY], ids=["checksummed", "encrypted"])
def test_a_ledger_rolled_back_to_an_older_authentic_copy_is_refused(tmp_path, key):
    _record(tmp_path, 1, key)
    older = (tmp_path / "state" / LEDGER_FILE).read_bytes()
    _record(tmp_path, 2, key)
    (tmp_path / "state" / LEDGER_FILE).write_bytes(older)  # a backup restored: authentic, one release short
    for read in (lambda: _ledger(tmp_path, key), lambda: _ledger(tmp_path, key).locked().__enter__()):
        with pytest.raises(LedgerError, match="an older copy: version 1 of 2") as refused:
            read()
        assert str(tmp_path / "state" / LEDGER_FILE) in str(refused.value)
        assert str(tmp_path / "anchor" / "ledger.jsonl") in str(refused.value)


@pytest.mark.parametrize("key", [None, KEY], ids=["checksummed", "encrypted"])
def test_a_deleted_ledger_is_refused_not_read_as_empty(tmp_path, key):
    _record(tmp_path, 1, key)
    (tmp_path / "state" / LEDGER_FILE).unlink()
    with pytest.raises(LedgerError, match="missing, but its anchor .* records 1 version") as refused:
        _ledger(tmp_path, key)
    assert "Restore the latest ledger" in str(refused.value) and "move the anchor" in str(refused.value)
    assert not (tmp_path / "state" / LEDGER_FILE).exists()  # nothing recreated in its place


def test_a_first_start_and_an_honest_restart_work(tmp_path):
    assert _ledger(tmp_path).releases == ()  # no anchor, no ledger: a new node
    assert not (tmp_path / "anchor").exists()  # a read writes nothing
    for server_round in (1, 2, 3):
        _record(tmp_path, server_round)  # each a fresh object: a restarted node
    assert [r.server_round for r in _ledger(tmp_path).releases] == [1, 2, 3]
    anchor = LedgerAnchor(tmp_path / "anchor" / "ledger.jsonl", tmp_path / "state" / LEDGER_FILE)
    assert len(anchor.read().committed) == 3


def test_a_crash_after_the_ledger_write_before_its_commit_does_not_brick_the_node(tmp_path, monkeypatch):
    _record(tmp_path, 1)
    older = (tmp_path / "state" / LEDGER_FILE).read_bytes()

    def die(self, data):
        raise _Killed("after the ledger write")

    monkeypatch.setattr(LedgerAnchor, "commit", die)
    with pytest.raises(_Killed):
        _record(tmp_path, 2)
    monkeypatch.undo()
    assert [r.server_round for r in _ledger(tmp_path).releases] == [1, 2]  # the written version is accepted
    with _ledger(tmp_path).locked():  # and committed by the first locked read, before anything is answered
        pass
    (tmp_path / "state" / LEDGER_FILE).write_bytes(older)
    with pytest.raises(LedgerError, match="older copy"):
        _ledger(tmp_path)


def test_a_crash_before_the_ledger_write_leaves_the_previous_version_valid(tmp_path, monkeypatch):
    _record(tmp_path, 1)
    real = node_ledger.atomic_write_bytes

    def die(path, data):
        raise _Killed("after the announcement, before the ledger write")

    monkeypatch.setattr(node_ledger, "atomic_write_bytes", die)
    with pytest.raises(_Killed):
        _record(tmp_path, 2)
    monkeypatch.setattr(node_ledger, "atomic_write_bytes", real)
    assert [r.server_round for r in _ledger(tmp_path).releases] == [1]  # the release never left: not counted
    _record(tmp_path, 2)  # the node goes on
    assert [r.server_round for r in _ledger(tmp_path).releases] == [1, 2]


def test_a_torn_last_line_of_the_anchor_is_a_step_that_never_happened(tmp_path):
    _record(tmp_path, 1)
    anchor = tmp_path / "anchor" / "ledger.jsonl"
    anchor.write_bytes(anchor.read_bytes() + b'{"sha256": "ab')  # a crash mid-append
    assert len(_ledger(tmp_path).releases) == 1
    _record(tmp_path, 2)
    assert len(_ledger(tmp_path).releases) == 2


def test_a_ledger_from_before_anchors_is_adopted_and_an_anchor_in_the_state_dir_is_refused(tmp_path):
    with NodeLedger(tmp_path / "state", "data", CONTENT).locked() as book:  # written without an anchor
        book.record(_release(1))
    assert len(_ledger(tmp_path).releases) == 1  # adopted as it is
    _record(tmp_path, 2)
    with pytest.raises(ConfigError, match="inside the state directory"):
        NodeLedger(tmp_path / "state", "data", anchor=tmp_path / "state" / "anchor.jsonl")
    with pytest.raises(LedgerError, match="not this ledger's anchor"):  # one anchor per ledger
        NodeLedger(tmp_path / "other", "data", anchor=tmp_path / "anchor" / "ledger.jsonl")


def test_the_node_config_names_the_anchor_or_defaults_outside_the_state_dir(tmp_path, monkeypatch):
    deployed = {"state-dir": str(tmp_path / "state"), "max-epsilon": 8, "delta": 1e-5}
    deployed |= {"partition-id": 0, "data-path": "d.jsonl", "sampling-size": 100}
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg"))
    default = policy_from_node_config(deployed).anchor_path()
    assert default == default_anchor(tmp_path / "state") and default.is_relative_to(tmp_path / "xdg" / "fedllm")
    named = policy_from_node_config({**deployed, "ledger-anchor": str(tmp_path / "a.jsonl")})
    assert named.anchor_path() == tmp_path / "a.jsonl"
    simulated = policy_from_node_config({**deployed, "simulated": True}, simulated=True)
    assert simulated.anchor_path() == tmp_path / "state.ledger-anchor"  # beside its state, on the researcher's storage


def test_verify_checks_each_simulated_nodes_ledger_against_its_anchor(tmp_path):
    from fedllm.cli.at_rest import verify_run

    state, anchor = tmp_path / "nodes" / "client-0", tmp_path / "nodes" / "client-0.ledger-anchor"
    for server_round in (1, 2):
        with NodeLedger(state, "data", CONTENT, anchor=anchor).locked() as book:
            book.record(_release(server_round))
        if server_round == 1:
            older = (state / LEDGER_FILE).read_bytes()
    assert "nodes/client-0.ledger-anchor (the ledger is its latest version)" in verify_run(tmp_path, None)
    (state / LEDGER_FILE).write_bytes(older)
    with pytest.raises(LedgerError, match="older copy"):
        verify_run(tmp_path, None)
