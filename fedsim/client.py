"""The client side: one resident model that trains any virtual client on demand.

A ``ClientTrainer`` is the plain object that a Ray worker wraps (one per worker process); the reference
engine uses a single one for every client.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from fedsim.algorithms import ClientStrategy, LocalContext, build_client_strategy
from fedsim.attacks import POISONING, poison
from fedsim.clientdata import ClientData
from fedsim.config import ExperimentConfig
from fedsim.data.collator import Collator
from fedsim.data.encoded import EncodedSamples
from fedsim.clients_per_batch import auto_batch_size, batch_memory_left, cohort_size, engine_workers
from fedsim.messages import ClientTask, ClientUpdate, NamedTensors, WireTensors
from fedsim.models.adapter import get_weights, set_weights, trainable_parameters
from fedsim.models.loading import LoadedModel, check_layer_window
from fedsim.models.multiclient import check_batchable
from fedsim.seeding import derive_seed, rng_for
from fedsim.uplink import RESIDUAL, Uplink
from fedsim.training import (LocalRun, batch_indices, extra_client_bytes, local_optimizer, samples_per_task,
                             train_locally, train_together)


MEASURE_TRIES = 8  # clients tried, largest first, for the one-more-client memory measurement
PERSONAL = "adapter/"  # client-state keys holding a personalized client's own adapter


def split_state(state: NamedTensors | None) -> tuple[NamedTensors | None, NamedTensors | None]:
    """(personal adapter, algorithm state) out of a client's stored state (its uplink residual, if any, is the
    uplink's: fedsim.uplink)."""
    if not state:
        return None, None
    adapter = {k[len(PERSONAL):]: v for k, v in state.items() if k.startswith(PERSONAL)}
    rest = {k: v for k, v in state.items() if not k.startswith((PERSONAL, RESIDUAL))}
    return adapter or None, rest or None


@dataclass
class ClientStart:
    """Everything one client's local training starts from, whichever way it is trained."""

    task: ClientTask
    start: NamedTensors  # the weights it trains from
    strategy: ClientStrategy
    ctx: LocalContext
    batches: Iterator[np.ndarray]  # its shard's mini-batches, as sample indices
    state: NamedTensors | None  # its stored state, whole


class ClientTrainer:
    def __init__(self, cfg: ExperimentConfig, loaded: LoadedModel, data: ClientData, personalized: bool = False):
        check_layer_window(loaded, cfg.algorithm.client)  # before any training: a penalty on no layer is refused
        self.cfg = cfg
        self.personalized = personalized
        self.loaded = loaded
        self.data = data
        self.params = trainable_parameters(loaded.model)
        self.uplink = Uplink(cfg)
        self.collate = Collator(loaded.processor, cfg.data.max_length, train=True, prompt=cfg.data.prompt)
        self.encoded = EncodedSamples(self._samples, self.collate.encode, int(cfg.runtime.sample_cache_mb * 2**20))
        # Clients trained together; with more than one, what each extra client costs in memory.
        self.clients_per_batch, self.extra_client_bytes = 1, {}
        if cfg.runtime.clients_per_batch != 1:
            check_batchable(loaded.model, list(self.params))
            self.extra_client_bytes = self._measure_extra_client()
            self.clients_per_batch = cfg.runtime.clients_per_batch
            if self.clients_per_batch == "auto":
                budget = cfg.runtime.batch_memory_gb * 2**30 or batch_memory_left(loaded.device, cfg)
                fit = int(budget // sum(self.extra_client_bytes.values()))
                self.clients_per_batch = auto_batch_size(cohort_size(cfg), engine_workers(cfg), fit)

    def _local_run(self, begun: ClientStart) -> LocalRun:
        """A client's own LoRA tensors (copies of its starting weights), optimizer and dropout stream, for
        training in a multi-client batch."""
        task = begun.task
        params = {name: begun.start[name].to(p.device, p.dtype, copy=True).requires_grad_()
                  for name, p in self.params.items()}
        generator = torch.Generator(self.loaded.device)
        generator.manual_seed(derive_seed(self.cfg.seed, "client", task.seed_round, task.client_id))
        samples = (self.encoded.get(task.client_id, rows) for rows in begun.batches)
        return LocalRun(params, samples, begun.strategy, begun.ctx, local_optimizer(params, self.cfg.training, task.lr),
                        generator)

    def _measure_extra_client(self) -> dict[str, int]:
        """Bytes one more client adds to a batch, measured on the first mini-batch of the largest client whose
        batch can be formed. A client whose samples cannot be (longer than data.max_length) fails its own tasks
        as a dropout later; it must not stop the run here. Up to MEASURE_TRIES clients, largest first."""
        failure = None
        for client in np.argsort(-self.data.shard_sizes(), kind="stable")[:MEASURE_TRIES].tolist():
            begun = self._start(ClientTask(client, 0, 0, self.cfg.training.lr), get_weights(self.loaded.model), {},
                                None)
            run = self._local_run(begun)
            run.strategy.begin(run.ctx)
            try:
                return extra_client_bytes(self.loaded.model, run, next(run.batches), self.collate.batch,
                                          self.loaded.device)
            except ValueError as err:  # the collator's refusal of a sample, naming data.max_length
                failure = err
        raise failure

    def _samples(self, client: int, rows: np.ndarray) -> list[dict]:
        """The rows as the client trains on them: poisoned when it attacks with label_flip or backdoor."""
        samples = self.data.samples(client, rows)
        if self.cfg.attack.kind in POISONING and self.uplink.is_attacker(client):
            return poison(samples, rows, self.cfg, client)
        return samples

    def _batch(self, client: int, rows: np.ndarray) -> dict[str, torch.Tensor]:
        batch = self.collate.batch(self.encoded.get(client, rows))
        return {k: v.to(self.loaded.device) for k, v in batch.items()}

    def _start(self, task: ClientTask, weights: NamedTensors, server_extras: NamedTensors,
               client_state: NamedTensors | None) -> ClientStart:
        """From the global ``weights`` or, when personalized, from the client's own adapter."""
        personal, algo_state = split_state(client_state)
        start = personal if self.personalized and personal is not None else weights
        # Seeds derive from (round, client), not from call order, so any worker reproduces this exact run.
        rng = rng_for(self.cfg.seed, "client", task.seed_round, task.client_id)
        strategy = build_client_strategy(self.cfg.algorithm.client)
        ctx = LocalContext(start, server_extras, algo_state, self.loaded.layer_of, self.loaded.num_layers)
        return ClientStart(task, start, strategy, ctx, batch_indices(self.data.shard(task.client_id), self.cfg.training, rng),
                           client_state)

    def _result(self, begun: ClientStart, params: dict[str, torch.Tensor], steps: int, loss: float,
                seconds: float) -> tuple[ClientUpdate, NamedTensors | None]:
        """The update (a delta against the starting weights, through the uplink) and the client's new stored
        state."""
        task, start = begun.task, begun.start
        extras, new_algo_state = begun.strategy.finish(params, steps, task.lr)
        local = {name: p.detach().to("cpu", torch.float32, copy=True) for name, p in params.items()}
        shard_size = len(self.data.shard(task.client_id))
        delta, kept = self.uplink.send({name: local[name] - start[name] for name in local}, task.seed_round,
                                       task.client_id, begun.state)
        update = ClientUpdate(
            client_id=task.client_id,
            delta=WireTensors(delta),
            num_samples=shard_size,
            base_version=task.base_version,
            extras=WireTensors(extras),
            metrics={"train_loss": loss, "steps": steps, "samples_processed": samples_per_task(shard_size, self.cfg.training),
                     "compute_seconds": seconds},
        )
        new_state = {**(new_algo_state or {}), **kept}
        if self.personalized:
            new_state.update({PERSONAL + name: tensor for name, tensor in local.items()})
        return update, WireTensors(new_state) if new_state else None

    def train(
        self,
        task: ClientTask,
        weights: NamedTensors,
        server_extras: NamedTensors,
        client_state: NamedTensors | None,
    ) -> tuple[ClientUpdate, NamedTensors | None]:
        """Train ``task.client_id`` alone on the resident adapter; its update and new stored state."""
        begun = self._start(task, weights, server_extras, client_state)
        set_weights(self.loaded.model, begun.start)
        torch.manual_seed(derive_seed(self.cfg.seed, "client", task.seed_round, task.client_id))  # LoRA dropout
        batches = (self._batch(task.client_id, rows) for rows in begun.batches)
        started = time.perf_counter()
        steps, loss = train_locally(self.loaded.model, self.params, batches, begun.strategy, begun.ctx,
                                    self.cfg.training, task.lr)
        return self._result(begun, self.params, steps, loss, time.perf_counter() - started)

    def train_batch(
        self,
        tasks: list[ClientTask],
        weights: NamedTensors,
        server_extras: NamedTensors,
        client_states: list[NamedTensors | None],
    ) -> list[tuple[ClientUpdate, NamedTensors | None]]:
        """Train several clients in one forward pass per step (``train_together``); one task trains alone.

        Each client's update is the one ``train`` gives it alone: bit for bit on CPU, LoRA dropout included
        (its masks come from the client's own seed); on CUDA up to float rounding and dropout's random
        stream. Each client's ``compute_seconds`` is its share of the batch's wall time.
        """
        if len(tasks) == 1:
            return [self.train(tasks[0], weights, server_extras, client_states[0])]
        begun = [self._start(t, weights, server_extras, s) for t, s in zip(tasks, client_states)]
        runs = [self._local_run(b) for b in begun]
        started = time.perf_counter()
        train_together(self.loaded.model, runs, self.collate.batch, self.loaded.device, self.cfg.training)
        seconds = (time.perf_counter() - started) / len(tasks)
        return [self._result(b, run.params, run.steps, run.mean_loss, seconds) for b, run in zip(begun, runs)]
