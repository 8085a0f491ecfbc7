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

Bounded memory. A task's stored client state is fetched when the task is sent to a worker, not when it is
submitted, and no new batch is sent while ``RESULTS_WAITING`` x the workers' capacity of finished results
wait for the loop (the batch the loop waits for always goes): the driver's node holds a few batches' worth
of updates and states, whatever the cohort.

Faults. A worker whose process or node died is restarted by Ray in its placement bundle (which Ray moves to
a live node), or replaced when Ray cannot restart it. Every task whose result was lost with it, whether it
was running, queued on that worker, or finished but not yet consumed (read by the aggregator actor only
after the node went), runs again from the same version and client state with the same seeds, in the same
batch, so the run ends with the adapter it would have had without the fault. A worker that makes no
progress for ``runtime.task_timeout_s`` is taken for hung and restarted, with the same effect. Evaluation
shards and personalized-evaluation chunks lost with a worker run again on a live one. A task that raises
(its whole batch does) is retried once alone on another worker, then reported failed (``ClientTaskFailed``),
which the loop counts as the client's dropout. Waits for workers to come back are bounded by
``runtime.resource_timeout_s``. When the aggregator actor itself dies, calls raise ``ServerLost``, and
``actors.runtime`` recreates the server from the last checkpoint.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import ray
from ray.exceptions import (ActorUnavailableError, GetTimeoutError, NodeDiedError, ObjectLostError,
                            OutOfMemoryError, RayActorError, RayTaskError, WorkerCrashedError)
from ray.util.placement_group import PlacementGroup, placement_group_table, remove_placement_group
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy, PlacementGroupSchedulingStrategy

from actors.aggregator import AggregatorActor
from actors.placement import reserve_workers
from actors.worker import ClientWorker, DataSummary
from fedsim.config import ExperimentConfig
from fedsim.engine.batches import Batches
from fedsim.engine.inprocess import TASK_RETRIES, failure_reason, mean_metrics, state_cache_bytes
from fedsim.engine.loop import ClientTaskFailed
from fedsim.evaluation import combine
from fedsim.messages import ClientTask, NamedTensors, Published
from fedsim.statestore import ClientSet, StateManifest, StateStoreError

log = logging.getLogger(__name__)

# The worker process or node died, or a result died with them: run the task again. Checked before
# RayTaskError: an actor call whose argument was lost raises RayTaskError(ObjectReconstructionFailedError).
LOST = (RayActorError, ObjectLostError, WorkerCrashedError, NodeDiedError, OutOfMemoryError)
LOST_ATTEMPTS = 4  # a task lost this often (one that kills its worker, say) fails as "worker_lost"
REPLACEMENTS = 8  # per worker, for workers Ray could not restart
WAIT_REPORT_S = 60.0  # while only restarting workers are awaited, say so this often
UNREACHABLE_RETRIES = 10  # the aggregator lives on the driver's node: unreachable for long, it is gone
PERSONALIZED_CHUNK = 8  # clients per personalized evaluation call: their states travel together
STATS_REVIVAL_WAIT_S = 30.0  # at the end of a run, how long stats wait for lost workers Ray is restarting
RESULTS_WAITING = 2  # finished results waiting for the loop, in multiples of what the workers hold at once
SERVER_TIMEOUT_S = 600.0  # a call to the aggregator actor unanswered this long: the server is taken for lost
FIRST_CALL_TIMEOUT_S = 1800.0  # runtime.task_timeout_s=0 before any call was measured (a GPU warms up)
MIN_CALL_TIMEOUT_S = 300.0
CALL_TIMEOUT_FACTOR = 20.0  # runtime.task_timeout_s=0: this many times the longest call measured


class ServerLost(RuntimeError):
    """The aggregator actor died (or stopped answering): the run continues from its last checkpoint."""


def from_server(ref: ray.ObjectRef) -> Any:
    """``ray.get`` of a call to the aggregator actor, bounded; its death raises ``ServerLost``.

    ``ActorUnavailableError`` (unreachable for a moment, perhaps alive) is left to the caller to retry."""
    try:
        return ray.get(ref, timeout=SERVER_TIMEOUT_S)
    except ActorUnavailableError:
        raise
    except RayActorError as err:
        raise ServerLost(f"the aggregator actor died: {str(err).strip().splitlines()[0][:300]}") from err
    except GetTimeoutError as err:
        raise ServerLost(f"the aggregator actor did not answer within {SERVER_TIMEOUT_S:g} s") from err


def call_timeout(configured: float, longest: float | None) -> float:
    """How long a worker call may go without a result before its worker is taken for hung:
    ``runtime.task_timeout_s`` if set, else generous against the longest call of its kind measured so far."""
    if configured > 0:
        return configured
    if longest is None:
        return FIRST_CALL_TIMEOUT_S
    return max(MIN_CALL_TIMEOUT_S, CALL_TIMEOUT_FACTOR * longest)


def on_driver_node() -> NodeAffinitySchedulingStrategy:
    """The server side (aggregator, client states) lives on the driver's node: a run survives the loss of
    any worker node, and only the loss of the node it is driven from ends it (then: fedsim run --resume)."""
    return NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=False)


def node_alive(node_id: str | None) -> bool:
    """Whether Ray's control store lists the node ``node_id`` as alive (False for an unknown one)."""
    return any(node["NodeID"] == node_id and node["Alive"] for node in ray.nodes())


@dataclass
class WorkerSlot:
    index: int
    actor: Any
    busy: int = 0  # tasks sent to this actor whose results are not in yet
    tasks: int = 0  # tasks it finished
    failures: int = 0  # tasks that raised on it
    restarts: int = 0  # times it was lost (or restarted when hung), counted once per loss
    loss_counted: bool = False  # the loss it is coming back from is already in ``restarts``
    replacements: int = 0
    busy_seconds: float = 0.0  # time in client tasks
    placement: dict[str, Any] = field(default_factory=dict)
    revival: ray.ObjectRef | None = None  # placement() of a restarting or new actor: no task until it answers
    stale: bool = False  # restarted unseen (a new pid in a task's metrics): placement to be read again
    progress_at: float = 0.0  # when a training call last came back from it, or was sent to it while idle
    hung: int = 0  # times it was restarted for making no progress within the call timeout


@dataclass(eq=False)
class Job:
    """One client task, from ``submit`` until the loop settles or discards it; each try is sent afresh."""

    task: ClientTask
    published: ray.ObjectRef  # the version it trains from, also when run again
    has_state: bool  # the aggregator actor holds a state for the client
    state_in: ray.ObjectRef | None = None  # that state, fetched when the task is first sent to a worker
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
        self.version = from_server(self.actor.start.remote(cfg, initial, client_sizes))
        self.submitted = 0

    def submit(self, update: UpdateRef, base: ray.ObjectRef | None = None) -> str:
        self.submitted += 1
        unreachable = 0
        while True:
            try:
                outcome, self.version = from_server(self.actor.submit.remote(update.ref, [base], self.submitted))
                return outcome
            except ObjectLostError as err:  # the update died with its node before the aggregator read it
                update.ref = update.executor.rerun_lost(update.task, err)
            except ActorUnavailableError as err:  # the call may have run: repeated, it is not applied twice
                unreachable += 1
                if unreachable > UNREACHABLE_RETRIES:
                    raise ServerLost(f"the aggregator actor stayed unreachable: {err}") from err
                log.warning("the aggregator did not answer (%s); asking again", str(err).splitlines()[0][:200])
                time.sleep(1.0)

    def close_round(self) -> int:
        self.version = from_server(self.actor.close_round.remote())
        return self.version

    def flush(self) -> int:
        self.version = from_server(self.actor.flush.remote())
        return self.version

    def snapshot(self) -> tuple[int, ray.ObjectRef]:
        self.version, (ref,) = from_server(self.actor.snapshot.remote())
        return self.version, ref

    def state(self) -> tuple[NamedTensors, dict[str, Any]]:
        return from_server(self.actor.state.remote())

    def restore(self, tensors: NamedTensors, counts: dict[str, Any]) -> None:
        self.version = from_server(self.actor.restore.remote(tensors, counts))

    def stats(self) -> dict[str, Any]:
        return from_server(self.actor.stats.remote())


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
        self.server_restarts = 0
        self.slots: list[WorkerSlot] = []
        self.revivals: dict[ray.ObjectRef, WorkerSlot] = {}
        self.reviving_since: dict[int, float] = {}  # worker index -> when it was lost (or started)
        self.longest = {"train": None, "eval": None}  # the longest call of each kind, in seconds
        self.batch_size = 1  # until a worker says how many clients it trains together
        try:
            self.group = reserve_workers(cfg, f"fedsim:{self.run_id}")
            self.server = self._server()
            self.slots = [WorkerSlot(i, self._actor(i)) for i in range(cfg.runtime.num_workers)]
            for slot in self.slots:  # up once placement() answers; one lost while it starts is replaced
                self._await_revival(slot)
            self.batching = self._scatter([lambda actor: actor.batching.remote()], per_worker=1)[0]
            self._await_starting_workers()
        except BaseException:
            self.shutdown()
            raise
        self.batch_size = self.batching["clients_per_batch"]
        self.batches = Batches(self.batch_size)
        self.published: ray.ObjectRef | None = None
        self.jobs: dict[ClientTask, Job] = {}  # submitted, not yet settled or discarded
        self.queue: deque[list[Job]] = deque()  # batches waiting for a worker with room
        self.waiting_on: dict[ray.ObjectRef, Job] = {}  # results of tries in flight (discarded ones too)
        self.finished_waiting: set[Job] = set()  # finished, not yet handed to the loop
        self.results_bound = RESULTS_WAITING * self.capacity_per_worker * self.batch_size * len(self.slots)
        self.peak_waiting = {"results": 0, "states": 0}  # the most held on the driver's node at once
        self.with_state = ClientSet(cfg.partition.num_clients)  # clients the aggregator actor holds a state for
        self.reruns = {"unfinished": 0, "finished": 0}  # tries lost before / after they finished

    def _await_starting_workers(self) -> None:
        """Until every worker has started (one lost as it starts is replaced), or, after
        ``runtime.resource_timeout_s`` (at least ``MIN_CALL_TIMEOUT_S``), with those that did."""
        deadline = time.monotonic() + max(self.cfg.runtime.resource_timeout_s, MIN_CALL_TIMEOUT_S)
        while self.revivals and time.monotonic() < deadline:
            left = deadline - time.monotonic()
            ready, _ = ray.wait(list(self.revivals), num_returns=1, timeout=max(min(WAIT_REPORT_S, left), 0.0))
            for ref in ready:
                self._revived(self.revivals[ref])
        if self.revivals:
            log.warning("starting with %d of %d workers; the others join when Ray places them",
                        len(self.slots) - len(self.revivals), len(self.slots))

    def initial_weights(self) -> NamedTensors:
        """The adapter every worker starts from (the same LoRA init on each), from a live worker."""
        return self._scatter([lambda actor: actor.initial_weights.remote()], per_worker=1)[0]

    def data_summary(self) -> DataSummary:
        """Shard sizes, headline metric and chance levels of the run's data (the same on every worker)."""
        return self._scatter([lambda actor: actor.data_summary.remote()], per_worker=1)[0]

    def _server(self):
        # Named so that users (and tests) can find a run's server: ray.util.list_named_actors().
        name = f"fedsim:{self.run_id}:server:{self.server_restarts}"
        return AggregatorActor.options(num_cpus=0, name=name, scheduling_strategy=on_driver_node()).remote()

    def replace_server(self) -> None:
        """After ``ServerLost``: a new aggregator actor, and nothing of the old one's tasks kept. Tries still in
        flight run out and their results are dropped; the loop starts again from the last checkpoint."""
        log.warning("starting a new aggregator actor; the run continues from its last checkpoint")
        ray.kill(self.server, no_restart=True)  # it may hang rather than be dead
        for job in self.jobs.values():
            job.discarded = True
        self.jobs.clear()
        self.queue.clear()
        self.finished_waiting.clear()
        self.batches = Batches(self.batch_size)
        self.published = None
        self.with_state = ClientSet(self.cfg.partition.num_clients)
        self.server_restarts += 1
        self.server = self._server()

    def _check_server(self) -> None:
        """Raise ``ServerLost`` if the aggregator actor is gone: a call that lost an argument may have lost it
        with the server (a published version lives in its object store), not with a worker."""
        from_server(self.server.version.remote())

    # ------------------------------------------------------------------------------- workers
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

    def _lost(self, slot: WorkerSlot, actor: Any, err: BaseException) -> None:
        """A call to ``actor`` failed as if it died: unless the server is what died (``ServerLost``), take no
        task there until it answers again."""
        self._check_server()
        if actor is not slot.actor or slot.revival is not None:
            return
        log.warning("worker %d lost (%s); its tasks run again, and Ray restarts it", slot.index, type(err).__name__)
        # A lost result (ObjectLostError) may mean a dead node or only a lost object with the worker alive: it
        # counts now if the worker's node is dead (it may never come back), else once the worker answers from a
        # new process (_revived).
        if not isinstance(err, ObjectLostError) or not node_alive(slot.placement.get("node_id")):
            self._count_loss(slot)
        self._await_revival(slot)

    def _count_loss(self, slot: WorkerSlot) -> None:
        slot.restarts += 1
        slot.loss_counted = True

    def _await_revival(self, slot: WorkerSlot) -> None:
        slot.revival = slot.actor.placement.remote()  # waits through a restart
        self.revivals[slot.revival] = slot
        self.reviving_since.setdefault(slot.index, time.monotonic())

    def _revived(self, slot: WorkerSlot) -> None:
        ref, slot.revival = slot.revival, None
        del self.revivals[ref]
        try:
            placement = ray.get(ref)
        except LOST as err:  # past its restarts, or killed for good
            log.warning("worker %d did not come back: %s", slot.index, str(err).strip().splitlines()[0][:300])
            self._replace(slot)
            return
        self.reviving_since.pop(slot.index, None)
        slot.progress_at = time.monotonic()
        if slot.placement and placement["pid"] != slot.placement.get("pid"):
            if not slot.loss_counted:
                slot.restarts += 1
            log.warning("worker %d is back, on node %s", slot.index, placement["node_id"][:8])
        slot.placement, slot.loss_counted = placement, False

    def _replace(self, slot: WorkerSlot) -> None:
        slot.replacements += 1
        if slot.replacements > REPLACEMENTS:
            raise RuntimeError(f"worker {slot.index} could not be replaced in {REPLACEMENTS} attempts; the cluster "
                               f"may have lost the resources it needs; continue later with: {self._resume_hint()}")
        if slot.replacements > 1:
            # A replacement may land in a bundle whose node is dead but not yet declared so (Ray notices by
            # missed heartbeats); it then dies too, and the next one goes where Ray moved the bundle.
            time.sleep(min(2.0 ** (slot.replacements - 2), 15.0))
        log.warning("worker %d could not be restarted; starting a replacement", slot.index)
        ray.kill(slot.actor, no_restart=True)
        slot.actor = self._actor(slot.index)
        slot.busy = 0
        self._await_revival(slot)

    def _restart_hung(self, slot: WorkerSlot, waited_s: float) -> None:
        """Kill a worker that made no progress for its call timeout; Ray restarts it, and its calls fail and
        run again (a hung call cannot be cancelled: only its process can go)."""
        slot.hung += 1
        self._count_loss(slot)
        log.warning("worker %d made no progress for %.0f s (runtime.task_timeout_s=%g, 0: derived); restarting it "
                    "and running its calls again", slot.index, waited_s, self.cfg.runtime.task_timeout_s)
        ray.kill(slot.actor, no_restart=False)
        self._await_revival(slot)

    def _resume_hint(self) -> str:
        return f"fedsim run --resume {self.cfg.output.dir or 'RUN_DIR'}"

    def _check_revivals(self) -> None:
        """Fail, rather than wait forever, when no worker has been live for ``runtime.resource_timeout_s`` (at
        least ``MIN_CALL_TIMEOUT_S``: a worker that comes back loads its model first)."""
        if any(s.revival is None for s in self.slots) or not self.reviving_since:
            return
        bound = max(self.cfg.runtime.resource_timeout_s, MIN_CALL_TIMEOUT_S)
        waited = time.monotonic() - max(self.reviving_since.values())
        if waited > bound:
            raise RuntimeError(f"no worker came back within runtime.resource_timeout_s={bound:g} s (Ray could not "
                               f"place them: the cluster lost the resources they need); continue later with: "
                               f"{self._resume_hint()}")
        log.warning("waiting for %d worker(s) to come back (Ray restarts them once their placement bundles fit on "
                    "a live node; %.0f s left)", len(self.revivals), bound - waited)

    # ------------------------------------------------------------------------------- tasks
    def publish(self, version: int, handle: ray.ObjectRef) -> None:
        self.published = handle

    def submit(self, task: ClientTask) -> None:
        job = Job(task, self.published, task.client_id in self.with_state)
        self.jobs[task] = job
        self._enqueue(self.batches.add(job, self.published))

    def _enqueue(self, batches: list[list[Job]]) -> None:
        for batch in batches:
            for job in batch:
                job.batch = batch
            self.queue.append(batch)
        self._pump()

    def _pump(self, awaited: Job | None = None) -> None:
        """Hand waiting batches, in order, to the least busy workers with room (lowest index among equals); a
        retry skips the worker it raised on. While finished results waiting for the loop and tasks on their way
        add up to ``results_bound``, only the batch of the task the loop waits for (``awaited``) goes."""
        for batch in list(self.queue):
            held = len(self.finished_waiting) + sum(s.busy for s in self.slots)
            if held + len(batch) > self.results_bound and awaited not in batch:
                continue
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
        for job in jobs:  # fetched now, not at submit: only tasks on their way hold a state on this node
            if job.has_state and job.state_in is None:
                job.state_in = self.server.get_state.remote(job.task.client_id)
        refs = slot.actor.train_batch.options(num_returns=3 * len(jobs)).remote(
            [job.task for job in jobs], jobs[0].published, *(job.state_in for job in jobs))
        for i, job in enumerate(jobs):
            job.slot, job.actor = slot, slot.actor
            job.update, job.state, job.metrics_ref = refs[3 * i:3 * i + 3]
            job.outstanding = {job.update, job.state}
            for ref in job.outstanding:
                self.waiting_on[ref] = job
        if not slot.busy:
            slot.progress_at = time.monotonic()
        slot.busy += len(jobs)
        states = sum(1 for j in self.jobs.values() if j.state_in is not None and j not in self.finished_waiting)
        self.peak_waiting["states"] = max(self.peak_waiting["states"], states)

    def _hang_deadline(self, slot: WorkerSlot) -> float:
        return slot.progress_at + call_timeout(self.cfg.runtime.task_timeout_s, self.longest["train"])

    def _wait(self) -> None:
        """Take in everything finished by now, blocking until something is: results, workers back. Workers
        that made no progress within their call timeout are restarted meanwhile."""
        first: list = []
        while not first:
            refs = [*self.waiting_on, *self.revivals]
            if not refs:
                raise RuntimeError(f"{len(self.queue)} task(s) wait for a worker, but no worker is running anything")
            busy = [s for s in self.slots if s.busy and s.revival is None]
            now = time.monotonic()
            tick = min([WAIT_REPORT_S, *(self._hang_deadline(s) - now for s in busy)])
            first, _ = ray.wait(refs, num_returns=1, fetch_local=True, timeout=max(tick, 0.5))
            if first:
                break
            now = time.monotonic()
            for slot in busy:
                if now > self._hang_deadline(slot):
                    self._restart_hung(slot, now - slot.progress_at)
            if not self.waiting_on:
                self._check_revivals()
        done, _ = ray.wait([*self.waiting_on, *self.revivals], num_returns=len(self.waiting_on) + len(self.revivals),
                           timeout=0, fetch_local=True)
        for ref in dict.fromkeys([*first, *done]):
            if ref in self.revivals:
                self._revived(self.revivals[ref])
                continue
            job = self.waiting_on.pop(ref, None)
            if job is None:
                continue
            job.outstanding.discard(ref)
            if not job.outstanding:
                self._finished(job)

    def _finished(self, job: Job) -> None:
        slot = job.slot
        if job.actor is slot.actor:
            slot.busy -= 1
            slot.progress_at = time.monotonic()
        try:
            metrics = ray.get(job.metrics_ref)
        except LOST as err:
            self._lost(slot, job.actor, err)
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
        call_s = metrics.get("task_seconds", 0.0) * len(job.batch)
        self.longest["train"] = max(self.longest["train"] or 0.0, call_s)
        if job.actor is slot.actor and metrics.get("pid", slot.placement.get("pid")) != slot.placement.get("pid"):
            slot.restarts += 1  # restarted between tasks: its node (placement) is read again for stats
            slot.placement["pid"], slot.stale = metrics["pid"], True
        if not job.discarded:
            job.metrics = metrics
            self.finished_waiting.add(job)
            self.peak_waiting["results"] = max(self.peak_waiting["results"], len(self.finished_waiting))

    def _raised(self, job: Job, err: RayTaskError) -> None:
        cause = err.cause if err.cause is not None else err
        if isinstance(cause, StateStoreError):  # a client's stored state cannot be read: stop, naming the file
            raise cause
        reason = failure_reason(cause)
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
        self.finished_waiting.discard(job)
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
            self._pump(awaited=job)
            self._wait()
        self.finished_waiting.discard(job)
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
        self._lost(job.slot, job.actor, err)
        self._again(job, finished=True)
        self._until_done(job)
        return job.update

    def settle(self, task: ClientTask, accepted: bool) -> None:
        """Store the client's new state only once its update is accepted; otherwise it is forgotten."""
        job = self.jobs[task]
        try:
            while accepted and job.metrics.get("has_state", True):
                try:
                    from_server(self.server.put_state.remote(task.client_id, job.state))
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
        self.finished_waiting.discard(job)
        # A try in flight runs out and its result is dropped when it comes. Not ray.cancel: cancelling a call
        # queued on an actor leaves a gap in the actor's call sequence, and the actor's next call (an
        # evaluation) then times out waiting for it.

    # ------------------------------------------------------------------------------- calls on live workers
    def _scatter(self, calls: Sequence[Callable[[Any], ray.ObjectRef]], per_worker: int) -> list[Any]:
        """``ray.get`` of each call (a function of a worker actor) made on a live worker, at most ``per_worker``
        at once on each, the least loaded first; a call lost with its worker, or that outlives its timeout
        (behind the training calls queued on that worker), runs again on a live one. Results in call order."""
        results: list[Any] = [None] * len(calls)
        todo = deque(range(len(calls)))
        lost = [0] * len(calls)
        out: dict[ray.ObjectRef, tuple[int, WorkerSlot, Any, float]] = {}
        train_s = call_timeout(self.cfg.runtime.task_timeout_s, self.longest["train"])

        def deadline(slot: WorkerSlot, sent: float) -> float:
            queued = -(-slot.busy // self.batch_size)  # training calls ahead of it on that worker
            return sent + call_timeout(self.cfg.runtime.task_timeout_s, self.longest["eval"]) + queued * train_s

        while todo or out:
            while todo:
                load = {s.index: 0 for s in self.slots if s.revival is None}
                for _, slot, _, _ in out.values():
                    load[slot.index] = load.get(slot.index, 0) + 1
                live = [s for s in self.slots if s.revival is None and load[s.index] < per_worker]
                if not live:
                    break
                slot = min(live, key=lambda s: (load[s.index], s.busy, s.index))
                index = todo.popleft()
                out[calls[index](slot.actor)] = (index, slot, slot.actor, time.monotonic())
            refs = [*out, *self.revivals]
            if not refs:
                raise RuntimeError("no worker is live and none is coming back")
            now = time.monotonic()
            tick = min([WAIT_REPORT_S, *(deadline(slot, sent) - now for _, slot, _, sent in out.values())])
            ready, _ = ray.wait(refs, num_returns=1, timeout=max(tick, 0.5))
            if not ready:
                now = time.monotonic()
                for index, slot, actor, sent in list(out.values()):
                    if now > deadline(slot, sent) and actor is slot.actor and slot.revival is None:
                        self._restart_hung(slot, now - sent)
                if not out:
                    self._check_revivals()
                continue
            (ref,) = ready
            if ref in self.revivals:
                self._revived(self.revivals[ref])
                continue
            index, slot, actor, sent = out.pop(ref)
            try:
                results[index] = ray.get(ref)
                self.longest["eval"] = max(self.longest["eval"] or 0.0, time.monotonic() - sent)
            except LOST as err:
                self._lost(slot, actor, err)
                lost[index] += 1
                if lost[index] >= LOST_ATTEMPTS:
                    raise RuntimeError(f"a call was lost with its worker {lost[index]} times; the run stops; "
                                       f"continue it later with: {self._resume_hint()}") from err
                todo.appendleft(index)
        return results

    def evaluate(self, handle: ray.ObjectRef, ablations: bool = True) -> dict[str, float]:
        """Each worker scores a shard of the test split's batches; the pooled scores give the metrics one
        worker would have computed over the whole split (fedsim.evaluation.combine). A shard whose worker is
        lost is scored by another."""
        count = len(self.slots)
        shards = self._scatter([lambda actor, i=i: actor.evaluate_shard.remote(handle, i, count, ablations)
                                for i in range(count)], per_worker=count)
        return combine([scores for shard in shards for scores in shard])

    def evaluate_personalized(self, clients: np.ndarray, fallback: ray.ObjectRef) -> dict[str, float]:
        """Workers score the clients' own adapters, PERSONALIZED_CHUNK clients a call; each call's states go
        from the aggregator actor to its worker when the call is made, never through the driver, and at most
        two calls a worker are out at once, so that the object store holds a few chunks of states, not every
        client's."""
        chunks = [clients[i:i + PERSONALIZED_CHUNK].tolist() for i in range(0, len(clients), PERSONALIZED_CHUNK)]
        parts = self._scatter([lambda actor, c=chunk: actor.evaluate_states.remote(self.server.get_states.remote(c),
                                                                                     fallback)
                               for chunk in chunks], per_worker=2)
        return mean_metrics([m for part in parts for m in part])

    def adapter_files(self, handle: ray.ObjectRef) -> dict[str, bytes]:
        return self._scatter([lambda actor: actor.adapter_files.remote(handle)], per_worker=1)[0]

    # ------------------------------------------------------------------------------- client states
    def open_client_states(self, directory: Path, checkpointed: StateManifest | None) -> None:
        """The aggregator actor keeps them, on the driver's node: ``directory`` is on that node's disk."""
        from_server(self.server.open_states.remote(str(Path(directory).resolve()), self.cfg.partition.num_clients,
                                                   state_cache_bytes(self.cfg), checkpointed))
        if checkpointed is not None:
            self.with_state.update(checkpointed.clients.tolist())

    def client_states(self) -> StateManifest:
        return from_server(self.server.pin_states.remote())

    def client_states_saved(self) -> None:
        from_server(self.server.release_states.remote())

    def personalized_digest(self) -> str:
        return from_server(self.server.personalized_digest.remote())

    def fetch(self, handle: ray.ObjectRef) -> Published:
        return ray.get(handle, timeout=SERVER_TIMEOUT_S)

    def share(self, published: Published) -> ray.ObjectRef:
        return ray.put(published)

    def _bundles_placed(self) -> bool:
        """Whether every worker's placement bundle sits on a live node, so that Ray can restart a lost worker now
        (False while Ray looks for a node for the bundles of a dead one: no worker comes back from those soon)."""
        return self.group is None or placement_group_table(self.group).get("state") == "CREATED"

    def stats(self) -> dict[str, Any]:
        # Workers coming back by now are taken in, so that each worker's node is where it runs now; the wait is
        # only for workers that can come back (a run that lost a worker for good does not wait at its end).
        if self.revivals:
            wait_s = STATS_REVIVAL_WAIT_S if self._bundles_placed() else 0.0
            ready, _ = ray.wait(list(self.revivals), num_returns=len(self.revivals), timeout=wait_s)
            for ref in ready:
                self._revived(self.revivals[ref])
        for slot in self.slots:
            if slot.stale and slot.revival is None:
                try:
                    slot.placement, slot.stale = ray.get(slot.actor.placement.remote(), timeout=SERVER_TIMEOUT_S), False
                except (*LOST, GetTimeoutError):
                    pass
        return {"workers": [{"worker": s.index, "tasks": s.tasks, "failed_tasks": s.failures, "restarts": s.restarts,
                             "hung": s.hung, "busy_seconds": s.busy_seconds, **s.placement} for s in self.slots],
                "worker_restarts": sum(s.restarts for s in self.slots), "server_restarts": self.server_restarts,
                "batching": self.batching, "tasks_rerun": dict(self.reruns),
                "held_at_once": {**self.peak_waiting, "bound": self.results_bound}}

    def shutdown(self) -> None:
        for slot in self.slots:
            ray.kill(slot.actor, no_restart=True)
        if self.server is not None:
            ray.kill(self.server, no_restart=True)
        if self.group is not None:
            remove_placement_group(self.group)
