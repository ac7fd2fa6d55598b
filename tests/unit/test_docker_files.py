"""docker/: every container can read the keys it needs and no other, nodes reach only the Fleet
gateway, images are pinned (issue 13, problems 1 and 11). No Docker daemon here: the compose
file and the Dockerfiles are checked against each other and against what prepare.py writes."""

from __future__ import annotations

import re
import shlex
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from cryptography import x509

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
PRIVATE_KEYS = ("certs/ca.key", "certs/server.key", "keys/node1", "keys/node2")
KEY_FLAGS = ("--ssl-keyfile", "--auth-supernode-private-key")
INSTALL = re.compile(r"install -m (0[0-7]{3}) -o (\d+) -g (\d+) (\S+) (\S+)")


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((DOCKER / "compose.yaml").read_text())


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("docker")
    result = subprocess.run([sys.executable, str(DOCKER / "prepare.py"), str(folder), "--host", "fl.example.org"],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return folder


def dockerfile_user(service: dict) -> str:
    """The user a service runs as: compose's `user`, else the Dockerfile's last USER."""
    if "user" in service:
        return str(service["user"])
    text = (ROOT / service["build"]["dockerfile"]).read_text()
    users = re.findall(r"^USER\s+(\S+)", text, flags=re.M)
    return users[-1] if users else "0:0"


def argv(service: dict) -> list[str]:
    command = service.get("command", [])
    return shlex.split(command) if isinstance(command, str) else list(command)


def flag_value(args: list[str], flag: str) -> str | None:
    for index, arg in enumerate(args):
        if arg == flag:
            return args[index + 1]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    return None


def mounts(service: dict) -> list[tuple[str, str, bool]]:
    """(source, target, read-only) of each volume entry."""
    found = []
    for volume in service.get("volumes", []):
        source, target, *mode = volume.split(":")
        found.append((source, target, bool(mode) and "ro" in mode[0].split(",")))
    return found


def installs(compose: dict) -> dict[str, tuple[str, str]]:
    """Key copies the `keys` service makes: container path in its volume -> (mode, uid:gid)."""
    keys = compose["services"]["keys"]
    volume_at = {target: source for source, target, _ in mounts(keys)}
    found = {}
    for mode, uid, gid, _, destination in INSTALL.findall("\n".join(argv(keys))):
        folder, name = destination.rsplit("/", 1)
        found[f"{volume_at[folder]}/{name}"] = (mode, f"{uid}:{gid}")
    return found


def test_prepare_writes_private_keys_0600_and_a_certificate_for_every_name(prepared):
    for key in PRIVATE_KEYS:
        assert stat.S_IMODE((prepared / key).stat().st_mode) == 0o600, key
    for public in ("certs/ca.crt", "certs/server.crt", "keys/node1.pub"):
        assert stat.S_IMODE((prepared / public).stat().st_mode) & 0o044 == 0o044, public
    cert = x509.load_pem_x509_certificate((prepared / "certs" / "server.crt").read_bytes())
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {"fl.example.org", "fleet-gateway", "superlink", "localhost"} <= set(names.get_values_for_type(x509.DNSName))
    # run again: nothing is replaced without --force
    again = subprocess.run([sys.executable, str(DOCKER / "prepare.py"), str(prepared)], cwd=ROOT,
                           capture_output=True, text=True, timeout=120)
    assert again.returncode != 0 and "--force" in again.stderr


def test_every_mounted_file_exists_and_every_volume_is_declared(compose, prepared):
    for name, service in compose["services"].items():
        for source, _target, _ in mounts(service):
            if source.startswith("."):
                assert (prepared / source).exists(), f"{name}: {source}"
            else:
                assert source in compose["volumes"], f"{name}: undeclared volume {source}"
        context = (DOCKER / service["build"]["context"]).resolve()
        assert (context / service["build"]["dockerfile"]).is_file(), name


def test_no_host_private_key_is_mounted_into_an_unprivileged_container(compose):
    for name, service in compose["services"].items():
        for source, _, read_only in mounts(service):
            if source.lstrip("./") in PRIVATE_KEYS:
                # only the one-shot root service that hands keys over reads the host's 0600 files
                assert name == "keys" and dockerfile_user(service) == "0:0" and read_only, f"{name}: {source}"
                assert service.get("network_mode") == "none"
        assert not any(source.endswith("ca.key") for source, _, _ in mounts(service)), f"{name} gets the CA key"


def test_each_key_a_service_uses_is_installed_0400_for_the_user_it_runs_as(compose):
    copies = installs(compose)
    used = 0
    for name, service in compose["services"].items():
        user = dockerfile_user(service)
        for flag in KEY_FLAGS:
            path = flag_value(argv(service), flag)
            if path is None:
                continue
            used += 1
            folder, key = path.rsplit("/", 1)
            [volume] = [source for source, target, ro in mounts(service) if target == folder and ro]
            assert copies.get(f"{volume}/{key}") == ("0400", user), f"{name}: {path} is not installed for {user}"
            assert user.split(":")[0] not in ("0", "root"), f"{name} runs as root"
            others = [s for s, svc in compose["services"].items()
                      if s not in (name, "keys") and volume in [m[0] for m in mounts(svc)]]
            assert not others, f"{name}'s key volume is also mounted by {others}"
    assert used == 4  # superlink, gateway, two nodes


def test_the_dockerfiles_run_as_the_users_the_keys_are_installed_for():
    superlink = (DOCKER / "Dockerfile.superlink").read_text()
    app = (DOCKER / "Dockerfile.app").read_text()
    assert re.findall(r"^USER\s+(\S+)", superlink, flags=re.M)[-1] == "49999:49999"
    assert re.findall(r"^USER\s+(\S+)", app, flags=re.M)[-1] == "10001:10001"
    assert "--uid 10001 --gid 10001" in app and "chown 10001:10001 /state /opt/fedllm/outputs" in app
    assert "chown 49999:49999 /state" in superlink


def test_nodes_reach_only_the_gateway_and_the_control_api_only_this_host(compose):
    services = compose["services"]
    link = services["superlink"]
    assert all(port.startswith("127.0.0.1:") for port in link.get("ports", [])), "Control API published publicly"
    assert "fleet" not in link["networks"]
    published = {name: s.get("ports", []) for name, s in services.items()}
    public = [name for name, ports in published.items() if any(not p.startswith("127.0.0.1:") for p in ports)]
    assert public == ["fleet-gateway"]
    for name in ("supernode-1", "supernode-2"):
        assert services[name]["networks"] == ["fleet"]
        assert flag_value(argv(services[name]), "--superlink") == "fleet-gateway:9092"
        assert any(target == "/data" and ro for _, target, ro in mounts(services[name]))  # data read-only
    gateway = argv(services["fleet-gateway"])
    assert services["fleet-gateway"]["entrypoint"][-1] == "fedllm.deployment.fleet_gateway"
    assert flag_value(gateway, "--superlink") == "superlink:9093"
    assert set(services["serverapp"]["networks"]) == {"control"}


def test_the_superlink_runs_with_tls_node_auth_and_no_runtime_installs(compose):
    args = argv(compose["services"]["superlink"])
    assert "--enable-supernode-auth" in args and "--disable-runtime-dependency-installation" in args
    assert "--insecure" not in args and flag_value(args, "--ssl-keyfile") == "/tls/server.key"
    app = (DOCKER / "Dockerfile.app").read_text()
    assert "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1" in app


def test_images_are_pinned_to_a_release_or_a_digest(compose):
    pinned = re.compile(r"^flwr/(superlink|supernode|superexec):1\.42\.0(@sha256:[0-9a-f]{64})?$")
    froms = re.findall(r"^FROM\s+(\S+)", (DOCKER / "Dockerfile.superlink").read_text(), flags=re.M)
    assert froms and all(pinned.match(image) for image in froms)
    assert re.search(r"^ARG BASE_IMAGE=(\S+)", (DOCKER / "Dockerfile.app").read_text(), flags=re.M)
    for name, service in compose["services"].items():
        base = service["build"].get("args", {}).get("BASE_IMAGE")
        assert base is None or pinned.match(base), f"{name}: {base}"
    for text in ((DOCKER / "Dockerfile.superlink").read_text(), (DOCKER / "compose.yaml").read_text()):
        assert "digest" in text  # says why there is none yet and how to add it
