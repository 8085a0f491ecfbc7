"""Client tasks run in this process, one after another, on one resident model."""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np

from fedsim.client import ClientTrainer, split_state
from fedsim.engine.loop import ClientTaskFailed
from fedsim.evaluation import Evaluator
from fedsim.messages import ClientTask, ClientUpdate, NamedTensors, Published
from fedsim.models.adapter import adapter_files, adapter_sha256, set_weights

log = logging.getLogger(__name__)
TASK_RETRIES = 1  # a client task that raises is run once more (on Ray: on another worker) before it fails

def personalized_adapters(states: dict[int, NamedTensors], num_clients: int) -> NamedTensors:
    """Every client's own adapter under ``client<id>/``, for the run's digest."""
    return {f"client{c}/{name}": tensor for c in range(num_clients)
            for name, tensor in (split_state(states.get(c))[0] or {}).items()}


def mean_metrics(per_client: list[dict[str, float]]) -> dict[str, float]:
    return {key: float(np.mean([m[key] for m in per_client])) for key in per_client[0]}


def failure_reason(err: BaseException) -> str:
    """How a failed client task is counted in summary.json's ``failed_updates``."""
    return f"exception:{type(err).__name__}"


class InProcessExecutor:
    """Tasks train lazily, when their result is asked for, from the version current when they were submitted.
    A task that raises is run once more, then reported failed, as on Ray."""

    def __init__(self, trainer: ClientTrainer, evaluator: Evaluator):
        self.trainer = trainer
        self.evaluator = evaluator
        self.published: Published | None = None
        self.pending: dict[ClientTask, Published] = {}
        self.states: dict[int, NamedTensors] = {}  # committed: clients whose updates were accepted
        self.unsettled: dict[ClientTask, NamedTensors | None] = {}  # new states awaiting the aggregator's word
        self.tasks_done = 0
        self.busy_seconds = 0.0

    def publish(self, version: int, handle: Published) -> None:
        self.published = handle

    def submit(self, task: ClientTask) -> None:
        self.pending[task] = self.published

    def result(self, task: ClientTask) -> tuple[ClientUpdate, dict[str, float]]:
        weights, extras = self.pending.pop(task)
        for attempt in range(TASK_RETRIES + 1):
            started = time.perf_counter()
            try:
                update, state = self.trainer.train(task, weights, extras, self.states.get(task.client_id))
                break
            except Exception as err:
                log.warning("client %d (task %d) raised %r (attempt %d)", task.client_id, task.seed_round, err,
                            attempt + 1)
                if attempt == TASK_RETRIES:
                    raise ClientTaskFailed(task, failure_reason(err)) from err
            finally:
                self.busy_seconds += time.perf_counter() - started
        self.unsettled[task] = state
        self.tasks_done += 1
        return update, {**update.metrics, "num_samples": update.num_samples, "worker": 0}

    def settle(self, task: ClientTask, accepted: bool) -> None:
        state = self.unsettled.pop(task)
        if accepted and state is not None:
            self.states[task.client_id] = state

    def discard(self, task: ClientTask) -> None:
        self.pending.pop(task, None)
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
                             "busy_seconds": self.busy_seconds}]}
