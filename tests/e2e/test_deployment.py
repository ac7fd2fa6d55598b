"""Flower's Deployment Engine on 127.0.0.1: SuperLink with TLS and node authentication behind the
Fleet gateway, registered SuperNodes with their own data and caps, an unregistered one, an
outsider holding only the CA certificate, `flwr run`. (The compose file: tests/unit/test_docker_files.py.)"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from safetensors.torch import load_file

from .conftest import run_demo, stray_processes

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> tuple[Path, dict]:
    workdir = tmp_path_factory.mktemp("demo")
    report = run_demo(
        [
            "--workdir",
            str(workdir),
            "--nodes",
            "2",
            "--unregistered",
            "1",
            "--broken-node",
            "--outsider",
            "--caps",
            "8,7.5",
            "--timeout",
            "600",
            # settings only the nodes may decide, sent by the coordinator: ignored (state dir) ...
            "--overrides",
            # one node is capped to one round: the run goes on with one update a round, knowingly
            f"debug=smoke federation.num_rounds=2 federation.min_updates=1 privacy.state_dir={workdir / 'server-says'}",
            # ... or refused (reproducible noise, remote code)
            "--hostile-overrides",
            "privacy.noise=seeded model.trust_remote_code=true",
        ],
        timeout=800,
    )
    return workdir, report


def test_the_run_finishes_over_tls_with_an_adapter_and_a_ledger(demo):
    workdir, report = demo
    outputs = Path(report["output_dir"])
    summary = json.loads((outputs / "summary.json").read_text())
    assert summary["rounds_completed"] == 2 and summary["stop_reason"] is None
    assert summary["wall_seconds"] >= summary["federation_seconds"] > 0  # the ServerApp times a deployed run too
    assert (outputs / "adapter" / "adapter_model.safetensors").is_file()
    ledger = json.loads((outputs / "privacy_ledger.json").read_text())
    assert ledger["clients"]["0"]["cap"] == 8.0 and ledger["clients"]["1"]["cap"] == 7.5  # the nodes' own caps
    assert all(c["epsilon"] <= c["cap"] for c in ledger["clients"].values())
    # nodes verified the SuperLink against the federation's own CA (no --insecure anywhere)
    assert "--insecure" not in (workdir / "flwr-home" / "config.toml").read_text()
    assert "root-certificates" in (workdir / "flwr-home" / "config.toml").read_text()


def test_an_unregistered_node_is_refused(demo):
    workdir, report = demo
    log = (workdir / "unregistered0.log").read_text()
    assert "Exit Code: 305" in log and "Failed to activate SuperNode" in log
    assert report["unregistered"][0]["returncode"] not in (None, 0)


def test_an_outsider_with_only_the_ca_can_neither_register_a_node_nor_start_a_run(demo):
    workdir, report = demo
    outsider = report["outsider"]
    for attempt in ("register", "run", "list"):  # at the address every node is given
        assert outsider[attempt]["returncode"] != 0, (attempt, outsider[attempt]["output"])
        assert "404" in outsider[attempt]["output"], (attempt, outsider[attempt]["output"])
    assert not (workdir / "outputs-outsider").exists()
    # the coordinator's SuperLink knows exactly its own two runs and the three nodes it registered
    assert len(report["runs"]) == 2
    assert len(report["nodes"]) == 3
    # the SuperLink itself is on loopback only; the gateway is the nodes' one door
    superlink = report["listening"]["superlink"]
    assert superlink and all(address.startswith("127.0.0.1:") for address in superlink)
    assert report["listening"]["fleet-gateway"] == [report["fleet"]]
    assert set(outsider["superlink_from_the_network"].values()) <= {"refused"}


def test_the_nodes_trained_through_the_gateway(demo):
    workdir, report = demo
    assert report["superlink"] != report["fleet"]
    for node in ("supernode0", "supernode1", "broken", "unregistered0"):
        args = json.loads((workdir / f"{node}.argv.json").read_text())
        assert args[args.index("--superlink") + 1] == report["fleet"]
    gateway_log = (workdir / "fleet-gateway.log").read_text()
    # one summary a minute and at shutdown (not a line per poll): the nodes' replies went through it,
    # the outsider's Control API calls were refused
    assert re.search(r"calls answered \([^)]*push-messages \d+", gateway_log), gateway_log[-2000:]
    assert re.search(r"404 x \d+ \([^)]*/v1/control/register-node", gateway_log), gateway_log[-2000:]


def test_a_node_with_a_wrong_data_path_declines_and_the_run_goes_on(demo):
    workdir, report = demo
    ledger = json.loads((Path(report["output_dir"]) / "privacy_ledger.json").read_text())
    refusals = ledger["clients"]["2"]["refusals"]
    assert refusals and "(data)" in refusals[0]["reason"]
    assert "missing" not in refusals[0]["reason"]  # the server learns the category, not the path
    assert (workdir / "broken" / "audit.jsonl").is_file()  # the detail is on the node


def test_the_nodes_ignore_or_refuse_what_only_they_may_decide(demo):
    workdir, report = demo
    assert not (workdir / "server-says").exists()  # privacy.state_dir from the server: ignored
    assert (workdir / "node0" / "state" / "privacy_ledger.json").is_file()
    hostile = Path(report["hostile_output_dir"])
    ledger = json.loads((hostile / "privacy_ledger.json").read_text())
    for client in ("0", "1"):  # seeded noise and remote code: refused, nothing trained, nothing spent
        assert [r["reason"].split(";")[0] for r in ledger["clients"][client]["refusals"]] == ["refused (policy)"]
    summary = json.loads((hostile / "summary.json").read_text())
    assert summary["stop_reason"] and "warning" in summary  # the seeded run says what it is worth


ACCOUNTING = {
    "partition-id",
    "refused",
    "epsilon",
    "epsilon-cap",
    "delta",
    "noise-multiplier",
    "sample-rate",
    "total-steps",
    "dp-history",
    "can-continue",
}
PREFLIGHT = {
    "partition-id",
    "refused",
    "rounds-planned",
    "rounds-affordable",
    "epsilon",
    "epsilon-after",
    "epsilon-cap",
    "delta",
}


def test_nodes_send_only_the_adapter_tensors_and_the_accounting(demo):
    workdir, report = demo
    adapter = load_file(Path(report["output_dir"]) / "adapter" / "adapter_model.safetensors")
    # PEFT saves without the adapter name; on the wire the names carry PEFT's full keys
    expected = {name.replace(".weight", "") for name in adapter}
    for node in ("node0", "node1"):
        logged = [json.loads(line) for line in (workdir / node / "state" / "audit.jsonl").read_text().splitlines()]
        entries = [e for e in logged if e.get("kind", "train") == "train"]
        assert [e["received"]["round"] for e in entries] == [1, 2, 1]  # the run's two rounds, then the hostile run's
        assert entries[2]["sent"]["config"] == {"status": {"category": "policy"}}
        for query in (e for e in logged if e.get("kind") == "query"):  # the pre-flights: numbers only
            refused = query["sent"]["config"].get("status")  # a refusal, in the train refusal's format
            assert not query["sent"]["tensors"] and set(query["sent"]["metrics"]) <= (
                ACCOUNTING if refused else PREFLIGHT
            )
        for entry in entries:
            assert entry["sent"]["record_types"] in (["arrays", "metrics"], ["metrics", "status"])
            sent = {t["name"].replace(".weight", "").replace(".default", "") for t in entry["sent"]["tensors"]}
            assert not entry["sent"]["tensors"] or sent == expected
            assert set(entry["sent"]["metrics"]) <= ACCOUNTING  # no loss, size, count or timing


def test_every_flower_process_is_gone(demo):
    assert stray_processes() == []
