"""Emulate a multi-node Ray cluster on one machine: a head and N worker nodes, each its own raylet.

    python cluster/local.py start --workers 2 --cpus-per-node 1 --gpus-per-node 2
    RAY_ADDRESS=127.0.0.1:6390 fedsim run experiments/quickstart.yaml runtime.placement=spread
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- fedsim run experiments/quickstart.yaml
    python cluster/local.py kill-node 1      # lose worker node 1 (its raylet and everything on it)
    python cluster/local.py stop             # stop exactly the nodes this script started

GPUs are logical (``--num-gpus`` on a machine without one schedules fractional-GPU actors all the same),
and each worker node carries a resource of its own (``fedsim_node_<i>: 1``) so that a run's placement
can be read off. Every node is a ``ray start --block`` process in a session of its own; ``stop`` and
``kill-node`` signal those sessions only, never other Ray instances on the machine (``ray stop`` would).

Secure defaults: token authentication is on (``RAY_AUTH_MODE=token``; the token is read from
``RAY_AUTH_TOKEN`` or ``~/.ray/auth_token``, generated there if absent, and every client of the cluster
needs the same), and the head binds its ports and the dashboard to 127.0.0.1. ``--host`` opens them to a
network: only on one you trust.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

STATE = Path(os.environ.get("FEDSIM_LOCAL_CLUSTER", Path.home() / ".fedsim" / "local-cluster.json"))


def ray_cli() -> str:
    """The ``ray`` executable beside this Python (a venv's), else the one on PATH."""
    local = Path(sys.executable).with_name("ray")
    found = str(local) if local.exists() else shutil.which("ray")
    if not found:
        raise SystemExit("the ray command is not installed: pip install 'ray[default]'")
    return found


def auth_env() -> dict[str, str]:
    """The environment every node and client shares: token authentication on, with a token on disk."""
    env = {**os.environ, "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "token")}
    if env["RAY_AUTH_MODE"] == "token" and not env.get("RAY_AUTH_TOKEN"):
        subprocess.run([ray_cli(), "get-auth-token", "--generate"], env=env, check=True,
                       stdout=subprocess.DEVNULL)
    return env


def _start_node(args: list[str], log: Path, env: dict[str, str]) -> int:
    with open(log, "ab") as out:
        proc = subprocess.Popen([ray_cli(), "start", "--block", "--disable-usage-stats", *args], env=env,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    return proc.pid


def node_ports(base: int, index: int) -> list[str]:
    """Ports of node ``index`` (0: the head): distinct for every node, since they share one address."""
    first = base + 1000 + 100 * index
    return [f"--node-manager-port={first}", f"--object-manager-port={first + 1}",
            f"--metrics-export-port={first + 2}", f"--dashboard-agent-listen-port={first + 3}",
            f"--dashboard-agent-grpc-port={first + 4}", f"--runtime-env-agent-port={first + 5}",
            f"--min-worker-port={first + 10}", f"--max-worker-port={first + 99}"]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False


def _wait_for_nodes(address: str, count: int, env: dict[str, str], timeout_s: float) -> None:
    """Until ``count`` nodes are alive in the cluster (checked from a short-lived client process)."""
    probe = ("import ray, sys; ray.init(address=sys.argv[1], log_to_driver=False); "
             "print(sum(n['Alive'] for n in ray.nodes()))")
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        done = subprocess.run([sys.executable, "-c", probe, address], env=env, capture_output=True, text=True)
        if done.returncode == 0 and done.stdout.strip().isdigit() and int(done.stdout.strip()) >= count:
            return
        time.sleep(1.0)
    raise SystemExit(f"the local cluster did not reach {count} live nodes in {timeout_s:.0f} s")


def start(opts: argparse.Namespace) -> None:
    if STATE.exists() and any(_alive(n["pid"]) for n in json.loads(STATE.read_text())["nodes"]):
        raise SystemExit(f"a local cluster started by this script is running (see {STATE}); stop it first")
    STATE.parent.mkdir(parents=True, exist_ok=True)
    logs = STATE.parent / "local-cluster-logs"
    logs.mkdir(exist_ok=True)
    env = auth_env()
    address = f"{opts.host}:{opts.port}"
    head = ["--head", f"--node-ip-address={opts.host}", f"--port={opts.port}", f"--dashboard-host={opts.host}",
            f"--dashboard-port={opts.dashboard_port}", f"--ray-client-server-port={opts.port + 1}",
            f"--num-cpus={opts.head_cpus}", "--num-gpus=0", "--resources", json.dumps({"fedsim_head": 1}),
            *node_ports(opts.port, 0)]
    state = {"address": address, "dashboard": f"http://{opts.host}:{opts.dashboard_port}", "nodes": [],
             "auth_mode": env["RAY_AUTH_MODE"]}

    def record(name: str, args: list[str]) -> None:  # on disk at once, so that stop finds every node
        state["nodes"].append({"name": name, "pid": _start_node(args, logs / f"{name}.log", env)})
        STATE.write_text(json.dumps(state, indent=1))

    try:
        record("head", head)
        _wait_for_nodes(address, 1, env, opts.timeout)
        for i in range(opts.workers):  # one at a time: nodes joining at once contend for the same files
            record(f"worker{i}", ["--address", address, f"--node-ip-address={opts.host}",
                                  f"--num-cpus={opts.cpus_per_node}", f"--num-gpus={opts.gpus_per_node}",
                                  "--resources", json.dumps({f"fedsim_node_{i}": 1}), *node_ports(opts.port, i + 1)])
            _wait_for_nodes(address, 2 + i, env, opts.timeout)
    except BaseException:
        stop(argparse.Namespace(grace=5.0))
        raise
    print(json.dumps(state, indent=1))


def _signal_node(node: dict, grace_s: float) -> None:
    """SIGTERM the node's session (its ``ray start --block`` and the processes it started), then SIGKILL."""
    try:
        os.killpg(node["pid"], signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.time() + grace_s
    while time.time() < deadline and _alive(node["pid"]):
        time.sleep(0.2)
    try:
        os.killpg(node["pid"], signal.SIGKILL)
    except ProcessLookupError:
        pass


def kill_node(opts: argparse.Namespace) -> None:
    state = json.loads(STATE.read_text())
    node = next((n for n in state["nodes"] if n["name"] == f"worker{opts.index}"), None)
    if node is None:
        raise SystemExit(f"no worker{opts.index} in {STATE}")
    os.killpg(node["pid"], signal.SIGKILL)  # abrupt, as a machine that goes away
    print(f"killed worker{opts.index} (session {node['pid']})")


def stop(opts: argparse.Namespace) -> None:
    if not STATE.exists():
        print("no local cluster started by this script")
        return
    state = json.loads(STATE.read_text())
    for node in reversed(state["nodes"]):  # workers first, the head last
        _signal_node(node, opts.grace)
    STATE.unlink()
    # `ray start` registered the head here for plain ray.init() calls to join; it is gone now.
    current = Path(os.environ.get("RAY_TMPDIR", "/tmp")) / "ray" / "ray_current_cluster"
    if current.is_file() and current.read_text().strip().endswith(f":{state['address'].rsplit(':', 1)[1]}"):
        current.unlink()
    print(f"stopped {len(state['nodes'])} node(s)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("start", help="start a head and N worker nodes")
    up.add_argument("--workers", type=int, default=2)
    up.add_argument("--cpus-per-node", type=int, default=1)
    up.add_argument("--gpus-per-node", type=int, default=1, help="logical GPUs per worker node")
    up.add_argument("--head-cpus", type=int, default=0, help="CPUs on the head (0: no client workers there)")
    up.add_argument("--host", default="127.0.0.1", help="address to bind (127.0.0.1: this machine only)")
    up.add_argument("--port", type=int, default=6390)
    up.add_argument("--dashboard-port", type=int, default=8265)
    up.add_argument("--timeout", type=float, default=120.0)
    up.set_defaults(func=start)
    down = sub.add_parser("stop", help="stop the nodes this script started")
    down.add_argument("--grace", type=float, default=10.0, help="seconds between SIGTERM and SIGKILL")
    down.set_defaults(func=stop)
    kill = sub.add_parser("kill-node", help="kill worker node INDEX abruptly (SIGKILL)")
    kill.add_argument("index", type=int)
    kill.set_defaults(func=kill_node)
    opts = parser.parse_args(argv)
    opts.func(opts)


if __name__ == "__main__":
    main()
