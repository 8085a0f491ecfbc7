"""Byzantine-robust server strategies: the round's updates are kept together and combined by a robust rule
(fedsim/robust.py) instead of a running mean, then applied as FedAvg applies its mean: x ← x + η · rule(Δ_1..Δ_K).

Memory is O(K × adapter) for the round (a running sum cannot take a median). The rows are sorted by client id
before the rule runs, so the result does not depend on the order in which updates arrived. The rules weigh
every client alike, as in their papers: sample weighting is refused.
"""

from __future__ import annotations

import logging
from typing import Sequence

import torch

from fedsim import robust
from fedsim.algorithms.fixedpoint import UpdateError
from fedsim.algorithms.server import ServerStrategy, register
from fedsim.config import ServerAlgoConfig
from fedsim.guard import first_non_finite
from fedsim.messages import ClientUpdate, NamedTensors

log = logging.getLogger(__name__)


class RobustStrategy(ServerStrategy):
    """Subclasses implement ``combine(rows) -> [d]`` and, where the rule has one, ``min_cohort(cfg)``."""

    default_weighting = "uniform"

    def __init__(self, cfg: ServerAlgoConfig, num_clients: int, client_sizes: Sequence[int] | None = None) -> None:
        super().__init__(cfg, num_clients, client_sizes)
        if self.weighting != "uniform":
            raise ValueError(f"config key 'algorithm.server.weighting' has invalid value {cfg.weighting!r} for "
                             f"{self.name}: robust rules weigh every client alike; expected auto or uniform")

    def _reset_round(self) -> None:
        super()._reset_round()
        self._rows: dict[tuple[int, int], torch.Tensor] = {}

    def accumulate(self, update: ClientUpdate, weight: float) -> None:
        self._check_update(update)
        name = first_non_finite(update.delta)
        if name is not None:
            raise UpdateError("non_finite", f"update from client {update.client_id}: delta {name!r} has non-finite "
                                            "values (NaN or Inf); it cannot be aggregated")
        row = self.layout.flatten(update.delta, torch.empty(self.layout.numel, dtype=torch.float32))
        # A client sends once a round (cohorts are drawn without replacement); the arrival number only keeps
        # a key unique should one ever send twice.
        self._rows[(update.client_id, len(self._rows))] = row
        self._count += 1
        self._total += 1

    def finalize(self) -> NamedTensors:
        """As every strategy's, except that a round with fewer updates than the rule needs (dropouts, late
        clients) leaves the model as it was, like a round with none."""
        need, rule = self.min_cohort(self.cfg)
        if 0 < self._count < need:
            log.warning("%s: %d update(s) this round, the rule needs %s; the round leaves the model unchanged",
                        self.name, self._count, rule)
            self._reset_round()
        return super().finalize()

    def _mean(self) -> NamedTensors:
        rows = torch.stack([self._rows[key] for key in sorted(self._rows)])
        return self.layout.unflatten(self.combine(rows))

    def combine(self, rows: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def apply(self, mean_delta: NamedTensors) -> None:
        for k, d in mean_delta.items():
            self.weights[k].add_(d, alpha=self.lr)


@register
class Median(RobustStrategy):
    """Coordinate-wise median (Yin et al., ICML 2018)."""

    name = "median"

    def combine(self, rows: torch.Tensor) -> torch.Tensor:
        return robust.coordinate_median(rows)


@register
class TrimmedMean(RobustStrategy):
    """Coordinate-wise mean after dropping the ``trim`` largest and smallest values (Yin et al., ICML 2018)."""

    name = "trimmed_mean"

    @classmethod
    def min_cohort(cls, cfg: ServerAlgoConfig) -> tuple[int, str]:
        return 2 * cfg.trim + 1, f"K > 2 * trim = {2 * cfg.trim}"

    def combine(self, rows: torch.Tensor) -> torch.Tensor:
        return robust.trimmed_mean(rows, self.cfg.trim)


@register
class Krum(RobustStrategy):
    """Krum (Blanchard et al., NeurIPS 2017): the update closest to its K − f − 2 nearest others."""

    name = "krum"

    @classmethod
    def min_cohort(cls, cfg: ServerAlgoConfig) -> tuple[int, str]:
        return 2 * cfg.f + 3, f"K > 2f + 2 = {2 * cfg.f + 2}"

    def averaged(self, count: int) -> int:
        return 1

    def combine(self, rows: torch.Tensor) -> torch.Tensor:
        return robust.krum(rows, self.cfg.f, self.averaged(len(rows)))[0]


@register
class MultiKrum(Krum):
    """Multi-Krum: the mean of the ``multikrum_m`` best-scoring updates by Krum's score (0: K − f)."""

    name = "multikrum"

    def averaged(self, count: int) -> int:
        return self.cfg.multikrum_m or count - self.cfg.f


@register
class Bulyan(RobustStrategy):
    """Bulyan (El Mhamdi et al., ICML 2018): K − 2f updates chosen by repeated Krum, then per coordinate the
    mean of the K − 4f values closest to their median."""

    name = "bulyan"

    @classmethod
    def min_cohort(cls, cfg: ServerAlgoConfig) -> tuple[int, str]:
        return 4 * cfg.f + 3, f"K >= 4f + 3 = {4 * cfg.f + 3}"

    def combine(self, rows: torch.Tensor) -> torch.Tensor:
        return robust.bulyan(rows, self.cfg.f)[0]


@register
class NormBound(RobustStrategy):
    """Norm bounding (Sun et al., 2019): every update clipped to L2 norm ``norm_bound``, then averaged."""

    name = "norm_bound"

    def combine(self, rows: torch.Tensor) -> torch.Tensor:
        return robust.norm_bounded_mean(rows, self.cfg.norm_bound)[0]
