"""fedsim on a real (emulated multi-node) Ray cluster: ``ray job submit``, placement over nodes, the loss
of a worker node, and a killed driver resumed. The module's tests share one cluster from cluster/local.py
(a head and worker nodes of 2 CPUs each, each node its own raylet, on 127.0.0.1 with token authentication);
a worker node a test kills is replaced (``local.py add-node``, as an autoscaler would) before the next test,
so each starts on 2 live worker nodes. Ray's health checks run every half second on this cluster, so that a
killed node is marked dead in under 2 s rather than the default's 15.

Drivers run as separate processes (``fedsim run`` with RAY_ADDRESS), as a user runs them: this test
process keeps out of Ray altogether. The reference run of the sequential engine needs no Ray; it runs in a
thread of this process while the cluster works.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from concurrent.futures import Future
from pathlib import Path

import psutil
import pytest

from conftest import REPO, in_background

pytestmark = pytest.mark.slow

LOCAL = str(REPO / "cluster" / "local.py")
QUICKSTART = str(REPO / "experiments" / "quickstart.yaml")
PORT = 6411
CPUS = 2  # per worker node
SMALL = ["data.num_train=160", "data.num_test=20", "partition.num_clients=4", "federation.clients_per_round=2",
         "training.local_epochs=1", "eval.every=1", "eval.zero_shot=false", "output.progress=never",
         "runtime.num_workers=2", "runtime.cpus_per_worker=1", "checkpoint.every=1"]
FEDBUFF = ["algorithm.server.name=fedbuff", "algorithm.server.buffer_size=2", "scheduler.concurrency=3",
           "scheduler.speed=lognormal"]
# Ray marks a node dead after this many failed health checks in a row, this far apart (defaults: 5, 3000 ms). A
# killed node's raylet refuses each check at once; a live one fails a check only by not answering in 10 s
# (health_check_timeout_ms, left as it is).
HEALTH_CHECKS = {"RAY_health_check_period_ms": "500", "RAY_health_check_failure_threshold": "3"}


def client_env(state_file: Path, port: int) -> dict:
    """Environment of a client of a local cluster (auth mode, address, where local.py keeps its state)."""
    return {**os.environ, "FEDSIM_LOCAL_CLUSTER": str(state_file), "RAY_AUTH_MODE": "token",
            "RAY_ADDRESS": f"127.0.0.1:{port}", "PYTHONPATH": str(REPO), **HEALTH_CHECKS,
            # Results over 1 KiB go to the object store of the node that made them, as a real model's updates
            # (megabytes) do; by default Ray returns results under 100 KiB inline, to the driver.
            "RAY_max_direct_call_object_size": "1024"}


def local(env: dict, *args: str) -> dict:
    done = subprocess.run([sys.executable, LOCAL, *args], env=env, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stdout + done.stderr
    return json.loads(done.stdout) if args[0] in ("start", "add-node") else {}


class Cluster:
    """The module's cluster, its live worker nodes by index (a node's resource is ``fedsim_node_<index>``), and the
    drivers the current test started on it."""

    def __init__(self, env: dict):
        self.env = env
        self.info = local(env, "start", "--workers=2", f"--cpus-per-node={CPUS}", "--gpus-per-node=1",
                          "--head-cpus=0", f"--port={PORT}", f"--dashboard-port={PORT + 2}")
        self.workers = [0, 1]
        self.drivers: list[subprocess.Popen] = []

    def fedsim(self, *args: str) -> subprocess.Popen:
        """``fedsim run`` on the cluster, as a user runs it."""
        proc = subprocess.Popen([sys.executable, "-m", "fedsim.cli", "run", *args], env=self.env, cwd=REPO,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.drivers.append(proc)
        return proc

    def end_drivers(self) -> None:
        """Kill what a failed test left running: its workers would hold the next test's CPUs."""
        for proc in self.drivers:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
        self.drivers.clear()

    def replace_lost(self) -> None:
        while len(self.workers) < 2:
            node = local(self.env, "add-node", f"--cpus={CPUS}", "--gpus=1")
            self.workers.append(int(node["name"].removeprefix("worker")))

    def kill(self, index: int, until_marked_dead: bool) -> None:
        """SIGKILL worker node ``index``; with ``until_marked_dead``, return once Ray has marked it dead."""
        self.workers.remove(index)
        local(self.env, "kill-node", str(index), *["--wait"] * until_marked_dead)

    def executing(self, index: int) -> list[str]:
        """Titles of node ``index``'s processes that are executing a call (Ray titles a worker process
        ``ray::<class>.<method>`` while it runs a call, ``ray::<class>`` between calls)."""
        state = json.loads(Path(self.env["FEDSIM_LOCAL_CLUSTER"]).read_text())
        (session,) = [n["pid"] for n in state["nodes"] if n["name"] == f"worker{index}"]
        titles = []
        for proc in psutil.process_iter(["cmdline"]):
            try:
                title = " ".join(proc.info["cmdline"] or [])
                if title.startswith("ray::") and "." in title.split()[0] and os.getsid(proc.pid) == session:
                    titles.append(title)
            except (psutil.Error, OSError):
                continue
        return titles


@pytest.fixture(scope="module")
def module_cluster(tmp_path_factory):
    env = client_env(tmp_path_factory.mktemp("cluster") / "state.json", PORT)
    try:
        yield Cluster(env)
    finally:
        subprocess.run([sys.executable, LOCAL, "stop", "--grace", "2"], env=env, check=False)


@pytest.fixture
def cluster(module_cluster) -> Iterator[Cluster]:
    """The module's cluster with 2 live worker nodes."""
    module_cluster.replace_lost()
    yield module_cluster
    module_cluster.end_drivers()


@contextmanager
def paused(proc: subprocess.Popen) -> Iterator[None]:
    """The driver stopped (SIGSTOP, as a busy or swapped-out driver is) for the body, then let go on."""
    os.kill(proc.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(proc.pid, signal.SIGCONT)


def wait_for_round(run: Path, proc: subprocess.Popen, round_idx: int, timeout_s: float = 600) -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline and proc.poll() is None:
        state = run / "checkpoint" / "state.json"
        if state.exists() and json.loads(state.read_text())["round"] >= round_idx:
            return
        time.sleep(0.25)
    raise AssertionError(f"round {round_idx} not reached: {proc.poll()} {proc.stdout.read() if proc.poll() else ''}")


def finish(proc: subprocess.Popen, timeout_s: float = 600) -> str:
    out, _ = proc.communicate(timeout=timeout_s)
    assert proc.returncode == 0, out[-4000:]
    return out


def fault_free(overrides: list[str], whole: Path) -> Future:
    """The reference engine's summary for ``overrides``, run in a thread of this process (it needs no Ray)
    while the test drives the cluster: started once the run on the cluster is past its start, whose imports
    keep both cores busy, it takes time the run spends waiting for Ray."""
    from fedsim.engine import run_sequential
    from fedsim.validation import load_config

    return in_background(run_sequential, load_config(QUICKSTART, [*overrides, f"output.dir={whole}"]), whole)


def worker_nodes(run: Path) -> set[str]:
    return {w["node_id"] for w in json.loads((run / "summary.json").read_text())["workers"]}


def test_ray_job_submit_runs_an_experiment_packed_on_one_node(tmp_path, cluster):
    """A head on 127.0.0.1 with token authentication; the repository goes up with --working-dir. The run's
    2 workers (1 CPU each) with placement=pack fill one worker node; without the token the cluster refuses
    the client."""
    info = cluster.info
    assert info["dashboard"].startswith("http://127.0.0.1:") and info["auth_mode"] == "token"
    run = tmp_path / "run"
    ray_cli = str(Path(sys.executable).with_name("ray"))
    env = {k: v for k, v in cluster.env.items() if k != "RAY_ADDRESS"}
    done = subprocess.run([ray_cli, "job", "submit", "--address", info["dashboard"], "--working-dir", str(REPO),
                           "--", sys.executable, "-m", "fedsim.cli", "run", "experiments/quickstart.yaml", *SMALL,
                           "federation.rounds=1", "runtime.placement=pack", f"output.dir={run}"],
                          env=env, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert "succeeded" in done.stdout.lower()
    summary = json.loads((run / "summary.json").read_text())
    assert summary["rounds"] == 1 and summary["client_updates"] == 2
    assert len(worker_nodes(run)) == 1
    no_token = {**env, "RAY_AUTH_TOKEN": "not-the-token"}
    refused = subprocess.run([ray_cli, "job", "list", "--address", info["dashboard"]], env=no_token,
                             capture_output=True, text=True, timeout=120)
    assert refused.returncode != 0


def test_a_killed_driver_resumes_on_the_cluster_to_the_same_adapter(tmp_path, cluster):
    """Asynchronous FedBuff, with tasks in flight at the checkpoint, its workers spread over both worker
    nodes; the driver is killed after round 1 and ``fedsim run --resume`` on the cluster ends on the adapter
    and metrics of a fault-free run (the reference engine's, on the same thread count). Synchronous resumes
    on Ray are tested in test_ray_runtime."""
    overrides = [*SMALL, *FEDBUFF, "federation.rounds=3", "runtime.placement=spread", "runtime.num_threads=1"]
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    proc = cluster.fedsim(QUICKSTART, *overrides, f"output.dir={cut}")
    wait_for_round(cut, proc, 1)
    proc.kill()
    proc.wait()
    assert not (cut / "summary.json").exists()
    resume = cluster.fedsim("--resume", str(cut))
    reference = fault_free(overrides, whole)
    finish(resume)
    resumed = json.loads((cut / "summary.json").read_text())
    expected = reference.result()
    assert resumed["mode"] == "async" and resumed["resumed_after_round"] >= 1
    assert resumed["adapter_sha256"] == expected["adapter_sha256"]
    assert resumed["final_metrics"] == expected["final_metrics"]
    assert len(worker_nodes(cut)) == 2


def pause_until_idle(cluster: Cluster, index: int, quiet_s: float = 1.0, timeout_s: float = 60.0) -> None:
    """Until no process of worker node ``index`` has executed a call for ``quiet_s``: the tasks in flight
    finished (their results wait on the node), or wait for an object of the paused driver."""
    quiet_since = time.monotonic()
    deadline = quiet_since + timeout_s
    while time.monotonic() - quiet_since < quiet_s:
        assert time.monotonic() < deadline, f"node {index} still executing {cluster.executing(index)}"
        if cluster.executing(index):
            quiet_since = time.monotonic()
        time.sleep(0.1)


def test_a_node_lost_while_the_driver_is_paused_costs_nothing_but_time(tmp_path, cluster):
    """Head + 2 worker nodes (2 CPUs each): placement=spread puts one worker on each. Asynchronous FedBuff
    with the default queue_per_worker keeps tasks in flight all the time. The driver is paused (SIGSTOP, as a
    busy or swapped-out driver would be) while its tasks run on the workers; once they are done, one worker
    node is killed with what it holds: tasks it was running and results it finished that the driver has not
    consumed. Which of the two it holds depends on timing (a task whose global adapter is not on the node yet
    waits for the paused driver, its owner), so the test asks that lost work of either kind ran again. Ray
    restarts the lost worker on the other node (with its placement bundle), the lost tasks run again with the
    same seeds, and the run ends with the adapter of a fault-free run (the reference engine's, on the same
    thread count)."""
    overrides = [*SMALL, *FEDBUFF, "federation.rounds=5", "runtime.placement=spread", "runtime.num_threads=1"]
    whole, run = tmp_path / "whole", tmp_path / "run"
    kept, lost = cluster.workers
    proc = cluster.fedsim(QUICKSTART, *overrides, f"output.dir={run}")
    wait_for_round(run, proc, 1)
    with paused(proc):
        pause_until_idle(cluster, lost)
        cluster.kill(lost, until_marked_dead=False)
    reference = fault_free(overrides, whole)
    out = finish(proc)
    summary = json.loads((run / "summary.json").read_text())
    expected = reference.result()
    applied = [[r["clients"] for r in map(json.loads, (d / "metrics.jsonl").read_text().splitlines())]
               for d in (whole, run)]
    faults = [line for line in out.splitlines() if "actors.executor" in line]
    assert summary["adapter_sha256"] == expected["adapter_sha256"], (summary["tasks_rerun"], applied, faults)
    assert summary["final_metrics"] == expected["final_metrics"]
    assert summary["global_version"] == 5 and summary["failed_updates"] == {}
    assert summary["worker_restarts"] >= 1
    # What the node held (running tasks, or results the driver had not consumed) was made again.
    assert summary["tasks_rerun"]["finished"] + summary["tasks_rerun"]["unfinished"] >= 1, (
        summary["tasks_rerun"], out[-3000:])
    nodes = {tuple(w["node_resources"]) for w in summary["workers"]}
    assert nodes <= {(f"fedsim_node_{kept}",), (f"fedsim_node_{lost}",)}
    assert all(w["node_resources"] == [f"fedsim_node_{kept}"] for w in summary["workers"] if w["restarts"])
    first = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    assert first["round"] == 1


def test_a_node_lost_right_before_an_evaluation_round_ends_on_the_fault_free_run(tmp_path, cluster):
    """Two worker nodes, a worker filling each (2 CPUs; spread); evaluation only after round 3. The driver is
    paused after round 1's checkpoint while one worker node is killed and the cluster marks it dead; the lost
    worker's bundle fits nowhere now, so it never comes back. Its tasks run again on the other worker, and the
    evaluation and the adapter files go to the live worker only (a shard sent to the lost one used to wait
    forever): the run ends with the fault-free adapter and metrics."""
    overrides = [*SMALL, f"runtime.cpus_per_worker={CPUS}", "federation.rounds=3", "eval.every=3",
                 "runtime.placement=spread", "runtime.num_threads=1"]
    whole, run = tmp_path / "whole", tmp_path / "run"
    proc = cluster.fedsim(QUICKSTART, *overrides, f"output.dir={run}")
    wait_for_round(run, proc, 1)
    with paused(proc):
        cluster.kill(cluster.workers[-1], until_marked_dead=True)
    reference = fault_free(overrides, whole)
    out = finish(proc)
    summary = json.loads((run / "summary.json").read_text())
    expected = reference.result()
    assert summary["adapter_sha256"] == expected["adapter_sha256"], out[-3000:]
    assert summary["final_metrics"] == expected["final_metrics"]
    assert summary["worker_restarts"] >= 1 and summary["server_restarts"] == 0
