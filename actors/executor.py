"""Client tasks on a pool of Ray worker actors; the aggregator, which also keeps client states, as a remote actor.

The driver holds task descriptors and object references, never tensors: a global version is put in the
object store once and every task of that version shares the reference; updates and client states go from
the worker that produced them straight to the aggregator actor. A worker trains up to
``runtime.clients_per_batch`` tasks of one version in one call (``fedsim.engine.batches``), each with its
own results.

The driver waits on every task in flight at once (``ray.wait``) and hands a worker its next task the moment
one finishes; finished results wait, in the order they came, until the loop asks for them in the virtual
clock's order. ``ray.wait`` also fetches a finished task's update and state to the driver's node, where the
aggregator actor lives, so a worker node lost after that costs nothing. Evaluation is sharded:
each worker scores a slice of the test split's batches and the driver pools the per-sample scores.

Faults. A worker whose process or node died is restarted by Ray in its placement bundle (which Ray moves to
a live node), or replaced when Ray cannot restart it. Every task whose result was lost with it, whether it
was running, queued on that worker, or finished but not yet consumed (read by the aggregator actor only
after the node went), runs again from the same version and client state with the same seeds, in the same
batch, so the run ends with the adapter it would have had without the fault. A task that raises (its whole
batch does) is retried once alone on another worker, then reported failed (``ClientTaskFailed``), which the
loop counts as the client's dropout.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import ray
from ray.exceptions import (ActorUnavailableError, GetTimeoutError, NodeDiedError, ObjectLostError,
                            OutOfMemoryError, RayActorError, RayTaskError, WorkerCrashedError)
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy, PlacementGroupSchedulingStrategy

from actors.aggregator import AggregatorActor
from actors.worker import ClientWorker
from fedsim.config import ExperimentConfig
from fedsim.engine.batches import Batches
from fedsim.engine.inprocess import TASK_RETRIES, failure_reason, mean_metrics, state_cache_bytes
from fedsim.engine.loop import ClientTaskFailed
from fedsim.evaluation import BatchScores, combine
from fedsim.messages import ClientTask, NamedTensors, Published
from fedsim.statestore import ClientSet, StateManifest

log = logging.getLogger(__name__)

# The worker process or node died, or a result died with them: run the task again. Checked before
# RayTaskError: an actor call whose argument was lost raises RayTaskError(ObjectReconstructionFailedError).
LOST = (RayActorError, ObjectLostError, WorkerCrashedError, NodeDiedError, OutOfMemoryError)
LOST_ATTEMPTS = 4  # a task lost this often (one that kills its worker, say) fails as "worker_lost"
REPLACEMENTS = 8  # per worker, for workers Ray could not restart
PLACEMENT_GRACE_S = 5.0  # runtime.resource_timeout_s=0 still gives free resources this long to be placed
WAIT_REPORT_S = 60.0  # while only restarting workers are awaited, say so this often
UNREACHABLE_RETRIES = 10  # the aggregator lives on the driver's node: unreachable for long, it is gone
PERSONALIZED_CHUNK = 8  # clients per personalized evaluation call: their states travel together


def on_driver_node() -> NodeAffinitySchedulingStrategy:
    """The server side (aggregator, client states) lives on the driver's node: a run survives the loss of
    any worker node, and only the loss of the node it is driven from ends it (then: fedsim run --resume)."""
    return NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=False)


@dataclass
class WorkerSlot:
    index: int
    actor: Any
    busy: int = 0  # tasks sent to this actor whose results are not in yet
    tasks: int = 0  # tasks it finished
    failures: int = 0  # tasks that raised on it
    restarts: int = 0  # times it came back in a new process (restarted by Ray, or replaced)
    replacements: int = 0
    busy_seconds: float = 0.0  # time in client tasks
    placement: dict[str, Any] = field(default_factory=dict)
    revival: ray.ObjectRef | None = None  # placement() of a restarting or new actor: no task until it answers
    stale: bool = False  # restarted unseen (a new pid in a task's metrics): placement to be read again


@dataclass(eq=False)
class Job:
    """One client task, from ``submit`` until the loop settles or discards it; each try is sent afresh."""

    task: ClientTask
    published: ray.ObjectRef  # the version it trains from, also when run again
    state_in: ray.ObjectRef | None  # the client's stored state when it was submitted
    slot: WorkerSlot | None = None  # the current try's worker, and the actor it went to
    actor: Any = None
    update: ray.ObjectRef | None = None
    state: ray.ObjectRef | None = None
    metrics_ref: ray.ObjectRef | None = None
    outstanding: set = field(default_factory=set)  # the try's update and state, until both are on this node
    metrics: dict[str, float] | None = None  # set when it finished
    failure: str | None = None  # set when it failed for good
    failures: int = 0  # tries that raised
    lost: int = 0  # tries lost with their worker or node
    avoid: int | None = None  # the worker it just raised on: its retry goes elsewhere
    discarded: bool = False
    batch: list[Job] = field(default_factory=list)  # the tasks it trains with (itself included); alone on a retry

    @property
    def done(self) -> bool:
        return self.metrics is not None or self.failure is not None


@dataclass
class UpdateRef:
    """A finished task's update as the loop holds it: the object reference, and the executor that runs the
    task again should the update be lost before the aggregator reads it."""

    task: ClientTask
    ref: ray.ObjectRef
    executor: RayExecutor


class RemoteAggregator:
    """``AggregatorLike`` over the ``AggregatorActor`` that the executor started (it keeps client states)."""

    def __init__(self, actor: Any, cfg: ExperimentConfig, initial: NamedTensors, client_sizes: Sequence[int]):
        self.actor = actor
        self.version = ray.get(self.actor.start.remote(cfg, initial, client_sizes))
        self.submitted = 0

    def submit(self, update: UpdateRef, base: ray.ObjectRef | None = None) -> str:
        self.submitted += 1
        unreachable = 0
        while True:
            try:
                outcome, self.version = ray.get(self.actor.submit.remote(update.ref, [base], self.submitted))
                return outcome
            except ObjectLostError as err:  # the update died with its node before the aggregator read it
                update.ref = update.executor.rerun_lost(update.task, err)
            except ActorUnavailableError as err:  # the call may have run: repeated, it is not applied twice
                unreachable += 1
                if unreachable > UNREACHABLE_RETRIES:
                    raise
                log.warning("the aggregator did not answer (%s); asking again", str(err).splitlines()[0][:200])
                time.sleep(1.0)

    def close_round(self) -> int:
        self.version = ray.get(self.actor.close_round.remote())
        return self.version

    def flush(self) -> int:
        self.version = ray.get(self.actor.flush.remote())
        return self.version

    def snapshot(self) -> tuple[int, ray.ObjectRef]:
        self.version, (ref,) = ray.get(self.actor.snapshot.remote())
        return self.version, ref

    def state(self) -> tuple[NamedTensors, dict[str, Any]]:
        return ray.get(self.actor.state.remote())

    def restore(self, tensors: NamedTensors, counts: dict[str, Any]) -> None:
        self.version = ray.get(self.actor.restore.remote(tensors, counts))

    def stats(self) -> dict[str, Any]:
        return ray.get(self.actor.stats.remote())


class RayExecutor:
    """``Executor`` over worker actors, with at most ``workers x (1 + queue_per_worker)`` calls on the cluster,
    each training up to ``clients_per_batch`` clients together."""

    def __init__(self, cfg: ExperimentConfig, personalized: bool):
        self.cfg = cfg
        self.personalized = personalized
        self.capacity_per_worker = 1 + cfg.runtime.queue_per_worker
        self.run_id = f"{cfg.name}-{uuid.uuid4().hex[:8]}"
        self.started = 0
        # Held here for the run: Ray rebuilds a restarted worker from its creation arguments, and one passed
        # by reference must still exist then (else the restart fails with ReferenceCountingAssertionError).
        self.cfg_ref = ray.put(cfg)
        self.group: PlacementGroup | None = None
        self.server = None
        self.slots: list[WorkerSlot] = []
        try:
            self.group = self._placement_group()
            self.server = AggregatorActor.options(num_cpus=0, scheduling_strategy=on_driver_node()).remote()
            self.slots = [WorkerSlot(i, self._actor(i)) for i in range(cfg.runtime.num_workers)]
            for slot, placement in zip(self.slots, ray.get([s.actor.placement.remote() for s in self.slots])):
                slot.placement = placement
            self.batching = ray.get(self.slots[0].actor.batching.remote())
        except BaseException:
            self.shutdown()
            raise
        self.batch_size = self.batching["clients_per_batch"]
        self.batches = Batches(self.batch_size)
        self.published: ray.ObjectRef | None = None
        self.jobs: dict[ClientTask, Job] = {}  # submitted, not yet settled or discarded
        self.queue: deque[list[Job]] = deque()  # batches waiting for a worker with room
        self.waiting_on: dict[ray.ObjectRef, Job] = {}  # results of tries in flight (discarded ones too)
        self.revivals: dict[ray.ObjectRef, WorkerSlot] = {}
        self.with_state = ClientSet(cfg.partition.num_clients)  # clients the aggregator actor holds a state for
        self.reruns = {"unfinished": 0, "finished": 0}  # tries lost before / after they finished

    # ------------------------------------------------------------------------------- workers
    def _placement_group(self) -> PlacementGroup | None:
        """One bundle per worker, packed or spread over nodes (None when workers reserve no resources)."""
        runtime = self.cfg.runtime
        bundle = {k: v for k, v in (("CPU", runtime.cpus_per_worker), ("GPU", runtime.gpus_per_worker)) if v}
        if not bundle:
            return None
        group = placement_group([dict(bundle) for _ in range(runtime.num_workers)],
                                strategy=runtime.placement.upper(), name=f"fedsim:{self.run_id}")
        timeout = max(runtime.resource_timeout_s, PLACEMENT_GRACE_S)
        try:
            ray.get(group.ready(), timeout=timeout)
        except GetTimeoutError:
            remove_placement_group(group)
            free = ray.available_resources()
            short = ", ".join(f"{need * runtime.num_workers:g} {r} ({free.get(r, 0):g} free)"
                              for r, need in bundle.items())
            raise RuntimeError(f"Ray could not place {runtime.num_workers} workers of {bundle} ({runtime.placement}) "
                               f"within {timeout:g} s (runtime.resource_timeout_s={runtime.resource_timeout_s:g}): "
                               f"they need {short}; other runs may hold them, or no node has a bundle's worth "
                               "free. Wait for those runs, lower the request, or raise runtime.resource_timeout_s"
                               ) from None
        return group

    def _actor(self, index: int):
        runtime = self.cfg.runtime
        # Named per run so that users (and tests) can find a run's workers: ray.util.list_named_actors().
        name = f"fedsim:{self.run_id}:worker{index}:{self.started}"
        self.started += 1
        strategy = (PlacementGroupSchedulingStrategy(self.group, placement_group_bundle_index=index)
                    if self.group is not None else "DEFAULT")
        return ClientWorker.options(num_cpus=runtime.cpus_per_worker, num_gpus=runtime.gpus_per_worker,
                                    name=name, scheduling_strategy=strategy
                                    ).remote(self.cfg_ref, self.personalized, index)

    def _worker_lost(self, slot: WorkerSlot, actor: Any, err: BaseException) -> None:
        """A call to ``actor`` failed as if it died: take no task there until it answers again."""
        if actor is not slot.actor or slot.revival is not None:
            return
        log.warning("worker %d lost (%s); its tasks run again, and Ray restarts it", slot.index, type(err).__name__)
        self._await_revival(slot)

    def _await_revival(self, slot: WorkerSlot) -> None:
        slot.revival = slot.actor.placement.remote()  # calls other than train wait through a restart
        self.revivals[slot.revival] = slot

    def _revived(self, slot: WorkerSlot) -> None:
        ref, slot.revival = slot.revival, None
        del self.revivals[ref]
        try:
            placement = ray.get(ref)
        except LOST as err:  # past its restarts, or killed for good
            log.warning("worker %d did not come back: %s", slot.index, str(err).strip().splitlines()[0][:300])
            self._replace(slot)
            return
        if placement["pid"] != slot.placement.get("pid"):
            slot.restarts += 1
            log.warning("worker %d is back, on node %s", slot.index, placement["node_id"][:8])
        slot.placement = placement

    def _revive_now(self, slot: WorkerSlot) -> None:
        while slot.revival is not None:
            ray.wait([slot.revival])
            self._revived(slot)

    def _replace(self, slot: WorkerSlot) -> None:
        slot.replacements += 1
        if slot.replacements > REPLACEMENTS:
            raise RuntimeError(f"worker {slot.index} could not be replaced in {REPLACEMENTS} attempts; the cluster "
                               "may have lost the resources it needs")
        if slot.replacements > 1:
            # A replacement may land in a bundle whose node is dead but not yet declared so (Ray notices by
            # missed heartbeats); it then dies too, and the next one goes where Ray moved the bundle.
            time.sleep(min(2.0 ** (slot.replacements - 2), 15.0))
        log.warning("worker %d could not be restarted; starting a replacement", slot.index)
        ray.kill(slot.actor, no_restart=True)
        slot.actor = self._actor(slot.index)
        slot.busy = 0
        self._await_revival(slot)

    # ------------------------------------------------------------------------------- tasks
    def publish(self, version: int, handle: ray.ObjectRef) -> None:
        self.published = handle

    def submit(self, task: ClientTask) -> None:
        state = self.server.get_state.remote(task.client_id) if task.client_id in self.with_state else None
        job = Job(task, self.published, state)
        self.jobs[task] = job
        self._enqueue(self.batches.add(job, self.published))

    def _enqueue(self, batches: list[list[Job]]) -> None:
        for batch in batches:
            for job in batch:
                job.batch = batch
            self.queue.append(batch)
        self._pump()

    def _pump(self) -> None:
        """Hand waiting batches, in order, to the least busy workers with room (lowest index among equals); a
        retry skips the worker it raised on."""
        for batch in list(self.queue):
            free = [s for s in self.slots if s.revival is None
                    and s.busy + len(batch) <= self.capacity_per_worker * self.batch_size]
            if not free:
                return
            avoid = batch[0].avoid
            if avoid is not None and len(self.slots) > 1:
                free = [s for s in free if s.index != avoid]
                if not free:
                    continue
            slot = min(free, key=lambda s: (s.busy, s.index))
            self.queue = deque(b for b in self.queue if b is not batch)
            self._send(batch, slot)

    def _send(self, jobs: list[Job], slot: WorkerSlot) -> None:
        """One call trains the batch; each task's update, state and metrics come back as refs of their own."""
        refs = slot.actor.train_batch.options(num_returns=3 * len(jobs)).remote(
            [job.task for job in jobs], jobs[0].published, *(job.state_in for job in jobs))
        for i, job in enumerate(jobs):
            job.slot, job.actor = slot, slot.actor
            job.update, job.state, job.metrics_ref = refs[3 * i:3 * i + 3]
            job.outstanding = {job.update, job.state}
            for ref in job.outstanding:
                self.waiting_on[ref] = job
        slot.busy += len(jobs)

    def _wait(self) -> None:
        """Take in everything finished by now, blocking until something is: results, workers back."""
        refs = [*self.waiting_on, *self.revivals]
        if not refs:
            raise RuntimeError(f"{len(self.queue)} task(s) wait for a worker, but no worker is running anything")
        first: list = []
        while not first:
            first, _ = ray.wait(refs, num_returns=1, fetch_local=True, timeout=WAIT_REPORT_S)
            if not first and not self.waiting_on:
                log.warning("waiting for %d worker(s) to come back (Ray restarts them once their placement bundles "
                            "fit on a live node)", len(self.revivals))
        done, _ = ray.wait(refs, num_returns=len(refs), timeout=0, fetch_local=True)
        for ref in dict.fromkeys([*first, *done]):
            if ref in self.revivals:
                self._revived(self.revivals[ref])
                continue
            job = self.waiting_on.pop(ref)
            job.outstanding.discard(ref)
            if not job.outstanding:
                self._finished(job)

    def _finished(self, job: Job) -> None:
        slot = job.slot
        if job.actor is slot.actor:
            slot.busy -= 1
        try:
            metrics = ray.get(job.metrics_ref)
        except LOST as err:
            self._worker_lost(slot, job.actor, err)
            if not job.discarded:
                self._again(job, finished=False)
            return
        except RayTaskError as err:
            slot.failures += 1
            if not job.discarded:
                self._raised(job, err)
            return
        slot.tasks += 1
        slot.busy_seconds += metrics.get("task_seconds", 0.0)
        if job.actor is slot.actor and metrics.get("pid", slot.placement.get("pid")) != slot.placement.get("pid"):
            slot.restarts += 1  # restarted between tasks: its node (placement) is read again for stats
            slot.placement["pid"], slot.stale = metrics["pid"], True
        if not job.discarded:
            job.metrics = metrics

    def _raised(self, job: Job, err: RayTaskError) -> None:
        reason = failure_reason(err.cause if err.cause is not None else err)
        job.failures += 1
        message = str(err).strip().splitlines()[-1]
        if job.failures > TASK_RETRIES:
            log.warning("client %d (task %d) raised again, on worker %d: %s", job.task.client_id, job.task.seed_round,
                        job.slot.index, message)
            job.failure = reason
            return
        log.warning("client %d (task %d) raised on worker %d: %s; retrying it alone on another worker",
                    job.task.client_id, job.task.seed_round, job.slot.index, message)
        job.avoid, job.batch = job.slot.index, [job]
        self.queue.appendleft(job.batch)

    def _again(self, job: Job, finished: bool) -> None:
        """Queue a lost try again, first in line, with the batch it was trained in (the same batch gives the
        same bits), unless the task has been lost too often."""
        job.lost += 1
        job.metrics = None
        if job.lost >= LOST_ATTEMPTS:
            log.error("client %d (task %d) lost its worker %d times; counted as failed", job.task.client_id,
                      job.task.seed_round, job.lost)
            job.failure = "worker_lost"
            return
        self.reruns["finished" if finished else "unfinished"] += 1
        job.avoid = None
        if not any(batch is job.batch for batch in self.queue):  # its batch-mates, lost with it, queued it
            self.queue.appendleft(job.batch)

    def _until_done(self, job: Job) -> None:
        self._enqueue(self.batches.close())
        while not job.done:
            self._pump()
            self._wait()
        self._pump()  # refill before the driver goes off to the aggregator
        if job.failure is not None:
            self.jobs.pop(job.task, None)
            raise ClientTaskFailed(job.task, job.failure)

    def result(self, task: ClientTask) -> tuple[UpdateRef, dict[str, float]]:
        job = self.jobs[task]
        self._until_done(job)
        return UpdateRef(task, job.update, self), job.metrics

    def rerun_lost(self, task: ClientTask, err: BaseException) -> ray.ObjectRef:
        """Run a finished task again whose result was lost before it was read; its new update."""
        job = self.jobs[task]
        log.warning("the result of client %d (task %d) was lost with its node (%s); running the task again",
                    task.client_id, task.seed_round, type(err).__name__)
        self._worker_lost(job.slot, job.actor, err)
        self._again(job, finished=True)
        self._until_done(job)
        return job.update

    def settle(self, task: ClientTask, accepted: bool) -> None:
        """Store the client's new state only once its update is accepted; otherwise it is forgotten."""
        job = self.jobs[task]
        try:
            while accepted and job.metrics.get("has_state", True):
                try:
                    ray.get(self.server.put_state.remote(task.client_id, job.state))
                    self.with_state.add(task.client_id)
                    break
                except LOST as err:
                    self.rerun_lost(task, err)
        finally:
            self.jobs.pop(task, None)

    def discard(self, task: ClientTask) -> None:
        job = self.jobs.pop(task, None)
        if job is None:
            return
        job.discarded = True  # its batch still trains it, if it has not yet: the batches stay as on any engine
        # A try in flight runs out and its result is dropped when it comes. Not ray.cancel: cancelling a call
        # queued on an actor leaves a gap in the actor's call sequence, and the actor's next call (an
        # evaluation) then times out waiting for it.

    # ------------------------------------------------------------------------------- evaluation
    def _any_worker(self) -> WorkerSlot:
        """The least busy worker (lowest index among equals)."""
        return min(self.slots, key=lambda s: (s.revival is not None, s.busy, s.index))

    def evaluate(self, handle: ray.ObjectRef) -> dict[str, float]:
        """Each worker scores a shard of the test split's batches; the pooled scores give the metrics one
        worker would have computed over the whole split (fedsim.evaluation.combine)."""
        count = len(self.slots)
        calls: dict[ray.ObjectRef, tuple[int, WorkerSlot, Any]] = {}
        parts: dict[int, list[BatchScores]] = {}

        def send(index: int, slot: WorkerSlot) -> None:
            calls[slot.actor.evaluate_shard.remote(handle, index, count)] = (index, slot, slot.actor)

        for index, slot in enumerate(self.slots):
            send(index, slot)
        while calls:
            ready, _ = ray.wait(list(calls), num_returns=1)
            index, slot, actor = calls.pop(ready[0])
            try:
                parts[index] = ray.get(ready[0])
            except LOST as err:
                self._worker_lost(slot, actor, err)
                self._revive_now(slot)
                send(index, slot)
        return combine([scores for index in range(count) for scores in parts[index]])

    def evaluate_personalized(self, clients: np.ndarray, fallback: ray.ObjectRef) -> dict[str, float]:
        """Workers score the clients' own adapters, PERSONALIZED_CHUNK clients a call, in turn; each call's
        states go from the aggregator actor to its worker, never through the driver, and at most two calls a
        worker are out at once, so that the object store holds a few chunks of states, not every client's."""
        chunks = [clients[i:i + PERSONALIZED_CHUNK].tolist() for i in range(0, len(clients), PERSONALIZED_CHUNK)]
        parts: list[list[dict[str, float]]] = [[] for _ in chunks]
        calls: dict[ray.ObjectRef, int] = {}

        def take_one() -> None:
            (ready,), _ = ray.wait(list(calls), num_returns=1)
            parts[calls.pop(ready)] = ray.get(ready)

        for index, chunk in enumerate(chunks):
            if len(calls) >= 2 * len(self.slots):
                take_one()
            slot = self.slots[index % len(self.slots)]
            calls[slot.actor.evaluate_states.remote(self.server.get_states.remote(chunk), fallback)] = index
        while calls:
            take_one()
        return mean_metrics([m for part in parts for m in part])

    def adapter_files(self, handle: ray.ObjectRef) -> dict[str, bytes]:
        while True:
            slot = self._any_worker()
            actor = slot.actor
            try:
                return ray.get(actor.adapter_files.remote(handle))
            except LOST as err:
                self._worker_lost(slot, actor, err)
                self._revive_now(slot)

    def open_client_states(self, directory: Path, checkpointed: StateManifest | None) -> None:
        """The aggregator actor keeps them, on the driver's node: ``directory`` is on that node's disk."""
        ray.get(self.server.open_states.remote(str(Path(directory).resolve()), self.cfg.partition.num_clients,
                                               state_cache_bytes(self.cfg), checkpointed))
        if checkpointed is not None:
            self.with_state.update(checkpointed.clients.tolist())

    def client_states(self) -> StateManifest:
        return ray.get(self.server.pin_states.remote())

    def client_states_saved(self) -> None:
        ray.get(self.server.release_states.remote())

    def personalized_digest(self) -> str:
        return ray.get(self.server.personalized_digest.remote())

    def fetch(self, handle: ray.ObjectRef) -> Published:
        return ray.get(handle)

    def share(self, published: Published) -> ray.ObjectRef:
        return ray.put(published)

    def stats(self) -> dict[str, Any]:
        for slot in self.slots:
            if slot.stale and slot.revival is None:
                try:
                    slot.placement, slot.stale = ray.get(slot.actor.placement.remote()), False
                except LOST:
                    pass
        return {"workers": [{"worker": s.index, "tasks": s.tasks, "failed_tasks": s.failures, "restarts": s.restarts,
                             "busy_seconds": s.busy_seconds, **s.placement} for s in self.slots],
                "worker_restarts": sum(s.restarts for s in self.slots), "batching": self.batching,
                "tasks_rerun": dict(self.reruns)}

    def shutdown(self) -> None:
        for slot in self.slots:
            ray.kill(slot.actor, no_restart=True)
        if self.server is not None:
            ray.kill(self.server, no_restart=True)
        if self.group is not None:
            remove_placement_group(self.group)
