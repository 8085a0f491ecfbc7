"""The Ray instance fedsim starts for a run: every socket on loopback, only holders of its token admitted."""

from __future__ import annotations

import ipaddress
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from actors.local_ray import start_local_ray
from conftest import REPO

AUTH_VARS = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_ADDRESS")
# Long enough to look at while it runs; one worker, small clients, no evaluation to wait for.
LONG_SMALL_RUN = ["federation.rounds=1000", "data.num_train=240", "data.num_test=16", "partition.num_clients=4",
                  "training.local_epochs=1", "eval.every=1000", "eval.zero_shot=false", "runtime.num_workers=1",
                  "output.progress=never"]
_JOIN = "import ray, sys; ray.init(address=sys.argv[1], log_to_driver=False); print('joined', flush=True)"


def without_ray_settings() -> dict[str, str]:
    """This process's environment less any Ray address or auth setting of the user's."""
    return {k: v for k, v in os.environ.items() if k not in AUTH_VARS}


def is_loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    return (getattr(ip, "ipv4_mapped", None) or ip).is_loopback


def run_tree(root: int) -> list[psutil.Process]:
    proc = psutil.Process(root)
    return [proc, *proc.children(recursive=True)]


def listening_sockets(procs: list[psutil.Process]) -> list[tuple[str, str, int]]:
    """(process, address, port) of every listening TCP socket and every bound UDP socket of ``procs``."""
    rows = []
    for proc in procs:
        try:
            conns, name = proc.net_connections(kind="inet"), proc.name()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        rows += [(name, c.laddr.ip, c.laddr.port) for c in conns
                 if c.status == psutil.CONN_LISTEN or (c.type == socket.SOCK_DGRAM and c.laddr)]
    return rows


def wait_for_a_client_worker(run: subprocess.Popen, log: Path, timeout_s: float = 180.0) -> list[psutil.Process]:
    """The run's process tree once a client worker actor runs: its Ray instance and driver are up by then."""
    deadline = time.monotonic() + timeout_s
    while True:
        assert run.poll() is None, f"the run exited with {run.returncode}: {log.read_text()}"
        procs = run_tree(run.pid)
        if any(_command(proc).startswith("ray::ClientWorker") for proc in procs):
            return procs
        assert time.monotonic() < deadline, f"no client worker in {timeout_s:.0f} s: {log.read_text()}"
        time.sleep(0.5)


def _command(proc: psutil.Process) -> str:
    try:
        return " ".join(proc.cmdline())
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return ""


def gcs_of(procs: list[psutil.Process]) -> tuple[str, str]:
    """The run's GCS address (from its raylet's command line) and the token in that raylet's environment."""
    for proc in procs:
        try:
            args, environ = proc.cmdline(), proc.environ()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        address = next((a.split("=", 1)[1] for a in args if a.startswith("--gcs-address=")), None)
        if address and "raylet" in proc.name():
            return address, environ["RAY_AUTH_TOKEN"]
    raise AssertionError("no raylet in the run's process tree")


def client(address: str, home: Path, **auth: str) -> subprocess.Popen:
    """A driver that tries to join ``address`` from this machine's loopback, with ``auth`` as its settings."""
    env = without_ray_settings()
    # A stray ~/.ray/auth_token must not speak for the client; without the variable Ray would swap 127.0.0.1
    # for the interface address and fail to connect for a reason other than the token. A refused client asks
    # the GCS this many times, a second apart, before it gives up (Ray's default: 20).
    env.update(HOME=str(home), RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_gcs_server_port_wait_time_s="3", **auth)
    return subprocess.Popen([sys.executable, "-c", _JOIN, address], env=env, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)


def stop(run: subprocess.Popen) -> None:
    """SIGTERM the run (it shuts its Ray down), then SIGKILL whatever of its tree is left."""
    procs = run_tree(run.pid) if run.poll() is None else []
    run.send_signal(signal.SIGTERM)
    try:
        run.wait(timeout=30)
    except subprocess.TimeoutExpired:
        run.kill()
    _, alive = psutil.wait_procs(procs, timeout=10)
    for proc in alive:
        proc.kill()


@pytest.mark.slow
def test_a_local_run_listens_on_loopback_only_and_admits_only_its_token(tmp_path):
    """`fedsim run` with its own Ray: no process of the run listens outside loopback; a client without the
    token and one with a wrong token are refused by Ray's authentication, one with the run's token joins."""
    log_path = tmp_path / "run.log"
    env = without_ray_settings()
    with open(log_path, "w") as log:
        run = subprocess.Popen([sys.executable, "-m", "fedsim.cli", "run", str(REPO / "experiments/quickstart.yaml"),
                                *LONG_SMALL_RUN, f"output.dir={tmp_path / 'run'}"], env=env, stdout=log,
                               stderr=subprocess.STDOUT, cwd=REPO)
    clients = {}
    try:
        procs = wait_for_a_client_worker(run, log_path)
        sockets = listening_sockets(procs)
        assert {name for name, _, _ in sockets} >= {"gcs_server", "raylet"}, sockets
        assert [s for s in sockets if not is_loopback(s[1])] == []
        address, token = gcs_of(procs)
        assert is_loopback(address.rsplit(":", 1)[0]) and len(token) == 64
        clients["none"] = client(address, tmp_path)
        clients["wrong"] = client(address, tmp_path, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN="0" * 64)
        clients["right"] = client(address, tmp_path, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token)
        outputs = {name: proc.communicate(timeout=90)[0] for name, proc in clients.items()}
    finally:
        for proc in clients.values():
            proc.kill()
        stop(run)
    assert clients["right"].returncode == 0 and "joined" in outputs["right"], outputs["right"]
    for name in ("none", "wrong"):
        assert clients[name].returncode != 0 and "joined" not in outputs[name]
        assert "AuthenticationError" in outputs[name] and "InvalidAuthToken" in outputs[name], outputs[name]


_TWO_INSTANCES = """
import os, ray
import ray._private.ray_constants as constants
from actors.local_ray import start_local_ray, stop_local_ray

@ray.remote(num_cpus=1)
def node_ip():
    return ray.util.get_node_ip_address()

SETTINGS = ("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")

def settings():  # Ray's own ray.init sets other variables (PYTHONBREAKPOINT, ...)
    return {name: os.environ.get(name) for name in SETTINGS}, constants.ENABLE_RAY_CLUSTER

os.environ["RAY_AUTH_TOKEN_PATH"] = "/nonexistent/auth_token"  # the user's, kept for the user's own clusters
before = settings()
start_local_ray(num_cpus=1, log_to_driver=False)
assert settings() == before, settings()
first = ray.get(node_ip.remote())
ray.shutdown()  # as a run does: the next instance must not be sent this one's token
start_local_ray(num_cpus=1, log_to_driver=False)
second = ray.get(node_ip.remote())
stop_local_ray()
assert settings() == before, settings()
print("node IPs", first, second, flush=True)
"""


@pytest.mark.slow
def test_a_second_local_instance_in_one_process_works_and_the_environment_is_left_as_it_was():
    """A notebook's second run: a fresh token for the new instance, the caller's environment untouched."""
    env = {**without_ray_settings(), "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", _TWO_INSTANCES], env=env, capture_output=True, text=True,
                          timeout=180, cwd=REPO)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "node IPs 127.0.0.1 127.0.0.1" in done.stdout


def test_a_local_instance_without_token_authentication_is_refused(monkeypatch):
    """RAY_AUTH_MODE=disabled asks for an open instance: refused, naming the variable, before Ray starts."""
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    with pytest.raises(RuntimeError, match=r"RAY_AUTH_MODE='disabled'.*token authentication only"):
        start_local_ray(num_cpus=1)
