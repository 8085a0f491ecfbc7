"""``runtime.clients_per_batch: auto``: how many clients a worker trains together, chosen at start-up.

The aim is that every worker is busy for the whole of a round: the clients trained at once are split evenly
into one batch per worker, and into more (as even) only where memory holds fewer clients per batch. What one
more client costs is measured on a real step at start-up (``ClientTrainer``); the budget is
``runtime.batch_memory_gb``, or half the memory free on the worker's device.
"""

from __future__ import annotations

import math

import psutil
import torch

from fedsim.algorithms import SERVER_STRATEGIES
from fedsim.config import ExperimentConfig
from fedsim.scheduler._common import ceil_count

AUTO_MEMORY_SHARE = 0.5  # clients_per_batch=auto without batch_memory_gb: this share of the free memory


def batch_memory_left(device: torch.device, cfg: ExperimentConfig) -> float:
    """Bytes ``clients_per_batch: auto`` may fill when ``runtime.batch_memory_gb`` is 0: half the memory free
    now (the model loaded) on the worker's device, split among the workers that may share it (a fractional
    GPU's share of the device; on CPU, every worker of the run)."""
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        share = cfg.runtime.gpus_per_worker
        if 0 < share < 1:
            free = min(free, share * total - torch.cuda.memory_reserved(device))
        return AUTO_MEMORY_SHARE * max(0, free)
    return AUTO_MEMORY_SHARE * psutil.virtual_memory().available / engine_workers(cfg)


def auto_batch_size(cohort: int, workers: int, most: int) -> int:
    """``runtime.clients_per_batch: auto``: the cohort (clients trained at once: a round's dispatch, or the
    asynchronous concurrency) split evenly into one batch per worker, so that no worker waits for another's
    extra batch (20 clients on 2 workers: 10 and 10, not 8, 8 and 4); where at most ``most`` clients fit a
    batch, into the fewest batches per worker that hold them, again evenly."""
    per_worker = math.ceil(cohort / workers)
    batches_per_worker = math.ceil(per_worker / max(1, most))
    return max(1, math.ceil(per_worker / batches_per_worker))


def cohort_size(cfg: ExperimentConfig) -> int:
    """Clients whose tasks a run submits at once: a synchronous round's dispatch (clients per round, times
    ``scheduler.overcommit``), or the asynchronous concurrency."""
    if SERVER_STRATEGIES[cfg.algorithm.server.name].asynchronous:
        return cfg.scheduler.concurrency or cfg.clients_per_round()
    return ceil_count(cfg.scheduler.overcommit, cfg.clients_per_round())


def engine_workers(cfg: ExperimentConfig) -> int:
    """Processes that train clients at once: the Ray workers, or the sequential engine's one."""
    return cfg.runtime.num_workers if cfg.runtime.engine == "ray" else 1
