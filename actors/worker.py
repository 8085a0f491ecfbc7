"""Client worker actor: one resident 4-bit model + LoRA that trains many virtual clients.

The model and the dataset (with its partition, derived from the seed) are loaded once, in the worker, for its
lifetime; a task brings only a client id, the global version (an object-store reference shared by every task
of that version) and the client's state.

Ray restarts a worker whose process or node died (``max_restarts``), in its placement bundle, which Ray moves
to a live node. Only ``placement`` (which the executor sends to learn that a worker is back) waits through a
restart (``max_task_retries=-1``); training and evaluation calls fail with the worker instead, and the
executor runs them again itself, with the same seeds, on whichever worker is live (actors/executor.py): a call
that waited for a worker whose node is gone for good would wait forever.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import ray
import torch

from fedsim.engine.inprocess import batching
from fedsim.config import ExperimentConfig
from fedsim.plugins import import_plugins
from fedsim.evaluation import BatchScores, Evaluator
from fedsim.messages import ClientTask, NamedTensors, Published
from fedsim.models.adapter import adapter_files, get_weights, set_weights
from fedsim.seeding import derive_seed

log = logging.getLogger(__name__)
WORKER_RESTARTS = 4  # by Ray, per actor; a worker that exhausts them is replaced by the executor


@dataclass
class DataSummary:
    """What the driver needs of the run's data, from a worker that loaded it: the driver loads none."""

    shard_sizes: np.ndarray  # samples per client, for the virtual clock
    metric: str  # the headline metric (DatasetSplits.metric)
    chance_metrics: dict[str, float]  # fedsim.chance, over the test rows the evaluation scores


def _node_resources(node_id: str) -> list[str]:
    """Names of the resources the node declares (``ray start --resources``), to tell nodes apart."""
    return next((list(n["Resources"]) for n in ray.nodes() if n["NodeID"] == node_id), [])


def cap_gpu_memory(fraction: float) -> float | None:
    """Cap this process's CUDA allocator at ``fraction`` of its GPU; the cap set, or None (no CUDA, or a whole
    GPU or more). Ray's fractional GPUs are a scheduling promise only: without a cap, one worker can take the
    memory its neighbours on the same GPU were promised, and they fail with CUDA out-of-memory."""
    if not 0 < fraction < 1:
        return None
    if not torch.cuda.is_available():
        log.info("runtime.gpus_per_worker=%g: no CUDA device in this worker, no GPU memory cap to set", fraction)
        return None
    torch.cuda.set_per_process_memory_fraction(fraction, torch.cuda.current_device())
    log.info("GPU memory of this worker capped at %g of device %d", fraction, torch.cuda.current_device())
    return fraction


@ray.remote(max_restarts=WORKER_RESTARTS, max_task_retries=0)
class ClientWorker:
    def __init__(self, cfg: ExperimentConfig, personalized: bool, index: int):
        import_plugins(cfg.plugins)  # the user's strategies, datasets and steps, registered in this process too
        # Before anything touches the GPU: the model below must already fit in this worker's share.
        self.gpu_memory_fraction = cap_gpu_memory(cfg.runtime.gpus_per_worker)
        # Ray pins OMP_NUM_THREADS=1 in actors; give torch the cores this worker reserved.
        threads = cfg.runtime.num_threads or max(1, int(cfg.runtime.cpus_per_worker))
        torch.set_num_threads(threads)
        self.index = index
        # The model's libraries (peft, transformers, bitsandbytes) load here, in the worker: the driver imports
        # this module to create the actor and holds no model.
        from fedsim.chance import chance_metrics
        from fedsim.client import ClientTrainer
        from fedsim.clientdata import load_client_data
        from fedsim.models.loading import load_model

        data = load_client_data(cfg)  # derived from the seed here: no client data crosses the network
        self.loaded = load_model(cfg.model, derive_seed(cfg.seed, "lora_init"))
        self.trainer = ClientTrainer(cfg, self.loaded, data, personalized)
        self.evaluator = Evaluator.for_run(cfg, self.loaded.processor, data.test, self.loaded.device)
        self.data = DataSummary(data.shard_sizes(), data.metric, chance_metrics(cfg, data.test))
        self.tasks_done = 0

    @ray.method(max_task_retries=-1)
    def placement(self) -> dict[str, Any]:
        ctx = ray.get_runtime_context()
        return {"worker": self.index, "node_id": ctx.get_node_id(), "node_ip": ray.util.get_node_ip_address(),
                "node_resources": sorted(r for r in _node_resources(ctx.get_node_id()) if r.startswith("fedsim_")),
                "pid": os.getpid(),
                "gpu_ids": ctx.get_accelerator_ids().get("GPU", []),
                "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
                "device": str(self.loaded.device), "torch_threads": torch.get_num_threads(),
                "gpu_memory_fraction": self.gpu_memory_fraction}

    def initial_weights(self) -> NamedTensors:
        return get_weights(self.loaded.model)

    def data_summary(self) -> DataSummary:
        return self.data

    def batching(self) -> dict[str, Any]:
        """Clients this worker trains together, and what each extra one costs (fedsim.engine.inprocess)."""
        return batching(self.trainer)

    # called with num_returns = 3 per task
    def train_batch(self, tasks: list[ClientTask], published: Published, *states: NamedTensors | None) -> tuple:
        """For each task, in order: the client's update, its new state, and metrics (with the task's share of
        the call's wall time in this worker). The tasks train together (ClientTrainer.train_batch)."""
        started = time.perf_counter()
        weights, extras = published
        try:
            results = self.trainer.train_batch(tasks, weights, extras, list(states))
        except Exception:
            if torch.cuda.is_available():  # leave the next task the memory this one held when it failed
                torch.cuda.empty_cache()
            raise
        self.tasks_done += len(tasks)
        share = (time.perf_counter() - started) / len(tasks)
        out: list[Any] = []
        for update, new_state in results:
            out += [update, new_state, {**update.metrics, "num_samples": update.num_samples, "worker": self.index,
                                        "pid": os.getpid(), "has_state": new_state is not None,
                                        "task_seconds": share}]
        return tuple(out)

    def evaluate(self, weights: NamedTensors) -> dict[str, float]:
        set_weights(self.loaded.model, weights)
        return self.evaluator.evaluate(self.loaded.model)

    def evaluate_shard(self, published: Published, index: int, count: int,
                       ablations: bool = True) -> list[BatchScores]:
        """Per-sample scores of shard ``index`` of ``count`` of the test split (fedsim.evaluation.combine)."""
        set_weights(self.loaded.model, published[0])
        return self.evaluator.evaluate_shard(self.loaded.model, index, count, ablations)

    def evaluate_states(self, states: list[NamedTensors | None], fallback: Published) -> list[dict[str, float]]:
        """Metrics of each personalized client's own adapter (the ``fallback`` version's for clients that have
        none)."""
        from fedsim.client import split_state  # loaded with the trainer: a lookup

        return [self.evaluate(split_state(s)[0] or fallback[0]) for s in states]

    def adapter_files(self, published: Published) -> dict[str, bytes]:
        """The adapter in peft format as file contents, so the driver writes it wherever the run lives."""
        return adapter_files(self.loaded.model, published[0])
