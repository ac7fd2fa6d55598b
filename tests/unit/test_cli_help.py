"""Help and config errors (issue 15, item 5): every command explains itself without a Hydra
traceback or a stray output folder; `--version`; key typos get a "did you mean"; wrongly typed
values name the key; a rejected config leaves no `outputs/<date>/<time>` behind."""

from __future__ import annotations

import pytest

from fedllm.cli.main import main

COMMANDS = (
    "simulate",
    "plan",
    "audit",
    "report",
    "evaluate",
    "generate",
    "verify",
    "decrypt",
    "node-status",
    "node",
    "flower-local",
)


def _run(argv: list[str]) -> int:
    """``main(argv)``'s exit status, whether it returns it or argparse exits with it."""
    try:
        return main(argv)
    except SystemExit as exc:
        return int(exc.code or 0)


@pytest.fixture(autouse=True)
def _in_empty_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    yield
    assert list(tmp_path.iterdir()) == [], "the command created files in the working directory"


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help_that_says_what_it_does(command, capsys):
    assert _run([command, "--help"]) == 0
    out, err = capsys.readouterr()
    assert out.startswith(f"usage: fedllm {command}") and "Traceback" not in out + err
    assert len(out.splitlines()) >= 5  # a description and options, not only a usage line


def test_override_commands_list_their_options_groups_and_keys(capsys):
    assert _run(["simulate", "-h"]) == 0
    out = capsys.readouterr().out
    for expected in (
        "-m, --multirun",
        "resume=RUN_DIR",
        "privacy ",
        "sample*",
        "target_epsilon",
        "num_rounds",
        "summary.json",
    ):
        assert expected in out
    assert _run(["audit", "--help"]) == 0
    assert "audit.canaries" in capsys.readouterr().out


def test_top_level_help_and_version(capsys):
    assert _run(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(command in out for command in COMMANDS) and "--help" in out
    assert _run(["--version"]) == 0
    from fedllm import __version__

    assert capsys.readouterr().out.strip() == f"fedllm {__version__}"
    assert _run([]) == 2 and "usage: fedllm" in capsys.readouterr().err
    assert _run(["help", "plan"]) == 0 and capsys.readouterr().out.startswith("usage: fedllm plan")


@pytest.mark.parametrize(
    ("command", "override", "expected"),
    [
        (
            "simulate",
            "privacy.target_epsilion=3",
            "privacy.target_epsilion: unknown key; did you mean privacy.target_epsilon?",
        ),
        ("plan", "privacy.target_epsilion=3", "did you mean privacy.target_epsilon?"),
        ("simulate", "federation.num_round=3", "did you mean federation.num_rounds?"),
        ("simulate", "seeed=1", "seeed: unknown key; did you mean seed?"),
        ("simulate", "privcy=none", "privcy: unknown key; did you mean privacy?"),
        ("simulate", "+privacy.target_epsilion=3", "did you mean privacy.target_epsilon?"),
        ("simulate", "train.batch_size=1.5", "train.batch_size: expected an integer, got 1.5"),
        ("simulate", "federation.num_rounds=three", "federation.num_rounds: expected an integer, got 'three'"),
        ("plan", "federation.num_rounds=three", "federation.num_rounds: expected an integer, got 'three'"),
        ("simulate", "privacy=nonee", "Available options in 'privacy'"),
        ("audit", "audit.canaries=-5", "audit.canaries: at least 2 canaries"),
        ("audit", "audit.kind=foo", "audit.kind: got 'foo'"),
        ("audit", "privacy.target_epsilion=3", "did you mean privacy.target_epsilon?"),
    ],
)
def test_a_rejected_override_is_one_line_and_creates_nothing(command, override, expected, capsys):
    assert _run([command, override]) == 1
    out, err = capsys.readouterr()
    assert err.startswith(f"fedllm {command}: ") and expected in err, err
    assert err.count("\n") == 1 and "Traceback" not in err and "+privacy" not in err.replace(override, "")
    assert "To append to your config" not in out + err


def test_every_job_of_a_sweep_is_checked_before_any_runs(capsys):
    assert _run(["simulate", "-m", "privacy.target_epsilon=3,abc"]) == 1
    assert "privacy.target_epsilon: expected a number, got 'abc'" in capsys.readouterr().err
    assert _run(["simulate", "--multirun", "federation.num_rounds=1,2", "train.lr=0.1,-1"]) == 1
    assert "train.lr: must be positive" in capsys.readouterr().err


def test_a_rejected_config_inside_hydra_leaves_no_run_folder(tmp_path):
    from fedllm.cli.simulate import remove_unused_run_dir

    hydra_only, started = tmp_path / "a", tmp_path / "b"
    for folder in (hydra_only, started):
        (folder / ".hydra").mkdir(parents=True)
        (folder / ".hydra" / "config.yaml").write_text("{}")
        (folder / "simulate.log").write_text("")
    (started / "config.json").write_text("{}")
    remove_unused_run_dir(hydra_only)
    remove_unused_run_dir(started)
    assert not hydra_only.exists() and (started / "config.json").is_file()
    for folder in tmp_path.iterdir():  # the fixture expects an empty working directory
        import shutil

        shutil.rmtree(folder)
