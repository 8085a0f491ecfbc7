"""``runtime.engine=ray``: join (or start) a Ray cluster, start the actors, run the federation loop."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from actors.executor import RayExecutor, RemoteAggregator, ServerLost
from actors.local_ray import reload_ray_auth, start_local_ray, stop_local_ray
from fedsim.algorithms import SERVER_STRATEGIES
from fedsim.checkpoint import check_checkpoint
from fedsim.plugins import import_plugins
from fedsim.config import ConfigError, ExperimentConfig
from fedsim.engine.loop import run_federation
from fedsim.messages import nbytes
from fedsim.validation import check_data

log = logging.getLogger(__name__)


def connect(cfg: ExperimentConfig) -> bool:
    """Join ``runtime.address`` or RAY_ADDRESS if given, else start a local instance; True if we started one.

    A Ray instance already initialised in this process (a test session, a notebook) is used as it is.
    """
    if ray.is_initialized():
        return False
    address = cfg.runtime.address or os.environ.get("RAY_ADDRESS")
    if address:
        reload_ray_auth()  # the cluster's token from the environment, not one an earlier local run left cached
        ray.init(address=address, log_to_driver=True)
        return False
    # A fresh instance for this run (never a stale one that `ray start` left registered on this machine, which
    # plain ray.init() would join), on loopback with a token of its own.
    start_local_ray(log_to_driver=True)
    return True


def reads_local_files(cfg: ExperimentConfig) -> bool:
    """Whether the run reads data from local folders (``data.path`` or a ``modality_task`` ``text_path``)."""
    steps = list((cfg.data.scenarios or {}).values()) + list((cfg.data.test_scenarios or {}).values())
    return cfg.data.path is not None or any(isinstance(step, dict) and step.get("text_path") for step in steps)


DATA_CHECK_TIMEOUT_S = 120.0  # the check reads a few files: a node that cannot answer in this time is named


@ray.remote(num_cpus=0)
def _data_problem_here(cfg: ExperimentConfig) -> str | None:
    try:
        import_plugins(cfg.plugins)  # a user's dataset adapter checks its own files
        check_data(cfg)
    except ConfigError as err:
        return str(err)
    return None


def check_data_on_nodes(cfg: ExperimentConfig) -> None:
    """Fail naming the node when a worker node cannot read the run's data folders (the driver checked its own
    disk when it loaded the config): before the workers load models, not as a crash in one of them. Nodes
    that join later (an autoscaler's) are checked by the worker that lands there, when it loads its data."""
    if not reads_local_files(cfg):
        return
    nodes = [n for n in ray.nodes() if n["Alive"] and (n["Resources"].get("CPU") or n["Resources"].get("GPU"))]
    checks = [_data_problem_here.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)
                                         ).remote(cfg) for n in nodes]
    ready, _ = ray.wait(checks, num_returns=len(checks), timeout=DATA_CHECK_TIMEOUT_S)
    answers = [ray.get(check) if check in ready else f"no answer within {DATA_CHECK_TIMEOUT_S:g} s (node down?)"
               for check in checks]
    problems = [f"node {n['NodeManagerAddress']} ({n['NodeID'][:8]}): {problem}"
                for n, problem in zip(nodes, answers) if problem]
    if problems:
        raise RuntimeError("the run's data cannot be read on every node that may run a worker; put it on storage "
                           "they all read (docs/clusters.md, Data on clusters):\n  " + "\n  ".join(problems))


SERVER_RECOVERIES = 3  # aggregator actors a run may lose and recreate before it gives up


def run_ray(cfg: ExperimentConfig, run_dir: Path, resume: bool = False) -> dict[str, Any]:
    started_here = connect(cfg)
    executor = None
    try:
        check_data_on_nodes(cfg)
        strategy_cls = SERVER_STRATEGIES[cfg.algorithm.server.name]
        executor = RayExecutor(cfg, strategy_cls.personalized)  # waits for the cluster to hold its workers
        initial = executor.initial_weights()
        data = executor.data_summary()  # the workers load the data (from the seed); the driver holds none
        shard_sizes = data.shard_sizes
        log.info("ray runtime: %d workers on %s", len(executor.slots),
                 sorted({s.placement.get("node_id", "?")[:8] for s in executor.slots}))
        while True:
            try:
                aggregator = RemoteAggregator(executor.server, cfg, initial, shard_sizes)
                return run_federation(cfg, run_dir, "ray", executor, aggregator, shard_sizes,
                                      nbytes(initial), strategy_cls.personalized, strategy_cls.asynchronous,
                                      strategy_cls.trains, resume, headline_metric=data.metric,
                                      chance_metrics=data.chance_metrics)
            except ServerLost as lost:
                resume = recover_from(lost, cfg, run_dir, executor)
    finally:
        if executor is not None:
            executor.shutdown()
        if started_here:
            stop_local_ray()


def recover_from(lost: ServerLost, cfg: ExperimentConfig, run_dir: Path, executor: RayExecutor) -> bool:
    """After the aggregator actor died: a new one, to continue from the run's last checkpoint (the workers
    stay); the run ends at once, saying how to continue it, when there is no checkpoint or it died too often."""
    resume_hint = f"continue it later with: fedsim run --resume {run_dir}"
    if executor.server_restarts >= SERVER_RECOVERIES:
        raise RuntimeError(f"{lost}; the aggregator actor was lost {SERVER_RECOVERIES + 1} times, the run stops; "
                           f"{resume_hint}") from lost
    try:
        check_checkpoint(run_dir)
    except FileNotFoundError:
        raise RuntimeError(f"{lost}; the run has no checkpoint to continue from (checkpoint.every="
                           f"{cfg.checkpoint.every}), so it stops here") from lost
    log.error("%s; recreating it from the last checkpoint in %s", lost, run_dir)
    executor.replace_server()
    return True
