"""Client tasks on a pool of Ray worker actors; the aggregator as a remote actor.

The driver holds task descriptors and object references, never tensors: a global version is put in the
object store once and every task of that version shares the reference; updates go from the worker that
produced them straight to the aggregator actor; client states go straight to the state store.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import ray
from ray.exceptions import ObjectLostError, RayActorError, WorkerCrashedError
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy, PlacementGroupSchedulingStrategy

from actors.aggregator import AggregatorActor
from actors.state_store import ClientStateStore
from actors.worker import ClientWorker
from fedsim.config import ExperimentConfig
from fedsim.engine.inprocess import mean_metrics, personalized_adapters
from fedsim.messages import ClientTask, NamedTensors, Published
from fedsim.models.adapter import adapter_sha256

log = logging.getLogger(__name__)

# A task whose worker process died, or whose result died with it, is run again elsewhere.
WORKER_LOST = (RayActorError, ObjectLostError, WorkerCrashedError)
PLACEMENT_TIMEOUT_S = 300
REPLACE_ATTEMPTS = 8


def on_driver_node() -> NodeAffinitySchedulingStrategy:
    """The server side (aggregator, client states) lives on the driver's node: a run survives the loss of
    any worker node, and only the loss of the node it is driven from ends it (then: fedsim run --resume)."""
    return NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=False)


@dataclass
class WorkerSlot:
    index: int
    actor: Any
    busy: int = 0  # tasks sent to this worker whose result is not ready yet
    tasks: int = 0
    restarts: int = 0
    placement: dict[str, Any] = field(default_factory=dict)


@dataclass
class Running:
    slot: WorkerSlot
    actor: Any  # the actor it was sent to (the slot may hold a replacement by now)
    published: ray.ObjectRef
    update: ray.ObjectRef
    state: ray.ObjectRef
    metrics: ray.ObjectRef
    ready: bool = False


class RemoteAggregator:
    """``AggregatorLike`` over an ``AggregatorActor``."""

    def __init__(self, cfg: ExperimentConfig, initial: NamedTensors, client_sizes: list[int]):
        self.actor = AggregatorActor.options(num_cpus=0, scheduling_strategy=on_driver_node()
                                             ).remote(cfg, initial, client_sizes)

    def submit(self, update: ray.ObjectRef, base: ray.ObjectRef | None = None) -> str:
        return ray.get(self.actor.submit.remote(update, [base]))

    def close_round(self) -> int:
        return ray.get(self.actor.close_round.remote())

    def flush(self) -> int:
        return ray.get(self.actor.flush.remote())

    def snapshot(self) -> tuple[int, ray.ObjectRef]:
        version, (ref,) = ray.get(self.actor.snapshot.remote())
        return version, ref

    def state(self) -> tuple[NamedTensors, dict[str, Any]]:
        return ray.get(self.actor.state.remote())

    def restore(self, tensors: NamedTensors, counts: dict[str, Any]) -> None:
        ray.get(self.actor.restore.remote(tensors, counts))

    def stats(self) -> dict[str, Any]:
        return ray.get(self.actor.stats.remote())


class RayExecutor:
    """``Executor`` over worker actors, with at most ``workers x (1 + queue_per_worker)`` tasks on the cluster."""

    def __init__(self, cfg: ExperimentConfig, personalized: bool):
        self.cfg = cfg
        self.personalized = personalized
        self.capacity_per_worker = 1 + cfg.runtime.queue_per_worker
        self.run_id = f"{cfg.name}-{uuid.uuid4().hex[:8]}"
        self.started = 0
        self.store = ClientStateStore.options(num_cpus=0, scheduling_strategy=on_driver_node()).remote()
        self.group = self._placement_group()
        self.slots = [WorkerSlot(i, self._actor(i)) for i in range(cfg.runtime.num_workers)]
        placements = ray.get([s.actor.placement.remote() for s in self.slots])
        for slot, placement in zip(self.slots, placements):
            slot.placement = placement
        self.published: ray.ObjectRef | None = None
        self.waiting: deque[ClientTask] = deque()  # submitted, not yet sent to a worker
        self.waiting_published: dict[ClientTask, ray.ObjectRef] = {}
        self.running: dict[ClientTask, Running] = {}
        self.unsettled: dict[ClientTask, ray.ObjectRef] = {}  # new client states awaiting the aggregator's word

    # ------------------------------------------------------------------------------- workers
    def _placement_group(self) -> PlacementGroup | None:
        """One bundle per worker, packed or spread over nodes (None when workers reserve no resources)."""
        runtime = self.cfg.runtime
        bundle = {k: v for k, v in (("CPU", runtime.cpus_per_worker), ("GPU", runtime.gpus_per_worker)) if v}
        if not bundle:
            return None
        group = placement_group([dict(bundle) for _ in range(runtime.num_workers)],
                                strategy=runtime.placement.upper(), name=f"fedsim:{self.run_id}")
        try:
            ray.get(group.ready(), timeout=PLACEMENT_TIMEOUT_S)
        except ray.exceptions.GetTimeoutError:
            remove_placement_group(group)
            raise RuntimeError(f"Ray could not place {runtime.num_workers} workers of {bundle} "
                               f"({runtime.placement}) within {PLACEMENT_TIMEOUT_S} s; the cluster has "
                               f"{ray.available_resources()} free") from None
        return group

    def _actor(self, index: int):
        runtime = self.cfg.runtime
        # Named per run so that users (and tests) can find a run's workers: ray.util.list_named_actors().
        name = f"fedsim:{self.run_id}:worker{index}:{self.started}"
        self.started += 1
        strategy = (PlacementGroupSchedulingStrategy(self.group, placement_group_bundle_index=index)
                    if self.group is not None else "DEFAULT")
        return ClientWorker.options(num_cpus=runtime.cpus_per_worker, num_gpus=runtime.gpus_per_worker,
                                    name=name, max_restarts=0, scheduling_strategy=strategy
                                    ).remote(self.cfg, self.personalized, index)

    def _replace(self, slot: WorkerSlot) -> None:
        log.warning("worker %d died; starting a replacement and re-running its unfinished tasks", slot.index)
        ray.kill(slot.actor, no_restart=True)
        slot.busy = 0
        slot.restarts += 1
        # A replacement may land in a placement bundle whose node is dead but not yet declared so (Ray
        # notices by missed heartbeats); it then dies too, and the next one goes where Ray moved the bundle.
        for attempt in range(REPLACE_ATTEMPTS):
            slot.actor = self._actor(slot.index)
            try:
                slot.placement = ray.get(slot.actor.placement.remote())
                break
            except WORKER_LOST:
                log.warning("replacement for worker %d died on start (attempt %d); retrying", slot.index, attempt + 1)
                time.sleep(min(2.0 ** attempt, 15.0))
        else:
            raise RuntimeError(f"worker {slot.index} could not be replaced in {REPLACE_ATTEMPTS} attempts; "
                               "the cluster may have lost the resources it needs")
        for task in [t for t, r in self.running.items() if r.slot is slot and not r.ready]:
            self._requeue(task)

    def _requeue(self, task: ClientTask) -> None:
        """Back to the front of the queue, with the version it was submitted under."""
        self.waiting_published[task] = self.running.pop(task).published
        self.waiting.appendleft(task)

    # ------------------------------------------------------------------------------- tasks
    def publish(self, version: int, handle: ray.ObjectRef) -> None:
        self.published = handle

    def submit(self, task: ClientTask) -> None:
        self.waiting.append(task)
        self.waiting_published[task] = self.published
        self._pump()

    def _pump(self) -> None:
        """Send waiting tasks to the least busy workers while they have room."""
        while self.waiting:
            slot = self._any_worker()
            if slot.busy >= self.capacity_per_worker:
                return
            task = self.waiting.popleft()
            published = self.waiting_published.pop(task)
            state = self.store.get.remote(task.client_id)
            update, new_state, metrics = slot.actor.train.remote(task, published, state)
            self.running[task] = Running(slot, slot.actor, published, update, new_state, metrics)
            slot.busy += 1

    def _mark_ready(self, block: bool) -> None:
        """Free the slots of tasks whose results are ready (collected or not); block for one if asked."""
        pending = {r.metrics: r for r in self.running.values() if not r.ready}
        if not pending:
            return
        ready, _ = ray.wait(list(pending), num_returns=1 if block else len(pending), timeout=None if block else 0)
        for ref in ready:
            self._release(pending[ref])

    @staticmethod
    def _release(running: Running) -> None:
        """The task no longer occupies its worker (counted once, and only against the actor that ran it)."""
        if not running.ready and running.slot.actor is running.actor:
            running.slot.busy -= 1
        running.ready = True

    def result(self, task: ClientTask) -> tuple[ray.ObjectRef, dict[str, float]]:
        while True:
            self._mark_ready(block=False)
            self._pump()
            if task not in self.running:  # queued behind others: wait until a worker frees up
                if not any(not r.ready for r in self.running.values()):
                    raise RuntimeError(f"task {task} is queued but no worker is running anything")
                self._mark_ready(block=True)
                continue
            running = self.running[task]
            try:
                metrics = ray.get(running.metrics)
            except WORKER_LOST:
                if running.slot.actor is running.actor:
                    self._replace(running.slot)
                if task in self.running:
                    self._requeue(task)
                continue
            del self.running[task]
            self._release(running)
            running.slot.tasks += 1
            self.unsettled[task] = running.state
            return running.update, metrics

    def settle(self, task: ClientTask, accepted: bool) -> None:
        """Store the client's new state only once its update is accepted; otherwise it is forgotten."""
        state = self.unsettled.pop(task)
        if accepted:
            ray.get(self.store.put.remote(task.client_id, state))

    def discard(self, task: ClientTask) -> None:
        self.unsettled.pop(task, None)
        if task in self.running:
            # Not ray.cancel: cancelling a call queued on an actor leaves a gap in the actor's call sequence,
            # and the actor's next call (an evaluation) then times out waiting for it. The task runs out
            # and its result is dropped with its references.
            self._release(self.running.pop(task))
        elif task in self.waiting:
            self.waiting.remove(task)
            self.waiting_published.pop(task, None)

    # ------------------------------------------------------------------------------- evaluation
    def _any_worker(self) -> WorkerSlot:
        """The least busy worker (lowest index among equals)."""
        return min(self.slots, key=lambda s: (s.busy, s.index))

    def evaluate(self, handle: ray.ObjectRef) -> dict[str, float]:
        while True:
            slot = self._any_worker()
            try:
                return ray.get(slot.actor.evaluate.remote(_weights_of.remote(handle)))
            except WORKER_LOST:
                self._replace(slot)

    def evaluate_personalized(self, num_clients: int, fallback: ray.ObjectRef) -> dict[str, float]:
        states = ray.get(self.store.get_many.remote(list(range(num_clients))))
        chunks = np.array_split(np.arange(num_clients), len(self.slots))
        fallback_weights = _weights_of.remote(fallback)
        calls = [slot.actor.evaluate_states.remote([states[c] for c in chunk], fallback_weights)
                 for slot, chunk in zip(self.slots, chunks) if len(chunk)]
        return mean_metrics([m for part in ray.get(calls) for m in part])

    def adapter_files(self, handle: ray.ObjectRef) -> dict[str, bytes]:
        return ray.get(self._any_worker().actor.adapter_files.remote(_weights_of.remote(handle)))

    def client_states(self) -> dict[int, NamedTensors]:
        return ray.get(self.store.all.remote())

    def restore_client_states(self, states: dict[int, NamedTensors]) -> None:
        ray.get(self.store.put_many.remote(states))

    def personalized_digest(self, num_clients: int) -> str:
        states = ray.get(self.store.get_many.remote(list(range(num_clients))))
        return adapter_sha256(personalized_adapters(dict(enumerate(states)), num_clients))

    def fetch(self, handle: ray.ObjectRef) -> Published:
        return ray.get(handle)

    def share(self, published: Published) -> ray.ObjectRef:
        return ray.put(published)

    def stats(self) -> dict[str, Any]:
        return {"workers": [{"worker": s.index, "tasks": s.tasks, "restarts": s.restarts, **s.placement}
                            for s in self.slots],
                "worker_restarts": sum(s.restarts for s in self.slots)}

    def shutdown(self) -> None:
        for slot in self.slots:
            ray.kill(slot.actor, no_restart=True)
        ray.kill(self.store, no_restart=True)
        if self.group is not None:
            remove_placement_group(self.group)


@ray.remote(num_cpus=0)
def _weights_of(published: Published) -> NamedTensors:
    return published[0]
