"""Who trains when on the virtual clock: synchronous rounds (over-commit, deadline, quorum) and
asynchronous dispatch with a fixed number of clients in flight (FedBuff / FedScale style).

Planners only decide; the caller trains, computes durations (``planner.clock``) and aggregates.
Every random choice is derived from the experiment seed and its coordinates (round, client, dispatch id),
never from a shared generator, so it does not depend on call order.
"""

from __future__ import annotations

import heapq
import logging
import math
from dataclasses import asdict, dataclass, field
from typing import Optional

import numpy as np

from fedsim.config import SchedulerConfig
from fedsim.scheduler._common import ceil_count, fail, hashed_uniforms
from fedsim.scheduler.availability import AlwaysAvailable, Availability, build_availability
from fedsim.scheduler.clock import Clock
from fedsim.scheduler.devices import DeviceProfiles
from fedsim.seeding import derive_seed, rng_for

log = logging.getLogger(__name__)


def check_planner_config(cfg: SchedulerConfig) -> None:
    if not (cfg.overcommit >= 1 and math.isfinite(cfg.overcommit)):
        fail("overcommit", cfg.overcommit, "a finite value >= 1")
    if not 0 <= cfg.dropout < 1:
        fail("dropout", cfg.dropout, "a value in [0, 1)")
    if not (cfg.deadline_s >= 0 and math.isfinite(cfg.deadline_s)):
        fail("deadline_s", cfg.deadline_s, "a finite value >= 0 (0: no deadline)")
    if not 0 <= cfg.quorum <= 1:
        fail("quorum", cfg.quorum, "a value in [0, 1]")
    if not cfg.concurrency >= 0:
        fail("concurrency", cfg.concurrency, "a value >= 0 (0: federation clients per round)")


def _resolve(cfg: SchedulerConfig, num_clients: int, seed: int, devices: Optional[DeviceProfiles],
             availability: Optional[Availability]) -> tuple[DeviceProfiles, Availability]:
    devices = devices if devices is not None else DeviceProfiles.from_config(cfg, num_clients, seed)
    availability = availability if availability is not None else build_availability(cfg, num_clients, seed)
    for name, n in (("devices", devices.num_clients), ("availability", availability.num_clients)):
        if n != num_clients:
            raise ValueError(f"{name} describe {n} clients, the planner has {num_clients}")
    return devices, availability


# --- synchronous rounds ------------------------------------------------------------------------------------


@dataclass
class Selection:
    """Clients dispatched for a round (ascending) and those among them that will fail and never report."""

    dispatched: list[int]
    failed: set[int]
    round_idx: int = 0
    start_s: float = 0.0
    attempt: int = 0

    @property
    def reporting(self) -> list[int]:
        return [c for c in self.dispatched if c not in self.failed]


@dataclass
class RoundOutcome:
    """``kept``: aggregated this round (ascending); ``late``: reported but not kept; ``end_s``: round close."""

    kept: list[int]
    late: list[int]
    end_s: float
    quorum_met: bool


class SyncPlanner:
    """Synchronous rounds of cohort size K with FedScale-style over-commitment.

    A round dispatches ceil(K * overcommit) available clients and keeps the first K to finish. With a
    deadline, only clients finishing within ``deadline_s`` of the round start count; if K of them finish
    the round closes at the K-th finish, otherwise at the deadline with whoever made it, and
    ``quorum_met`` says whether that is at least ceil(quorum * K). The planner never discards a round:
    an engine that abandons rounds below quorum skips aggregation when ``quorum_met`` is False.
    Without a deadline, a round with fewer than K reporting (dropouts, too few available) closes when its
    last reporting client finishes: the simulator knows who failed, a real server would need a deadline.
    """

    def __init__(self, cfg: SchedulerConfig, num_clients: int, cohort_size: int, seed: int,
                 devices: Optional[DeviceProfiles] = None, availability: Optional[Availability] = None) -> None:
        check_planner_config(cfg)
        if not 0 < cohort_size <= num_clients:
            raise ValueError(f"cohort size {cohort_size} must be in 1..{num_clients} (the number of clients)")
        self.cfg, self.num_clients, self.cohort_size, self.seed = cfg, num_clients, cohort_size, seed
        self.devices, self.availability = _resolve(cfg, num_clients, seed, devices, availability)
        self.clock = Clock(cfg, self.devices)
        self.dispatch_size = ceil_count(cfg.overcommit, cohort_size)
        self.quorum_size = ceil_count(cfg.quorum, cohort_size)

    def select(self, round_idx: int, now_s: float, attempt: int = 0) -> Selection:
        """Sample ceil(K * overcommit) of the clients available now (fewer if fewer are), seeded by (seed, round).

        An empty selection means nobody is available: retry at ``retry_time(now_s)`` with ``attempt + 1``
        (or call ``select_when_available``).
        """
        coords = (round_idx,) if attempt == 0 else (round_idx, attempt)
        rng = rng_for(self.seed, "cohort", *coords)
        if isinstance(self.availability, AlwaysAvailable):
            # Everyone is online: the same draw as over the list of ids 0..N-1, without building it. numpy
            # samples k of N without replacement in O(k), so a round costs the same at any N.
            picked = rng.choice(self.num_clients, size=min(self.dispatch_size, self.num_clients), replace=False)
        else:
            ids = self.availability.available_ids(now_s, round_idx, attempt)
            picked = ids[rng.choice(len(ids), size=min(self.dispatch_size, len(ids)), replace=False)]
        dispatched = sorted(int(c) for c in picked)
        failed: set[int] = set()
        if self.cfg.dropout > 0 and dispatched:
            draws = hashed_uniforms(derive_seed(self.seed, "dropout", round_idx), np.array(dispatched))
            failed = {c for c, u in zip(dispatched, draws) if u < self.cfg.dropout}
        return Selection(dispatched, failed, round_idx=round_idx, start_s=float(now_s), attempt=attempt)

    def retry_time(self, now_s: float) -> float:
        """When to try again after an empty selection; raises if no client will ever be available."""
        later = self.availability.next_time(now_s)
        if later is None:
            raise RuntimeError(f"no client is available at t={now_s:g}s and none will ever be "
                               f"(scheduler.availability={self.cfg.availability!r})")
        return later

    def select_when_available(self, round_idx: int, now_s: float) -> Selection:
        """``select`` at now_s, or at the first later moment when someone is available (``start_s`` says when)."""
        attempt = 0
        while True:
            selection = self.select(round_idx, now_s, attempt)
            if selection.dispatched:
                return selection
            now_s, attempt = self.retry_time(now_s), attempt + 1

    def close(self, round_idx: int, start_s: float, durations: dict[int, float]) -> RoundOutcome:
        """Close a round from each reporting (dispatched, not failed) client's task duration in seconds.

        Clients finish at start_s + duration, in order of (duration, client id).
        """
        bad = {c: d for c, d in durations.items() if not (d >= 0 and math.isfinite(d))}
        if bad:
            raise ValueError(f"round {round_idx}: task durations must be finite and >= 0, got {bad}")
        order = sorted(durations.items(), key=lambda item: (item[1], item[0]))
        deadline = self.cfg.deadline_s
        on_time = [item for item in order if item[1] <= deadline] if deadline > 0 else order
        kept_items = on_time[:self.cohort_size]
        if len(kept_items) == self.cohort_size:
            end_s = start_s + kept_items[-1][1]
        elif deadline > 0:
            end_s = start_s + deadline
        else:
            end_s = start_s + (order[-1][1] if order else 0.0)
        kept = sorted(c for c, _ in kept_items)
        late = sorted(set(durations) - set(kept))
        return RoundOutcome(kept=kept, late=late, end_s=end_s, quorum_met=len(kept) >= self.quorum_size)


# --- asynchronous dispatch ---------------------------------------------------------------------------------


@dataclass
class Dispatch:
    """One task handed to a client: ``failed`` ones hold their slot until their finish and never report."""

    id: int
    client: int
    start_s: float
    failed: bool
    duration_s: Optional[float] = None

    @property
    def finish_s(self) -> float:
        if self.duration_s is None:
            raise RuntimeError(f"dispatch {self.id} (client {self.client}) has no duration yet: call set_duration")
        return self.start_s + self.duration_s


@dataclass
class _Pending:
    heap: list[tuple[float, int]] = field(default_factory=list)  # (finish_s, dispatch id), known durations
    unknown: int = 0  # in-flight dispatches without a duration


class AsyncPlanner:
    """At most C clients in flight; each finish frees a slot that ``dispatch_next`` refills at that time.

    Caller loop::

        new = planner.start(0.0)
        while ...:
            for d in new: planner.set_duration(d.id, duration_of(d))   # failed ones too (they hold a slot)
            done = planner.next_finished()   # None: the clock jumped to when someone may come online
            if done is not None and not done.failed: ...apply its update...
            new = planner.dispatch_next()

    Dispatch k picks uniformly among clients available at (now, k) and not in flight, seeded by
    (seed, k, attempt); it fails with probability ``dropout``, seeded by (seed, k). When nobody can be
    picked, the slot stays empty and ``next_finished`` jumps the clock to the next availability change
    (the next interval start of a trace; now + retry_s for bernoulli) if that comes before the next finish,
    returning None so the caller refills. Availability is checked at dispatch only.
    """

    # Candidates tried by rejection before listing every available client (uniform either way).
    CANDIDATES = 64

    def __init__(self, cfg: SchedulerConfig, num_clients: int, concurrency: int, seed: int,
                 devices: Optional[DeviceProfiles] = None, availability: Optional[Availability] = None) -> None:
        check_planner_config(cfg)
        if not concurrency >= 1:
            raise ValueError(f"concurrency must be >= 1 (scheduler.concurrency, 0 meaning clients per round), "
                             f"got {concurrency}")
        self.cfg, self.num_clients, self.seed = cfg, num_clients, seed
        self.concurrency = min(concurrency, num_clients)  # a client is never in flight twice
        self.devices, self.availability = _resolve(cfg, num_clients, seed, devices, availability)
        self.clock = Clock(cfg, self.devices)
        self.now_s = 0.0
        self.num_dispatched = 0
        self._started = False
        self._attempt = 0  # failed tries at picking dispatch number num_dispatched
        self._starved = False  # the last refill left a slot empty for want of an available client
        self._busy = np.zeros(num_clients, dtype=bool)
        self._in_flight: dict[int, Dispatch] = {}
        self._pending = _Pending()

    @property
    def in_flight(self) -> list[Dispatch]:
        return sorted(self._in_flight.values(), key=lambda d: d.id)

    def start(self, now_s: float = 0.0) -> list[Dispatch]:
        """Set the clock and fill the C slots with clients available now."""
        if self._started:
            raise RuntimeError("AsyncPlanner.start was already called")
        self._started, self.now_s = True, float(now_s)
        return self.dispatch_next()

    def dispatch_next(self) -> list[Dispatch]:
        """Fill the free slots at ``now_s``; the caller then sets each new dispatch's duration."""
        if not self._started:
            raise RuntimeError("call AsyncPlanner.start before dispatch_next")
        new: list[Dispatch] = []
        self._starved = False
        while len(self._in_flight) < self.concurrency:
            k = self.num_dispatched
            client = self._pick(k, self._attempt)
            if client is None:
                self._attempt += 1
                self._starved = True
                break
            failed = self.cfg.dropout > 0 and rng_for(self.seed, "async_dropout", k).random() < self.cfg.dropout
            dispatch = Dispatch(id=k, client=client, start_s=self.now_s, failed=bool(failed))
            self._in_flight[k] = dispatch
            self._busy[client] = True
            self._pending.unknown += 1
            self.num_dispatched, self._attempt = k + 1, 0
            new.append(dispatch)
        return new

    def state(self) -> dict:
        """Everything needed to continue later, as JSON (random choices derive from the seed, not a generator)."""
        if not self._started:
            raise RuntimeError("AsyncPlanner.state before start: there is nothing to save")
        return {"now_s": self.now_s, "num_dispatched": self.num_dispatched, "attempt": self._attempt,
                "starved": self._starved, "in_flight": [asdict(d) for d in self.in_flight]}

    def restore(self, state: dict) -> None:
        """Continue from ``state()`` (instead of ``start``): the same dispatches follow as if never stopped."""
        if self._started:
            raise RuntimeError("AsyncPlanner.restore after start")
        self._started, self.now_s = True, float(state["now_s"])
        self.num_dispatched, self._attempt, self._starved = state["num_dispatched"], state["attempt"], state["starved"]
        for fields in state["in_flight"]:
            dispatch = Dispatch(**{**fields, "duration_s": None})
            self._in_flight[dispatch.id] = dispatch
            self._busy[dispatch.client] = True
            self._pending.unknown += 1
            if fields["duration_s"] is not None:
                self.set_duration(dispatch.id, fields["duration_s"])

    def _pick(self, k: int, attempt: int) -> Optional[int]:
        rng = rng_for(self.seed, "dispatch", k, attempt)
        candidates = rng.integers(0, self.num_clients, size=self.CANDIDATES)
        ok = ~self._busy[candidates] & self.availability.available(candidates, self.now_s, k, attempt)
        if ok.any():
            return int(candidates[np.argmax(ok)])
        ids = self.availability.available_ids(self.now_s, k, attempt)
        ids = ids[~self._busy[ids]]
        return int(ids[rng.integers(len(ids))]) if len(ids) else None

    def set_duration(self, dispatch_id: int, duration_s: float) -> None:
        """Tell the planner how long an in-flight task takes (from ``self.clock`` or a measurement)."""
        dispatch = self._in_flight.get(dispatch_id)
        if dispatch is None:
            raise KeyError(f"dispatch {dispatch_id} is not in flight")
        if dispatch.duration_s is not None:
            raise RuntimeError(f"dispatch {dispatch_id} already has a duration ({dispatch.duration_s}s)")
        if not (duration_s >= 0 and math.isfinite(duration_s)):
            raise ValueError(f"dispatch {dispatch_id}: duration must be finite and >= 0, got {duration_s!r}")
        dispatch.duration_s = float(duration_s)
        self._pending.unknown -= 1
        heapq.heappush(self._pending.heap, (dispatch.finish_s, dispatch_id))

    def next_finished(self) -> Optional[Dispatch]:
        """Pop the in-flight task finishing first (ties by dispatch id) and advance the clock to its finish.

        Returns None instead when a slot is empty for want of available clients and someone may come
        online before that finish: the clock moves to that moment and the caller should ``dispatch_next``.
        """
        if self._pending.unknown:
            unknown = [d.id for d in self.in_flight if d.duration_s is None]
            raise RuntimeError(f"dispatches {unknown} have no duration yet: call set_duration for each first")
        heap = self._pending.heap
        if self._starved:
            wake = self.availability.next_time(self.now_s)
            if wake is not None and (not heap or wake < heap[0][0]):
                log.debug("no client to dispatch at t=%gs; waiting until t=%gs", self.now_s, wake)
                self.now_s = wake
                return None
        if not heap:
            if self._starved:
                raise RuntimeError(f"nothing in flight at t={self.now_s:g}s and no client will ever be available "
                                   f"(scheduler.availability={self.cfg.availability!r})")
            raise RuntimeError("nothing in flight: call dispatch_next first")
        finish_s, dispatch_id = heapq.heappop(heap)
        dispatch = self._in_flight.pop(dispatch_id)
        self._busy[dispatch.client] = False
        self.now_s = max(self.now_s, finish_s)
        return dispatch
