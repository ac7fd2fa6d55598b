"""A node runs only the code its operator installed (issue 24): the content hash of fedllm's files,
computed identically from an app bundle (FAB) and from the installed package, and the node's
accept/refuse decision on the bundle the coordinator submits (``fedllm node run``)."""

from __future__ import annotations

import io
import json
import logging
import shutil
import zipfile
from pathlib import Path

import pytest
from flwr.cli.build import build_fab_from_disk
from flwr.supercore.fab import Fab

import fedllm
from fedllm.cli.main import main
from fedllm.errors import ConfigError
from fedllm.federation import records as keys
from fedllm.node.app_check import (
    APPROVED,
    CLIENTAPP,
    COMPONENT,
    DIFFERS,
    IDENTICAL,
    UNREADABLE,
    app_hash,
    approved_hashes,
    check_app,
    installed_digests,
    read_bundle,
)
from fedllm.node.release import Refusal
from tests.node_driver import node_context, query_message, train_message

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = Path(fedllm.__file__).resolve().parent
PYPROJECT = (ROOT / "pyproject.toml").read_text()
GUARD = "fedllm/node/guard.py"


def make_fab(package: Path = PACKAGE, pyproject: str = PYPROJECT, separator: str = "/", extra=()) -> bytes:
    """A FAB as `flwr build` lays it out (package files under ``fedllm/``, ``pyproject.toml``), in memory."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("pyproject.toml", pyproject)
        for file in sorted(package.rglob("*")):
            if file.is_file():
                archive.writestr(separator.join(("fedllm", *file.relative_to(package).parts)), file.read_bytes())
        for name, data in extra:
            archive.writestr(name, data)
    return buffer.getvalue()


@pytest.fixture
def copied_package(tmp_path) -> Path:
    """A copy of the installed package, to edit."""
    copy = tmp_path / "fedllm"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    return copy


@pytest.mark.slow  # slow tier: Flower builds a bundle of the whole repository
def test_the_hash_is_the_same_from_a_flwr_build_bundle_and_from_the_installed_package():
    fab = build_fab_from_disk(ROOT)  # Flower's own file selection (fab-include, .gitignore)
    assert app_hash(read_bundle(fab).digests) == app_hash(installed_digests())
    assert app_hash(installed_digests()).startswith("sha256:") and len(app_hash(installed_digests())) == 71


def test_separators_and_bytecode_caches_do_not_change_the_hash(copied_package):
    (copied_package / "node" / "__pycache__").mkdir()
    (copied_package / "node" / "__pycache__" / "guard.cpython-311.pyc").write_bytes(b"\x00compiled")
    windows = make_fab(separator="\\", extra=[("fedllm/node/__pycache__/x.cpython-311.pyc", b"junk")])
    assert app_hash(read_bundle(windows).digests) == app_hash(installed_digests(copied_package))
    assert app_hash(installed_digests(copied_package)) == app_hash(installed_digests())


def test_the_installed_code_is_accepted():
    verdict = check_app(make_fab(), installed_digests(), frozenset())
    assert verdict.accepted and verdict.reason == IDENTICAL and verdict.app_hash == verdict.installed_hash


def test_one_byte_changed_in_the_guard_is_refused_naming_that_file(copied_package):
    guard = copied_package / "node" / "guard.py"
    data = bytearray(guard.read_bytes())
    data[-2] = ord("#") if data[-2] != ord("#") else ord(" ")
    guard.write_bytes(bytes(data))
    verdict = check_app(make_fab(copied_package), installed_digests(), frozenset())
    assert not verdict.accepted and verdict.reason == DIFFERS
    assert verdict.first_difference == GUARD
    assert verdict.app_hash != verdict.installed_hash
    assert verdict.app_hash in verdict.describe() and GUARD in verdict.describe()


def test_a_file_added_to_the_package_is_refused_naming_it(copied_package):
    (copied_package / "sitecustomize_hook.py").write_text("import os\n")
    verdict = check_app(make_fab(copied_package), installed_digests(), frozenset())
    assert not verdict.accepted and verdict.first_difference == "fedllm/sitecustomize_hook.py"


def test_another_clientapp_component_is_refused_even_with_the_installed_code():
    other = PYPROJECT.replace(f'clientapp = "{CLIENTAPP}"', 'clientapp = "evil.app:app"')
    assert other != PYPROJECT
    fab = make_fab(pyproject=other)
    approved = frozenset({app_hash(installed_digests())})
    verdict = check_app(fab, installed_digests(), approved)
    assert not verdict.accepted and verdict.reason == COMPONENT and verdict.clientapp == "evil.app:app"


def test_an_approved_hash_in_the_node_config_is_accepted(copied_package):
    (copied_package / "node" / "guard.py").write_text((PACKAGE / "node" / "guard.py").read_text() + "# reviewed\n")
    fab = make_fab(copied_package)
    reviewed = app_hash(read_bundle(fab).digests)
    other = "sha256:" + "0" * 64
    approved = approved_hashes({"approved-app-hashes": f"{other},{reviewed}"})
    verdict = check_app(fab, installed_digests(), approved)
    assert verdict.accepted and verdict.reason == APPROVED and verdict.first_difference == GUARD
    assert not check_app(fab, installed_digests(), frozenset({other})).accepted


@pytest.mark.parametrize("value", ["sha256:abc", "md5:" + "0" * 32, "0" * 64, "sha256:" + "G" * 64])
def test_a_malformed_approved_hash_names_the_key(value):
    with pytest.raises(ConfigError, match="approved-app-hashes"):
        approved_hashes({"approved-app-hashes": value})


def test_an_unreadable_or_ambiguous_bundle_is_refused():
    assert check_app(b"not a zip", installed_digests(), frozenset()).reason == UNREADABLE
    twice = make_fab(extra=[("fedllm\\node\\guard.py", b"print('other')\n")])
    verdict = check_app(twice, installed_digests(), frozenset())
    assert not verdict.accepted and verdict.reason == UNREADABLE and "twice" in verdict.detail
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("fedllm/__init__.py", "")
    assert check_app(buffer.getvalue(), installed_digests(), frozenset()).reason == UNREADABLE  # no pyproject


# ---- the node process's answer (fedllm.deployment.node_process) ----------------------------------


@pytest.fixture
def node_config(tmp_path) -> dict:
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps({"prompt": "SECRET-RECORD-0", "response": "x"}) + "\n")
    return {
        "partition-id": 3,
        "state-dir": str(tmp_path / "state"),
        "data-path": str(data),
        "max-epsilon": 6.0,
        "delta": 1e-5,
        "sampling-size": 100,
        "allowed-models": "embedded,tiny",
    }


@pytest.fixture
def guard_calls(monkeypatch) -> list[str]:
    """The installed ClientApp's calls into the node's guard (which reads data, plan and ledger)."""
    from fedllm.federation import client_app

    calls: list[str] = []

    def answer_round(policy, request, extension=None):
        calls.append("round")
        return Refusal(policy.partition_id, "data", cap=policy.max_epsilon)

    def answer_preflight(policy, request, extension=None):
        calls.append("preflight")
        return Refusal(policy.partition_id, "data", cap=policy.max_epsilon)

    monkeypatch.setattr(client_app, "answer_round", answer_round)
    monkeypatch.setattr(client_app, "answer_preflight", answer_preflight)
    return calls


def _tampered_fab(copied_package: Path) -> Fab:
    guard = copied_package / "node" / "guard.py"
    guard.write_text(guard.read_text().replace('"""Decide and carry out', '"""Leak, then decide and carry out'))
    content = make_fab(copied_package)
    return Fab(hash_str="f" * 64, content=content, verifications={})


def test_the_node_refuses_a_tampered_bundle_before_its_guard_reads_anything(
    tiny_cfg, node_config, guard_calls, copied_package, caplog
):
    from fedllm.deployment.node_process import answer

    fab = _tampered_fab(copied_package)
    tampered_hash = app_hash(read_bundle(fab.content).digests)
    for message in (query_message(tiny_cfg), train_message(tiny_cfg, "run", 1, {})):
        with caplog.at_level(logging.WARNING, logger="fedllm"):
            reply = answer(message, node_context(node_config), fab, installed_digests())
        assert reply.content[keys.STATUS][keys.CATEGORY] == "policy"
        assert dict(reply.content[keys.METRICS]) == {
            keys.PARTITION_ID: 3,
            keys.REFUSED: 1,
            keys.CAN_CONTINUE: 0,
            keys.EPSILON_CAP: 6.0,
        }
    assert guard_calls == []  # nothing of the node's data, plan or ledger was read
    assert tampered_hash in caplog.text and GUARD in caplog.text
    audit = [json.loads(line) for line in (Path(node_config["state-dir"]) / "audit.jsonl").read_text().splitlines()]
    assert [e["kind"] for e in audit] == ["query", "train"]
    for entry in audit:
        assert entry["app"]["app_hash"] == tampered_hash and entry["app"]["first_difference"] == GUARD
        assert entry["sent"]["config"] == {"status": {"category": "policy"}}
    assert "SECRET-RECORD" not in (Path(node_config["state-dir"]) / "audit.jsonl").read_text()


def test_the_node_runs_its_installed_clientapp_for_the_installed_code(tiny_cfg, node_config, guard_calls, monkeypatch):
    from fedllm.deployment.node_process import answer

    monkeypatch.setenv("FEDLLM_PINNED_APP", "1")
    fab = Fab(hash_str="e" * 64, content=make_fab(), verifications={})
    reply = answer(train_message(tiny_cfg, "run", 1, {}), node_context(node_config), fab, installed_digests())
    assert guard_calls == ["round"]  # the installed guard decided (here: a stand-in that declines)
    assert reply.content[keys.STATUS][keys.CATEGORY] == "data"


def test_a_clientapp_loaded_the_old_way_warns_that_it_runs_the_coordinators_code(
    tiny_cfg, node_config, guard_calls, monkeypatch, caplog
):
    from fedllm.federation.client_app import app

    monkeypatch.delenv("FEDLLM_PINNED_APP", raising=False)
    with caplog.at_level(logging.WARNING, logger="fedllm"):
        app(message=train_message(tiny_cfg, "run", 1, {}), context=node_context(node_config))
    assert "this node runs the coordinator's code" in caplog.text
    caplog.clear()
    monkeypatch.setenv("FEDLLM_PINNED_APP", "1")
    with caplog.at_level(logging.WARNING, logger="fedllm"):
        app(message=train_message(tiny_cfg, "run", 1, {}), context=node_context(node_config))
    assert "coordinator's code" not in caplog.text


def test_fedllm_node_hash_prints_the_installed_hash_and_a_bundles_first_difference(copied_package, tmp_path, capsys):
    assert main(["node", "hash"]) == 0
    assert capsys.readouterr().out.startswith(app_hash(installed_digests()))
    fab = tmp_path / "app.fab"
    fab.write_bytes(_tampered_fab(copied_package).content)
    assert main(["node", "hash", str(fab)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(app_hash(read_bundle(fab.read_bytes()).digests)) and f"first differing file: {GUARD}" in out
    assert main(["node", "hash", str(tmp_path / "missing.fab")]) == 1
