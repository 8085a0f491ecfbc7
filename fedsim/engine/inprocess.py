"""Client tasks run in this process, one after another, on one resident model."""

from __future__ import annotations

import hashlib
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fedsim.config import ExperimentConfig
from fedsim.engine.batches import Batches
from fedsim.engine.loop import ClientTaskFailed
from fedsim.evaluation import Evaluator
from fedsim.messages import ClientTask, ClientUpdate, NamedTensors, Published
from fedsim.models.adapter import adapter_files, set_weights, update_digest
from fedsim.statestore import ClientStateStore, StateManifest

if TYPE_CHECKING:  # the client side loads peft and transformers: not in the Ray driver or aggregator processes
    from fedsim.client import ClientTrainer

log = logging.getLogger(__name__)
TASK_RETRIES = 1  # a client task that raises is run once more, alone (on Ray: on another worker), before it fails

def personalized_digest(states: ClientStateStore) -> str:
    """The run's digest: ``adapter_sha256`` of every client's own adapter under ``client<id>/``, read one
    client at a time (clients in the order of those names: by the decimal string of their ids)."""
    from fedsim.client import split_state

    clients = states.clients()
    digest = hashlib.sha256()
    for client in clients[np.argsort(np.char.add(clients.astype(str), "/"), kind="stable")].tolist():
        update_digest(digest, split_state(states.get(client))[0] or {}, f"client{client}/")
    return digest.hexdigest()


def state_cache_bytes(cfg: ExperimentConfig) -> int:
    return int(cfg.runtime.state_cache_mb * 2**20)


def batching(trainer: ClientTrainer) -> dict[str, Any]:
    """summary.json's ``batching``: clients trained together, and the bytes each extra client costs."""
    return {"clients_per_batch": trainer.clients_per_batch, "extra_client_bytes": trainer.extra_client_bytes}


def mean_metrics(per_client: list[dict[str, float]]) -> dict[str, float]:
    return {key: float(np.mean([m[key] for m in per_client])) for key in per_client[0]}


def failure_reason(err: BaseException) -> str:
    """How a failed client task is counted in summary.json's ``failed_updates``."""
    return f"exception:{type(err).__name__}"


class InProcessExecutor:
    """Tasks train lazily, when the result of one of their batch (``Batches``) is asked for, from the version
    current when they were submitted. A batch that raises runs again one task at a time; a task that raises
    then is reported failed, as on Ray."""

    def __init__(self, trainer: ClientTrainer, evaluator: Evaluator):
        self.trainer = trainer
        self.evaluator = evaluator
        self.published: Published | None = None
        self.batches = Batches(trainer.clients_per_batch)
        self.pending: dict[ClientTask, Published] = {}  # submitted, not trained yet
        self.batch_of: dict[ClientTask, list[ClientTask]] = {}  # pending tasks whose batch has closed
        self.trained: dict[ClientTask, tuple[ClientUpdate, NamedTensors | None] | ClientTaskFailed] = {}
        self.cfg = trainer.cfg
        self.states: ClientStateStore | None = None  # of accepted updates; open_client_states() opens it
        self.unsettled: dict[ClientTask, NamedTensors | None] = {}  # new states awaiting the aggregator's word
        self.tasks_done = 0
        self.busy_seconds = 0.0

    def publish(self, version: int, handle: Published) -> None:
        self.published = handle

    def submit(self, task: ClientTask) -> None:
        self.pending[task] = self.published
        self._closed(self.batches.add(task, self.published))

    def _closed(self, batches: list[list[ClientTask]]) -> None:
        for batch in batches:
            self.batch_of.update((task, batch) for task in batch)

    def result(self, task: ClientTask) -> tuple[ClientUpdate, dict[str, float]]:
        self._closed(self.batches.close())
        if task not in self.trained:
            self._train([t for t in self.batch_of[task] if t in self.pending])
        outcome = self.trained.pop(task)
        if isinstance(outcome, ClientTaskFailed):
            raise outcome
        update, state = outcome
        self.unsettled[task] = state
        self.tasks_done += 1
        return update, {**update.metrics, "num_samples": update.num_samples, "worker": 0}

    def _train(self, tasks: list[ClientTask]) -> None:
        """Train ``tasks`` together; if that raises, each once more alone (TASK_RETRIES). Their states are read
        first: a state that cannot be read (``StateStoreError``) stops the run, it is no client's dropout."""
        weights, extras = self.pending[tasks[0]]
        for task in tasks:
            del self.pending[task]
            del self.batch_of[task]
        states = [self.states.get(t.client_id) for t in tasks]
        started = time.perf_counter()
        try:
            results = self.trainer.train_batch(tasks, weights, extras, states)
            self.trained.update(zip(tasks, results))
        except Exception as err:
            log.warning("clients %s (tasks %s) raised %r; each runs once more, alone",
                        [t.client_id for t in tasks], [t.seed_round for t in tasks], err)
            for task, state in zip(tasks, states):
                try:
                    self.trained[task] = self.trainer.train(task, weights, extras, state)
                except Exception as again:
                    log.warning("client %d (task %d) raised again: %r", task.client_id, task.seed_round, again)
                    failed = ClientTaskFailed(task, failure_reason(again))
                    failed.__cause__ = again
                    self.trained[task] = failed
        finally:
            self.busy_seconds += time.perf_counter() - started

    def settle(self, task: ClientTask, accepted: bool) -> None:
        state = self.unsettled.pop(task)
        if accepted and state is not None:
            self.states.put(task.client_id, state)

    def discard(self, task: ClientTask) -> None:
        self.pending.pop(task, None)
        self.batch_of.pop(task, None)
        self.trained.pop(task, None)
        self.unsettled.pop(task, None)

    def _evaluate_weights(self, weights: NamedTensors, ablations: bool = True) -> dict[str, float]:
        set_weights(self.trainer.loaded.model, weights)
        return self.evaluator.evaluate(self.trainer.loaded.model, ablations)

    def evaluate(self, handle: Published, ablations: bool = True) -> dict[str, float]:
        return self._evaluate_weights(handle[0], ablations)

    def evaluate_personalized(self, clients: np.ndarray, fallback: Published) -> dict[str, float]:
        """Mean over the clients' own adapters; clients never trained hold the initial one."""
        from fedsim.client import split_state

        fallback_metrics = None
        per_client = []
        for client in clients.tolist():
            adapter = split_state(self.states.get(client))[0]
            if adapter is None:
                fallback_metrics = fallback_metrics or self.evaluate(fallback)
                per_client.append(fallback_metrics)
            else:
                per_client.append(self._evaluate_weights(adapter))
        return mean_metrics(per_client)

    def adapter_files(self, handle: Published) -> dict[str, bytes]:
        return adapter_files(self.trainer.loaded.model, handle[0])

    def open_client_states(self, directory: Path, checkpointed: StateManifest | None) -> None:
        self.states = ClientStateStore(directory, self.cfg.partition.num_clients, state_cache_bytes(self.cfg),
                                       checkpointed)

    def client_states(self) -> StateManifest:
        return self.states.pin()

    def client_states_saved(self) -> None:
        self.states.release()

    def personalized_digest(self) -> str:
        return personalized_digest(self.states)

    def fetch(self, handle: Published) -> Published:
        return handle

    def share(self, published: Published) -> Published:
        return published

    def stats(self) -> dict[str, Any]:
        return {"workers": [{"worker": 0, "tasks": self.tasks_done, "restarts": 0,
                             "busy_seconds": self.busy_seconds}], "batching": batching(self.trainer)}
