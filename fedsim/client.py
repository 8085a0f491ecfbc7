"""The client side: one resident model that trains any virtual client on demand.

A ``ClientTrainer`` is the plain object that a Ray worker wraps (one per worker process); the reference
engine uses a single one for every client.
"""

from __future__ import annotations

import time

import datasets
import numpy as np
import torch

from fedsim.algorithms import LocalContext, build_client_strategy
from fedsim.config import ExperimentConfig
from fedsim.data.collator import Collator
from fedsim.messages import ClientTask, ClientUpdate, NamedTensors
from fedsim.models.adapter import get_weights, set_weights, trainable_parameters
from fedsim.models.loading import LoadedModel, check_layer_window
from fedsim.seeding import derive_seed, rng_for
from fedsim.training import batch_indices, samples_per_task, train_locally


PERSONAL = "adapter/"  # client-state keys holding a personalized client's own adapter


def split_state(state: NamedTensors | None) -> tuple[NamedTensors | None, NamedTensors | None]:
    """(personal adapter, algorithm state) out of a client's stored state."""
    if not state:
        return None, None
    adapter = {k[len(PERSONAL):]: v for k, v in state.items() if k.startswith(PERSONAL)}
    rest = {k: v for k, v in state.items() if not k.startswith(PERSONAL)}
    return adapter or None, rest or None


class ClientTrainer:
    def __init__(self, cfg: ExperimentConfig, loaded: LoadedModel, train: datasets.Dataset, shards: list[np.ndarray],
                 personalized: bool = False):
        check_layer_window(loaded, cfg.algorithm.client)  # before any training: a penalty on no layer is refused
        self.cfg = cfg
        self.personalized = personalized
        self.loaded = loaded
        self.train_data = train
        self.shards = shards
        self.params = trainable_parameters(loaded.model)
        self.collate = Collator(loaded.processor, cfg.data.max_length, train=True, prompt=cfg.data.prompt)

    def _batch(self, indices: np.ndarray) -> dict[str, torch.Tensor]:
        batch = self.collate([self.train_data[int(i)] for i in indices])
        return {k: v.to(self.loaded.device) for k, v in batch.items()}

    def train(
        self,
        task: ClientTask,
        weights: NamedTensors,
        server_extras: NamedTensors,
        client_state: NamedTensors | None,
    ) -> tuple[ClientUpdate, NamedTensors | None]:
        """Train ``task.client_id`` from the global ``weights`` (or, when personalized, from its own adapter).

        Returns the update (a delta against the starting weights) and the client's new stored state.
        """
        personal, algo_state = split_state(client_state)
        start = personal if self.personalized and personal is not None else weights
        shard = self.shards[task.client_id]
        set_weights(self.loaded.model, start)
        # Seeds derive from (round, client), not from call order, so any worker reproduces this exact run.
        torch.manual_seed(derive_seed(self.cfg.seed, "client", task.seed_round, task.client_id))
        rng = rng_for(self.cfg.seed, "client", task.seed_round, task.client_id)
        strategy = build_client_strategy(self.cfg.algorithm.client)
        ctx = LocalContext(start, server_extras, algo_state, self.loaded.layer_of, self.loaded.num_layers)
        batches = (self._batch(idx) for idx in batch_indices(shard, self.cfg.training, rng))
        started = time.perf_counter()
        steps, loss = train_locally(self.loaded.model, self.params, batches, strategy, ctx, self.cfg.training,
                                    task.lr)
        extras, new_algo_state = strategy.finish(self.params, steps, task.lr)
        local = get_weights(self.loaded.model)
        update = ClientUpdate(
            client_id=task.client_id,
            delta={name: local[name] - start[name] for name in local},
            num_samples=len(shard),
            base_version=task.base_version,
            extras=extras,
            metrics={"train_loss": loss, "steps": steps, "samples_processed": samples_per_task(len(shard), self.cfg.training),
                     "compute_seconds": time.perf_counter() - started},
        )
        new_state = dict(new_algo_state or {})
        if self.personalized:
            new_state.update({PERSONAL + name: tensor for name, tensor in local.items()})
        return update, new_state or None

