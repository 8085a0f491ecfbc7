"""Waiting for resources: a run that asks for more than the cluster holds asks the autoscaler for it and waits
up to ``runtime.resource_timeout_s``, then fails naming what is missing, before any actor starts."""

from __future__ import annotations

import time

import pytest

from actors.runtime import run_ray

from conftest import small_config


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
