"""Exact, order-independent running sums of named tensors: fixed-point integers on one flat vector.

A server strategy folds each client delta into a ``FixedPointSum``; since integer addition is associative, the
mean it yields does not depend on the order in which updates arrive, on any machine or thread count.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from fractions import Fraction

import numpy as np
import torch

from fedsim.messages import FlatLayout, NamedTensors

# Running sums hold round(weight * delta * 2**FIXED_POINT_BITS) as int64 (the product taken in float64),
# so they are exact and order-independent: integer addition is associative, float addition is not, and
# every step is elementwise IEEE arithmetic, so the result is the same bits on any machine or thread count.
# Why 32 fractional bits: one term's rounding error is at most 2**-33 ≈ 1.2e-10, no more than float32's
# own rounding of any value above ~2e-3, and the mean's error is at most 2**-33 · count / total weight
# (≤ 2**-33 when weights are ≥ 1, e.g. sample counts). Small deltas pay: at 1e-4 (a few lr-2e-5 Adam steps)
# the relative error is ~1e-6, coarser than float32's 6e-8 but far below client-sampling noise; elements of
# weight·delta below ~1e-10 vanish. The other 30 bits, under the 2**62 bound, give weighted sums a range of
# ±2**30 ≈ 1.07e9 (1e6 samples times a delta of 1000); the bound leaves a bit of headroom so that adding two
# in-range values cannot wrap before the overflow check.
FIXED_POINT_BITS = 32
FIXED_POINT_LIMIT = 2 ** 62


class UpdateError(ValueError):
    """An update the server cannot fold in. ``kind`` (non_finite, overflow, mismatch, invalid_weight,
    ahead_of_server, missing_base) is what summary.json counts it under in ``rejected_by_reason``."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


def from_fixed(total_sum: torch.Tensor, divisor: Fraction | int | float) -> torch.Tensor:
    """The float32 mean ``(total_sum / 2**FIXED_POINT_BITS) / divisor`` of a fixed-point sum."""
    return total_sum.to(torch.float64, copy=True).div_(2.0 ** FIXED_POINT_BITS).div_(float(divisor)).to(torch.float32)


class FixedPointSum(Mapping[str, torch.Tensor]):
    """An exact running sum Σ round(weight · x · 2**FIXED_POINT_BITS) of named tensors (see FIXED_POINT_BITS).

    The sum is one int64 vector in a ``FlatLayout``'s order, readable as named tensors (views), and empty (no
    names) from ``reset`` until the next ``commit``. An update goes in two steps, so that a strategy can check
    everything before changing anything: ``prepare`` scales it into terms and raises UpdateError if they, or the
    sum with them, would leave ±2**62; ``commit`` adds them. Its vectors are reused from update to update, so
    an update costs a few passes over one vector and no allocation.
    """

    def __init__(self) -> None:
        self._storage = torch.empty(0, dtype=torch.int64)  # the sum
        self._terms = torch.empty(0, dtype=torch.float64)  # the prepared terms: integers, exact in float64
        self._peak = 0  # the largest |prepared term|
        self.reset(FlatLayout({}))

    def reset(self, layout: FlatLayout) -> None:
        """Empty the sum, for tensors laid out as ``layout``."""
        self.layout = layout
        self.flat: torch.Tensor | None = None
        self._bound = 0  # Σ peaks of the committed terms: no element of the sum is larger in magnitude

    def __getitem__(self, name: str) -> torch.Tensor:
        if self.flat is None:
            raise KeyError(name)
        return self.layout.view(self.flat, name)

    def __iter__(self) -> Iterator[str]:
        return iter(self.layout.shapes if self.flat is not None else ())

    def __len__(self) -> int:
        return len(self.layout.shapes) if self.flat is not None else 0

    def prepare(self, tensors: NamedTensors, weight: float, what: str, prefix: str = "") -> None:
        """Scale ``tensors`` (the layout's names and shapes) into terms, the products taken in float64, and
        check them; an UpdateError (non_finite, overflow) names the first faulty tensor in their order."""
        self._terms = _sized(self._terms, self.layout.numel)
        terms = self.layout.flatten(tensors, self._terms).mul_(weight).mul_(2.0 ** FIXED_POINT_BITS)
        # numpy's rint: the same round-half-to-even as torch's round_, some 30 times faster on float64 here
        np.rint(terms.numpy(), out=terms.numpy())
        low, high = _extremes(terms)
        # Checked in float64, before any cast: a value beyond int64 would wrap silently.
        if not _within_limit(low, high):
            raise self._fault(terms, tensors, weight, what, prefix)
        self._peak = int(max(-low, high))
        if self.flat is None or self._bound + self._peak <= FIXED_POINT_LIMIT:
            return  # no element of the sum plus the terms can leave the range
        # Both operands are within ±2**62, so the sum is within [-2**63, 2**63]; only +2**63 wraps, to
        # -2**63, which the lower bound catches.
        new = self.flat + terms.to(torch.int64)
        if not _within_limit(*_extremes(new)):
            raise self._fault(new, tensors, weight, what, prefix, running=True)

    def commit(self) -> None:
        """Add the terms of the last ``prepare`` to the sum."""
        if self.flat is None:
            self._storage = _sized(self._storage, self.layout.numel)
            self.flat = self._storage.zero_()
        # One pass: numpy casts the terms to int64 (exactly: they are integers) chunk by chunk as it adds them.
        total = self.flat.numpy()
        np.add(total, self._terms.numpy(), out=total, dtype=np.int64, casting="unsafe")
        self._bound += self._peak

    def restore(self, tensors: NamedTensors) -> None:
        """Set the sum to ``tensors`` (int64, the layout's names and shapes), e.g. from a checkpoint."""
        self._storage = _sized(self._storage, self.layout.numel)
        self.flat = self.layout.flatten(tensors, self._storage)
        self._bound = int(self.flat.abs().max()) if self.flat.numel() else 0

    def mean(self, divisor: Fraction | int | float) -> NamedTensors:
        """The float32 mean ``from_fixed(sum, divisor)``, as named tensors."""
        return self.layout.unflatten(from_fixed(self.flat, divisor))

    def _fault(self, values: torch.Tensor, tensors: NamedTensors, weight: float, what: str, prefix: str,
               running: bool = False) -> UpdateError:
        """The error for the first of ``tensors`` whose part of ``values`` is non-finite or beyond ±2**62,
        naming it ``{what} '{prefix}{name}'``."""
        name = next(k for k in tensors if not _within_limit(*_extremes(self.layout.view(values, k))))
        label = f"{what} {prefix + name!r}"
        if not all(map(math.isfinite, _extremes(self.layout.view(values, name)))):
            return UpdateError("non_finite", f"{label} has non-finite values (NaN or Inf); it cannot be aggregated")
        return UpdateError("overflow", _overflow_message(label, weight, running))


def _sized(buffer: torch.Tensor, numel: int) -> torch.Tensor:
    """``buffer`` if it has ``numel`` elements, else a new vector of its dtype that has."""
    return buffer if buffer.numel() == numel else torch.empty(numel, dtype=buffer.dtype)


def _extremes(x: torch.Tensor) -> tuple[float, float]:
    """(min, max) of ``x``, both NaN if it holds a NaN; (0, 0) if it is empty."""
    if not x.numel():
        return 0.0, 0.0
    low, high = torch.aminmax(x)
    return low.item(), high.item()


def _within_limit(low: float, high: float) -> bool:
    return -FIXED_POINT_LIMIT <= low and high <= FIXED_POINT_LIMIT  # False for NaN too


def _overflow_message(what: str, weight: float, running: bool = False) -> str:
    bound = 2.0 ** (math.log2(FIXED_POINT_LIMIT) - FIXED_POINT_BITS)
    where = "brings the running weighted sum beyond" if running else "is beyond"
    return (f"{what} times weight {weight:g} {where} the exact fixed-point range (each element of a "
            f"weighted sum must stay within ±{bound:.3g}, i.e. ±2**62 after scaling by "
            f"2**{FIXED_POINT_BITS}); use uniform weighting (algorithm.server.weighting=uniform) "
            "or smaller weights")
