"""Bash (and zsh) completion for ``fedllm``: its commands, then Hydra's completion of overrides.

Hydra's own ``-sc install=bash`` script registers the command it was started as and asks it
for completions; fedllm runs Hydra as ``fedllm-simulate`` (no such command exists) and a
``fedllm`` that needs a subcommand first, so Hydra's script completes nothing. This script
completes the subcommand itself and, after ``simulate``, ``plan`` or ``audit``, asks Hydra
(``fedllm <command> -sc query=bash``) with the line rewritten as Hydra expects it.
"""

from __future__ import annotations

COMMANDS = ("simulate", "plan", "audit", "report", "verify", "decrypt", "node-status", "evaluate", "generate")
HYDRA_COMMANDS = ("simulate", "plan", "audit")  # the commands that take Hydra overrides
SHELLS = ("bash", "zsh")

_SCRIPT = """\
# fedllm completion: eval "$(fedllm simulate -sc install=bash)"  (zsh: autoload -U bashcompinit; bashcompinit first)
_fedllm_complete()
{
    local words=($COMP_LINE)
    local current="${COMP_WORDS[COMP_CWORD]}"
    if (( COMP_CWORD <= 1 )); then
        COMPREPLY=($(compgen -W "COMMANDS --help --version" -- "$current"))
        return
    fi
    case "${words[1]}" in
        HYDRA_CASES)
            # the three take the same overrides; Hydra (run by `simulate`) completes them from the line
            # as it would see it: "fedllm-simulate <overrides>"
            local line="fedllm-simulate${COMP_LINE#*${words[1]}}"
            local choices
            choices=$(COMP_POINT=${#line} COMP_LINE="$line" "${words[0]}" simulate -sc query=bash 2>/dev/null)
            COMPREPLY=($(compgen -o nospace -o default -W "$choices" -- "$current"))
            ;;
        *)
            COMPREPLY=($(compgen -o default -- "$current"))
            ;;
    esac
}
COMP_WORDBREAKS=${COMP_WORDBREAKS//=}
complete -o nospace -o default -F _fedllm_complete fedllm
"""


def completion_request(argv: list[str]) -> str | None:
    """The shell-completion action ``argv`` asks for (``install=bash``, ``uninstall=zsh``, ...), if it
    asks to install or uninstall one; None otherwise (Hydra answers ``query=`` itself)."""
    for index, flag in enumerate(argv):
        value = argv[index + 1] if index + 1 < len(argv) else ""
        if flag in ("-sc", "--shell-completion") and value.split("=", 1)[0] in ("install", "uninstall"):
            return value
    return None


def completion_script(request: str) -> str:
    """What ``fedllm <command> -sc install=bash`` (or ``uninstall=bash``) prints for ``eval``.

    Raises:
        ValueError: a shell other than bash or zsh (its message names the ones there are).
    """
    action, _, shell = request.partition("=")
    if shell not in SHELLS:
        raise ValueError(f"shell completion: {shell or 'no shell'} is not supported; choose {' or '.join(SHELLS)}")
    if action == "uninstall":
        return "complete -r fedllm 2> /dev/null; unset -f _fedllm_complete\n"
    return _SCRIPT.replace("HYDRA_CASES", "|".join(HYDRA_COMMANDS)).replace("COMMANDS", " ".join(COMMANDS))
