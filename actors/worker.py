"""Client worker actor: one resident 4-bit model + LoRA that trains many virtual clients.

The model and the dataset (with its partition, derived from the seed) are loaded once, in the worker, for its
lifetime; a task brings only a client id, the global version (an object-store reference shared by every task
of that version) and the client's state.
"""

from __future__ import annotations

import os
from typing import Any

import ray
import torch

from fedsim.client import ClientTrainer, split_state
from fedsim.config import ExperimentConfig
from fedsim.clientdata import load_client_data
from fedsim.evaluation import Evaluator
from fedsim.messages import ClientTask, ClientUpdate, NamedTensors, Published
from fedsim.models.adapter import adapter_files, get_weights, set_weights
from fedsim.models.loading import load_model
from fedsim.seeding import derive_seed


def _node_resources(node_id: str) -> list[str]:
    """Names of the resources the node declares (``ray start --resources``), to tell nodes apart."""
    return next((list(n["Resources"]) for n in ray.nodes() if n["NodeID"] == node_id), [])


@ray.remote
class ClientWorker:
    def __init__(self, cfg: ExperimentConfig, personalized: bool, index: int):
        # Ray pins OMP_NUM_THREADS=1 in actors; give torch the cores this worker reserved.
        threads = cfg.runtime.num_threads or max(1, int(cfg.runtime.cpus_per_worker))
        torch.set_num_threads(threads)
        self.index = index
        data = load_client_data(cfg)  # derived from the seed here: no client data crosses the network
        splits = data.splits
        self.loaded = load_model(cfg.model, derive_seed(cfg.seed, "lora_init"))
        self.trainer = ClientTrainer(cfg, self.loaded, splits.train, data.shards, personalized)
        self.evaluator = Evaluator(self.loaded.processor, splits.test, cfg.eval, cfg.data.max_length,
                                   self.loaded.device, cfg.seed, cfg.data.prompt)
        self.tasks_done = 0

    def placement(self) -> dict[str, Any]:
        ctx = ray.get_runtime_context()
        return {"worker": self.index, "node_id": ctx.get_node_id(), "node_ip": ray.util.get_node_ip_address(),
                "node_resources": sorted(r for r in _node_resources(ctx.get_node_id()) if r.startswith("fedsim_")),
                "pid": os.getpid(),
                "gpu_ids": ctx.get_accelerator_ids().get("GPU", []),
                "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
                "device": str(self.loaded.device), "torch_threads": torch.get_num_threads()}

    def initial_weights(self) -> NamedTensors:
        return get_weights(self.loaded.model)

    @ray.method(num_returns=3)
    def train(self, task: ClientTask, published: Published, state: NamedTensors | None
              ) -> tuple[ClientUpdate, NamedTensors | None, dict[str, float]]:
        weights, extras = published
        update, new_state = self.trainer.train(task, weights, extras, state)
        self.tasks_done += 1
        return update, new_state, {**update.metrics, "num_samples": update.num_samples, "worker": self.index}

    def evaluate(self, weights: NamedTensors) -> dict[str, float]:
        set_weights(self.loaded.model, weights)
        return self.evaluator.evaluate(self.loaded.model)

    def evaluate_states(self, states: list[NamedTensors | None], fallback: NamedTensors) -> list[dict[str, float]]:
        """Metrics of each personalized client's own adapter (``fallback`` for clients that have none)."""
        return [self.evaluate(split_state(s)[0] or fallback) for s in states]

    def adapter_files(self, weights: NamedTensors) -> dict[str, bytes]:
        """The adapter in peft format as file contents, so the driver writes it wherever the run lives."""
        return adapter_files(self.loaded.model, weights)
