"""Aggregator actor: a thin shell around ``fedsim.aggregator.Aggregator``.

Updates arrive as object references and are resolved here, one at a time, so neither the driver nor this
actor ever holds a whole round of updates.
"""

from __future__ import annotations

from typing import Any

import ray

from fedsim.aggregator import Aggregator
from fedsim.algorithms import build_server_strategy
from fedsim.config import ExperimentConfig
from fedsim.guard import UpdateGuard
from fedsim.messages import ClientUpdate, NamedTensors, Published


@ray.remote
class AggregatorActor:
    def __init__(self, cfg: ExperimentConfig, initial: NamedTensors, client_sizes: list[int]):
        strategy = build_server_strategy(cfg.algorithm.server, cfg.partition.num_clients, client_sizes)
        self.aggregator = Aggregator(strategy, UpdateGuard(cfg.runtime.max_update_norm))
        self.aggregator.init(initial)

    def submit(self, update: ClientUpdate, base: Published | None = None) -> str:
        return self.aggregator.submit(update, base)

    def close_round(self) -> int:
        return self.aggregator.close_round()

    def flush(self) -> int:
        return self.aggregator.flush()

    def version(self) -> int:
        return self.aggregator.version

    def snapshot(self) -> tuple[int, list[ray.ObjectRef]]:
        """The current version, put in the object store once; the list keeps Ray from resolving the ref."""
        version, published = self.aggregator.snapshot()
        return version, [ray.put(published)]

    def state(self) -> tuple[NamedTensors, dict[str, Any]]:
        return self.aggregator.state()

    def restore(self, tensors: NamedTensors, counts: dict[str, Any]) -> None:
        self.aggregator.restore(tensors, counts)

    def stats(self) -> dict[str, Any]:
        return self.aggregator.stats()
