"""The reference engine: one process, the backbone loaded once, clients trained one after another.

It is the correctness oracle for the Ray runtime (``runtime.engine=sequential``): the same scheduler,
aggregator and loop, with client tasks run in this process instead of on workers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from fedsim.aggregator import Aggregator
from fedsim.algorithms import build_server_strategy
from fedsim.client import ClientTrainer
from fedsim.clientdata import load_client_data
from fedsim.config import ExperimentConfig
from fedsim.engine.inprocess import InProcessExecutor
from fedsim.engine.loop import run_federation
from fedsim.evaluation import Evaluator
from fedsim.guard import UpdateGuard
from fedsim.messages import nbytes
from fedsim.models.adapter import get_weights
from fedsim.models.loading import load_model
from fedsim.seeding import derive_seed


def run_sequential(cfg: ExperimentConfig, run_dir: Path, resume: bool = False) -> dict[str, Any]:
    if cfg.runtime.num_threads:
        torch.set_num_threads(cfg.runtime.num_threads)
    data = load_client_data(cfg)
    loaded = load_model(cfg.model, derive_seed(cfg.seed, "lora_init"))
    strategy = build_server_strategy(cfg.algorithm.server, cfg.partition.num_clients)
    trainer = ClientTrainer(cfg, loaded, data.splits.train, data.shards, strategy.personalized)
    evaluator = Evaluator(loaded.processor, data.splits.test, cfg.eval, cfg.data.max_length, loaded.device,
                          cfg.data.prompt)
    initial = get_weights(loaded.model)
    aggregator = Aggregator(strategy, UpdateGuard(cfg.runtime.max_update_norm))
    aggregator.init(initial)
    return run_federation(cfg, run_dir, "sequential", InProcessExecutor(trainer, evaluator), aggregator,
                          [len(s) for s in data.shards], nbytes(initial), strategy.personalized,
                          strategy.asynchronous, strategy.trains, resume)
