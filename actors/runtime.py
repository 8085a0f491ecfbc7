"""``runtime.engine=ray``: join (or start) a Ray cluster, start the actors, run the federation loop."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import ray

from actors.executor import RayExecutor, RemoteAggregator
from fedsim.algorithms import SERVER_STRATEGIES
from fedsim.config import ExperimentConfig
from fedsim.engine.loop import run_federation
from fedsim.clientdata import load_client_data
from fedsim.messages import nbytes

log = logging.getLogger(__name__)


def connect(cfg: ExperimentConfig) -> bool:
    """Join ``runtime.address`` or RAY_ADDRESS if given, else start a local instance; True if we started one.

    A Ray instance already initialised in this process (a test session, a notebook) is used as it is.
    """
    if ray.is_initialized():
        return False
    address = cfg.runtime.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
        return False
    # address="local": a fresh instance for this run, never a stale one that `ray start` left registered on
    # this machine (plain ray.init() would try to join it).
    ray.init(address="local", include_dashboard=False, log_to_driver=True)
    return True


def check_resources(cfg: ExperimentConfig) -> None:
    """Fail before starting actors that the cluster could never place (Ray would wait forever)."""
    total = ray.cluster_resources()
    runtime = cfg.runtime
    for resource, per_worker, key in (("CPU", runtime.cpus_per_worker, "runtime.cpus_per_worker"),
                                      ("GPU", runtime.gpus_per_worker, "runtime.gpus_per_worker")):
        need = per_worker * runtime.num_workers
        if need > total.get(resource, 0) + 1e-9:
            raise RuntimeError(
                f"runtime.num_workers={runtime.num_workers} x {key}={per_worker} needs {need:g} {resource}, "
                f"but the Ray cluster has {total.get(resource, 0):g}; lower one of them or grow the cluster")


def run_ray(cfg: ExperimentConfig, run_dir: Path, resume: bool = False) -> dict[str, Any]:
    started_here = connect(cfg)
    executor = None
    try:
        check_resources(cfg)
        data = load_client_data(cfg)  # the driver needs shard sizes for the clock; workers load data themselves
        strategy_cls = SERVER_STRATEGIES[cfg.algorithm.server.name]
        executor = RayExecutor(cfg, strategy_cls.personalized)
        initial = ray.get(executor.slots[0].actor.initial_weights.remote())
        shard_sizes = [len(s) for s in data.shards]
        aggregator = RemoteAggregator(cfg, initial, shard_sizes)
        log.info("ray runtime: %d workers on %s", len(executor.slots),
                 sorted({s.placement["node_id"][:8] for s in executor.slots}))
        return run_federation(cfg, run_dir, "ray", executor, aggregator, shard_sizes,
                              nbytes(initial), strategy_cls.personalized, strategy_cls.asynchronous,
                              strategy_cls.trains, resume, headline_metric=data.splits.metric)
    finally:
        if executor is not None:
            executor.shutdown()
        if started_here:
            ray.shutdown()
