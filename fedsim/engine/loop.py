"""The federation loop, shared by every engine: scheduler -> client tasks -> aggregator -> metrics.

An engine supplies an ``Executor`` (where client tasks run: in this process, or on Ray workers) and an
``AggregatorLike`` (the server side: a plain ``Aggregator`` or a Ray actor around one). Updates and global
versions travel between them as opaque handles (the objects themselves in process, object references on
Ray), so the loop never holds more than a handle per task in flight.

Every decision (who is selected, who drops out, in which order updates are applied) follows the seed and
the virtual clock, never the order in which results happen to arrive: the same config gives the same
adapter on any engine and any number of workers. Only the order in which tasks are handed out is free:
a synchronous round hands out its largest tasks first, so that workers finish the round together.

A client task that raises (after the executor's retry) is that client's dropout for the round, counted by
reason (``failed_updates`` in summary.json); the run goes on.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable, Iterator, Protocol, Sequence

import numpy as np
from tqdm.auto import tqdm

from fedsim import compression
from fedsim.aggregator import accountant_for
from fedsim.attacks import choose_attackers
from fedsim.checkpoint import Checkpoint, read_checkpoint, write_checkpoint
from fedsim.config import ExperimentConfig, to_yaml
from fedsim.messages import ClientTask, NamedTensors, Published
from fedsim.output import RunWriter, library_versions
from fedsim.scheduler import AsyncPlanner, Clock, DeviceProfiles, SyncPlanner, build_availability
from fedsim.seeding import rng_for, sample_without_replacement
from fedsim.statestore import STATES_DIR, StateManifest
from fedsim.trackers import Trackers
from fedsim.training import round_lr, samples_per_task

log = logging.getLogger(__name__)


class ClientTaskFailed(Exception):
    """A client task that raised (and raised again when retried): the client drops out of its round."""

    def __init__(self, task: ClientTask, reason: str):
        super().__init__(f"client {task.client_id} (task {task.seed_round}) failed: {reason}")
        self.task = task
        self.reason = reason  # "exception:<type name>", or "worker_lost"


class Executor(Protocol):
    """Runs client tasks. ``submit`` queues; ``result`` blocks until that task is done (re-running it
    elsewhere if its worker died) or raises ``ClientTaskFailed``; ``settle`` then stores the client's new
    state (SCAFFOLD's c_i, a personal adapter) if the aggregator accepted its update, and forgets it
    otherwise, so that rejected, late, dropped and too-stale updates leave a client's stored state as it
    was. ``stats`` may give each worker's ``busy_seconds`` (time in client tasks).

    Client states live in a ``fedsim.statestore.ClientStateStore`` that ``open_client_states`` opens before
    the first task, with a checkpoint's states when resuming; ``client_states`` gives the manifest a
    checkpoint records (the store keeps its files from then on) and ``client_states_saved`` says that the
    checkpoint is written (the files only the one before referred to may go)."""

    def publish(self, version: int, handle: Any) -> None: ...
    def submit(self, task: ClientTask) -> None: ...
    def result(self, task: ClientTask) -> tuple[Any, dict[str, float]]: ...
    def settle(self, task: ClientTask, accepted: bool) -> None: ...
    def discard(self, task: ClientTask) -> None: ...
    def evaluate(self, handle: Any, ablations: bool = True) -> dict[str, float]: ...
    def evaluate_personalized(self, clients: np.ndarray, fallback: Any) -> dict[str, float]: ...
    def adapter_files(self, handle: Any) -> dict[str, bytes]: ...
    def open_client_states(self, directory: Path, checkpointed: StateManifest | None) -> None: ...
    def client_states(self) -> StateManifest: ...
    def client_states_saved(self) -> None: ...
    def personalized_digest(self) -> str: ...
    def fetch(self, handle: Any) -> Published: ...
    def share(self, published: Published) -> Any: ...
    def stats(self) -> dict[str, Any]: ...


class AggregatorLike(Protocol):
    version: int  # the current global version, known without a snapshot

    def submit(self, update: Any, base: Any = None) -> str: ...
    def close_round(self) -> int: ...
    def snapshot(self) -> tuple[int, Any]: ...
    def state(self) -> tuple[NamedTensors, dict[str, Any]]: ...
    def restore(self, tensors: NamedTensors, counts: dict[str, Any]) -> None: ...
    def stats(self) -> dict[str, Any]: ...


@dataclass
class Tally:
    """Counters that end up in summary.json."""

    updates: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    failed: int = 0  # clients that dropped out (dispatched, never reported; task failures included)
    failed_by_reason: dict[str, int] = field(default_factory=dict)  # client tasks that failed, by reason
    late: int = 0  # reported after their round closed
    no_quorum: int = 0  # of those, reported in time to a round that missed its quorum
    simulated_s: float = 0.0
    train_seconds: float = 0.0


class InFlight:
    """Asynchronous tasks on the way (by dispatch id) and the published versions they train from."""

    def __init__(self) -> None:
        self.tasks: dict[int, ClientTask] = {}
        self.handles: dict[int, Any] = {}  # version -> handle, for the versions some task still trains from

    def add(self, dispatch_id: int, task: ClientTask, handle: Any) -> None:
        self.tasks[dispatch_id] = task
        self.handles[task.base_version] = handle

    def pop(self, dispatch_id: int) -> tuple[ClientTask, Any]:
        """The task and the handle of the version it trains from (dropped here once no task uses it)."""
        task = self.tasks.pop(dispatch_id)
        handle = self.handles[task.base_version]
        if all(t.base_version != task.base_version for t in self.tasks.values()):
            del self.handles[task.base_version]
        return task, handle


def personalized_sample(cfg: ExperimentConfig, step: int) -> np.ndarray:
    """The clients whose own adapters the evaluation after ``step`` scores, ascending: all of them, or
    ``eval.personalized_clients`` drawn from the seed and the step (in O(k) time, whatever the number of
    clients)."""
    n, k = cfg.partition.num_clients, cfg.eval.personalized_clients
    if k in (0, n):
        return np.arange(n)
    return np.sort(sample_without_replacement(rng_for(cfg.seed, "personalized_eval", step), n, k))


def mean(values: Iterable[float]) -> float:
    values = list(values)
    return float(np.mean(values)) if values else float("nan")


class FederationLoop:
    def __init__(self, cfg: ExperimentConfig, writer: RunWriter, executor: Executor, aggregator: AggregatorLike,
                 shard_sizes: Sequence[int], adapter_bytes: int, personalized: bool, asynchronous: bool,
                 trackers: Trackers | None = None):
        self.cfg = cfg
        self.writer = writer
        self.trackers = trackers or Trackers()  # output.trackers: they receive what the writer writes
        self.executor = executor
        self.aggregator = aggregator
        self.shard_sizes = shard_sizes
        self.adapter_bytes = adapter_bytes
        # what one update takes on the uplink: deltas are float32, 4 bytes an element before encoding
        self.upload_bytes = compression.payload_bytes(cfg.compression.kind, adapter_bytes // 4,
                                                      cfg.compression.density)
        self.accountant = accountant_for(cfg)
        self.personalized = personalized
        self.asynchronous = asynchronous
        num_clients = cfg.partition.num_clients
        self.devices = DeviceProfiles.from_config(cfg.scheduler, num_clients, cfg.seed)
        self.availability = build_availability(cfg.scheduler, num_clients, cfg.seed)
        self.clock = Clock(cfg.scheduler, self.devices)
        self.tally = Tally()
        self.metrics: dict[str, float] = {}
        self.initial_handle: Any = None
        self.zero_shot: dict[str, float] | None = None
        self.current_version = 0
        self.first_round = 1
        self.rounds_wall_s = 0.0  # wall time of the rounds run by this process (the busy fractions' base)
        self.resumed_async: Checkpoint | None = None  # a checkpoint taken mid-flight, for run_async to continue

    # --------------------------------------------------------------------------------------- checkpoints
    def save_checkpoint(self, round_idx: int, planner: AsyncPlanner | None = None,
                        in_flight: InFlight | None = None) -> None:
        """Asynchronous runs also save the planner and the tasks in flight with the versions they train from."""
        tensors, counts = self.aggregator.state()
        state = {"tally": asdict(self.tally), "metrics": self.metrics, "zero_shot": self.zero_shot,
                 "current_version": self.current_version, "aggregator": counts,
                 "accountant": self.accountant.state() if self.accountant else None}
        published = {}
        if planner is not None:
            state["planner"] = planner.state()
            state["in_flight"] = {str(i): asdict(task) for i, task in in_flight.tasks.items()}
            published = {v: self.executor.fetch(handle) for v, handle in in_flight.handles.items()}
        write_checkpoint(self.writer.dir, Checkpoint(round_idx, tensors, self.executor.client_states(), state,
                                                     published))
        # Only now, the new checkpoint durable and the old one gone, may the old one's state files go.
        self.executor.client_states_saved()

    def restore(self, ckpt: Checkpoint) -> None:
        """Continue after round ``ckpt.round``: server, counters and metrics as they were (client states:
        ``run_federation`` opens the store with the checkpoint's)."""
        self.aggregator.restore(ckpt.server, ckpt.state["aggregator"])
        self.tally = Tally(**ckpt.state["tally"])
        self.metrics = ckpt.state["metrics"]
        self.zero_shot = ckpt.state["zero_shot"]
        self.current_version = ckpt.state["current_version"]
        if self.accountant:
            self.accountant = type(self.accountant).from_state(ckpt.state["accountant"])
        self.first_round = ckpt.round + 1
        if "planner" in ckpt.state:
            self.resumed_async = ckpt

    def resubmit(self, planner: AsyncPlanner, in_flight: InFlight, current: Any) -> None:
        """Put the checkpoint's tasks back in flight, each from the version it was dispatched with."""
        ckpt = self.resumed_async
        planner.restore(ckpt.state["planner"])
        handles = {v: self.executor.share(published) for v, published in ckpt.published.items()}
        for dispatch_id, fields in sorted(ckpt.state["in_flight"].items(), key=lambda item: int(item[0])):
            task = ClientTask(**fields)
            self.executor.publish(task.base_version, handles[task.base_version])
            in_flight.add(int(dispatch_id), task, handles[task.base_version])
            self.executor.submit(task)
        self.executor.publish(self.current_version, current)

    # --------------------------------------------------------------------------------------- helpers
    def bytes_per_task(self) -> tuple[int, int]:
        """(down, up): a personalized (local-only) client exchanges nothing."""
        return (0, 0) if self.personalized else (self.adapter_bytes, self.upload_bytes)

    def modeled_duration(self, client: int) -> float:
        down, up = self.bytes_per_task()
        samples = samples_per_task(int(self.shard_sizes[client]), self.cfg.training)
        return self.clock.task_duration(client, samples, down, up).total_s

    def largest_first(self, clients: Iterable[int]) -> list[int]:
        """Hand-out order of a round's tasks: most samples first (ties by id), so no worker is left with a
        long task at the end of the round while the others idle."""
        return sorted(clients, key=lambda c: (-samples_per_task(int(self.shard_sizes[c]), self.cfg.training), c))

    def count_failure(self, failure: ClientTaskFailed) -> None:
        log.warning("%s; counted as the client's dropout", failure)
        self.tally.failed += 1
        reasons = self.tally.failed_by_reason
        reasons[failure.reason] = reasons.get(failure.reason, 0) + 1

    def measured_duration(self, client: int, metrics: dict[str, float]) -> float:
        down, up = self.bytes_per_task()
        return self.clock.task_duration(client, int(metrics["samples_processed"]), down, up,
                                        metrics["compute_seconds"]).total_s

    def publish(self) -> Any:
        version, handle = self.aggregator.snapshot()
        self.executor.publish(version, handle)
        return handle

    def evaluate(self, handle: Any, step: int, total: int) -> dict[str, float]:
        if self.personalized:
            return self.executor.evaluate_personalized(personalized_sample(self.cfg, step), self.initial_handle)
        every = self.cfg.eval.ablations_every
        return self.executor.evaluate(handle, ablations=not every or step % every == 0 or step == total)

    def log_step(self, step: int, total: int, handle: Any, record: dict[str, Any]) -> None:
        if step % self.cfg.eval.every == 0 or step == total:
            self.metrics = record["eval"] = self.evaluate(handle, step, total)
        record["simulated_seconds"] = self.tally.simulated_s
        if self.accountant:  # one privacy step per noised server step, i.e. per version
            self.accountant.step(self.current_version - self.accountant.steps)
            record["epsilon"] = self.accountant.epsilon()
        self.writer.log_round(record)
        self.trackers.log_step(record)
        log.info("round %d/%d: loss %.4f, simulated %.1fs%s", step, total, record.get("train_loss", float("nan")),
                 self.tally.simulated_s, f", eval {record['eval']}" if "eval" in record else "")

    # --------------------------------------------------------------------------------------- run
    def run(self, rounds: int) -> None:
        try:
            self.run_rounds(rounds)
        except BaseException:
            self.trackers.fail()
            raise

    def run_rounds(self, rounds: int) -> None:
        self.initial_handle = self.publish()
        resumed = self.first_round > 1
        if (self.cfg.eval.zero_shot or rounds == 0) and not resumed:
            self.zero_shot = self.executor.evaluate(self.initial_handle)
            self.metrics = dict(self.zero_shot)
        disable = {"auto": None, "always": False, "never": True}[self.cfg.output.progress]
        bar = tqdm(total=rounds, initial=self.first_round - 1, desc="rounds", unit="round", disable=disable)
        steps = self.run_async(rounds) if self.asynchronous else self.run_sync(rounds)
        for step in steps:
            bar.update(1)
            rate = self.tally.updates / self.tally.train_seconds if self.tally.train_seconds else 0.0
            bar.set_postfix(round=step, updates_per_s=f"{rate:.2f}", simulated=f"{self.tally.simulated_s:.0f}s")
        bar.close()

    def run_sync(self, rounds: int) -> Iterator[int]:
        cfg = self.cfg
        planner = SyncPlanner(cfg.scheduler, cfg.partition.num_clients, cfg.clients_per_round(), cfg.seed,
                              self.devices, self.availability)
        measured = cfg.scheduler.compute_time == "measured"
        down, up = self.bytes_per_task()
        every = cfg.checkpoint.every
        for round_idx in range(self.first_round, rounds + 1):
            started = time.perf_counter()
            selection = planner.select_when_available(round_idx, self.tally.simulated_s)
            start_s = selection.start_s  # later than now if nobody was available now
            live = [c for c in selection.dispatched if c not in selection.failed]
            lr = round_lr(cfg.training, round_idx, rounds)
            tasks = {c: ClientTask(c, round_idx, self.current_version, lr) for c in live}
            held: dict[int, tuple[Any, dict[str, float]]] = {}
            failures = 0
            if measured:  # durations are known only after training: train every live client, then decide
                for client in self.largest_first(live):
                    self.executor.submit(tasks[client])
                for client in live:
                    try:
                        held[client] = self.executor.result(tasks[client])
                    except ClientTaskFailed as failure:  # never reports: not in the round's durations
                        self.count_failure(failure)
                        failures += 1
                outcome = planner.close(round_idx, start_s, {c: self.measured_duration(c, m)
                                                             for c, (_, m) in held.items()})
            else:  # modeled durations: who is late is known up front, and late clients are not trained
                outcome = planner.close(round_idx, start_s, {c: self.modeled_duration(c) for c in live})
            if not outcome.quorum_met:  # closed at its deadline without a quorum: the round is wasted
                self.tally.no_quorum += len(outcome.kept)
                outcome = replace(outcome, kept=[], late=outcome.late + outcome.kept)
            for client in self.largest_first(c for c in outcome.kept if c not in held):
                self.executor.submit(tasks[client])
            losses, unreported = [], 0
            for client in outcome.kept:  # each update goes to the aggregator as it comes, never a whole round
                try:
                    update, metrics = held.pop(client) if client in held else self.executor.result(tasks[client])
                    accepted = self.aggregator.submit(update) == "accepted"
                except ClientTaskFailed as failure:
                    self.count_failure(failure)
                    failures += 1
                    unreported += 1
                    continue
                self.executor.settle(tasks[client], accepted)
                if accepted:
                    self.tally.updates += 1
                    losses.append(metrics["train_loss"])
            for client in held:  # trained (measured durations), but late: their new state is dropped too
                self.executor.settle(tasks[client], accepted=False)
            self.current_version = self.aggregator.close_round()
            handle = self.publish()

            round_s = time.perf_counter() - started
            self.tally.train_seconds += round_s
            self.rounds_wall_s += round_s
            self.tally.failed += len(selection.failed)
            self.tally.late += len(outcome.late)
            round_down = down * len(selection.dispatched)
            round_up = up * (len(outcome.kept) + len(outcome.late) - unreported)
            self.tally.bytes_down += round_down
            self.tally.bytes_up += round_up
            self.tally.simulated_s = outcome.end_s
            record = {"round": round_idx, "clients": list(outcome.kept), "train_loss": mean(losses), "lr": lr,
                      "failed": len(selection.failed) + failures, "late": len(outcome.late),
                      "bytes_up": round_up, "bytes_down": round_down,
                      "wall_seconds": time.perf_counter() - started}
            self.log_step(round_idx, rounds, handle, record)
            if every and (round_idx % every == 0 or round_idx == rounds):
                self.save_checkpoint(round_idx)
            yield round_idx

    def run_async(self, versions: int) -> Iterator[int]:
        """Keep C clients in flight on the virtual clock; apply updates in simulated finish-time order."""
        cfg = self.cfg
        concurrency = cfg.scheduler.concurrency or cfg.clients_per_round()
        planner = AsyncPlanner(cfg.scheduler, cfg.partition.num_clients, concurrency, cfg.seed,
                               self.devices, self.availability)
        down, up = self.bytes_per_task()
        in_flight = InFlight()
        handle = self.initial_handle
        every = cfg.checkpoint.every

        def launch(dispatches) -> None:
            lr = round_lr(cfg.training, self.current_version + 1, versions)
            for d in dispatches:
                planner.set_duration(d.id, self.modeled_duration(d.client))
                self.tally.bytes_down += down
                if not d.failed:
                    task = ClientTask(d.client, d.id, self.current_version, lr)
                    in_flight.add(d.id, task, handle)
                    self.executor.submit(task)

        if self.resumed_async is not None:  # continue right after the checkpointed version was published
            self.resubmit(planner, in_flight, handle)
            launch(planner.dispatch_next())
        else:
            launch(planner.start(0.0))
        started, losses, applied = time.perf_counter(), [], []
        began = started  # tasks run on during evaluations: the busy fractions' base is the whole loop
        sent = (self.tally.bytes_up, self.tally.bytes_down)  # bytes counted in earlier records
        while self.current_version < versions:
            done = planner.next_finished()
            if done is None:  # a slot stayed empty (nobody available); the clock moved to when someone may be
                launch(planner.dispatch_next())
                continue
            self.tally.simulated_s = done.finish_s
            if done.failed:
                self.tally.failed += 1
            else:
                task, base = in_flight.pop(done.id)
                try:
                    update, metrics = self.executor.result(task)
                    outcome = self.aggregator.submit(update, base)
                except ClientTaskFailed as failure:
                    self.count_failure(failure)
                    launch(planner.dispatch_next())
                    continue
                self.tally.bytes_up += up
                self.executor.settle(task, outcome == "accepted")
                if outcome == "accepted":
                    self.tally.updates += 1
                    losses.append(metrics["train_loss"])
                    applied.append(done.client)
                version = self.aggregator.version
                if version != self.current_version:
                    self.current_version = version
                    handle = self.publish()
                    self.tally.train_seconds += time.perf_counter() - started
                    record = {"round": version, "clients": applied, "train_loss": mean(losses),
                              "bytes_up": self.tally.bytes_up - sent[0],
                              "bytes_down": self.tally.bytes_down - sent[1],
                              "wall_seconds": time.perf_counter() - started}
                    self.log_step(version, versions, handle, record)
                    if every and (version % every == 0 or version == versions):
                        self.save_checkpoint(version, planner, in_flight)
                    started, losses, applied = time.perf_counter(), [], []
                    sent = (self.tally.bytes_up, self.tally.bytes_down)
                    yield version
            launch(planner.dispatch_next())
        for task in in_flight.tasks.values():  # still in flight when the run reached its last version
            self.executor.discard(task)
        self.rounds_wall_s += time.perf_counter() - began


def study_axes(cfg: ExperimentConfig, loop: FederationLoop, agg_stats: dict[str, Any]) -> dict[str, Any]:
    """summary.json's privacy, attack and compression entries (None where the axis is off)."""
    dp, accountant = cfg.privacy, loop.accountant
    privacy = None if accountant is None else {
        "mode": dp.mode, "epsilon": accountant.epsilon(), "delta": dp.delta, "steps": accountant.steps,
        "noise_multiplier": dp.noise_multiplier, "accountant": dp.accountant,
        "sampling": ("q = 1: a client taking part in every step" if dp.mode == "local" else
                     f"{dp.sampling}, q = {accountant.sample_size}/{accountant.population}"),
        "clip_norm": agg_stats["clip_norm"] if dp.mode == "central" else dp.clip_norm}
    attack = None if cfg.attack.kind == "none" else {
        "kind": cfg.attack.kind, "fraction": cfg.attack.fraction, "attackers": choose_attackers(cfg).tolist()}
    comp = None if cfg.compression.kind == "none" else {
        "kind": cfg.compression.kind, "density": cfg.compression.density,
        "error_feedback": cfg.compression.error_feedback, "bytes_per_update": loop.upload_bytes}
    return {"privacy": privacy, "attack": attack, "compression": comp}


def busy_fractions(stats: dict[str, Any], rounds_wall_s: float) -> dict[str, Any]:
    """``stats`` with each worker's ``busy_fraction``: its time in client tasks over the wall time of the
    rounds (synchronous: round starts to publishes, evaluations left out; asynchronous: the whole loop, as
    tasks run on during evaluations), and their mean as ``busy_fraction``."""
    workers = [dict(w) for w in stats.get("workers", [])]
    if not rounds_wall_s or not workers or any("busy_seconds" not in w for w in workers):
        return stats
    for worker in workers:
        worker["busy_fraction"] = worker["busy_seconds"] / rounds_wall_s
    return {**stats, "workers": workers, "busy_fraction": mean(w["busy_fraction"] for w in workers)}


def run_federation(cfg: ExperimentConfig, run_dir: Path, engine: str, executor: Executor,
                   aggregator: AggregatorLike, shard_sizes: Sequence[int], adapter_bytes: int,
                   personalized: bool, asynchronous: bool, trains: bool, resume: bool = False, *,
                   headline_metric: str, chance_metrics: dict[str, float] | None = None) -> dict[str, Any]:
    """Run every round of ``cfg`` (with ``resume``: those after the run directory's checkpoint) and write
    the run directory; returns the summary. ``headline_metric`` (the data's ``DatasetSplits.metric``: roc_auc
    for Hateful-Memes, macro_f1 for CrisisMMD, accuracy otherwise) names the metric the benchmark reports;
    ``chance_metrics`` (fedsim.chance, from the test split) what guessing scores, so that a report can draw it."""
    started = time.perf_counter()
    ckpt = read_checkpoint(run_dir) if resume else None
    writer = RunWriter(run_dir, resume_round=ckpt.round if ckpt else None)
    writer.write_config(to_yaml(cfg))
    executor.open_client_states(writer.dir / STATES_DIR, ckpt.clients if ckpt else None)
    trackers = Trackers.start(cfg, writer.dir, resumed_after=ckpt.round if ckpt else None)
    loop = FederationLoop(cfg, writer, executor, aggregator, shard_sizes, adapter_bytes, personalized, asynchronous,
                          trackers)
    if ckpt is not None:
        loop.restore(ckpt)
        log.info("resuming %s after round %d", run_dir, ckpt.round)
    rounds = cfg.federation.rounds if trains else 0
    loop.run(rounds)

    version, handle = aggregator.snapshot()
    if cfg.output.save_adapter and not personalized and trains:
        writer.write_adapter(executor.adapter_files(handle))
    agg_stats = aggregator.stats()
    tally = loop.tally
    summary = {
        "experiment": cfg.name,
        "engine": engine,
        "mode": "async" if asynchronous else "sync",
        "algorithm": {"server": cfg.algorithm.server.name, "client": cfg.algorithm.client.name},
        "num_clients": cfg.partition.num_clients,
        "clients_per_round": cfg.clients_per_round(),
        "rounds": rounds,
        "global_version": version,
        "client_updates": tally.updates,
        "headline_metric": headline_metric,
        "chance_metrics": chance_metrics or {},
        "final_metrics": loop.metrics,
        # personalized runs: how many clients' own adapters each evaluation scored (eval.personalized_clients)
        "personalized_clients_evaluated": ((cfg.eval.personalized_clients or cfg.partition.num_clients)
                                           if personalized else None),
        "zero_shot_metrics": loop.zero_shot or {},
        "wall_seconds": time.perf_counter() - started,
        "train_seconds": tally.train_seconds,
        "updates_per_second": tally.updates / tally.train_seconds if tally.train_seconds else 0.0,
        "simulated_seconds": tally.simulated_s,
        "bytes_up": tally.bytes_up,
        "bytes_down": tally.bytes_down,
        "adapter_bytes": adapter_bytes,
        "dropped_updates": tally.late + tally.failed,
        "dropped_by_reason": {"late": tally.late - tally.no_quorum, "no_quorum": tally.no_quorum,
                              "dropout": tally.failed},
        "failed_updates": dict(sorted(tally.failed_by_reason.items())),
        "rejected_updates": agg_stats["rejected_updates"],
        "rejected_by_reason": agg_stats["rejected_by_reason"],
        "stale_updates": agg_stats["stale_updates"],
        "staleness": {"histogram": agg_stats["staleness_histogram"], "mean": agg_stats["mean_staleness"]},
        "adapter_sha256": (executor.personalized_digest() if personalized
                           else agg_stats["adapter_sha256"]),
        **busy_fractions(executor.stats(), loop.rounds_wall_s),
        **study_axes(cfg, loop, agg_stats),
        "resumed_after_round": ckpt.round if ckpt else None,
        "versions": library_versions(),
        "run_dir": str(writer.dir),
    }
    writer.write_summary(summary)
    trackers.finish(summary, writer)
    return summary
