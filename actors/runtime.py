"""``runtime.engine=ray``: join (or start) a Ray cluster, start the actors, run the federation loop."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import ray
from ray.autoscaler.sdk import request_resources
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from actors.executor import RayExecutor, RemoteAggregator
from fedsim.algorithms import SERVER_STRATEGIES
from fedsim.config import ConfigError, ExperimentConfig
from fedsim.engine.loop import run_federation
from fedsim.clientdata import load_client_data
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
        ray.init(address=address, log_to_driver=True)
        return False
    # address="local": a fresh instance for this run, never a stale one that `ray start` left registered on
    # this machine (plain ray.init() would try to join it).
    ray.init(address="local", include_dashboard=False, log_to_driver=True)
    return True


def missing_resources(cfg: ExperimentConfig) -> dict[str, tuple[float, float]]:
    """{resource: (needed, in the cluster)} for each resource the workers need more of than the cluster has."""
    total = ray.cluster_resources()
    runtime = cfg.runtime
    need = {"CPU": runtime.cpus_per_worker * runtime.num_workers, "GPU": runtime.gpus_per_worker * runtime.num_workers}
    return {r: (n, total.get(r, 0.0)) for r, n in need.items() if n > total.get(r, 0.0) + 1e-9}


def _describe(missing: dict[str, tuple[float, float]]) -> str:
    return ", ".join(f"{need:g} {r} (the cluster has {have:g})" for r, (need, have) in missing.items())


def wait_for_resources(cfg: ExperimentConfig, poll_s: float = 2.0) -> bool:
    """Make sure the cluster can ever hold the workers; True if the autoscaler was asked to grow it.

    A cluster that lacks them is asked for them (an autoscaling cluster may start with no GPU node at all) and
    waited for up to ``runtime.resource_timeout_s``, since a GPU node takes minutes to boot; after that, or at
    once with a timeout of 0, the run fails naming what is missing, before any actor starts (Ray would
    otherwise wait forever for a placement that cannot happen).
    """
    runtime = cfg.runtime
    missing = missing_resources(cfg)
    if not missing:
        return False
    hint = (f"runtime.num_workers={runtime.num_workers} x runtime.cpus_per_worker={runtime.cpus_per_worker:g} / "
            f"runtime.gpus_per_worker={runtime.gpus_per_worker:g}")
    if runtime.resource_timeout_s <= 0:
        raise RuntimeError(f"{hint} needs {_describe(missing)}; lower them or grow the cluster "
                           "(runtime.resource_timeout_s > 0 waits for an autoscaler to add nodes)")
    bundle = {k: v for k, v in (("CPU", runtime.cpus_per_worker), ("GPU", runtime.gpus_per_worker)) if v}
    request_resources(bundles=[dict(bundle) for _ in range(runtime.num_workers)])
    start = time.monotonic()
    deadline = start + runtime.resource_timeout_s
    next_report = start
    while missing:
        now = time.monotonic()
        if now >= deadline:
            request_resources(bundles=[])  # withdraw the demand: nothing will use those nodes
            raise RuntimeError(f"{hint} needs {_describe(missing)}; no node with them joined within "
                               f"runtime.resource_timeout_s={runtime.resource_timeout_s:g} s")
        if now >= next_report:
            log.warning("waiting for the cluster to grow: %s (asked the autoscaler; %.0f s left)",
                        _describe(missing), deadline - now)
            next_report = now + 30.0
        time.sleep(min(poll_s, max(deadline - now, 0.0)))
        missing = missing_resources(cfg)
    log.warning("the cluster now holds what the run needs, after %.0f s", time.monotonic() - start)
    return True


def reads_local_files(cfg: ExperimentConfig) -> bool:
    """Whether the run reads data from local folders (``data.path`` or a ``modality_task`` ``text_path``)."""
    steps = list((cfg.data.scenarios or {}).values()) + list((cfg.data.test_scenarios or {}).values())
    return cfg.data.path is not None or any(isinstance(step, dict) and step.get("text_path") for step in steps)


@ray.remote(num_cpus=0)
def _data_problem_here(cfg: ExperimentConfig) -> str | None:
    try:
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
    problems = [f"node {n['NodeManagerAddress']} ({n['NodeID'][:8]}): {problem}"
                for n, problem in zip(nodes, ray.get(checks)) if problem]
    if problems:
        raise RuntimeError("the run's data cannot be read on every node that may run a worker; put it on storage "
                           "they all read (cluster/README.md, Data on clusters):\n  " + "\n  ".join(problems))


def run_ray(cfg: ExperimentConfig, run_dir: Path, resume: bool = False) -> dict[str, Any]:
    started_here = connect(cfg)
    executor = None
    requested = False
    try:
        requested = wait_for_resources(cfg)
        check_data_on_nodes(cfg)
        data = load_client_data(cfg)  # the driver needs shard sizes for the clock; workers load data themselves
        strategy_cls = SERVER_STRATEGIES[cfg.algorithm.server.name]
        executor = RayExecutor(cfg, strategy_cls.personalized)
        initial = ray.get(executor.slots[0].actor.initial_weights.remote())
        shard_sizes = data.shard_sizes()
        aggregator = RemoteAggregator(executor.server, cfg, initial, shard_sizes)
        log.info("ray runtime: %d workers on %s", len(executor.slots),
                 sorted({s.placement["node_id"][:8] for s in executor.slots}))
        return run_federation(cfg, run_dir, "ray", executor, aggregator, shard_sizes,
                              nbytes(initial), strategy_cls.personalized, strategy_cls.asynchronous,
                              strategy_cls.trains, resume, headline_metric=data.metric)
    finally:
        if requested:  # a standing request would keep the autoscaler's nodes up after the run
            request_resources(bundles=[])
        if executor is not None:
            executor.shutdown()
        if started_here:
            ray.shutdown()
