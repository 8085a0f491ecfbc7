"""Screening of client updates before they reach the server strategy.

One bad client (diverged training, a bf16 overflow) must not poison the global adapter: ``UpdateGuard``
rejects updates with non-finite values and, optionally, updates whose global L2 norm is too large.
"""

from __future__ import annotations

import logging
import math

import torch

from fedsim.messages import ClientUpdate

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
        for group in (update.delta, update.extras):
            for name, t in group.items():
                if not torch.isfinite(t).all():
                    return NON_FINITE, f"non-finite values in {name}"
        if self.max_norm > 0:
            norm = math.sqrt(sum(t.detach().to(torch.float64).square().sum().item() for t in update.delta.values()))
            if norm > self.max_norm:
                return NORM, f"L2 norm {norm:.4g} exceeds runtime.max_update_norm={self.max_norm:g}"
        return None
