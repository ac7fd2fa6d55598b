"""A local federation on Flower's Deployment Engine: SuperLink + N SuperNodes over TLS with node
authentication, then `flwr run`. Every process it starts is stopped before it exits.

    python scripts/demo_federation.py --workdir /tmp/fedllm-demo [--nodes 2] [--unregistered 1]
        [--overrides "debug=smoke federation.num_rounds=2"] [--caps 8,6] [--port 9400]

What it does, as an operator would:
  1. a private CA and the SuperLink certificate (subjectAltName 127.0.0.1, localhost);
  2. one authentication key pair per node, registered with the SuperLink (`flwr supernode register`);
  3. each node's own data file (here: a slice of the embedded Rotten Tomatoes reviews) and its
     node config: data-path, state-dir, max-epsilon, partition-id;
  4. `flower-superlink` (TLS, --enable-supernode-auth, no runtime dependency installation) and
     one `flower-supernode` per node; with --unregistered, nodes whose key was never registered
     (the SuperLink must refuse them);
  5. `flwr run . demo` with the Hydra overrides as run config, and waits for the run to finish;
     with --hostile-overrides, a second run whose settings every node must refuse.
It prints a JSON report: where the outputs are, and how each unregistered node ended.
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
ENV = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1", "HF_HUB_OFFLINE": "1",
       "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "TOKENIZERS_PARALLELISM": "false",
       "PYTHONWARNINGS": "ignore::DeprecationWarning"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--unregistered", type=int, default=0, help="nodes that try to join unregistered")
    parser.add_argument("--broken-node", action="store_true",
                        help="one more registered node whose data path does not exist (it declines)")
    parser.add_argument("--overrides", default="debug=smoke federation.num_rounds=2")
    parser.add_argument("--caps", default="", help="comma-separated max-epsilon per node (empty: 8 each)")
    parser.add_argument("--hostile-overrides", default="",
                        help="after the run, a second run with these overrides (e.g. privacy.noise=seeded): "
                             "settings a node must refuse; its outputs go to <workdir>/outputs-hostile")
    parser.add_argument("--records", type=int, default=200, help="records in each node's data file")
    parser.add_argument("--port", type=int, default=0, help="SuperLink port (default: a free one)")
    parser.add_argument("--timeout", type=float, default=900)
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
        log = (self.workdir / f"{name}.log").open("w")
        proc = subprocess.Popen(args, cwd=self.workdir, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
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


def flwr(args: list[str], env: dict, timeout: float) -> subprocess.CompletedProcess:
    result = subprocess.run([str(BIN / "flwr"), *args], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=timeout)
    if result.returncode != 0:
        raise RuntimeError(f"flwr {' '.join(args)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def node_config(index: int, data: Path, state: Path, cap: str) -> str:
    """A node's own rules: its data, its state, its cap and delta (the server can only lower them)."""
    return " ".join([f"partition-id={index}", f'data-path="{data}"', f'state-dir="{state}"',
                     f"max-epsilon={float(cap or 8)}", "delta=1e-5"])


def run_demo(args: argparse.Namespace) -> dict:
    from fedllm.deployment.demo_data import write_node_files
    from fedllm.deployment.pki import make_node_keys, make_tls

    workdir = args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    port = args.port or free_port()
    tls = make_tls(workdir / "certs", ["127.0.0.1", "localhost"])
    home = workdir / "flwr-home"
    home.mkdir(exist_ok=True)
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "demo"\n\n[superlink.demo]\naddress = "127.0.0.1:{port}"\n'
        f'root-certificates = "{tls.ca_cert}"\n')
    env = {**os.environ, **ENV, "FLWR_HOME": str(home), "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    caps = args.caps.split(",") if args.caps else [""] * args.nodes
    data = write_node_files([workdir / f"node{n}" / "data.jsonl" for n in range(args.nodes)], args.records)
    output_dir = workdir / "outputs"
    procs = Processes(workdir, env)
    report: dict = {"superlink": f"127.0.0.1:{port}", "output_dir": str(output_dir), "unregistered": []}
    try:
        superlink = procs.start("superlink", [
            str(BIN / "flower-superlink"), "--ssl-ca-certfile", str(tls.ca_cert), "--ssl-certfile",
            str(tls.server_cert), "--ssl-keyfile", str(tls.server_key), "--enable-supernode-auth",
            "--disable-runtime-dependency-installation", "--host", "127.0.0.1", "--port", str(port),
            "--database", str(workdir / "superlink.db")])
        wait_for_port(port, superlink)
        for index in range(args.nodes):
            private, public = make_node_keys(workdir / "keys", f"node{index}")
            flwr(["supernode", "register", str(public), "demo"], env, timeout=60)
            procs.start(f"supernode{index}", [
                str(BIN / "flower-supernode"), "--root-certificates", str(tls.ca_cert), "--superlink",
                f"127.0.0.1:{port}", "--auth-supernode-private-key", str(private), "--port", str(free_port()),
                "--node-config", node_config(index, data[index], workdir / f"node{index}" / "state", caps[index])])
        if args.broken_node:
            private, public = make_node_keys(workdir / "keys", "broken")
            flwr(["supernode", "register", str(public), "demo"], env, timeout=60)
            procs.start("broken", [
                str(BIN / "flower-supernode"), "--root-certificates", str(tls.ca_cert), "--superlink",
                f"127.0.0.1:{port}", "--auth-supernode-private-key", str(private), "--port", str(free_port()),
                "--node-config", node_config(args.nodes, workdir / "missing" / "data.jsonl", workdir / "broken", "")])
        rogues = []
        for index in range(args.unregistered):
            private, _ = make_node_keys(workdir / "keys", f"unregistered{index}")
            rogues.append(procs.start(f"unregistered{index}", [
                str(BIN / "flower-supernode"), "--root-certificates", str(tls.ca_cert), "--superlink",
                f"127.0.0.1:{port}", "--auth-supernode-private-key", str(private), "--port", str(free_port()),
                "--max-retries", "0", "--node-config", node_config(args.nodes + 1 + index, data[0],
                                                                  workdir / f"unregistered{index}", "")]))
        clients = args.nodes + int(args.broken_node)
        run_config = f'overrides="{args.overrides} federation.num_clients={clients}" output-dir="{output_dir}"'
        result = flwr(["run", str(ROOT), "demo", "--run-config", run_config, "--stream"], env, timeout=args.timeout)
        (workdir / "flwr-run.log").write_text(result.stdout + result.stderr)
        if args.hostile_overrides:
            hostile = (f'overrides="{args.overrides} {args.hostile_overrides} federation.num_clients={clients}" '
                       f'output-dir="{workdir / "outputs-hostile"}"')
            result = flwr(["run", str(ROOT), "demo", "--run-config", hostile, "--stream"], env, timeout=args.timeout)
            (workdir / "flwr-run-hostile.log").write_text(result.stdout + result.stderr)
            report["hostile_output_dir"] = str(workdir / "outputs-hostile")
        for rogue in rogues:
            try:
                rogue.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
            report["unregistered"].append({"returncode": rogue.poll()})
    finally:
        procs.stop()
    report["summary"] = json.loads((output_dir / "summary.json").read_text()) if (
        output_dir / "summary.json").is_file() else None
    return report


if __name__ == "__main__":
    outcome = run_demo(parse_args())
    print(json.dumps({k: v for k, v in outcome.items() if k != "summary"}, indent=2))
    print(f"outputs: {outcome['output_dir']} (adapter/, summary.json, privacy_ledger.json, metrics.jsonl)")
    sys.exit(0 if outcome["summary"] else 1)
