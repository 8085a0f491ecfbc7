"""Client tasks run in this process, one after another, on one resident model."""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np

from fedsim.client import ClientTrainer, split_state
from fedsim.engine.batches import Batches
from fedsim.engine.loop import ClientTaskFailed
from fedsim.evaluation import Evaluator
from fedsim.messages import ClientTask, ClientUpdate, NamedTensors, Published
from fedsim.models.adapter import adapter_files, adapter_sha256, set_weights

log = logging.getLogger(__name__)
TASK_RETRIES = 1  # a client task that raises is run once more, alone (on Ray: on another worker), before it fails

def personalized_adapters(states: dict[int, NamedTensors], num_clients: int) -> NamedTensors:
    """Every client's own adapter under ``client<id>/``, for the run's digest."""
    return {f"client{c}/{name}": tensor for c in range(num_clients)
            for name, tensor in (split_state(states.get(c))[0] or {}).items()}


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
        self.states: dict[int, NamedTensors] = {}  # committed: clients whose updates were accepted
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
        """Train ``tasks`` together; if that raises, each once more alone (TASK_RETRIES)."""
        weights, extras = self.pending[tasks[0]]
        for task in tasks:
            del self.pending[task]
            del self.batch_of[task]
        started = time.perf_counter()
        try:
            results = self.trainer.train_batch(tasks, weights, extras, [self.states.get(t.client_id) for t in tasks])
            self.trained.update(zip(tasks, results))
        except Exception as err:
            log.warning("clients %s (tasks %s) raised %r; each runs once more, alone",
                        [t.client_id for t in tasks], [t.seed_round for t in tasks], err)
            for task in tasks:
                try:
                    self.trained[task] = self.trainer.train(task, weights, extras, self.states.get(task.client_id))
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
            self.states[task.client_id] = state

    def discard(self, task: ClientTask) -> None:
        self.pending.pop(task, None)
        self.batch_of.pop(task, None)
        self.trained.pop(task, None)
        self.unsettled.pop(task, None)

    def _evaluate_weights(self, weights: NamedTensors) -> dict[str, float]:
        set_weights(self.trainer.loaded.model, weights)
        return self.evaluator.evaluate(self.trainer.loaded.model)

    def evaluate(self, handle: Published) -> dict[str, float]:
        return self._evaluate_weights(handle[0])

    def evaluate_personalized(self, num_clients: int, fallback: Published) -> dict[str, float]:
        """Mean over every client's own adapter; clients never trained hold the initial one."""
        fallback_metrics = None
        per_client = []
        for client in range(num_clients):
            adapter = split_state(self.states.get(client))[0]
            if adapter is None:
                fallback_metrics = fallback_metrics or self.evaluate(fallback)
                per_client.append(fallback_metrics)
            else:
                per_client.append(self._evaluate_weights(adapter))
        return mean_metrics(per_client)

    def adapter_files(self, handle: Published) -> dict[str, bytes]:
        return adapter_files(self.trainer.loaded.model, handle[0])

    def client_states(self) -> dict[int, NamedTensors]:
        return dict(self.states)

    def restore_client_states(self, states: dict[int, NamedTensors]) -> None:
        self.states.update(states)

    def personalized_digest(self, num_clients: int) -> str:
        return adapter_sha256(personalized_adapters(self.states, num_clients))

    def fetch(self, handle: Published) -> Published:
        return handle

    def share(self, published: Published) -> Published:
        return published

    def stats(self) -> dict[str, Any]:
        return {"workers": [{"worker": 0, "tasks": self.tasks_done, "restarts": 0,
                             "busy_seconds": self.busy_seconds}], "batching": batching(self.trainer)}
