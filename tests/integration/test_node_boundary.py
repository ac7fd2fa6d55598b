"""The node's privacy boundary, tried as a curious coordinator would: with everything the
server sends and receives, it must not reproduce a node's noise, and nothing it sets may
loosen the node's own rules (the real ClientApp, no engine)."""

from __future__ import annotations

import dataclasses
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from fedllm import task
from fedllm.cli.node_status import node_status, node_status_cli
from fedllm.config import DataConfig, FederationConfig, LoraSettings, ModelConfig, PrivacyConfig, TrainConfig
from fedllm.errors import ConfigError
from fedllm.federation import records as keys
from fedllm.federation.audit import AUDIT_FILE
from fedllm.federation.client_app import train
from fedllm.node import guard
from fedllm.node.guard import RoundRequest, _train
from fedllm.node.policy import SIMULATED_NODES_ENV, policy_from_node_config, tiny_parameters, write_simulated_nodes
from fedllm.planning import plan_for
from fedllm.privacy.node_ledger import NodeLedger
from fedllm.training.local import DPSpec
from tests.conftest import RT_PROMPT, tiny_config
from tests.node_driver import node_context, run_round, simulated_node, train_message

ACCOUNTING_KEYS = {
    keys.PARTITION_ID,
    keys.REFUSED,
    keys.EPSILON,
    keys.EPSILON_CAP,
    keys.DELTA,
    keys.NOISE_MULTIPLIER,
    keys.SAMPLE_RATE,
    keys.TOTAL_STEPS,
    keys.DP_HISTORY,
    keys.CAN_CONTINUE,
}


def _cfg(tmp_path: Path, noise: str = "secure", **privacy):
    return tiny_config(
        privacy=PrivacyConfig(state_dir=str(tmp_path / "server-says"), noise=noise, **privacy),
        federation=FederationConfig(num_clients=3, num_rounds=2),
    )


def _arrays(reply) -> dict[str, torch.Tensor]:
    return reply.content[keys.ARRAYS].to_torch_state_dict()


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _coordinator_replay(cfg, partition_id: int, server_round: int, seed: int) -> dict[str, torch.Tensor]:
    """What a curious coordinator can compute: it knows the config it sent (seed included), the
    node's index, the round, the adapter it sent, fedllm's code and here even the node's records."""
    shard = task.tokenized_shard(cfg, partition_id)
    plan = plan_for(cfg, len(shard))
    dp = DPSpec(
        noise_multiplier=plan.noise_multiplier,
        max_grad_norm=cfg.privacy.max_grad_norm,
        accountant=cfg.privacy.accountant,
        grad_sample_mode=cfg.privacy.grad_sample_mode,
    )
    initial = task.model_bundle(cfg.model, cfg.lora, cfg.seed).initial_adapter
    request = RoundRequest(cfg=cfg, run_id="run", server_round=server_round, received=initial)
    return _train(cfg, shard, request, dp, [], seed)[1]


def _public_seeds(cfg, partition_id: int, server_round: int) -> list[int]:
    """Every seed a server could try: the old derivation, its neighbours, and small integers."""
    derived = cfg.seed * 1_000_003 + partition_id * 1_009 + server_round
    return [derived, derived + 1, cfg.seed, partition_id, server_round, *range(4)]


@pytest.mark.slow  # seconds each: kept out of the fast tier (make test runs it)
def test_the_coordinator_cannot_replay_a_nodes_noise(tmp_path):
    cfg = _cfg(tmp_path)
    update = _arrays(run_round(cfg, "run", 1, partition_id=1))
    for seed in _public_seeds(cfg, 1, 1):
        assert not _same(update, _coordinator_replay(cfg, 1, 1, seed))
    # and the node itself never repeats its noise: the same round on a fresh node state differs
    again = run_round(
        cfg, "run", 1, partition_id=1, node_config=simulated_node(cfg, 1, state_dir=str(tmp_path / "fresh"))
    )
    assert not _same(update, _arrays(again))


@pytest.mark.slow  # seconds each: kept out of the fast tier (make test runs it)
def test_seeded_noise_is_replayed_bit_for_bit_as_its_warning_says(tmp_path):
    cfg = _cfg(tmp_path, noise="seeded")
    update = _arrays(run_round(cfg, "run", 1, partition_id=1))
    derived = cfg.seed * 1_000_003 + 1 * 1_009 + 1
    assert _same(update, _coordinator_replay(cfg, 1, 1, derived))


# ---- a deployed node: its own node config, its own data file --------------------------------------------


def _records_file(path: Path, count: int = 120) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [
        json.dumps(
            {
                "prompt": f"review number {i} was {'great' if i % 2 else 'dull'}",
                "response": "positive" if i % 2 else "negative",
            }
        )
        for i in range(count)
    ]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _deployed(tmp_path: Path, **extra) -> dict:
    config = {
        keys.NODE_PARTITION_ID: 0,
        "state-dir": str(tmp_path / "node-state"),
        "data-path": str(_records_file(tmp_path / "node-data.jsonl")),
        "max-epsilon": 7.0,
        "delta": 1e-5,
        "allowed-models": "tiny",  # these tests' runs use the random test model
        "sampling-size": 120,  # the file's 120 records: the plans and epsilons of a node whose N is its n
    }
    config.update({k.replace("_", "-"): v for k, v in extra.items()})
    return config


def _refusal_category(reply) -> str:
    assert reply.content[keys.METRICS][keys.REFUSED] == 1
    assert keys.ARRAYS not in reply.content.array_records
    return reply.content[keys.STATUS][keys.CATEGORY]


@pytest.mark.slow  # seconds each: kept out of the fast tier (make test runs it)
def test_a_deployed_node_keeps_its_own_state_dir_data_and_cap(tmp_path):
    cfg = _cfg(tmp_path)
    cfg = dataclasses.replace(
        cfg,
        data=DataConfig(
            name="jsonl",
            path=str(tmp_path / "server-data.jsonl"),
            prompt_template=RT_PROMPT,
            choices=("positive", "negative"),
            test_size=100,
        ),
    )
    node = _deployed(tmp_path)
    metrics = run_round(cfg, "run", 1, node_config=node).content[keys.METRICS]
    assert metrics[keys.REFUSED] == 0 and metrics[keys.EPSILON_CAP] == 7.0  # the node's cap, under the target 8
    assert not (tmp_path / "server-says").exists()  # privacy.state_dir from the server is ignored
    assert not (tmp_path / "server-data.jsonl").exists()  # the server's data.path was never needed
    ledger = NodeLedger(tmp_path / "node-state", str((tmp_path / "node-data.jsonl").resolve()))
    assert len(ledger.releases) == 1


def test_a_server_target_above_the_nodes_cap_does_not_raise_it(tmp_path):
    # the server plans noise for epsilon 50: one round would take the node far past its own cap 7
    reply = run_round(_cfg(tmp_path, target_epsilon=50.0), "run", 1, node_config=_deployed(tmp_path))
    assert _refusal_category(reply) == "budget"
    assert reply.content[keys.METRICS][keys.EPSILON_CAP] == 7.0 and reply.content[keys.METRICS][keys.EPSILON] == 0


@pytest.mark.slow  # seconds each: kept out of the fast tier (make test runs it)
def test_appending_records_keeps_the_nodes_spent_epsilon(tmp_path):
    cfg = _cfg(tmp_path)
    node = _deployed(tmp_path, max_epsilon=8.0)  # the plan's two rounds fit exactly
    first = run_round(cfg, "run-a", 1, node_config=node).content[keys.METRICS][keys.EPSILON]
    with open(node["data-path"], "a", encoding="utf-8") as handle:
        handle.write(json.dumps({"prompt": "one more review", "response": "positive"}) + "\n")
    second = run_round(cfg, "run-b", 1, node_config=node).content[keys.METRICS]
    assert second[keys.REFUSED] == 0 and second[keys.EPSILON] > first  # composed, not a fresh budget
    ledger = NodeLedger(tmp_path / "node-state", str(Path(node["data-path"]).resolve()))
    assert len({r.fingerprint for r in ledger.releases}) == 2  # the content changed and is on record


@pytest.mark.parametrize(
    "override, expected",
    [
        (dict(privacy=PrivacyConfig(mode="none")), "policy"),
        (dict(privacy=PrivacyConfig(mode="client")), "policy"),
        (dict(privacy=PrivacyConfig(noise="seeded")), "policy"),
        (dict(model=ModelConfig(name_or_path="/srv/coordinator/backdoored-model")), "policy"),
        (dict(model=ModelConfig(source="tiny", trust_remote_code=True)), "policy"),
    ],
)
def test_a_deployed_node_refuses_what_its_policy_does_not_allow(tmp_path, override, expected):
    cfg = tiny_config(**override)
    sent = task.model_bundle(ModelConfig(source="tiny"), cfg.lora, cfg.seed).initial_adapter
    reply = run_round(cfg, "run", 1, node_config=_deployed(tmp_path), arrays=sent)
    assert _refusal_category(reply) == expected
    assert not (tmp_path / "node-state" / "privacy_ledger.json").exists()  # nothing ran, nothing spent
    assert set(reply.content[keys.STATUS].keys()) == {keys.CATEGORY}  # the detail stays on the node


HUGE = 10**9


@pytest.mark.parametrize(
    "override, bound",
    [
        (dict(federation=FederationConfig(num_clients=3, num_rounds=HUGE)), "max-rounds=1000"),
        (dict(train=TrainConfig(local_steps=HUGE)), "max-local-steps=1000"),
        (dict(train=TrainConfig(batch_size=HUGE)), "max-batch-size=1024"),
        (
            dict(data=DataConfig(prompt_template=RT_PROMPT, choices=("positive", "negative"), max_length=HUGE)),
            "max-length=4096",
        ),
        # what it would build (issue 25): each cost 3+ GiB or 44 s of CPU per message, pre-flight included
        (
            dict(model=ModelConfig(source="tiny", hidden_size=16384, intermediate_size=16384, num_layers=64)),
            "max-model-params=200000000",
        ),
        (dict(lora=LoraSettings(r=200_000)), "max-lora-rank=256"),
        (
            dict(data=DataConfig(prompt_template="x" * 200_000 + RT_PROMPT, choices=("positive", "negative"))),
            "max-template-chars=2000",
        ),
    ],
)
def test_a_coordinator_cannot_make_a_node_plan_or_train_an_unbounded_task(
    tmp_path, monkeypatch, caplog, override, bound
):
    # a billion rounds would make the node plan a 5e9-step mechanism (the PRV accountant then runs
    # out of memory after minutes); the node refuses before it plans, loads data or opens its ledger
    cfg = tiny_config(**override)
    sent = task.model_bundle(ModelConfig(source="tiny"), LoraSettings(), cfg.seed).initial_adapter

    def planned(*args, **kwargs):
        raise AssertionError("the node planned or built a task beyond its bounds")

    monkeypatch.setattr(guard, "plan_for", planned)
    monkeypatch.setattr(guard.task, "node_shard", planned)
    monkeypatch.setattr(guard.task, "model_bundle", planned)
    reply = run_round(cfg, "run", 1, node_config=_deployed(tmp_path), arrays=sent)
    assert _refusal_category(reply) == "policy"
    assert not (tmp_path / "node-state" / "privacy_ledger.json").exists()
    assert bound in caplog.text  # the operator learns which bound, and how to raise it


@pytest.mark.slow  # seconds each: kept out of the fast tier (make test runs it)
def test_an_operator_may_raise_or_lower_the_bounds(tmp_path):
    cfg = tiny_config(federation=FederationConfig(num_clients=3, num_rounds=2), train=TrainConfig(local_steps=3))
    sent = task.model_bundle(ModelConfig(source="tiny"), cfg.lora, cfg.seed).initial_adapter
    lowered = run_round(cfg, "run", 1, node_config=_deployed(tmp_path, max_local_steps=2), arrays=sent)
    assert _refusal_category(lowered) == "policy"
    allowed = run_round(cfg, "run", 1, node_config=_deployed(tmp_path, max_local_steps=3, max_rounds=2), arrays=sent)
    assert allowed.content[keys.METRICS][keys.REFUSED] == 0
    with pytest.raises(ConfigError, match="max-rounds: expected a whole number"):
        policy_from_node_config(_deployed(tmp_path, max_rounds="lots"))
    with pytest.raises(ConfigError, match="max-length: must be a positive whole number"):
        policy_from_node_config(_deployed(tmp_path, max_length=0))
    with pytest.raises(ConfigError, match="max-lora-rank: must be a positive whole number"):
        policy_from_node_config(_deployed(tmp_path, max_lora_rank=0))


def test_the_tiny_models_parameter_count_is_known_before_it_is_built():
    cfg = tiny_config()
    built = task.model_bundle(cfg.model, cfg.lora, cfg.seed).model.get_base_model()
    assert tiny_parameters(cfg) == sum(p.numel() for p in built.parameters() if not p.requires_grad)
    assert tiny_parameters(tiny_config(model=ModelConfig(source="embedded"))) == 0


def test_a_node_that_allows_it_trains_without_dp_and_says_so(tmp_path):
    cfg = tiny_config(privacy=PrivacyConfig(mode="none"))
    reply = run_round(cfg, "run", 1, node_config=_deployed(tmp_path, allow_nonprivate=True))
    assert reply.content[keys.METRICS][keys.REFUSED] == 0
    assert keys.EPSILON not in reply.content[keys.METRICS]


def test_a_ledger_scope_from_the_server_is_refused(tmp_path):
    cfg = _cfg(tmp_path)
    raw = cfg.to_dict()
    raw["privacy"]["ledger_scope"] = "run"  # "count this run only": the node's budget is not the server's to scope
    msg = train_message(cfg, "run", 1, task.model_bundle(cfg.model, cfg.lora, cfg.seed).initial_adapter)
    msg.content[keys.CONFIG][keys.TASK_CONFIG] = json.dumps(raw)
    with pytest.raises(ConfigError, match="ledger_scope"):
        _call(msg, _deployed(tmp_path))


def _call(msg, node_config):
    """The ClientApp's train function itself, so that its errors reach the test."""
    return train(msg, node_context(node_config))


@pytest.mark.parametrize("missing", ["state-dir", "data-path", "max-epsilon", "delta", "sampling-size"])
def test_a_deployed_node_needs_its_own_rules_in_its_node_config(tmp_path, missing):
    node = _deployed(tmp_path)
    del node[missing]
    with pytest.raises(ConfigError, match=missing):
        _call_round(_cfg(tmp_path), node)


def _call_round(cfg, node_config):
    msg = train_message(cfg, "run", 1, task.model_bundle(cfg.model, cfg.lora, cfg.seed).initial_adapter)
    return _call(msg, node_config)


def test_a_data_refusal_says_only_data(tmp_path):
    node = _deployed(tmp_path, data_path=str(tmp_path / "no-such-file.jsonl"))
    reply = run_round(_cfg(tmp_path), "run", 1, node_config=node)
    assert _refusal_category(reply) == "data"
    assert "no-such-file" not in json.dumps(dict(reply.content[keys.METRICS]))


def test_a_reply_carries_the_adapter_and_the_accounting_only_and_the_audit_log_says_so(tmp_path):
    reply = run_round(_cfg(tmp_path), "run", 1, node_config=_deployed(tmp_path))
    sent = dict(reply.content[keys.METRICS])
    assert set(sent) == ACCOUNTING_KEYS  # no loss, no shard size, no example count, no timing
    assert list(reply.content.array_records) == [keys.ARRAYS] and not reply.content.config_records
    entry = json.loads((tmp_path / "node-state" / AUDIT_FILE).read_text().splitlines()[-1])
    assert entry["sent"]["metrics"] == json.loads(json.dumps(sent))  # exactly what left, the history too
    assert entry["sent"]["config"] == {}


def test_a_node_may_declare_its_size_and_loss_public(tmp_path):
    node = _deployed(tmp_path, public_size=True, public_metrics=True)
    sent = dict(run_round(_cfg(tmp_path), "run", 1, node_config=node).content[keys.METRICS])
    assert sent[keys.NUM_EXAMPLES] == 120
    assert {keys.TRAIN_LOSS, keys.TRAIN_SECONDS, keys.EXAMPLES_SEEN} <= set(sent)


def test_two_runs_racing_on_one_node_never_spend_past_its_cap(tmp_path):
    # cap 7: one round of the plan (~6.6) fits, a second (8.0) does not; both runs ask at once
    cfg, node = _cfg(tmp_path), _deployed(tmp_path)
    with ThreadPoolExecutor(max_workers=2) as pool:
        replies = list(pool.map(lambda run: run_round(cfg, run, 1, node_config=node), ["run-a", "run-b"]))
    assert sorted(r.content[keys.METRICS][keys.REFUSED] for r in replies) == [0, 1]
    ledger = NodeLedger(tmp_path / "node-state", str((tmp_path / "node-data.jsonl").resolve()))
    assert len(ledger.releases) == 1 and ledger.epsilon(delta=1e-5, accountant="prv") <= 7.0


@pytest.mark.slow  # seconds each: kept out of the fast tier (make test runs it)
def test_a_simulated_node_takes_its_rules_from_the_driver_not_from_the_message(tmp_path, monkeypatch):
    researcher = _cfg(tmp_path / "researcher")  # what `fedllm simulate` was started with
    monkeypatch.setenv(SIMULATED_NODES_ENV, "")  # restored after the test
    write_simulated_nodes(researcher, tmp_path / "simulated_nodes.json")
    engine = {keys.NODE_PARTITION_ID: 0, keys.NODE_NUM_PARTITIONS: 3}  # all Flower's engine gives a node
    sent = task.model_bundle(researcher.model, researcher.lora, researcher.seed).initial_adapter

    def ask(**privacy):
        cfg = dataclasses.replace(researcher, privacy=dataclasses.replace(researcher.privacy, **privacy))
        return train(train_message(cfg, "run", 1, sent), node_context(engine))

    reply = ask(state_dir=str(tmp_path / "evil"), target_epsilon=50.0)  # elsewhere, and a higher budget
    assert _refusal_category(reply) == "budget" and reply.content[keys.METRICS][keys.EPSILON_CAP] == 8.0
    assert not (tmp_path / "evil").exists()
    assert _refusal_category(ask(noise="seeded")) == "policy"  # the researcher chose secure noise
    assert ask().content[keys.METRICS][keys.REFUSED] == 0
    assert (tmp_path / "researcher" / "server-says" / "client-0" / "privacy_ledger.json").is_file()


def test_a_policy_refusal_tells_the_operator_what_to_change(tmp_path, caplog):
    cfg = tiny_config(privacy=PrivacyConfig(mode="none"))
    with caplog.at_level("WARNING", logger="fedllm.node.guard"):
        run_round(cfg, "run", 1, node_config=_deployed(tmp_path))
    assert "allow-nonprivate=true" in caplog.text


def test_a_format_spec_in_a_template_cannot_quote_a_record(tmp_path):
    # "{prompt:{prompt}}" would make str.format raise with the record's text as the "format spec"
    cfg = tiny_config(
        data=DataConfig(
            prompt_template="Review: {prompt:{prompt}}",
            choices=("positive", "negative"),
            max_records=600,
            test_size=100,
        )
    )
    reply = run_round(cfg, "run", 1, node_config=_deployed(tmp_path))
    assert _refusal_category(reply) == "policy"
    assert "review number" not in json.dumps(dict(reply.content[keys.METRICS]))


def test_an_unexpected_failure_tells_the_server_error_and_nothing_else(tmp_path, monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("review number 7 was great")  # e.g. a library quoting a record

    monkeypatch.setattr("fedllm.node.guard.task.node_shard", boom)
    reply = run_round(_cfg(tmp_path), "run", 1, node_config=_deployed(tmp_path))
    assert _refusal_category(reply) == "error" and not reply.has_error()
    audit = (tmp_path / "node-state" / AUDIT_FILE).read_text()
    assert "review number" not in audit and '"error"' in audit


@pytest.mark.parametrize("key, value", [("simulated", True), ("noise", "seeded")])
def test_only_the_simulation_driver_may_mark_a_node_simulated_or_seeded(tmp_path, key, value):
    with pytest.raises(ConfigError, match="fedllm simulate"):
        _call_round(_cfg(tmp_path), {**_deployed(tmp_path), key: value})


@pytest.mark.slow  # seconds each: kept out of the fast tier (make test runs it)
def test_renaming_the_data_file_keeps_the_spent_epsilon_of_the_same_records(tmp_path):
    cfg = _cfg(tmp_path)
    node = _deployed(tmp_path, max_epsilon=8.0)
    first = run_round(cfg, "run-a", 1, node_config=node).content[keys.METRICS][keys.EPSILON]
    renamed = tmp_path / "renamed.jsonl"
    Path(node["data-path"]).rename(renamed)  # a new path, so a new default dataset-id: the same records
    second = run_round(cfg, "run-b", 1, node_config={**node, "data-path": str(renamed)}).content[keys.METRICS]
    assert second[keys.REFUSED] == 0 and second[keys.EPSILON] > first
    # the operator's view counts the same releases the guard does
    shown = node_status(policy_from_node_config({**node, "data-path": str(renamed)}))
    assert f"{second[keys.EPSILON]:.4f} spent of cap 8" in shown


def test_the_task_format_cannot_probe_whether_a_record_exists(tmp_path):
    # choices without "negative": a node holding a negative record used to decline ("data"), one
    # without trained; now both train, the record kept with no target (zero gradient)
    cfg = tiny_config(
        data=DataConfig(prompt_template=RT_PROMPT, choices=("positive", "neutral"), max_records=600, test_size=100)
    )
    nodes = [_deployed(tmp_path / "with"), _deployed(tmp_path / "without")]  # each writes a mixed file
    lines = [json.dumps({"prompt": f"review number {i}", "response": "positive"}) for i in range(120)]
    Path(nodes[1]["data-path"]).write_text("\n".join(lines) + "\n", encoding="utf-8")  # no negative record
    replies = [run_round(cfg, "run", 1, node_config=node) for node in nodes]
    assert [r.content[keys.METRICS][keys.REFUSED] for r in replies] == [0, 0]
    assert set(replies[0].content[keys.METRICS]) == set(replies[1].content[keys.METRICS])


@pytest.mark.slow  # seconds each: kept out of the fast tier (make test runs it)
def test_the_operator_sees_what_the_node_spent_and_sent(tmp_path, capsys):
    node = _deployed(tmp_path)
    run_round(_cfg(tmp_path), "run-a", 1, node_config=node)
    run_round(_cfg(tmp_path, target_epsilon=50.0), "run-b", 1, node_config=node)  # refused: budget
    spent = NodeLedger(tmp_path / "node-state", str((tmp_path / "node-data.jsonl").resolve())).epsilon(
        delta=1e-5, accountant="prv"
    )
    config = " ".join(f'{k}="{v}"' if isinstance(v, str) else f"{k}={v}" for k, v in node.items())
    assert node_status_cli(["--node-config", config]) == 0
    out = capsys.readouterr().out
    assert f"{spent:.4f} spent of cap 7 at delta 1e-05 (prv)" in out and "1 DP-SGD rounds in 1 run(s)" in out
    assert "run run-b round 1: refused (budget)" in out and "run run-a round 1: sent" in out


@pytest.mark.parametrize("server_rule", [dict(duplicates="refuse"), dict(max_record_chars=10)])
def test_the_nodes_data_rules_are_its_own_not_the_servers(tmp_path, server_rule):
    # a server asking to refuse duplicates, or records over 10 characters, would learn from the
    # refusal whether the node holds such a record; the node applies its own rules instead
    node = _deployed(tmp_path)
    with open(node["data-path"], "a", encoding="utf-8") as handle:
        handle.write(json.dumps({"prompt": "review number 1 was great", "response": "positive"}) + "\n")
    cfg = tiny_config(
        data=DataConfig(
            prompt_template=RT_PROMPT, choices=("positive", "negative"), max_records=600, test_size=100, **server_rule
        )
    )
    assert run_round(cfg, "run", 1, node_config=node).content[keys.METRICS][keys.REFUSED] == 0


def test_a_deployed_node_tells_its_operator_each_round_on_its_console(tmp_path, capsys):
    """The SuperNode's console is where the operator looks: one line per round, with the spent
    epsilon and cap when it trained, and the reason when it refused."""
    node = _deployed(tmp_path)
    run_round(_cfg(tmp_path), "run", 1, node_config=node)
    trained = [line for line in capsys.readouterr().err.splitlines() if "fedllm node:" in line]
    assert any("round 1" in line and "epsilon" in line and "of cap 7" in line for line in trained), trained
    run_round(_cfg(tmp_path, mode="none"), "run", 2, node_config=node)
    refused = [line for line in capsys.readouterr().err.splitlines() if "fedllm node:" in line]
    assert any("refusing round 2" in line for line in refused), refused


def test_node_status_shows_a_hostile_run_id_escaped_on_the_operators_terminal(tmp_path):
    """The run id is the coordinator's choice; printed raw, an ANSI escape or a newline would
    rewrite what the operator reads (a forged "round 9" line, a cleared screen)."""
    node = _deployed(tmp_path)
    run_round(_cfg(tmp_path), "run\x1b[2J\n2026 run x round 9: refused (budget)", 1, node_config=node)
    status = node_status(policy_from_node_config(node))
    assert "\x1b" not in status  # no escape sequence reaches the terminal
    assert not any(line.strip().startswith("2026 run x") for line in status.splitlines())  # no forged line
    assert "run run\\x1b[2J\\n2026 run x round 9: refused (budget) round 1: sent" in status  # spelled out
