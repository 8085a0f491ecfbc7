"""Faults the Ray runtime survives on a real local Ray instance: the aggregator actor's death, a hung worker,
and a cohort far larger than the workers hold, with bounded memory on the driver's node."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from actors.runtime import run_ray
from fedsim.engine import run_sequential
from fedsim.output import read_metrics

from conftest import small_config

pytestmark = pytest.mark.slow

# Workers run torch on one thread each: the reference engine must too (reduction order).
FAULTS = ("runtime.num_threads=1", "eval.zero_shot=false", "federation.rounds=3", "checkpoint.every=1",
          "eval.every=3", "runtime.num_workers=2")


@pytest.fixture(scope="module")
def fault_free(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("fault_free")
    return run_sequential(small_config(root, *FAULTS), root / "run")


def run_in_thread(cfg, run_dir: Path) -> tuple[threading.Thread, dict]:
    outcome: dict = {}

    def target() -> None:
        try:
            outcome.update(run_ray(cfg, run_dir))
        except BaseException as err:  # surfaced by the test
            outcome["error"] = err

    thread = threading.Thread(target=target)
    thread.start()
    return thread, outcome


def wait_for_checkpoint(run_dir: Path, round_idx: int, timeout_s: float = 600) -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        records = read_metrics(run_dir) if (run_dir / "metrics.jsonl").exists() else []
        if len(records) >= round_idx and (run_dir / "checkpoint").is_dir():
            return
        time.sleep(0.1)
    raise AssertionError(f"round {round_idx} was not checkpointed within {timeout_s} s")


def actors_of(ray, cfg, role: str) -> list[str]:
    return [n for n in ray.util.list_named_actors() if f":{role}" in n and cfg.name in n]


def test_the_run_survives_its_aggregator_actor_and_ends_on_the_fault_free_adapter(ray_cluster, tmp_path, fault_free):
    """The server actor is killed (not raised in: killed) after round 1's checkpoint; the run recreates it
    from that checkpoint, keeps its workers, and ends as the fault-free run did; summary.json tells the
    server's loss from a worker's."""
    cfg, run_dir = small_config(tmp_path, *FAULTS), tmp_path / "run"
    thread, outcome = run_in_thread(cfg, run_dir)
    wait_for_checkpoint(run_dir, 1)
    (server,) = actors_of(ray_cluster, cfg, "server")
    ray_cluster.kill(ray_cluster.get_actor(server), no_restart=True)
    thread.join(timeout=600)
    assert not thread.is_alive() and "error" not in outcome, outcome.get("error")
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["server_restarts"] == 1 and summary["worker_restarts"] == 0
    assert summary["failed_updates"] == {} and summary["tasks_rerun"]["finished"] + summary["tasks_rerun"][
        "unfinished"] == 0, "a server loss is not a worker loss: no task counts as lost with a worker"
    assert summary["adapter_sha256"] == fault_free["adapter_sha256"]
    assert summary["final_metrics"] == fault_free["final_metrics"]
    assert [r["round"] for r in read_metrics(run_dir)] == [1, 2, 3]


def test_a_hung_worker_is_restarted_and_its_calls_run_again(ray_cluster, tmp_path, fault_free):
    """Worker 0's process is stopped (SIGSTOP: alive, silent, as a call stuck in a driver would leave it)
    in round 2. After runtime.task_timeout_s without progress the executor restarts it; its calls run again
    with the same seeds, and the run ends on the fault-free adapter."""
    cfg, run_dir = small_config(tmp_path, *FAULTS, "runtime.task_timeout_s=5"), tmp_path / "run"
    thread, outcome = run_in_thread(cfg, run_dir)
    wait_for_checkpoint(run_dir, 1)
    (name,) = [n for n in actors_of(ray_cluster, cfg, "worker0")]
    pid = ray_cluster.get(ray_cluster.get_actor(name).placement.remote())["pid"]
    os.kill(pid, signal.SIGSTOP)
    thread.join(timeout=600)
    assert not thread.is_alive() and "error" not in outcome, outcome.get("error")
    summary = json.loads((run_dir / "summary.json").read_text())
    hung = [w["hung"] for w in summary["workers"]]
    assert hung[0] >= 1 and summary["workers"][0]["restarts"] >= 1 and summary["server_restarts"] == 0
    assert summary["adapter_sha256"] == fault_free["adapter_sha256"]
    assert summary["final_metrics"] == fault_free["final_metrics"]


def many_clients(tmp_path, clients: int, *overrides: str):
    """``clients`` clients a round on 2 workers, one tiny training step each."""
    return small_config(tmp_path, f"partition.num_clients={clients}", f"federation.clients_per_round={clients}",
                        f"data.num_train={4 * clients}", "data.num_test=8", "partition.scheme=quantity",
                        "partition.min_samples=1", "training.batch_size=2", "training.local_epochs=0",
                        "training.local_steps=1", "eval.zero_shot=false", "runtime.num_workers=2",
                        "checkpoint.every=0", "output.save_adapter=false", *overrides)


def test_a_cohort_of_500_on_2_workers_holds_a_bounded_number_of_results(ray_cluster, tmp_path):
    """500 clients a round on 2 workers: finished results waiting for the loop stay within a small multiple
    of what the workers hold at once, not the cohort."""
    summary = run_ray(many_clients(tmp_path, 500, "federation.rounds=1"), tmp_path / "run")
    held = summary["held_at_once"]
    assert summary["client_updates"] == 500
    assert held["bound"] == 2 * 2 * 1 * 2  # RESULTS_WAITING x (1 + queue_per_worker) x clients_per_batch x workers
    assert 0 < held["results"] <= held["bound"] + 1  # + the task the loop waits for, which always goes


def test_client_states_are_fetched_for_tasks_on_their_way_only(ray_cluster, tmp_path):
    """SCAFFOLD keeps a state per client: in round 2 each of 40 tasks needs one, but only the tasks sent to a
    worker (and results waiting) hold theirs on the driver's node, never the whole cohort's."""
    summary = run_ray(many_clients(tmp_path, 40, "federation.rounds=2", "algorithm.server.name=scaffold",
                                   "algorithm.client.name=scaffold", "training.optimizer=sgd"), tmp_path / "run")
    held = summary["held_at_once"]
    assert summary["client_updates"] == 80
    assert 0 < held["states"] <= held["bound"] + 1
