"""The README's deployment examples work as written (issue 15): its node trains every round of
its coordinator's run (and would refuse every round of the default plan, as it says), its run
config file carries quoted values through Flower, the ServerApp's split and Hydra, its
SuperNode command lines are ones flwr 1.42 accepts, and the epsilon it quotes is the accountant's.
Parsed with the same code a SuperNode and the ServerApp use; nothing is started."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from fedllm.config import compose_experiment
from fedllm.errors import ConfigError
from fedllm.planning import plan_for
from fedllm.privacy.calibration import epsilon_by_round
from fedllm.task import split_for
from tests.node_budget import node_outlook, parse_flower_config, quoted_flag, run_config

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:typer")  # flwr's CLI imports it

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()
NODE_RECORDS = 1000  # an institution's records, near which its public sampling-size is chosen


def code_block(language: str, marker: str) -> str:
    """The README's one fenced ``language`` block that contains ``marker``."""
    blocks = [b for b in re.findall(rf"^\s*```{language}\n(.*?)^\s*```", README, flags=re.M | re.S) if marker in b]
    assert len(blocks) == 1, f"expected one {language} block with {marker!r} in README.md, found {len(blocks)}"
    return "\n".join(line.strip() for line in blocks[0].splitlines())


def command(block: str) -> str:
    """A shell command from a block, continuation lines joined."""
    return re.sub(r"\\\n", " ", block)


@pytest.fixture(scope="module")
def launch():
    """The coordinator's documented `flwr run` (step 6)."""
    run = parse_flower_config(quoted_flag(command(code_block("bash", "flwr run . fedllm")), "--run-config"))
    return run, run_config(run["overrides"])


@pytest.fixture(scope="module")
def node_config() -> str:
    return quoted_flag(command(code_block("bash", "flower-supernode")), "--node-config")


@pytest.fixture(scope="module")
def default_run():
    """The default experiment and its binding (smallest) shard, as `fedllm plan` shows them."""
    cfg = compose_experiment([])
    return cfg, min(len(shard) for shard in split_for(cfg).shards)


@pytest.mark.slow  # seconds each: kept out of the fast tier (make test runs it)
def test_the_documented_node_trains_every_round_of_the_documented_run(launch, node_config):
    _, cfg = launch
    outlook = node_outlook(cfg, node_config)
    assert outlook.policy.sampling_size == NODE_RECORDS  # a round figure near its dataset's size
    assert outlook.rounds == outlook.planned, (
        f"the README's node ({node_config}) trains {outlook.rounds} of {outlook.planned} rounds of the README's run "
        f"(target {cfg.privacy.target_epsilon} at delta {cfg.privacy.delta})"
    )
    assert outlook.policy.partition_id < cfg.federation.num_clients


@pytest.mark.slow  # seconds each: kept out of the fast tier (make test runs it)
def test_the_first_round_epsilon_the_readme_quotes_is_the_accountants(default_run, node_config):
    cfg, smallest = default_run
    plan = plan_for(cfg, smallest)
    first = epsilon_by_round(
        noise_multiplier=plan.noise_multiplier,
        sample_rate=plan.sample_rate,
        local_steps=cfg.train.local_steps,
        rounds=1,
        delta=cfg.privacy.delta,
        accountant=cfg.privacy.accountant,
    )[0]
    assert f"shows {first:.2f} after the first of {cfg.federation.num_rounds} rounds for {smallest:,} records" in README
    # and, as it says, the README's node (cap 4) refuses every round of that plan
    assert node_outlook(run_config(""), node_config).rounds == 0


def test_the_run_config_file_carries_quoted_values_to_hydra(tmp_path, launch):
    path = tmp_path / "run.toml"
    path.write_text(code_block("toml", "overrides = "))
    run = parse_flower_config(str(path))  # what `flwr run . fedllm --run-config run.toml` sends
    cfg = run_config(run["overrides"])  # what the ServerApp composes
    assert cfg.data.prompt_template == "Question: {prompt}\nAnswer:"
    assert cfg.data.name == "jsonl" and cfg.data.path and cfg.train.objective == "token"
    assert run["output-dir"].startswith("/")
    # the same plan as the one-line launch: the file form changes only the quoting
    _, one_line = launch
    assert (cfg.privacy.target_epsilon, cfg.privacy.delta) == (one_line.privacy.target_epsilon, one_line.privacy.delta)
    # the one-line form cannot carry it: the ServerApp's split drops the quotes Hydra needs
    with pytest.raises(ConfigError, match="prompt_template"):
        run_config(parse_flower_config("overrides=\"data.prompt_template='Question: {prompt}'\"")["overrides"])


def test_the_documented_supernode_flags_are_flwr_142s():
    from flwr.supernode.cli.flower_supernode import _parse_args_run_supernode

    parser = _parse_args_run_supernode()
    args = shlex.split(command(code_block("bash", "flower-supernode")))
    first = parser.parse_args(args[1:])
    second = parser.parse_args([*args[1:], "--port", "9095"])
    assert (first.host, first.port) == ("127.0.0.1", 9094) and second.port == 9095
    assert first.isolation == "process"  # the node's own ClientApp process runs the installed fedllm (issue 24)
    assert "fedllm node run --runtime-api-address 127.0.0.1:9094" in README
    assert "--host 127.0.0.1 --port 9094" in README and "--port 9095" in README
    with pytest.raises(SystemExit):  # the flag older guides show
        parser.parse_args([*args[1:], "--clientappio-api-address", "127.0.0.1:9095"])


def test_a_node_config_file_is_read_like_the_string(tmp_path, node_config):
    values = parse_flower_config(node_config)
    path = tmp_path / "node.toml"
    path.write_text(
        "".join(
            f"{key} = {value!r}\n".replace("'", '"') if isinstance(value, str) else f"{key} = {value}\n"
            for key, value in values.items()
        )
    )
    assert parse_flower_config(str(path)) == values
