"""fedsim on a real (emulated multi-node) Ray cluster: ``ray job submit``, placement over nodes, the loss
of a worker node, and a killed driver resumed. Clusters come from cluster/local.py (a head and worker nodes,
each its own raylet, on 127.0.0.1 with token authentication): each node-loss test starts and stops its own,
the other tests share one.

Drivers run as separate processes (``fedsim run`` with RAY_ADDRESS), as a user runs them: this test
process keeps out of Ray altogether (a reference run of the sequential engine needs none).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO

pytestmark = pytest.mark.slow

LOCAL = str(REPO / "cluster" / "local.py")
QUICKSTART = str(REPO / "experiments" / "quickstart.yaml")
PORT = 6411
SMALL = ["data.num_train=160", "data.num_test=20", "partition.num_clients=4", "federation.clients_per_round=2",
         "training.local_epochs=1", "eval.every=1", "eval.zero_shot=false", "output.progress=never",
         "runtime.num_workers=2", "runtime.cpus_per_worker=1", "checkpoint.every=1"]
FEDBUFF = ["algorithm.server.name=fedbuff", "algorithm.server.buffer_size=2", "scheduler.concurrency=3",
           "scheduler.speed=lognormal"]
PAUSE_S = 8.0  # the driver's pause: the tasks it has in flight (well under a second each) finish meanwhile


def client_env(state_file: Path, port: int) -> dict:
    """Environment of a client of a local cluster (auth mode, address, where local.py keeps its state)."""
    return {**os.environ, "FEDSIM_LOCAL_CLUSTER": str(state_file), "RAY_AUTH_MODE": "token",
            "RAY_ADDRESS": f"127.0.0.1:{port}", "PYTHONPATH": str(REPO),
            # Results over 1 KiB go to the object store of the node that made them, as a real model's updates
            # (megabytes) do; by default Ray returns results under 100 KiB inline, to the driver.
            "RAY_max_direct_call_object_size": "1024"}


def stop_cluster(env: dict) -> None:
    subprocess.run([sys.executable, LOCAL, "stop", "--grace", "5"], env=env, check=False)


@pytest.fixture
def cluster_env(tmp_path):
    """The environment of a cluster that the test starts itself; stopped after the test."""
    env = client_env(tmp_path / "cluster" / "state.json", PORT)
    yield env
    stop_cluster(env)


def local(env: dict, *args: str) -> dict:
    done = subprocess.run([sys.executable, LOCAL, *args], env=env, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stdout + done.stderr
    return json.loads(done.stdout) if args[0] == "start" else {}


def start_cluster(env: dict, workers: int, cpus: int, head_cpus: int = 0, port: int = PORT) -> dict:
    return local(env, "start", f"--workers={workers}", f"--cpus-per-node={cpus}", "--gpus-per-node=1",
                 f"--head-cpus={head_cpus}", f"--port={port}", f"--dashboard-port={port + 2}")


def fedsim(env: dict, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "fedsim.cli", "run", *args], env=env, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_for_round(run: Path, proc: subprocess.Popen, round_idx: int, timeout_s: float = 600) -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline and proc.poll() is None:
        state = run / "checkpoint" / "state.json"
        if state.exists() and json.loads(state.read_text())["round"] >= round_idx:
            return
        time.sleep(0.5)
    raise AssertionError(f"round {round_idx} not reached: {proc.poll()} {proc.stdout.read() if proc.poll() else ''}")


def finish(proc: subprocess.Popen, timeout_s: float = 600) -> str:
    out, _ = proc.communicate(timeout=timeout_s)
    assert proc.returncode == 0, out[-4000:]
    return out


def fault_free(overrides: list[str], whole: Path) -> dict:
    """The reference engine's summary for ``overrides``, run in this process (it needs no Ray)."""
    from fedsim.engine import run_sequential
    from fedsim.validation import load_config

    return run_sequential(load_config(QUICKSTART, [*overrides, f"output.dir={whole}"]), whole)


def fault_free_and_started(env: dict, overrides: list[str], whole: Path, run: Path, cpus: int):
    """The reference engine's summary for ``overrides`` (same thread count), and ``fedsim run`` of the same on
    a fresh cluster of 2 worker nodes of ``cpus`` CPUs each, once its round 1 is checkpointed."""
    expected = fault_free(overrides, whole)
    start_cluster(env, workers=2, cpus=cpus)
    proc = fedsim(env, QUICKSTART, *overrides, f"output.dir={run}")
    wait_for_round(run, proc, 1)
    return expected, proc


def test_a_node_lost_while_the_driver_is_paused_costs_nothing_but_time(tmp_path, cluster_env):
    """Head + 2 worker nodes (2 CPUs each): placement=spread puts one worker on each. Asynchronous FedBuff
    with the default queue_per_worker keeps tasks in flight all the time. The driver is paused (SIGSTOP, as a
    busy or swapped-out driver would be) while its tasks run on the workers; worker node 1 is killed with
    what it holds: tasks it was running and results it finished that the driver has not consumed. Which of
    the two it holds depends on timing (a task whose global adapter is not on the node yet waits for the
    paused driver, its owner), so the test asks that lost work of either kind ran again. Ray restarts the
    lost worker on the other node (with its placement bundle), the lost tasks run again with the same seeds,
    and the run ends with the adapter of a fault-free run (the reference engine's, on the same thread count)."""
    overrides = [*SMALL, *FEDBUFF, "federation.rounds=5", "runtime.placement=spread", "runtime.num_threads=1"]
    whole, run = tmp_path / "whole", tmp_path / "run"
    expected, proc = fault_free_and_started(cluster_env, overrides, whole, run, cpus=2)
    os.kill(proc.pid, signal.SIGSTOP)
    try:
        time.sleep(PAUSE_S)
        local(cluster_env, "kill-node", "1")
    finally:
        os.kill(proc.pid, signal.SIGCONT)
    out = finish(proc)
    summary = json.loads((run / "summary.json").read_text())
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
    assert nodes <= {("fedsim_node_0",), ("fedsim_node_1",)}
    assert all(w["node_resources"] == ["fedsim_node_0"] for w in summary["workers"] if w["restarts"])
    first = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    assert first["round"] == 1


def test_a_node_lost_right_before_an_evaluation_round_ends_on_the_fault_free_run(tmp_path, cluster_env):
    """Two worker nodes of one CPU each, a worker on each (spread); evaluation only after round 3. The driver
    is paused after round 1's checkpoint while worker node 1 is killed; the lost worker's bundle fits nowhere
    now, so it never comes back. Its tasks run again on worker 0, and the evaluation and the adapter files go
    to the live worker only (a shard sent to the lost one used to wait forever): the run ends with the
    fault-free adapter and metrics."""
    overrides = [*SMALL, "federation.rounds=3", "eval.every=3", "runtime.placement=spread",
                 "runtime.num_threads=1"]
    whole, run = tmp_path / "whole", tmp_path / "run"
    expected, proc = fault_free_and_started(cluster_env, overrides, whole, run, cpus=1)
    os.kill(proc.pid, signal.SIGSTOP)
    try:
        local(cluster_env, "kill-node", "1")
        time.sleep(PAUSE_S)
    finally:
        os.kill(proc.pid, signal.SIGCONT)
    out = finish(proc)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["adapter_sha256"] == expected["adapter_sha256"], out[-3000:]
    assert summary["final_metrics"] == expected["final_metrics"]
    assert summary["worker_restarts"] >= 1 and summary["server_restarts"] == 0


@pytest.fixture(scope="module")
def shared_env(tmp_path_factory):
    """A cluster for the tests that kill no node, started once: a head and 2 worker nodes of 2 CPUs each, on
    its own port (the node-loss tests above start and stop theirs first)."""
    port = PORT + 10
    env = client_env(tmp_path_factory.mktemp("shared-cluster") / "state.json", port)
    try:
        yield env, start_cluster(env, workers=2, cpus=2, port=port)
    finally:
        stop_cluster(env)


def worker_nodes(run: Path) -> set[str]:
    return {w["node_id"] for w in json.loads((run / "summary.json").read_text())["workers"]}


def test_ray_job_submit_runs_an_experiment_packed_on_one_node(tmp_path, shared_env):
    """A head on 127.0.0.1 with token authentication; the repository goes up with --working-dir. The run's
    2 workers (1 CPU each) with placement=pack fill one worker node; without the token the cluster refuses
    the client."""
    env, info = shared_env
    assert info["dashboard"].startswith("http://127.0.0.1:") and info["auth_mode"] == "token"
    run = tmp_path / "run"
    ray_cli = str(Path(sys.executable).with_name("ray"))
    env = {k: v for k, v in env.items() if k != "RAY_ADDRESS"}
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


def test_a_killed_driver_resumes_on_the_cluster_to_the_same_adapter(tmp_path, shared_env):
    """Asynchronous FedBuff, with tasks in flight at the checkpoint, its workers spread over both worker
    nodes; the driver is killed after round 1 and ``fedsim run --resume`` on the cluster ends on the adapter
    and metrics of a fault-free run (the reference engine's, on the same thread count). Synchronous resumes
    on Ray are tested in test_ray_runtime."""
    env, _ = shared_env
    overrides = [*SMALL, *FEDBUFF, "federation.rounds=3", "runtime.placement=spread", "runtime.num_threads=1"]
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    expected = fault_free(overrides, whole)
    proc = fedsim(env, QUICKSTART, *overrides, f"output.dir={cut}")
    wait_for_round(cut, proc, 1)
    proc.kill()
    proc.wait()
    assert not (cut / "summary.json").exists()
    finish(fedsim(env, "--resume", str(cut)))
    resumed = json.loads((cut / "summary.json").read_text())
    assert resumed["mode"] == "async" and resumed["resumed_after_round"] >= 1
    assert resumed["adapter_sha256"] == expected["adapter_sha256"]
    assert resumed["final_metrics"] == expected["final_metrics"]
    assert len(worker_nodes(cut)) == 2
