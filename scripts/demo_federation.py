"""A local federation on Flower's Deployment Engine: SuperLink + N SuperNodes over TLS with node
authentication, then `flwr run`. Every process it starts is stopped before it exits.

    python scripts/demo_federation.py --workdir /tmp/fedllm-demo [--nodes 2] [--unregistered 1]
        [--outsider] [--overrides "debug=smoke federation.num_rounds=2 federation.min_updates=2"]
        [--caps 8,6] [--port 9400]

What it does, as an operator would:
  1. a private CA and the SuperLink certificate (subjectAltName 127.0.0.1, localhost);
  2. `flower-superlink` (TLS, --enable-supernode-auth, no runtime dependency installation)
     listening on 127.0.0.1 only: its Control API (register nodes, start runs) is for the
     coordinator on this host, and `flwr` is pointed at it; and the Fleet gateway
     (fedllm.deployment.fleet_gateway), the one port nodes reach, which passes Flower's
     Fleet API to the SuperLink and nothing else;
  3. one authentication key pair per node, registered with the SuperLink (`flwr supernode register`);
  4. each node's own data file (here: a slice of the embedded Rotten Tomatoes reviews) and its
     node config: data-path, state-dir, max-epsilon, sampling-size, partition-id;
  5. one `flower-supernode --isolation process` per node, connected to the gateway, and beside it the
     node's own ClientApp process, `fedllm node run`: it runs the fedllm installed on the node and
     refuses (policy) an app bundle whose fedllm code is neither that nor a hash the node approved
     (--approve-app); --legacy-nodes starts them the old way instead (Flower runs the coordinator's
     bundle, and the node warns so); with --unregistered, nodes whose
     key was never registered (the SuperLink must refuse them); with --outsider, someone holding
     only the CA certificate tries, through the nodes' address, to register a key, start a run
     and list runs (all must fail);
  6. `flwr run . demo` with the Hydra overrides as run config, and waits for the run to finish;
     with --hostile-overrides, a second run whose settings every node must refuse; with --extra-run
     NAME=DIR, one more run of the app at DIR (e.g. an edited copy of this project) per option.
It prints a JSON report: where the outputs are, which addresses each server listens on, how
each unregistered node ended, what the outsider got, and the runs the SuperLink knows.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "HF_HUB_OFFLINE": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "PYTHONWARNINGS": "ignore::DeprecationWarning",
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--unregistered", type=int, default=0, help="nodes that try to join unregistered")
    parser.add_argument(
        "--broken-node",
        action="store_true",
        help="one more registered node whose data path does not exist (it declines)",
    )
    # 2 honest nodes by default: fewer than 3 updates a round, accepted knowingly (federation.min_updates)
    parser.add_argument("--overrides", default="debug=smoke federation.num_rounds=2 federation.min_updates=2")
    parser.add_argument("--caps", default="", help="comma-separated max-epsilon per node (empty: 8 each)")
    parser.add_argument(
        "--hostile-overrides",
        default="",
        help="after the run, a second run with these overrides (e.g. privacy.noise=seeded): "
        "settings a node must refuse; its outputs go to <workdir>/outputs-hostile",
    )
    parser.add_argument("--records", type=int, default=200, help="records in each node's data file")
    parser.add_argument(
        "--outsider",
        action="store_true",
        help="someone with only ca.crt tries to register a node, start a run and list runs",
    )
    parser.add_argument("--port", type=int, default=0, help="the port nodes connect to (default: a free one)")
    parser.add_argument(
        "--control-port", type=int, default=0, help="the SuperLink's own port on 127.0.0.1 (default: a free one)"
    )
    parser.add_argument("--timeout", type=float, default=900)
    parser.add_argument(
        "--legacy-nodes",
        action="store_true",
        help="start the SuperNodes the old way (--isolation subprocess: Flower runs the coordinator's app bundle)",
    )
    parser.add_argument(
        "--approve-app",
        type=Path,
        action="append",
        default=[],
        help="a project directory whose fedllm code every node approves (its hash joins approved-app-hashes)",
    )
    parser.add_argument(
        "--extra-run",
        action="append",
        default=[],
        metavar="NAME=DIR",
        help="after the runs, `flwr run DIR` (one round) with outputs in <workdir>/outputs-NAME",
    )
    parser.add_argument("--extra-overrides", default="", help="Hydra overrides added to every --extra-run")
    parser.add_argument(
        "--allow-nonprivate", action="store_true", help="nodes also train runs without DP-SGD (privacy=none)"
    )
    return parser.parse_args(argv)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(port: int, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited with {proc.returncode} before listening on {port}")
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.3)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout:.0f} s")


class Processes:
    """Every process the demo starts, stopped (terminate, then kill) on exit.

    Flower's daemons start helpers (SuperExec) that leave their parent's process tree, so
    every process is also tagged through its environment and found by that tag.
    """

    def __init__(self, workdir: Path, env: dict):
        self.tag = f"{workdir}:{os.getpid()}"
        self.workdir, self.env, self.started = workdir, {**env, "FEDLLM_DEMO_TAG": self.tag}, []

    def start(self, name: str, args: list[str]) -> subprocess.Popen:
        (self.workdir / f"{name}.argv.json").write_text(json.dumps(args))  # what was started, for the record
        with (self.workdir / f"{name}.log").open("w") as log:  # the child keeps its own descriptor
            proc = subprocess.Popen(
                args, cwd=self.workdir, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        self.started.append(proc)
        return proc

    def stop(self) -> None:
        import psutil

        from fedllm.processes import tagged_processes

        family = tagged_processes("FEDLLM_DEMO_TAG", self.tag)
        for proc in family:
            try:
                proc.terminate()
            except psutil.NoSuchProcess:
                continue
        _, alive = psutil.wait_procs(family, timeout=15)
        for proc in alive:
            proc.kill()
        psutil.wait_procs(alive, timeout=5)
        for proc in self.started:
            proc.wait(timeout=5)


def flwr(args: list[str], env: dict, timeout: float, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [str(BIN / "flwr"), *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )
    if check and result.returncode != 0:
        raise RuntimeError(f"flwr {' '.join(args)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def flwr_home(folder: Path, name: str, address: str, ca_cert: Path) -> Path:
    """A `flwr` CLI configuration with one connection ``name`` to ``address``, trusting ``ca_cert``."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.toml").write_text(
        f'[superlink]\ndefault = "{name}"\n\n[superlink.{name}]\naddress = "{address}"\n'
        f'root-certificates = "{ca_cert}"\n'
    )
    return folder


def listening(pid: int) -> list[str]:
    """Every address the process ``pid`` and its children listen on (TCP)."""
    import psutil

    found = set()
    root = psutil.Process(pid)
    for proc in [root, *root.children(recursive=True)]:
        try:
            found |= {
                f"{c.laddr.ip}:{c.laddr.port}"
                for c in proc.net_connections(kind="inet")
                if c.status == psutil.CONN_LISTEN
            }
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return sorted(found)


def reachable_from_outside(port: int) -> dict:
    """Try this host's own non-loopback addresses on ``port``: what someone on the network would get."""
    import psutil

    addresses = [
        a.address
        for addrs in psutil.net_if_addrs().values()
        for a in addrs
        if a.family == socket.AF_INET and not a.address.startswith("127.")
    ]
    tried = {}
    for address in addresses:
        with socket.socket() as sock:
            sock.settimeout(3)
            tried[address] = "connected" if sock.connect_ex((address, port)) == 0 else "refused"
    return tried


def outsider_attempts(workdir: Path, fleet: str, ca_cert: Path, env: dict, output_dir: Path) -> dict:
    """What someone holding only the CA certificate (every node has it) gets at the nodes' address."""
    from fedllm.deployment.pki import make_node_keys

    own = workdir / "outsider"
    own.mkdir(exist_ok=True)
    (own / "ca.crt").write_bytes(ca_cert.read_bytes())
    _, public = make_node_keys(own, "outsider-key")
    home = flwr_home(own / "flwr-home", "outsider", fleet, own / "ca.crt")
    outsider_env = {**env, "FLWR_HOME": str(home)}
    run_config = f'overrides="debug=smoke federation.num_rounds=1" output-dir="{output_dir}"'
    attempts = {
        "register": ["supernode", "register", str(public), "outsider"],
        "run": ["run", str(ROOT), "outsider", "--run-config", run_config],
        "list": ["ls", "outsider"],
    }
    report = {}
    for name, args in attempts.items():
        result = flwr(args, outsider_env, timeout=180, check=False)
        report[name] = {"returncode": result.returncode, "output": (result.stdout + result.stderr)[-2000:]}
    return report


def node_config(
    index: int, data: Path, state: Path, cap: str, sampling_size: int, approved: tuple = (), nonprivate: bool = False
) -> str:
    """A node's own rules: its data, its state, its cap and delta (the server can only lower them),
    the public record count its DP plan is fixed from (its file's size, a public demo number), and
    the app bundles besides its installed fedllm that its operator approved (``approved``: hashes)."""
    return " ".join(
        [
            f"partition-id={index}",
            f'data-path="{data}"',
            f'state-dir="{state}"',
            f"max-epsilon={float(cap or 8)}",
            "delta=1e-5",
            # the demo's default run is the smoke (the random tiny model), which no node allows unless it says so
            'allowed-models="embedded,tiny"',
            f"sampling-size={sampling_size}",
            *([f'approved-app-hashes="{",".join(approved)}"'] if approved else []),
            *(["allow-nonprivate=true"] if nonprivate else []),
        ]
    )


def app_hash_of(project: Path) -> str:
    """The content hash of the fedllm code of a project directory, as `fedllm node hash` prints it."""
    from fedllm.node.app_check import app_hash, installed_digests

    return app_hash(installed_digests(project.resolve() / "fedllm"))


def run_demo(args: argparse.Namespace) -> dict:
    from fedllm.deployment.demo_data import write_node_files
    from fedllm.deployment.pki import make_node_keys, make_tls

    workdir = args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    port, control_port = args.port or free_port(), args.control_port or free_port()
    fleet, control = f"127.0.0.1:{port}", f"127.0.0.1:{control_port}"
    tls = make_tls(workdir / "certs", ["127.0.0.1", "localhost"])
    # the coordinator's `flwr` talks to the SuperLink itself, on this host
    home = flwr_home(workdir / "flwr-home", "demo", control, tls.ca_cert)
    env = {**os.environ, **ENV, "FLWR_HOME": str(home), "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    caps = args.caps.split(",") if args.caps else [""] * args.nodes
    data = write_node_files([workdir / f"node{n}" / "data.jsonl" for n in range(args.nodes)], args.records)
    output_dir = workdir / "outputs"
    procs = Processes(workdir, env)
    report: dict = {"superlink": control, "fleet": fleet, "output_dir": str(output_dir), "unregistered": []}
    try:
        superlink = procs.start(
            "superlink",
            [
                str(BIN / "flower-superlink"),
                "--ssl-ca-certfile",
                str(tls.ca_cert),
                "--ssl-certfile",
                str(tls.server_cert),
                "--ssl-keyfile",
                str(tls.server_key),
                "--enable-supernode-auth",
                "--disable-runtime-dependency-installation",
                "--host",
                "127.0.0.1",
                "--port",
                str(control_port),
                "--database",
                str(workdir / "superlink.db"),
            ],
        )
        gateway = procs.start(
            "fleet-gateway",
            [
                sys.executable,
                "-m",
                "fedllm.deployment.fleet_gateway",
                "--listen",
                fleet,
                "--superlink",
                control,
                "--root-certificates",
                str(tls.ca_cert),
                "--ssl-certfile",
                str(tls.server_cert),
                "--ssl-keyfile",
                str(tls.server_key),
            ],
        )
        wait_for_port(control_port, superlink)
        wait_for_port(port, gateway)

        def start_node(name: str, private: Path, config: str, *extra: str, app: bool = True) -> subprocess.Popen:
            runtime = free_port()  # the SuperNode's Runtime (ClientAppIo) API, on loopback
            if app and not args.legacy_nodes:  # the node's own ClientApp process: its installed fedllm only
                procs.start(
                    f"{name}-app",
                    [
                        sys.executable,
                        "-m",
                        "fedllm.cli.main",
                        "node",
                        "run",
                        "--runtime-api-address",
                        f"127.0.0.1:{runtime}",
                    ],
                )
            return procs.start(
                name,
                [
                    str(BIN / "flower-supernode"),
                    "--root-certificates",
                    str(tls.ca_cert),
                    "--superlink",
                    fleet,
                    "--auth-supernode-private-key",
                    str(private),
                    "--port",
                    str(runtime),
                    "--isolation",
                    "subprocess" if args.legacy_nodes else "process",
                    *extra,
                    "--node-config",
                    config,
                ],
            )

        approved = tuple(app_hash_of(project) for project in args.approve_app)
        for index in range(args.nodes):
            private, public = make_node_keys(workdir / "keys", f"node{index}")
            flwr(["supernode", "register", str(public), "demo"], env, timeout=60)
            start_node(
                f"supernode{index}",
                private,
                node_config(
                    index,
                    data[index],
                    workdir / f"node{index}" / "state",
                    caps[index],
                    args.records,
                    approved,
                    args.allow_nonprivate,
                ),
            )
        if args.broken_node:
            private, public = make_node_keys(workdir / "keys", "broken")
            flwr(["supernode", "register", str(public), "demo"], env, timeout=60)
            missing = workdir / "missing" / "data.jsonl"
            start_node("broken", private, node_config(args.nodes, missing, workdir / "broken", "", args.records))
        rogues = []
        for index in range(args.unregistered):
            private, _ = make_node_keys(workdir / "keys", f"unregistered{index}")
            rogues.append(
                start_node(
                    f"unregistered{index}",
                    private,
                    node_config(args.nodes + 1 + index, data[0], workdir / f"unregistered{index}", "", args.records),
                    "--max-retries",
                    "0",
                    app=False,  # refused by the SuperLink before any message
                )
            )
        report["listening"] = {"superlink": listening(superlink.pid), "fleet-gateway": listening(gateway.pid)}
        if args.outsider:
            report["outsider"] = outsider_attempts(workdir, fleet, tls.ca_cert, env, workdir / "outputs-outsider")
            report["outsider"]["superlink_from_the_network"] = reachable_from_outside(control_port)
        clients = args.nodes + int(args.broken_node)
        run_config = f'overrides="{args.overrides} federation.num_clients={clients}" output-dir="{output_dir}"'
        result = flwr(["run", str(ROOT), "demo", "--run-config", run_config, "--stream"], env, timeout=args.timeout)
        (workdir / "flwr-run.log").write_text(result.stdout + result.stderr)
        if args.hostile_overrides:
            hostile = (
                f'overrides="{args.overrides} {args.hostile_overrides} federation.num_clients={clients}" '
                f'output-dir="{workdir / "outputs-hostile"}"'
            )
            result = flwr(["run", str(ROOT), "demo", "--run-config", hostile, "--stream"], env, timeout=args.timeout)
            (workdir / "flwr-run-hostile.log").write_text(result.stdout + result.stderr)
            report["hostile_output_dir"] = str(workdir / "outputs-hostile")
        for extra in args.extra_run:
            name, _, project = extra.partition("=")
            outputs = workdir / f"outputs-{name}"
            run_config = (
                f'overrides="{args.overrides} {args.extra_overrides} federation.num_rounds=1 '
                f'federation.num_clients={clients}" '
                f'output-dir="{outputs}"'
            )
            result = flwr(["run", project, "demo", "--run-config", run_config, "--stream"], env, timeout=args.timeout)
            (workdir / f"flwr-run-{name}.log").write_text(result.stdout + result.stderr)
            report.setdefault("extra_runs", {})[name] = {
                "output_dir": str(outputs),
                "app_hash": app_hash_of(Path(project)),
            }
        report["runs"] = json.loads(flwr(["ls", "demo", "--format", "json"], env, timeout=60).stdout).get("runs", [])
        report["nodes"] = json.loads(
            flwr(["supernode", "list", "demo", "--format", "json"], env, timeout=60).stdout
        ).get("nodes", [])
        for rogue in rogues:
            try:
                rogue.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
            report["unregistered"].append({"returncode": rogue.poll()})
    finally:
        procs.stop()
    report["summary"] = (
        json.loads((output_dir / "summary.json").read_text()) if (output_dir / "summary.json").is_file() else None
    )
    return report


if __name__ == "__main__":
    outcome = run_demo(parse_args())
    print(json.dumps({k: v for k, v in outcome.items() if k != "summary"}, indent=2))
    print(f"outputs: {outcome['output_dir']} (adapter/, summary.json, privacy_ledger.json, metrics.jsonl)")
    sys.exit(0 if outcome["summary"] else 1)
