"""Shell completion: fedllm's own script (Hydra's would register a `fedllm-simulate` that does not exist)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fedllm.cli.completion import completion_request, completion_script
from fedllm.cli.main import main


def test_install_and_uninstall_are_fedllms_and_queries_are_left_to_hydra():
    assert completion_request(["-sc", "install=bash"]) == "install=bash"
    assert completion_request(["privacy=client", "--shell-completion", "uninstall=zsh"]) == "uninstall=zsh"
    assert completion_request(["-sc", "query=bash"]) is None  # Hydra answers the script's queries
    assert completion_request(["privacy.target_epsilon=3"]) is None
    assert completion_request([]) is None  # `make run`: `fedllm simulate` with no override at all
    assert completion_request(["-sc"]) is None  # left for Hydra to reject
    script = completion_script("install=bash")
    assert "complete -o nospace -o default -F _fedllm_complete fedllm" in script
    assert "fedllm-simulate" in script and "complete -F hydra_bash_completion" not in script
    assert completion_script("uninstall=bash").startswith("complete -r fedllm")


def test_an_unsupported_shell_is_one_line_and_exit_1(capsys):
    assert main(["plan", "-sc", "install=fish"]) == 1
    assert capsys.readouterr().err.strip() == "fedllm plan: shell completion: fish is not supported; choose bash or zsh"


# completing a line as bash does: COMP_* set, the function called, COMPREPLY printed
DRIVER = """
eval "$(fedllm simulate -sc install=bash)"
COMP_LINE="$1"; COMP_POINT=${#COMP_LINE}
read -ra COMP_WORDS <<< "$COMP_LINE"; [[ "$COMP_LINE" == *" " ]] && COMP_WORDS+=("")
COMP_CWORD=$(( ${#COMP_WORDS[@]} - 1 ))
_fedllm_complete
printf '%s\\n' "${COMPREPLY[@]}"
"""


@pytest.mark.slow  # bash, and a `fedllm simulate -sc query=bash` per override completed
@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
@pytest.mark.parametrize(
    "line, expected",
    [
        ("fedllm sim", ["simulate"]),
        ("fedllm simulate privacy.targ", ["privacy.target_epsilon="]),
        ("fedllm plan federation.num_r", ["federation.num_rounds="]),
        ("fedllm audit priv", ["privacy.", "privacy="]),
    ],
)
def test_bash_completes_commands_and_overrides(tmp_path, line, expected):
    env = {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "HOME": str(Path.home())}
    result = subprocess.run(
        ["bash", "-c", DRIVER, "driver", line], capture_output=True, text=True, env=env, timeout=120, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    assert sorted(result.stdout.split()) == sorted(expected)
