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
from fedsim.messages import ClientUpdate, NamedTensors
from fedsim.models.adapter import get_weights, set_weights, trainable_parameters
from fedsim.models.loading import LoadedModel
from fedsim.seeding import derive_seed, rng_for
from fedsim.training import batch_indices, train_locally


class ClientTrainer:
    def __init__(self, cfg: ExperimentConfig, loaded: LoadedModel, train: datasets.Dataset, shards: list[np.ndarray]):
        self.cfg = cfg
        self.loaded = loaded
        self.train_data = train
        self.shards = shards
        self.params = trainable_parameters(loaded.model)
        self.collate = Collator(loaded.processor, cfg.data.max_length, train=True)

    def _batch(self, indices: np.ndarray) -> dict[str, torch.Tensor]:
        batch = self.collate([self.train_data[int(i)] for i in indices])
        return {k: v.to(self.loaded.device) for k, v in batch.items()}

    def train(
        self,
        client_id: int,
        round_idx: int,
        weights: NamedTensors,
        server_extras: NamedTensors,
        client_state: NamedTensors | None,
        lr: float,
        base_version: int = 0,
    ) -> tuple[ClientUpdate, NamedTensors | None]:
        """Train ``client_id`` from ``weights``; returns its update and its new per-client state."""
        shard = self.shards[client_id]
        set_weights(self.loaded.model, weights)
        # Seeds derive from (round, client), not from call order, so any worker reproduces this exact run.
        torch.manual_seed(derive_seed(self.cfg.seed, "client", round_idx, client_id))
        rng = rng_for(self.cfg.seed, "client", round_idx, client_id)
        strategy = build_client_strategy(self.cfg.algorithm.client)
        ctx = LocalContext(weights, server_extras, client_state, self.loaded.layer_of, self.loaded.num_layers)
        batches = (self._batch(idx) for idx in batch_indices(shard, self.cfg.training, rng))
        started = time.perf_counter()
        steps, loss = train_locally(self.loaded.model, self.params, batches, strategy, ctx, self.cfg.training, lr)
        extras, new_state = strategy.finish(self.params, steps, lr)
        local = get_weights(self.loaded.model)
        update = ClientUpdate(
            client_id=client_id,
            delta={name: local[name] - weights[name] for name in local},
            num_samples=len(shard),
            base_version=base_version,
            extras=extras,
            metrics={"train_loss": loss, "steps": steps, "compute_seconds": time.perf_counter() - started},
        )
        return update, new_state
