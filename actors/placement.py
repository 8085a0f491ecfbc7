"""A run's workers reserved as one Ray placement group: one bundle per worker, packed or spread over nodes.

While the group waits to be placed, its bundles are this run's own resource demand, which the autoscaler
sees and grows the cluster for (a GPU node boots in minutes). Two runs waiting side by side keep their own
demands: unlike ``ray.autoscaler.sdk.request_resources``, which is cluster-wide and which each call replaces,
so that one run that finished would cancel the other's request.
"""

from __future__ import annotations

import logging
import time

import ray
from ray.exceptions import GetTimeoutError
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group

from fedsim.config import ExperimentConfig

log = logging.getLogger(__name__)

PLACEMENT_GRACE_S = 5.0  # runtime.resource_timeout_s=0 still gives free resources this long to be placed
REPORT_EVERY_S = 30.0


def worker_bundle(cfg: ExperimentConfig) -> dict[str, float]:
    runtime = cfg.runtime
    return {k: v for k, v in (("CPU", runtime.cpus_per_worker), ("GPU", runtime.gpus_per_worker)) if v}


def missing_resources(cfg: ExperimentConfig) -> dict[str, tuple[float, float]]:
    """{resource: (needed, in the cluster)} for each resource the workers need more of than the cluster has."""
    total = ray.cluster_resources()
    need = {r: v * cfg.runtime.num_workers for r, v in worker_bundle(cfg).items()}
    return {r: (n, total.get(r, 0.0)) for r, n in need.items() if n > total.get(r, 0.0) + 1e-9}


def _describe(missing: dict[str, tuple[float, float]]) -> str:
    return ", ".join(f"{need:g} {r} (the cluster has {have:g})" for r, (need, have) in missing.items())


def _hint(cfg: ExperimentConfig) -> str:
    runtime = cfg.runtime
    return (f"runtime.num_workers={runtime.num_workers} x runtime.cpus_per_worker={runtime.cpus_per_worker:g} / "
            f"runtime.gpus_per_worker={runtime.gpus_per_worker:g}")


def reserve_workers(cfg: ExperimentConfig, name: str) -> PlacementGroup | None:
    """The placement group of the run's workers, once placed (None when workers reserve no resources).

    A cluster that can never hold the workers as it is fails at once with ``runtime.resource_timeout_s=0``;
    otherwise the group waits up to that long (at least ``PLACEMENT_GRACE_S``) for nodes to join or other
    runs to free resources, then fails naming what is missing, before any actor starts.
    """
    runtime = cfg.runtime
    bundle = worker_bundle(cfg)
    if not bundle:
        return None
    missing = missing_resources(cfg)
    if missing and runtime.resource_timeout_s <= 0:
        raise RuntimeError(f"{_hint(cfg)} needs {_describe(missing)}; lower them or grow the cluster "
                           "(runtime.resource_timeout_s > 0 waits for an autoscaler to add nodes)")
    group = placement_group([dict(bundle) for _ in range(runtime.num_workers)],
                            strategy=runtime.placement.upper(), name=name)
    timeout = max(runtime.resource_timeout_s, PLACEMENT_GRACE_S)
    start = time.monotonic()
    grew = False
    wait_s = 2.0  # the first report comes soon, then every REPORT_EVERY_S
    while True:
        left = start + timeout - time.monotonic()
        try:
            ray.get(group.ready(), timeout=max(min(left, wait_s), 0.0))
            break
        except GetTimeoutError:
            wait_s = REPORT_EVERY_S
        missing = missing_resources(cfg)
        if time.monotonic() - start >= timeout:
            remove_placement_group(group)
            raise RuntimeError(_unplaced(cfg, bundle, missing, timeout)) from None
        if missing:
            grew = True
            log.warning("waiting for the cluster to grow: %s (this run's placement group asks the autoscaler; "
                        "%.0f s left)", _describe(missing), start + timeout - time.monotonic())
        else:
            log.warning("waiting for resources other runs hold (%.0f s left)", start + timeout - time.monotonic())
    if grew:
        log.warning("the cluster now holds what the run needs, after %.0f s", time.monotonic() - start)
    return group


def _unplaced(cfg: ExperimentConfig, bundle: dict[str, float], missing: dict[str, tuple[float, float]],
              timeout: float) -> str:
    runtime = cfg.runtime
    if missing:
        return (f"{_hint(cfg)} needs {_describe(missing)}; no node with them joined within "
                f"runtime.resource_timeout_s={runtime.resource_timeout_s:g} s")
    free = ray.available_resources()
    short = ", ".join(f"{need * runtime.num_workers:g} {r} ({free.get(r, 0):g} free)" for r, need in bundle.items())
    return (f"Ray could not place {runtime.num_workers} workers of {bundle} ({runtime.placement}) within "
            f"{timeout:g} s (runtime.resource_timeout_s={runtime.resource_timeout_s:g}): they need {short}; other "
            "runs may hold them, or no node has a bundle's worth free. Wait for those runs, lower the request, or "
            "raise runtime.resource_timeout_s")
