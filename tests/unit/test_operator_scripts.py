"""scripts/make_certs.py and scripts/make_node_keys.py, run in this process (issue 15): `--help`
explains and creates nothing, and an existing CA or key is replaced only with `--force`.
(tests/unit/test_pki.py covers the key files themselves.)"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def load(script: str):
    """The script as a module (its main(argv) is what its command line runs)."""
    spec = importlib.util.spec_from_file_location(script.removesuffix(".py"), ROOT / "scripts" / script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    ("script", "says"), [("make_certs.py", "keep ca.key offline"), ("make_node_keys.py", "stays on the node")]
)
def test_help_explains_every_argument_and_creates_nothing(script, says, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        load(script).main(["--help"])
    out = capsys.readouterr().out
    assert exit_info.value.code == 0 and "--force" in out and says in out
    assert "folder for" in out  # the positional arguments are explained too
    assert list(tmp_path.iterdir()) == []


def test_make_certs_refuses_to_replace_a_ca_without_force(tmp_path, capsys):
    make_certs = load("make_certs.py")
    assert make_certs.main([str(tmp_path), "fl.example.org"]) == 0
    ca_key, ca_cert = (tmp_path / "ca.key").read_bytes(), (tmp_path / "ca.crt").read_bytes()
    assert make_certs.main([str(tmp_path), "fl.example.org"]) == 1
    err = capsys.readouterr().err
    assert "--force" in err and "Traceback" not in err
    assert (tmp_path / "ca.key").read_bytes() == ca_key and (tmp_path / "ca.crt").read_bytes() == ca_cert
    assert make_certs.main(["--force", str(tmp_path), "fl.example.org"]) == 0
    assert (tmp_path / "ca.key").read_bytes() != ca_key


def test_make_node_keys_refuses_to_replace_a_key_without_force(tmp_path, capsys):
    make_node_keys = load("make_node_keys.py")
    assert make_node_keys.main([str(tmp_path), "hospital-a"]) == 0
    private, public = (tmp_path / "hospital-a").read_bytes(), (tmp_path / "hospital-a.pub").read_bytes()
    assert make_node_keys.main([str(tmp_path), "hospital-a"]) == 1 and "--force" in capsys.readouterr().err
    assert (tmp_path / "hospital-a").read_bytes() == private and (tmp_path / "hospital-a.pub").read_bytes() == public
    assert make_node_keys.main(["--force", str(tmp_path), "hospital-a"]) == 0
    assert (tmp_path / "hospital-a").read_bytes() != private
