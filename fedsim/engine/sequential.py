"""The reference engine: one process, the backbone loaded once, clients trained one after another.

It is the correctness oracle for the Ray runtime (``runtime.engine=sequential``): the same scheduler,
aggregator and loop, with client tasks run in this process instead of on workers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedsim.aggregator import Aggregator, build_aggregator
from fedsim.algorithms import ServerStrategy
from fedsim.chance import chance_metrics
from fedsim.client import ClientTrainer
from fedsim.clientdata import load_client_data
from fedsim.config import ExperimentConfig
from fedsim.engine.inprocess import InProcessExecutor
from fedsim.engine.loop import run_federation
from fedsim.evaluation import Evaluator
from fedsim.messages import nbytes
from fedsim.models.adapter import get_weights
from fedsim.models.loading import LoadedModel, load_model
from fedsim.seeding import derive_seed


@dataclass
class SequentialParts:
    """The reference engine's pieces, ready for ``run_federation`` (or for a test to drive round by round)."""

    executor: InProcessExecutor
    aggregator: Aggregator
    strategy: ServerStrategy
    shard_sizes: np.ndarray
    adapter_bytes: int
    headline_metric: str  # the metric the data's benchmark reports (DatasetSplits.metric)
    chance_metrics: dict[str, float] = field(default_factory=dict)  # what guessing scores (fedsim.chance)


def build_sequential(cfg: ExperimentConfig, loaded: LoadedModel | None = None) -> SequentialParts:
    """Data, model (``loaded``, or loaded from ``cfg.model``; its adapter's current weights are the initial
    global weights), trainer, evaluator and aggregator of one in-process run."""
    data = load_client_data(cfg)
    loaded = loaded or load_model(cfg.model, derive_seed(cfg.seed, "lora_init"))
    shard_sizes = data.shard_sizes()
    aggregator = build_aggregator(cfg, shard_sizes)
    strategy = aggregator.strategy
    trainer = ClientTrainer(cfg, loaded, data, strategy.personalized)
    evaluator = Evaluator.for_run(cfg, loaded.processor, data.test, loaded.device)
    initial = get_weights(loaded.model)
    aggregator.init(initial)
    return SequentialParts(InProcessExecutor(trainer, evaluator), aggregator, strategy, shard_sizes, nbytes(initial),
                           data.metric, chance_metrics(cfg, data.test))


def run_sequential(cfg: ExperimentConfig, run_dir: Path, resume: bool = False) -> dict[str, Any]:
    if cfg.runtime.num_threads:
        torch.set_num_threads(cfg.runtime.num_threads)
    parts = build_sequential(cfg)
    strategy = parts.strategy
    return run_federation(cfg, run_dir, "sequential", parts.executor, parts.aggregator, parts.shard_sizes,
                          parts.adapter_bytes, strategy.personalized, strategy.asynchronous, strategy.trains, resume,
                          headline_metric=parts.headline_metric, chance_metrics=parts.chance_metrics)
