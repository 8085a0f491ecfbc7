"""Screening of client updates before they reach the server strategy.

One bad client (diverged training, a bf16 overflow) must not poison the global adapter: ``UpdateGuard``
rejects updates with non-finite values and, optionally, updates whose global L2 norm is too large.
"""

from __future__ import annotations

import logging
import math

import torch

from fedsim.messages import ClientUpdate, NamedTensors

logger = logging.getLogger(__name__)

NON_FINITE = "non_finite"
NORM = "norm"


class UpdateGuard:
    """Reject updates with NaN/Inf (in the delta or the extras) or a delta L2 norm above ``max_norm``.

    The norm is global over all delta tensors, √(Σ_t ‖Δ_t‖²), taken in float64; ``max_norm`` 0 means no
    bound (``runtime.max_update_norm``). ``rejected`` counts rejections by kind (``non_finite``, ``norm``).
    """

    def __init__(self, max_norm: float = 0.0) -> None:
        if not (math.isfinite(max_norm) and max_norm >= 0):
            raise ValueError(f"config key 'runtime.max_update_norm' has invalid value {max_norm!r}: "
                             "expected a finite value >= 0 (0: no bound)")
        self.max_norm = float(max_norm)
        self.rejected: dict[str, int] = {}

    def check(self, update: ClientUpdate) -> str | None:
        """The reason to reject ``update``, or None to accept it; every rejection is counted and logged."""
        found = self._inspect(update)
        if found is None:
            return None
        self.reject(update, *found)
        return found[1]

    def reject(self, update: ClientUpdate, kind: str, reason: str) -> None:
        """Count and log one rejection of ``kind`` (also those found later, while aggregating)."""
        self.rejected[kind] = self.rejected.get(kind, 0) + 1
        logger.warning("rejected update from client %d: %s", update.client_id, reason)

    @property
    def total_rejected(self) -> int:
        return sum(self.rejected.values())

    def _inspect(self, update: ClientUpdate) -> tuple[str, str] | None:
        """(kind, reason) of the first problem found, or None."""
        # Under a bound the delta's Σ_t ‖Δ_t‖² is needed anyway, and a finite one shows that the delta is finite.
        squares = _squared_norm(update.delta) if self.max_norm > 0 else math.nan
        for group in (update.extras,) if math.isfinite(squares) else (update.delta, update.extras):
            name = first_non_finite(group)
            if name is not None:
                return NON_FINITE, f"non-finite values in {name}"
        if self.max_norm > 0 and (norm := math.sqrt(squares)) > self.max_norm:
            return NORM, f"L2 norm {norm:.4g} exceeds runtime.max_update_norm={self.max_norm:g}"
        return None


def _squared_norm(tensors: NamedTensors) -> float:
    """Σ_t ‖t‖², each tensor's in float64."""
    return sum(t.detach().to(torch.float64).square().sum().item() for t in tensors.values())


def first_non_finite(tensors: NamedTensors) -> str | None:
    """The name of the first tensor that holds a NaN or an Inf, or None if all are finite.

    A sum is finite only if all its terms are, so one cheap sum per tensor clears it; only a tensor whose sum
    is not finite (a NaN or Inf, or finite values whose sum overflows) is checked element by element.
    """
    for name, t in tensors.items():
        if not math.isfinite(t.detach().sum().item()) and not torch.isfinite(t).all():
            return name
    return None
