"""What a cluster must offer before a run starts its workers. Resources: a run that asks for more than the
cluster holds asks the autoscaler for it and waits up to ``runtime.resource_timeout_s``, then fails naming what
is missing, before any actor starts. Data: every node that may run a worker must read the run's data folders."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from actors.runtime import check_data_on_nodes, run_ray

from conftest import REPO, small_config
from real_fixtures import make_hateful_memes

# One GPU worker, one round of a small federation: what the join test runs once the GPU node is there.
SMALL = ["data.num_train=80", "data.num_test=16", "partition.num_clients=2", "federation.clients_per_round=2",
         "federation.rounds=1", "training.local_epochs=1", "eval.every=1", "eval.zero_shot=false",
         "output.progress=never", "runtime.num_workers=1", "runtime.cpus_per_worker=1",
         "runtime.gpus_per_worker=1", "runtime.resource_timeout_s=300", "output.save_adapter=false"]


def gpu_hungry(tmp_path, timeout_s: float):
    """Three workers of one GPU each: one more GPU than the session's cluster has."""
    return small_config(tmp_path, "runtime.num_workers=3", "runtime.gpus_per_worker=1", "runtime.cpus_per_worker=0",
                        f"runtime.resource_timeout_s={timeout_s}")


@pytest.mark.parametrize("timeout_s", [0, 3])
def test_a_run_waits_for_missing_gpus_then_fails_naming_them(ray_cluster, tmp_path, timeout_s):
    start = time.monotonic()
    with pytest.raises(RuntimeError, match=r"needs 3 GPU \(the cluster has 2\)") as failure:
        run_ray(gpu_hungry(tmp_path, timeout_s), tmp_path / "run")
    waited = time.monotonic() - start
    if timeout_s:
        assert "runtime.resource_timeout_s=3" in str(failure.value)
        assert timeout_s <= waited < timeout_s + 15, waited
    else:
        assert "resource_timeout_s > 0 waits" in str(failure.value)
        assert waited < 2, waited
    assert not ray_cluster.util.list_named_actors(), "no actor may start for a run that cannot be placed"


@pytest.mark.slow
def test_a_waiting_run_starts_when_a_node_with_the_resources_joins(tmp_path):
    """On a cluster with no GPU, a GPU run waits (asking the autoscaler); a GPU node joins
    (``cluster/local.py add-node``, the autoscaler's stand-in) and the run goes on to finish."""
    port = 6431
    env = {**os.environ, "FEDSIM_LOCAL_CLUSTER": str(tmp_path / "cluster" / "state.json"), "RAY_AUTH_MODE": "token",
           "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_ADDRESS": f"127.0.0.1:{port}", "PYTHONPATH": str(REPO)}
    log = tmp_path / "run.log"
    try:
        local = [sys.executable, str(REPO / "cluster" / "local.py")]
        subprocess.run([*local, "start", "--workers=0", "--head-cpus=0", f"--port={port}",
                        f"--dashboard-port={port + 2}"], env=env, check=True, capture_output=True, timeout=300)
        with open(log, "w") as out:
            run = subprocess.Popen([sys.executable, "-m", "fedsim.cli", "run", str(REPO / "experiments" / "quickstart.yaml"),
                                    *SMALL, f"output.dir={tmp_path / 'run'}"], env=env, cwd=REPO, stdout=out,
                                   stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while "waiting for the cluster to grow" not in log.read_text():
            assert run.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.5)
        assert "1 GPU (the cluster has 0)" in log.read_text()
        subprocess.run([*local, "add-node", "--cpus=1", "--gpus=1"], env=env, check=True, capture_output=True,
                       timeout=300)
        assert run.wait(timeout=400) == 0, log.read_text()[-3000:]
        assert (tmp_path / "run" / "summary.json").exists()
        assert "the cluster now holds what the run needs" in log.read_text()
    finally:
        subprocess.run([sys.executable, str(REPO / "cluster" / "local.py"), "stop", "--grace", "3"], env=env,
                       capture_output=True, timeout=120)


def test_data_a_node_cannot_read_fails_the_run_naming_the_node(ray_cluster, tmp_path):
    """The driver validated the folder; a node without it (here: removed after validation) is named."""
    make_hateful_memes(tmp_path / "hateful_memes")
    cfg = small_config(tmp_path, "data.dataset=hateful_memes", f"data.path={tmp_path / 'hateful_memes'}",
                       "data.num_train=0", "data.num_test=0")
    check_data_on_nodes(cfg)  # readable everywhere: passes
    (tmp_path / "hateful_memes" / "train.jsonl").unlink()
    node = ray_cluster.nodes()[0]
    with pytest.raises(RuntimeError, match="cannot be read on every node") as failure:
        check_data_on_nodes(cfg)
    assert f"node {node['NodeManagerAddress']} ({node['NodeID'][:8]})" in str(failure.value)
    assert "train.jsonl" in str(failure.value)


def test_two_runs_waiting_for_resources_keep_their_own_demands(ray_cluster, tmp_path):
    """Each waiting run's demand is its own pending placement group (what the autoscaler grows the cluster
    for): one run giving up withdraws its demand only, never the other's (a cluster-wide request_resources,
    which each call replaces, would)."""
    import threading

    from actors.placement import reserve_workers

    def pending() -> set[str]:
        return {g["name"] for g in ray_cluster.util.placement_group_table().values() if g["state"] == "PENDING"}

    errors: dict[str, BaseException] = {}

    def reserve(name: str, timeout_s: float) -> None:
        try:
            reserve_workers(gpu_hungry(tmp_path / name, timeout_s), name)
        except RuntimeError as err:
            errors[name] = err

    runs = {name: threading.Thread(target=reserve, args=(name, t)) for name, t in (("short", 3), ("long", 10))}
    for thread in runs.values():
        thread.start()
    deadline = time.monotonic() + 5
    while pending() != {"short", "long"} and time.monotonic() < deadline:
        time.sleep(0.2)
    assert pending() == {"short", "long"}, "each waiting run places a demand of its own"
    runs["short"].join(timeout=30)
    assert "short" in errors and pending() == {"long"}, "the run that gave up withdrew its own demand only"
    runs["long"].join(timeout=60)
    assert "needs 3 GPU (the cluster has 2)" in str(errors["long"]) and not pending()
