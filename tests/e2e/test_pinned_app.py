"""A node runs only the code its operator installed (issue 24), over real processes: the SuperLink
behind the Fleet gateway, a SuperNode in ``--isolation process`` beside its own ClientApp process
(``fedllm node run``), and ``flwr run`` of three app bundles built from three project directories:

* this project, unmodified: the node trains and the run completes;
* a copy whose ``fedllm/node/guard.py`` writes a marker file and puts the first record of the
  node's data file into a reply metric: refused (``policy``) before any of it runs;
* a copy with a harmless edit whose hash the node's operator approved: accepted.

The old way (``--isolation subprocess``: Flower imports the bundle's ClientApp) would run the
tampered guard: the marker would exist and the record would be in the reply."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from .conftest import run_demo, stray_processes

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
GUARD = "fedllm/node/guard.py"
# the first line of fedllm.node.guard.answer_round's body: the tampered copy inserts its leak before it
ROUND_BODY = "    node, server_round = policy.partition_id, request.server_round\n"


def _project_copy(target: Path) -> Path:
    """What `flwr run` bundles from this project: pyproject.toml, conf/ and the fedllm package."""
    target.mkdir(parents=True)
    shutil.copy(ROOT / "pyproject.toml", target / "pyproject.toml")
    for folder in ("conf", "fedllm"):
        shutil.copytree(ROOT / folder, target / folder, ignore=shutil.ignore_patterns("__pycache__"))
    return target


def _tamper(project: Path, marker: Path) -> None:
    """Edit the copy's guard as a coordinator who wants the node's records would."""
    guard = project / GUARD
    source = guard.read_text()
    assert source.count(ROUND_BODY) == 1, "answer_round changed: update ROUND_BODY"
    leak = (
        "    from pathlib import Path\n"
        f"    Path({str(marker)!r}).write_text('the coordinator ran code on the node')\n"
        "    first = Path(policy.data_path).read_text(encoding='utf-8').splitlines()[0]\n"
        "    return Update(arrays=dict(request.received), metrics={'partition-id': policy.partition_id, "
        "'refused': 0, 'leak': [int(b) for b in first.encode()[:256]]})\n"
    )
    tampered = source.replace(ROUND_BODY, leak + ROUND_BODY)
    compile(tampered, str(guard), "exec")  # the attack is real code (run the old way, it leaks: see the report)
    guard.write_text(tampered)


@pytest.fixture(scope="module")
def pinned(tmp_path_factory) -> tuple[Path, dict]:
    base = tmp_path_factory.mktemp("pinned")
    workdir, marker = base / "demo", base / "marker.txt"
    tampered = _project_copy(base / "tampered")
    _tamper(tampered, marker)
    approved = _project_copy(base / "approved")
    with (approved / GUARD).open("a") as guard:
        guard.write("# reviewed by the node's operator\n")
    report = run_demo(
        [
            "--workdir",
            str(workdir),
            "--nodes",
            "1",
            "--records",
            "60",
            # the first run spends the node's lifetime budget up to the run's target (epsilon 8), so a
            # second DP run would be refused for its budget: the bundles after it run without DP-SGD
            "--extra-overrides",
            "privacy=none",
            "--allow-nonprivate",
            "--overrides",
            "debug=smoke federation.num_rounds=1 train.local_steps=2 federation.min_updates=1",  # one node
            "--approve-app",
            str(approved),
            "--extra-run",
            f"tampered={tampered}",
            "--extra-run",
            f"approved={approved}",
            "--timeout",
            "400",
        ],
        timeout=900,
    )
    report["marker"] = str(marker)
    return workdir, report


def _train_entries(workdir: Path) -> list[dict]:
    lines = (workdir / "node0" / "state" / "audit.jsonl").read_text().splitlines()
    return [e for e in map(json.loads, lines) if e.get("kind", "train") == "train"]


def test_the_unmodified_bundle_trains_with_the_installed_fedllm_and_the_run_completes(pinned):
    workdir, report = pinned
    summary = json.loads((Path(report["output_dir"]) / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["rounds_completed"] == 1, summary
    first = _train_entries(workdir)[0]
    assert first["sent"]["tensors"] and "app" not in first
    args = json.loads((workdir / "supernode0.argv.json").read_text())
    assert args[args.index("--isolation") + 1] == "process"
    console = (workdir / "supernode0-app.log").read_text()
    assert "is this node's installed fedllm: running the installed ClientApp" in console
    assert "runs the coordinator's code" not in console


def test_a_tampered_bundle_is_refused_before_its_code_runs(pinned):
    workdir, report = pinned
    tampered = report["extra_runs"]["tampered"]
    assert not Path(report["marker"]).exists(), "the coordinator's code ran on the node"
    ledger = json.loads((Path(tampered["output_dir"]) / "privacy_ledger.json").read_text())
    assert [r["reason"].split(";")[0] for r in ledger["clients"]["0"]["refusals"]] == ["refused (policy)"]
    refused = [e for e in _train_entries(workdir) if "app" in e]
    assert len(refused) == 1 and refused[0]["sent"]["config"] == {"status": {"category": "policy"}}
    assert refused[0]["app"]["app_hash"] == tampered["app_hash"] and refused[0]["app"]["first_difference"] == GUARD
    assert "leak" not in refused[0]["sent"]["metrics"] and not refused[0]["sent"]["tensors"]
    console = (workdir / "supernode0-app.log").read_text()
    assert f"refusing app bundle {tampered['app_hash']}" in console and GUARD in console
    # no record text in anything the coordinator got back
    record = json.loads((workdir / "node0" / "data.jsonl").read_text().splitlines()[0])["prompt"]
    probe = record[len(record) // 3 :][:40]
    seen = [workdir / "flwr-run-tampered.log", *Path(tampered["output_dir"]).rglob("*")]
    assert not [p for p in seen if p.is_file() and probe in p.read_text(errors="replace")]


def test_a_differing_bundle_whose_hash_the_node_approved_is_accepted(pinned):
    workdir, report = pinned
    approved = report["extra_runs"]["approved"]
    summary = json.loads((Path(approved["output_dir"]) / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["rounds_completed"] == 1, summary
    last = _train_entries(workdir)[-1]
    assert last["sent"]["tensors"] and last["received"]["run_id"] != _train_entries(workdir)[0]["received"]["run_id"]
    console = (workdir / "supernode0-app.log").read_text()
    assert f"app bundle {approved['app_hash']} differs from the installed fedllm" in console


def test_no_process_is_left(pinned):
    assert stray_processes() == []
