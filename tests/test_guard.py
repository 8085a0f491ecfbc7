"""UpdateGuard: non-finite values and the global L2 norm bound."""

from __future__ import annotations

import logging

import pytest
import torch

from fedsim.guard import UpdateGuard
from fedsim.messages import ClientUpdate


def upd(cid: int = 0, **tensors) -> ClientUpdate:
    delta = {k: torch.tensor(v) for k, v in tensors.items() if not k.startswith("control")}
    extras = {k.replace("__", "/"): torch.tensor(v) for k, v in tensors.items() if k.startswith("control")}
    return ClientUpdate(client_id=cid, delta=delta, num_samples=1, extras=extras)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_values_are_rejected_by_name(bad: float, caplog) -> None:
    guard = UpdateGuard(max_norm=0.0)
    with caplog.at_level(logging.WARNING, logger="fedsim.guard"):
        reason = guard.check(upd(cid=7, a=[1.0, 2.0], b=[0.0, bad]))
    assert reason == "non-finite values in b"
    assert guard.rejected == {"non_finite": 1}
    assert "client 7" in caplog.text and "non-finite values in b" in caplog.text


def test_non_finite_extras_are_rejected() -> None:
    guard = UpdateGuard()
    assert guard.check(upd(a=[1.0], control__a=[float("nan")])) == "non-finite values in control/a"


def test_global_norm_over_all_tensors() -> None:
    guard = UpdateGuard(max_norm=10.0)
    # ‖[6, 8]‖ = 10 alone, but with b = [3, 4] the global norm is √(100 + 25) = 11.18
    assert guard.check(upd(a=[6.0, 8.0])) is None  # at the bound: accepted
    assert guard.check(upd(a=[6.0, 8.0], b=[3.0, 4.0])) == \
        "L2 norm 11.18 exceeds runtime.max_update_norm=10"
    assert guard.check(upd(a=[6.0, 8.01])) == "L2 norm 10.01 exceeds runtime.max_update_norm=10"
    assert guard.check(upd(a=[1.0, -2.0], b=[2.0, 0.0])) is None  # norm 3
    assert guard.rejected == {"norm": 2} and guard.total_rejected == 2


def test_zero_means_unbounded_but_still_finite() -> None:
    guard = UpdateGuard(max_norm=0.0)
    assert guard.check(upd(a=[1e30, -1e30])) is None
    assert guard.check(upd(a=[float("nan")])) is not None
    assert guard.rejected == {"non_finite": 1}


def test_counts_by_kind() -> None:
    guard = UpdateGuard(max_norm=1.0)
    for u in (upd(a=[2.0]), upd(a=[float("inf")]), upd(a=[0.5]), upd(a=[3.0]), upd(a=[float("nan")])):
        guard.check(u)
    assert guard.rejected == {"norm": 2, "non_finite": 2}


def test_norm_in_float64_for_low_precision_deltas() -> None:
    guard = UpdateGuard(max_norm=1e3)
    # the norm is taken in float64 whatever the delta's dtype
    big = torch.full((4,), 600.0, dtype=torch.bfloat16)  # norm 1200
    assert guard.check(ClientUpdate(0, {"a": big}, 1)) == "L2 norm 1200 exceeds runtime.max_update_norm=1000"


@pytest.mark.parametrize("bad", [-1.0, float("nan"), float("inf")])
def test_invalid_bound(bad: float) -> None:
    with pytest.raises(ValueError, match="runtime.max_update_norm"):
        UpdateGuard(bad)
