"""A run folder is data, never code (issue 25, item 3): ``fedllm evaluate`` / ``generate`` load a
base model from a path the folder names only when the command line names it too, and run a base's
own Python only with ``--trust-remote-code``."""

from __future__ import annotations

import json

import pytest

from fedllm.cli.main import main
from fedllm.config import ModelConfig
from fedllm.errors import FedLLMError
from fedllm.finished_run import LoadConsent, consented_model
from tests.conftest import tiny_config

EVIL = """
import pathlib
pathlib.Path({marker!r}).write_text("ran")
from transformers import LlamaConfig, LlamaForCausalLM
class EvilConfig(LlamaConfig):
    model_type = "evil"
class EvilModel(LlamaForCausalLM):
    config_class = EvilConfig
"""


@pytest.fixture
def booby_trapped(tmp_path):
    """A run folder whose config.json points at a model folder with an ``auto_map`` and
    ``trust_remote_code=true``, the model's Python writing a marker file when imported."""
    marker = tmp_path / "marker"
    model = tmp_path / "evil-model"
    model.mkdir()
    (model / "modeling_evil.py").write_text(EVIL.format(marker=str(marker)), encoding="utf-8")
    auto_map = {"AutoConfig": "modeling_evil.EvilConfig", "AutoModelForCausalLM": "modeling_evil.EvilModel"}
    (model / "config.json").write_text(json.dumps({"model_type": "evil", "auto_map": auto_map}), encoding="utf-8")
    (model / "tokenizer_config.json").write_text(json.dumps({"auto_map": auto_map}), encoding="utf-8")
    cfg = tiny_config(model=ModelConfig(source="pretrained", name_or_path=str(model), trust_remote_code=True))
    run_dir = tmp_path / "run"
    (run_dir / "adapter").mkdir(parents=True)
    (run_dir / "config.json").write_text(cfg.to_json(), encoding="utf-8")
    return run_dir, model, marker


@pytest.mark.parametrize("command", [["evaluate"], ["generate", "--max-new-tokens", "1"]])
def test_a_run_folder_naming_a_model_with_remote_code_runs_none_of_it(booby_trapped, command, capsys):
    run_dir, model, marker = booby_trapped
    name, *flags = command
    prompt = ["hello"] if name == "generate" else []
    assert main([name, str(run_dir), *prompt, *flags]) == 1
    assert f"--base-model '{model}'" in capsys.readouterr().err  # says how to allow it, naming the base
    # naming the base is not enough: its code needs its own flag
    assert main([name, str(run_dir), *prompt, *flags, "--base-model", str(model)]) == 1
    assert "--trust-remote-code" in capsys.readouterr().err
    assert main([name, str(run_dir), *prompt, *flags, "--base-model", "/elsewhere", "--trust-remote-code"]) == 1
    assert "names another one" in capsys.readouterr().err
    assert not marker.exists()


def test_consent_rules_for_built_in_and_loaded_bases(tmp_path):
    where = tmp_path / "config.json"
    tiny = ModelConfig(source="tiny", trust_remote_code=True)
    assert consented_model(tiny, LoadConsent(), where).trust_remote_code is False  # fedllm builds it: no code
    with pytest.raises(FedLLMError, match="drop --base-model"):
        consented_model(tiny, LoadConsent(base_model="x"), where)
    hub = ModelConfig(source="pretrained", name_or_path="org/model")
    with pytest.raises(FedLLMError, match="nothing names it"):
        consented_model(hub, LoadConsent(), where)
    assert consented_model(hub, LoadConsent(base_model="org/model"), where) == hub
    remote = ModelConfig(source="pretrained", name_or_path="org/model", trust_remote_code=True)
    with pytest.raises(FedLLMError, match="--trust-remote-code"):
        consented_model(remote, LoadConsent(base_model="org/model"), where)
    assert consented_model(remote, LoadConsent(base_model="org/model", trust_remote_code=True), where) == remote
