"""docker/: every container can read the keys it needs and no other, nodes reach only the Fleet
gateway, images are pinned (issue 13, problems 1 and 11); every folder a container writes is the
image's and its user's, the default model is prepared at build time, torch is the pinned CPU
wheel, no secret enters an image, and the documented run trains on every node (issue 15). No
Docker daemon here: the compose file and the Dockerfiles are checked against each other, against
Flower's base images, and against what prepare.py writes."""

from __future__ import annotations

import ast
import importlib
import importlib.util
import inspect
import re
import shlex
import stat
import tomllib
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import pytest
import yaml
from cryptography import x509
from packaging.specifiers import SpecifierSet

from fedllm.config import compose_experiment
from fedllm.model import base
from tests.node_budget import node_outlook, parse_flower_config, quoted_flag, run_config

# flwr's CLI imports typer, which warns on import (not our code)
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:typer")

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
PRIVATE_KEYS = ("certs/ca.key", "certs/server.key", "keys/node1", "keys/node2")
KEY_FLAGS = ("--ssl-keyfile", "--auth-supernode-private-key")
INSTALL = re.compile(r"install -m (0[0-7]{3}) -o (\d+) -g (\d+) (\S+) (\S+)")


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((DOCKER / "compose.yaml").read_text())


@pytest.fixture(scope="module")
def prepare_script():
    """docker/prepare.py, loaded in this process (its main() is what the command line runs)."""
    spec = importlib.util.spec_from_file_location("docker_prepare", DOCKER / "prepare.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, prepare_script) -> Path:
    folder = tmp_path_factory.mktemp("docker")
    assert prepare_script.main([str(folder), "--host", "fl.example.org"]) == 0
    return folder


@dataclass
class Run:
    """One RUN instruction: the user it runs as, and its `&&`-separated commands."""

    index: int
    user: str
    commands: list[list[str]]


@dataclass
class Dockerfile:
    """What a Dockerfile does, read without Docker: instructions with continuation lines joined."""

    text: str
    instructions: list[tuple[str, str]]
    user: str = "0:0"
    workdir: str = "/"
    env: dict[str, tuple[int, str]] = field(default_factory=dict)  # name -> (instruction index, value)
    args: dict[str, str] = field(default_factory=dict)
    runs: list[Run] = field(default_factory=list)
    copies: list[str] = field(default_factory=list)
    created: set[str] = field(default_factory=set)
    owners: dict[str, str] = field(default_factory=dict)

    @classmethod
    def read(cls, name: str) -> Dockerfile:
        text = (DOCKER / name).read_text()
        lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
        joined = re.sub(r"\\\n\s*", " ", "\n".join(lines))
        image = cls(text, [(m[1].upper(), m[2].strip()) for m in re.finditer(r"^(\w+)\s+(.*)$", joined, flags=re.M)])
        for index, (op, rest) in enumerate(image.instructions):
            image._apply(index, op, rest)
        return image

    def _apply(self, index: int, op: str, rest: str) -> None:
        if op == "USER":
            self.user = rest
        elif op == "WORKDIR":
            self.workdir = rest
        elif op in ("ENV", "ARG"):
            pairs = dict(item.split("=", 1) for item in shlex.split(rest) if "=" in item)
            if op == "ENV":
                self.env.update({k: (index, v) for k, v in pairs.items()})
            else:
                self.args.update(pairs)
        elif op in ("COPY", "ADD"):
            self.copies += [arg for arg in shlex.split(rest)[:-1] if not arg.startswith("--")]
        elif op == "RUN":
            commands = [shlex.split(part) for part in rest.split("&&")]
            self.runs.append(Run(index, self.user, commands))
            for command in commands:
                self._track(command)

    def _track(self, command: list[str]) -> None:
        """Folders made and their owners (mkdir -p, chown U:G, useradd --create-home)."""
        if command[:2] == ["mkdir", "-p"]:
            for path in command[2:]:
                self.created |= {str(p) for p in [PurePosixPath(path), *PurePosixPath(path).parents]}
        elif command and command[0] == "chown":
            self.owners.update({path: command[1] for path in command[2:]})
        elif command and command[0] == "useradd" and "--create-home" in command:
            # useradd's default home is /home/<login> (its last argument)
            home = command[command.index("--home-dir") + 1] if "--home-dir" in command else f"/home/{command[-1]}"
            self.created.add(home)
            self.owners[home] = f"{command[command.index('--uid') + 1]}:{command[command.index('--gid') + 1]}"

    def owner(self, path: str) -> str | None:
        return self.owners.get(path)


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


def test_prepare_writes_private_keys_0600_and_a_certificate_for_every_name(prepared, prepare_script, capsys):
    for key in PRIVATE_KEYS:
        assert stat.S_IMODE((prepared / key).stat().st_mode) == 0o600, key
    for public in ("certs/ca.crt", "certs/server.crt", "keys/node1.pub"):
        assert stat.S_IMODE((prepared / public).stat().st_mode) & 0o044 == 0o044, public
    cert = x509.load_pem_x509_certificate((prepared / "certs" / "server.crt").read_bytes())
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {"fl.example.org", "fleet-gateway", "superlink", "localhost"} <= set(names.get_values_for_type(x509.DNSName))
    # run again: nothing is replaced without --force
    before = (prepared / "certs" / "ca.key").read_bytes()
    assert prepare_script.main([str(prepared)]) == 1 and "--force" in capsys.readouterr().err
    assert (prepared / "certs" / "ca.key").read_bytes() == before


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
            others = [
                s
                for s, svc in compose["services"].items()
                if s not in (name, "keys") and volume in [m[0] for m in mounts(svc)]
            ]
            assert not others, f"{name}'s key volume is also mounted by {others}"
    assert used == 4  # superlink, gateway, two nodes


def test_the_dockerfiles_run_as_the_users_the_keys_are_installed_for():
    superlink = Dockerfile.read("Dockerfile.superlink")
    app = Dockerfile.read("Dockerfile.app")
    assert superlink.user == "49999:49999" and app.user == "10001:10001"
    assert "--uid 10001 --gid 10001" in app.text
    assert app.owner("/state") == "10001:10001" and superlink.owner("/state") == "49999:49999"


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
        app = services[f"node{name[-1]}-app"]  # the node's own ClientApp reads the data, read-only
        assert any(target == "/data" and ro for _, target, ro in mounts(app))
        assert app["network_mode"] == f"service:{name}" and "networks" not in app and not app.get("ports")
    gateway = argv(services["fleet-gateway"])
    assert services["fleet-gateway"]["entrypoint"][-1] == "fedllm.deployment.fleet_gateway"
    assert flag_value(gateway, "--superlink") == "superlink:9093"
    assert set(services["serverapp"]["networks"]) == {"control"}


def test_each_node_runs_its_installed_fedllm_never_the_coordinators_bundle(compose):
    """Issue 24: every SuperNode leaves its ClientApp to a process of its own (--isolation process),
    `fedllm node run` on the SuperNode's loopback Runtime API, which loads the image's fedllm."""
    services = compose["services"]
    nodes = [name for name in services if name.startswith("supernode")]
    assert nodes == ["supernode-1", "supernode-2"]
    for name in nodes:
        assert flag_value(argv(services[name]), "--isolation") == "process", name
        app = services[f"node{name[-1]}-app"]
        assert [*app["entrypoint"], *argv(app)][:3] == ["fedllm", "node", "run"]
        assert flag_value(argv(app), "--runtime-api-address") == "127.0.0.1:9094"  # flower-supernode's default
        assert not [t for _, t, _ in mounts(services[name]) if t in ("/data", "/state")], f"{name} reads no data"


def test_the_superlink_runs_with_tls_node_auth_and_no_runtime_installs(compose):
    args = argv(compose["services"]["superlink"])
    assert "--enable-supernode-auth" in args and "--disable-runtime-dependency-installation" in args
    assert "--insecure" not in args and flag_value(args, "--ssl-keyfile") == "/tls/server.key"
    app = (DOCKER / "Dockerfile.app").read_text()
    assert "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1" in app


def test_images_are_pinned_to_a_release_or_a_digest(compose):
    pinned = re.compile(
        r"^flwr/(superlink|supernode|superexec):1\.42\.0(-py3\.\d+-ubuntu[\d.]+)?"
        r"(@sha256:[0-9a-f]{64})?$"
    )
    froms = re.findall(r"^FROM\s+(\S+)", (DOCKER / "Dockerfile.superlink").read_text(), flags=re.M)
    assert froms and all(pinned.match(image) for image in froms)
    assert re.search(r"^ARG BASE_IMAGE=(\S+)", (DOCKER / "Dockerfile.app").read_text(), flags=re.M)
    for name, service in compose["services"].items():
        base = service["build"].get("args", {}).get("BASE_IMAGE")
        assert base is None or pinned.match(base), f"{name}: {base}"
    for text in ((DOCKER / "Dockerfile.superlink").read_text(), (DOCKER / "compose.yaml").read_text()):
        assert "digest" in text  # says why there is none yet and how to add it


# --- issue 15: the images could run as written ---------------------------------------------------

PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
SECRET_LIKE = re.compile(r"key|secret|token|passw|\.pem$|\.crt$|certs|node-data|\.env", re.I)
SECRET_NAME = re.compile(r"(^|_)(KEY|SECRET|TOKEN|PASSWORD|PASSWD)(_|$)", re.I)  # not TOKENIZERS_PARALLELISM


def image_of(service: dict) -> Dockerfile:
    return Dockerfile.read(Path(service["build"]["dockerfile"]).name)


def test_every_folder_a_container_writes_is_its_images_and_its_users(compose):
    checked = 0
    for name, service in compose["services"].items():
        user = dockerfile_user(service)
        if user.split(":")[0] in ("0", "root"):
            continue  # the one-shot `keys` service
        image = image_of(service)
        for _, target, read_only in mounts(service):
            if read_only:
                continue
            checked += 1
            # a fresh named volume takes the folder's owner from the image; a folder the image
            # lacks becomes a root-owned mount point the service's user cannot write
            assert target in image.created, f"{name}: {target} is mounted writable but the image has no such folder"
            assert image.owner(target) == user, f"{name}: {target} belongs to {image.owner(target)}, runs as {user}"
    assert checked == 6  # superlink state, ServerApp outputs, two node states, two ledger anchors
    # the ServerApp's default output folder (outputs/deployment/..., relative to its working
    # directory) is inside its outputs volume
    serverapp = compose["services"]["serverapp"]
    writable = [target for _, target, ro in mounts(serverapp) if not ro]
    assert f"{image_of(serverapp).workdir}/outputs" in writable


def test_home_and_the_model_cache_belong_to_the_runtime_user(monkeypatch):
    app = Dockerfile.read("Dockerfile.app")
    # Flower's base images set HOME=/app, owned by their own user (49999): ours must move it
    assert {"HOME", "FEDLLM_CACHE"} <= set(app.env), "HOME (and the model cache) left at the base image's /app"
    home, cache = app.env["HOME"][1], app.env["FEDLLM_CACHE"][1]
    assert app.owner(home) == app.user, f"HOME={home} is not {app.user}'s"
    assert PurePosixPath(cache).is_relative_to(home)
    for folder in [PurePosixPath(cache), *PurePosixPath(cache).parents]:
        if folder.is_relative_to(home) and folder != PurePosixPath(home):
            assert app.owner(str(folder)) == app.user, f"{folder} is not {app.user}'s: nothing can be cached below it"
    monkeypatch.setenv("FEDLLM_CACHE", cache)
    assert base.cache_root() == Path(cache)  # where fedllm looks


def test_the_default_model_is_prepared_at_build_time_and_reused(monkeypatch, tmp_path):
    app = Dockerfile.read("Dockerfile.app")
    prepares = [run for run in app.runs if any("embedded_model_dir" in " ".join(c) for c in run.commands)]
    assert len(prepares) == 1, "no RUN prepares the default model: every container would dequantise it at start"
    [prepare] = prepares
    [install] = [run for run in app.runs if any(c[-1:] == ["."] and "install" in c for c in run.commands)]
    assert prepare.index > install.index and prepare.user == app.user  # as the user whose cache it fills
    assert all(app.env[name][0] < prepare.index for name in ("HOME", "FEDLLM_CACHE", "HF_HUB_OFFLINE"))
    # the build step's Python names functions that exist, and is what the default model loads
    [snippet] = [c[c.index("-c") + 1] for c in prepare.commands if "-c" in c]
    for node in ast.walk(ast.parse(snippet)):
        if isinstance(node, ast.ImportFrom):
            module = importlib.import_module(node.module)
            assert all(hasattr(module, alias.name) for alias in node.names), snippet
    assert compose_experiment([]).model.kind == "embedded"
    # a prepared cache is used as it is: nothing is dequantised again
    monkeypatch.setenv("FEDLLM_CACHE", str(tmp_path))
    baked = tmp_path / base.EMBEDDED_CACHE_NAME
    baked.mkdir()
    (baked / "config.json").write_text("{}")

    def no_gguf():
        raise AssertionError("the model was converted again")

    monkeypatch.setattr(base, "embedded_gguf", no_gguf)
    assert base.embedded_model_dir() == baked


def test_torch_is_the_pinned_cpu_wheel_installed_before_fedllm():
    app = Dockerfile.read("Dockerfile.app")
    commands = [command for run in app.runs for command in run.commands]
    pins = [c for c in commands if "install" in c and any(arg.startswith("torch") for arg in c)]
    [torch] = pins
    pinned = re.search(r"torch==([\d.]+)", " ".join(torch))
    assert pinned and "https://download.pytorch.org/whl/cpu" in torch
    assert f"torch=={pinned[1]}" in PYPROJECT["project"]["dependencies"] and pinned[1] == "2.13.0"
    assert commands.index(torch) < next(i for i, c in enumerate(commands) if c[-1:] == ["."] and "install" in c)


def test_base_images_are_ubuntu_with_a_python_fedllm_supports(compose):
    supported = SpecifierSet(PYPROJECT["project"]["requires-python"])
    images = [Dockerfile.read("Dockerfile.app").args["BASE_IMAGE"]]
    images += [
        s["build"]["args"]["BASE_IMAGE"]
        for s in compose["services"].values()
        if s["build"]["dockerfile"].endswith("Dockerfile.app")
    ]
    for image in images:
        # the bare release tag (flwr/supernode:1.42.0) is Flower's Alpine image with Python 3.13:
        # no torch wheel for musl, and outside fedllm's requires-python
        found = re.search(r":[\d.]+-py(3\.\d+)-ubuntu", image)
        assert found, f"{image}: pin the -pyX.Y-ubuntuZZ.ZZ variant"
        assert supported.contains(f"{found[1]}.0"), f"{image}: Python {found[1]} is outside {supported}"


def test_no_secret_enters_an_image(compose):
    for name in sorted({Path(s["build"]["dockerfile"]).name for s in compose["services"].values()}):
        image = Dockerfile.read(name)
        assert not [s for s in image.copies if SECRET_LIKE.search(s)], f"{name} copies {image.copies}"
        assert not [k for k in [*image.env, *image.args] if SECRET_NAME.search(k)], name
        # the build context is the repository root: the Dockerfile's own ignore file lets through
        # only what it copies (never docker/certs, docker/keys, docker/node-data, outputs, .venv)
        ignore = [
            line.strip()
            for line in (DOCKER / f"{name}.dockerignore").read_text().splitlines()
            if line.strip() and not line.startswith("#")
        ]
        assert ignore[0] == "*", name
        allowed = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
        assert allowed == {source.rstrip("/") for source in image.copies}, name
    for name, service in compose["services"].items():
        environment = service.get("environment", {})
        names = environment if isinstance(environment, dict) else [e.split("=")[0] for e in environment]
        assert not [n for n in names if SECRET_NAME.search(n)], name


@pytest.mark.slow  # seconds each: kept out of the fast tier (make test runs it)
def test_the_documented_run_trains_on_every_node_for_all_its_rounds(compose, prepare_script):
    """The compose header's `flwr run` against the two nodes' own caps: a run planned past a
    node's cap is refused by that node in every round (the node plans from its sampling-size,
    which the compose file sets to the records `prepare.py` writes)."""
    [line] = [
        line.lstrip("# ")
        for line in (DOCKER / "compose.yaml").read_text().splitlines()
        if line.startswith("#") and "flwr run ." in line
    ]
    run = parse_flower_config(quoted_flag(line, "--run-config"))
    cfg = run_config(run["overrides"])
    records = inspect.signature(prepare_script.prepare).parameters["records"].default
    nodes = {name: s for name, s in compose["services"].items() if name.startswith("supernode")}
    partitions = []
    for name, service in nodes.items():
        outlook = node_outlook(cfg, flag_value(argv(service), "--node-config"))
        assert outlook.policy.sampling_size == records, name
        assert outlook.rounds == outlook.planned, (
            f"{name} trains {outlook.rounds} of {outlook.planned} rounds: the run's target "
            f"{cfg.privacy.target_epsilon} at delta {cfg.privacy.delta} exceeds its cap"
        )
        partitions.append(outlook.policy.partition_id)
    assert sorted(partitions) == list(range(cfg.federation.num_clients))
    writable = [target for _, target, ro in mounts(compose["services"]["serverapp"]) if not ro]
    assert any(PurePosixPath(run["output-dir"]).is_relative_to(target) for target in writable)


def test_every_node_anchors_its_ledger_in_a_host_folder_and_down_v_is_never_advised(compose):
    """Issue 25, item 7: `down -v` deletes the state volumes; the anchors must outlive them."""
    for node in ("1", "2"):
        config = flag_value(argv(compose["services"][f"supernode-{node}"]), "--node-config") or ""
        anchor = dict(shlex.split(item)[0].split("=", 1) for item in shlex.split(config, posix=False))["ledger-anchor"]
        app_mounts = {target: source for source, target, _ in mounts(compose["services"][f"node{node}-app"])}
        folder = str(Path(anchor).parent)
        assert app_mounts[folder].startswith("./"), f"node {node}: the anchor is not on a host folder"
        assert app_mounts["/state"] != app_mounts[folder]
    text = (DOCKER / "compose.yaml").read_text()
    advice = [line for line in text.splitlines() if "down -v" in line]
    assert advice and all("never" in line or "deletes" in line for line in advice)  # a warning, never a suggestion
    assert "`docker compose down -v` deletes those copies" not in text and "deletes the named volumes" in text
