"""Emulate a multi-node Ray cluster on one machine: a head and N worker nodes, each its own raylet.

    export RAY_AUTH_MODE=token RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0   # here and in every client (see below)
    python cluster/local.py start --workers 2 --cpus-per-node 1 --gpus-per-node 2
    RAY_ADDRESS=127.0.0.1:6390 fedsim run experiments/quickstart.yaml runtime.placement=spread
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- fedsim run experiments/quickstart.yaml
    python cluster/local.py add-node --cpus 1 --gpus 1   # one more worker node joins (an autoscaler's stand-in)
    python cluster/local.py kill-node 1      # lose worker node 1 (its raylet and everything on it)
    python cluster/local.py kill-node 1 --wait   # the same, returning once the cluster has marked it dead
    python cluster/local.py listeners        # every listening socket of the cluster's processes, as JSON
    python cluster/local.py stop             # stop exactly the nodes this script started

GPUs are logical (``--num-gpus`` on a machine without one schedules fractional-GPU actors all the same),
and each worker node carries a resource of its own (``fedsim_node_<i>: 1``) so that a run's placement
can be read off. Every node is a ``ray start --block`` process in a session of its own; ``stop`` and
``kill-node`` signal those sessions only, never other Ray instances on the machine (``ray stop`` would).
Each cluster keeps its Ray session files in a temp dir of its own (``--temp-dir``, default
``/tmp/fedsim-ray-<port>``), so that a job submitted to it joins it and not the last cluster started on the
machine (Ray's jobs find their cluster through ``<temp dir>/ray_current_cluster``).

Secure defaults: token authentication is on (``RAY_AUTH_MODE=token``; any other mode is refused; the token
is read from ``RAY_AUTH_TOKEN`` or ``~/.ray/auth_token``, generated there if absent, and every client of the
cluster needs the same). Every port of the cluster binds to 127.0.0.1 when ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``
is set here and in every client: Ray 2.60 binds its servers to loopback only when a node's IP is literally
127.0.0.1, and ``ray start`` (like ``ray.init(address="127.0.0.1:...")`` in a client) swaps a loopback
address for the machine's interface address unless that variable is 0. Without it the cluster advertises
the interface address and Ray binds most ports to all interfaces (cluster/README.md lists them and what
closes them); ``start`` says so on stderr. ``--host`` picks another address to advertise: only on a network
you trust.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

STATE = Path(os.environ.get("FEDSIM_LOCAL_CLUSTER", Path.home() / ".fedsim" / "local-cluster.json"))
LOOPBACK_VAR = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
LOOPBACK = "127.0.0.1"

# `ray start` for a worker node that keeps --node-ip-address=127.0.0.1. With LOOPBACK_VAR=0, Ray 2.60's
# services.get_node_ip_address() answers 127.0.0.1, but scripts.py refuses to start a non-head node
# ("Multi-node Ray clusters are not supported on Windows and OSX"); with the variable unset it starts one
# but services.resolve_ip_for_localhost() swaps 127.0.0.1 for the interface address. This launcher lets the
# node join and keeps the address as given; the raylet, agents and workers it starts inherit LOOPBACK_VAR=0
# and stay on loopback. tests/test_cluster_files.py checks the sockets, so a Ray upgrade that changes this
# shows up there.
_KEEP_LOOPBACK = ("import ray._private.ray_constants as constants, ray._private.services as services; "
                  "constants.ENABLE_RAY_CLUSTER = True; services.resolve_ip_for_localhost = lambda host: host; "
                  "from ray.scripts.scripts import main; main()")


def ray_cli() -> str:
    """The ``ray`` executable beside this Python (a venv's), else the one on PATH."""
    local = Path(sys.executable).with_name("ray")
    found = str(local) if local.exists() else shutil.which("ray")
    if not found:
        raise SystemExit("the ray command is not installed: pip install 'ray[default]'")
    return found


def auth_env() -> dict[str, str]:
    """The environment every node and client shares: token authentication on, with a token on disk.

    Exits if RAY_AUTH_MODE asks for another mode: a cluster anyone who reaches its ports may use."""
    mode = os.environ.get("RAY_AUTH_MODE", "token")
    if mode.lower() != "token":
        raise SystemExit(f"local.py: RAY_AUTH_MODE={mode!r}, but this script starts clusters with token "
                         "authentication only; export RAY_AUTH_MODE=token (or unset it) and try again")
    env = {**os.environ, "RAY_AUTH_MODE": "token"}
    token_file = Path(env.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
    if not env.get("RAY_AUTH_TOKEN") and not (token_file.is_file() and token_file.stat().st_size):
        subprocess.run([ray_cli(), "get-auth-token", "--generate"], env=env, check=True,
                       stdout=subprocess.DEVNULL)
    return env


def loopback_mode(host: str, env: dict[str, str]) -> bool:
    """Whether the cluster can stay on 127.0.0.1: asked for, and its clients share ``LOOPBACK_VAR=0``."""
    return host == LOOPBACK and env.get(LOOPBACK_VAR) == "0"


def client_env(state: dict) -> dict[str, str]:
    """The variables a client of the cluster sets (besides the token itself) to reach it."""
    env = {"RAY_AUTH_MODE": state["auth_mode"], "RAY_ADDRESS": state["address"]}
    if state.get("loopback"):
        env[LOOPBACK_VAR] = "0"
    return env


def _start_node(args: list[str], log: Path, env: dict[str, str], keep_loopback: bool = False) -> int:
    launcher = [sys.executable, "-c", _KEEP_LOOPBACK] if keep_loopback else [ray_cli()]
    with open(log, "ab") as out:
        proc = subprocess.Popen([*launcher, "start", "--block", "--disable-usage-stats", *args], env=env,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    return proc.pid


def node_ports(base: int, index: int) -> list[str]:
    """Ports of node ``index`` (0: the head): distinct for every node, since they share one address."""
    first = base + 1000 + 100 * index
    return [f"--node-manager-port={first}", f"--object-manager-port={first + 1}",
            f"--metrics-export-port={first + 2}", f"--dashboard-agent-listen-port={first + 3}",
            f"--dashboard-agent-grpc-port={first + 4}", f"--runtime-env-agent-port={first + 5}",
            f"--min-worker-port={first + 10}", f"--max-worker-port={first + 99}"]


def head_metrics_env(base: int) -> dict[str, str]:
    """The head's two Prometheus endpoints, which Ray puts on fixed ports (44217, 44227) unless told."""
    return {"AUTOSCALER_METRIC_PORT": str(base + 1006), "DASHBOARD_METRIC_PORT": str(base + 1007)}


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, exited but not yet reaped, does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True  # no /proc to ask: it answered the signal


POLL_S = 0.25  # between reads of the node table: one local RPC each


class NodeTable:
    """The cluster's node table, read from its GCS by a client in this process (no Ray driver to start, so a
    look costs milliseconds and the nodes starting up keep the CPU)."""

    def __init__(self, address: str):
        self.address = address
        self.client = None
        # The cluster takes tokens only (auth_env); Ray's client sends this process's token in this mode only.
        os.environ["RAY_AUTH_MODE"] = "token"

    def read(self) -> list[dict] | None:
        """Every node's liveness and resources; None while the GCS does not listen yet."""
        from ray._raylet import GcsClient
        from ray.core.generated.gcs_pb2 import GcsNodeInfo
        from ray.exceptions import RpcError

        try:
            if self.client is None:
                host, port = self.address.rsplit(":", 1)
                # A GcsClient made before the GCS listens retries for a minute before it gives up.
                socket.create_connection((host, int(port)), timeout=1.0).close()
                self.client = GcsClient(address=self.address)
            infos = self.client.get_all_node_info(timeout=10).values()
        except (OSError, RpcError):  # not up yet, or busy: the caller asks again (a wrong token raises)
            return None
        return [{"alive": info.state == GcsNodeInfo.GcsNodeState.ALIVE, "resources": dict(info.resources_total)}
                for info in infos]


def _wait_until(address: str, timeout_s: float, done, what: str) -> None:
    """Until ``done(nodes)`` holds for the cluster's nodes."""
    table = NodeTable(address)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        nodes = table.read()
        if nodes is not None and done(nodes):
            return
        time.sleep(POLL_S)
    raise SystemExit(f"the local cluster did not show {what} within {timeout_s:.0f} s")


def _wait_for_nodes(address: str, count: int, timeout_s: float) -> None:
    _wait_until(address, timeout_s, lambda nodes: sum(n["alive"] for n in nodes) >= count,
                f"{count} live nodes")


def _write(state: dict) -> None:  # on disk at once, so that stop finds every node
    STATE.write_text(json.dumps(state, indent=1))


def _read() -> dict:
    if not STATE.exists():
        raise SystemExit(f"no local cluster started by this script ({STATE})")
    return json.loads(STATE.read_text())


def _add_worker(state: dict, env: dict[str, str], cpus: int, gpus: int, resources: dict[str, float],
                timeout_s: float) -> dict:
    """Start worker node ``i`` (the next index), record it and wait until it is alive in the cluster."""
    index = sum(n["name"].startswith("worker") for n in state["nodes"])
    marker = f"fedsim_node_{index}"
    name = f"worker{index}"
    args = ["--address", state["address"], f"--node-ip-address={state['host']}", f"--num-cpus={cpus}",
            f"--num-gpus={gpus}", "--resources", json.dumps({marker: 1, **resources}),
            *node_ports(state["port"], index + 1)]
    logs = STATE.parent / "local-cluster-logs"
    node = {"name": name, "pid": _start_node(args, logs / f"{name}.log", env, keep_loopback=state["loopback"])}
    state["nodes"].append(node)
    _write(state)
    _wait_until(state["address"], timeout_s,
                lambda nodes: any(n["alive"] and n["resources"].get(marker) for n in nodes), f"a live {name}")
    return node


def start(opts: argparse.Namespace) -> None:
    if STATE.exists() and any(_alive(n["pid"]) for n in json.loads(STATE.read_text())["nodes"]):
        raise SystemExit(f"a local cluster started by this script is running (see {STATE}); stop it first")
    STATE.parent.mkdir(parents=True, exist_ok=True)
    (STATE.parent / "local-cluster-logs").mkdir(exist_ok=True)
    env = auth_env()
    host = LOOPBACK if opts.host == "localhost" else opts.host
    loopback = loopback_mode(host, env)
    if host == LOOPBACK and not loopback:
        print(f"local.py: {LOOPBACK_VAR} is not 0, so Ray advertises this machine's interface address instead of "
              f"{LOOPBACK} and binds most of the cluster's ports to all interfaces (token-protected except the "
              f"metrics ports; cluster/README.md). Export {LOOPBACK_VAR}=0 here and in every client to keep the "
              "cluster on loopback.", file=sys.stderr)
    temp_dir = opts.temp_dir or str(Path(tempfile.gettempdir()) / f"fedsim-ray-{opts.port}")
    address = f"{host}:{opts.port}"
    head = ["--head", f"--node-ip-address={host}", f"--port={opts.port}", f"--dashboard-host={host}",
            f"--dashboard-port={opts.dashboard_port}", f"--ray-client-server-port={opts.port + 1}",
            f"--temp-dir={temp_dir}", f"--num-cpus={opts.head_cpus}", "--num-gpus=0",
            "--resources", json.dumps({"fedsim_head": 1}), *node_ports(opts.port, 0)]
    state = {"address": address, "dashboard": f"http://{host}:{opts.dashboard_port}", "nodes": [],
             "auth_mode": env["RAY_AUTH_MODE"], "host": host, "port": opts.port, "temp_dir": temp_dir,
             "loopback": loopback}
    state["client_env"] = client_env(state)
    try:
        logs = STATE.parent / "local-cluster-logs"
        pid = _start_node(head, logs / "head.log", {**env, **head_metrics_env(opts.port)})
        state["nodes"].append({"name": "head", "pid": pid})
        _write(state)
        _wait_for_nodes(address, 1, opts.timeout)
        for _ in range(opts.workers):  # one at a time: nodes joining at once contend for the same files
            _add_worker(state, env, opts.cpus_per_node, opts.gpus_per_node, {}, opts.timeout)
    except BaseException:
        stop(argparse.Namespace(grace=5.0))
        raise
    print(json.dumps(state, indent=1))


def add_node(opts: argparse.Namespace) -> None:
    state = _read()
    env = {**auth_env(), **({LOOPBACK_VAR: "0"} if state["loopback"] else {})}  # the cluster's mode, not the caller's
    node = _add_worker(state, env, opts.cpus, opts.gpus, json.loads(opts.resources), opts.timeout)
    print(json.dumps(node))


def _session_members(sid: int) -> list[int]:
    """Live processes of session ``sid`` (a node's ``ray start`` and what it started, even in other groups)."""
    members = []
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if entry.isdigit():
            try:
                if os.getsid(int(entry)) == sid and _alive(int(entry)):
                    members.append(int(entry))
            except OSError:
                pass
    return members


def _signal_session(sid: int, sig: int) -> None:
    try:
        os.killpg(sid, sig)
    except ProcessLookupError:
        pass
    for pid in _session_members(sid):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def _terminate(node: dict) -> None:
    """SIGTERM the node's ``ray start --block``, which stops the processes it started in Ray's own order (a
    SIGTERM to all of them at once leaves the head's GCS hanging in its shutdown); where it is gone, SIGTERM
    what is left of its session."""
    pid = node["pid"]
    try:
        if _alive(pid) and os.getsid(pid) == pid:
            os.kill(pid, signal.SIGTERM)
            return
    except ProcessLookupError:
        pass
    _signal_session(pid, signal.SIGTERM)


def _stop_nodes(nodes: list[dict], grace_s: float) -> None:
    """Terminate the nodes together, then SIGKILL whatever of their sessions is left after ``grace_s``."""
    for node in nodes:
        _terminate(node)
    deadline = time.time() + grace_s
    while time.time() < deadline and any(_alive(n["pid"]) or _session_members(n["pid"]) for n in nodes):
        time.sleep(0.2)
    for node in nodes:
        _signal_session(node["pid"], signal.SIGKILL)


def kill_node(opts: argparse.Namespace) -> None:
    state = _read()
    node = next((n for n in state["nodes"] if n["name"] == f"worker{opts.index}"), None)
    if node is None:
        raise SystemExit(f"no worker{opts.index} in {STATE}")
    _signal_session(node["pid"], signal.SIGKILL)  # abrupt, as a machine that goes away
    if opts.wait:  # Ray notices by failed health checks (RAY_health_check_* on the head set how soon)
        marker = f"fedsim_node_{opts.index}"
        _wait_until(state["address"], opts.timeout,
                    lambda nodes: not any(n["alive"] and n["resources"].get(marker) for n in nodes),
                    f"worker{opts.index} as dead")
    print(f"killed worker{opts.index} (session {node['pid']})")


def listeners(opts: argparse.Namespace) -> None:
    """Print every listening TCP socket of the cluster's processes: node, pid, process, address, port."""
    import psutil

    state = _read()
    rows = []
    for node in state["nodes"]:
        for pid in _session_members(node["pid"]):
            try:
                proc = psutil.Process(pid)
                sockets = [c for c in proc.net_connections(kind="tcp") if c.status == psutil.CONN_LISTEN]
                name = proc.name()
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            rows += [{"node": node["name"], "pid": pid, "process": name, "address": c.laddr.ip,
                      "port": c.laddr.port} for c in sockets]
    print(json.dumps(sorted(rows, key=lambda r: (r["port"], r["address"])), indent=1))


def stop(opts: argparse.Namespace) -> None:
    if not STATE.exists():
        print("no local cluster started by this script")
        return
    state = json.loads(STATE.read_text())
    _stop_nodes([n for n in state["nodes"] if n["name"] != "head"], opts.grace)  # the workers together, then the head
    _stop_nodes([n for n in state["nodes"] if n["name"] == "head"], opts.grace)
    STATE.unlink()
    # `ray start` registered the head here for `ray.init()` without an address, and for the cluster's jobs.
    temp_dir = state.get("temp_dir") or str(Path(os.environ.get("RAY_TMPDIR", "/tmp")) / "ray")
    current = Path(temp_dir) / "ray_current_cluster"
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
    up.add_argument("--host", default=LOOPBACK,
                    help=f"address the nodes advertise ({LOOPBACK}: this machine only, with {LOOPBACK_VAR}=0)")
    up.add_argument("--port", type=int, default=6390)
    up.add_argument("--dashboard-port", type=int, default=8265)
    up.add_argument("--temp-dir", default=None, help="Ray's session files (default: /tmp/fedsim-ray-<port>)")
    up.add_argument("--timeout", type=float, default=120.0)
    up.set_defaults(func=start)
    grow = sub.add_parser("add-node", help="start one more worker node and wait until it has joined")
    grow.add_argument("--cpus", type=int, default=1)
    grow.add_argument("--gpus", type=int, default=1, help="logical GPUs")
    grow.add_argument("--resources", default="{}", help="more custom resources, as JSON")
    grow.add_argument("--timeout", type=float, default=120.0)
    grow.set_defaults(func=add_node)
    down = sub.add_parser("stop", help="stop the nodes this script started")
    down.add_argument("--grace", type=float, default=10.0, help="seconds between SIGTERM and SIGKILL")
    down.set_defaults(func=stop)
    kill = sub.add_parser("kill-node", help="kill worker node INDEX abruptly (SIGKILL)")
    kill.add_argument("index", type=int)
    kill.add_argument("--wait", action="store_true", help="return once the cluster has marked the node dead")
    kill.add_argument("--timeout", type=float, default=120.0, help="seconds --wait waits at most")
    kill.set_defaults(func=kill_node)
    ports = sub.add_parser("listeners", help="list the listening sockets of the cluster's processes (JSON)")
    ports.set_defaults(func=listeners)
    opts = parser.parse_args(argv)
    opts.func(opts)


if __name__ == "__main__":
    main()
