"""Which clients are online, asked at a decision point: a sync round or an async dispatch.

Every model answers ``available(clients, time_s, decision, attempt)`` as a pure function of its arguments
(and the seed), so the answer never depends on who asked before. ``decision`` is the round index (sync)
or the dispatch id (async); ``attempt`` counts the retries of one decision after nobody was available, so
a retry sees fresh draws. ``next_time(t)`` is the earliest time after t at which the answer may change
for the better (someone may come online), or None if it never will: planners jump there rather than spin.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import numpy as np

from fedsim.config import SchedulerConfig
from fedsim.scheduler._common import fail, hashed_uniforms, is_number, load_client_json, trace_error
from fedsim.scheduler.fedscale import BehaveTrace, map_trace_clients, read_behave_trace
from fedsim.seeding import derive_seed

# Bernoulli availability: after a decision found nobody, the planner retries this many simulated seconds later.
DEFAULT_RETRY_S = 1.0


def _ids(clients: Optional[np.ndarray], num_clients: int) -> np.ndarray:
    if clients is None:
        return np.arange(num_clients)
    ids = np.atleast_1d(np.asarray(clients, dtype=np.int64))
    if ids.size and (ids.min() < 0 or ids.max() >= num_clients):
        raise ValueError(f"client ids must be in 0..{num_clients - 1}, got {ids.min()}..{ids.max()}")
    return ids


class Availability:
    """Base class: subclasses implement ``available`` and ``next_time``."""

    num_clients: int

    def available(self, clients: Optional[np.ndarray], time_s: float, decision: int,
                  attempt: int = 0) -> np.ndarray:
        """A bool mask aligned with ``clients`` (all clients when None): who is online at this decision."""
        raise NotImplementedError

    def available_ids(self, time_s: float, decision: int, attempt: int = 0) -> np.ndarray:
        """The ids online at this decision, ascending."""
        return np.flatnonzero(self.available(None, time_s, decision, attempt))

    def next_time(self, time_s: float) -> Optional[float]:
        """The earliest time > time_s at which someone may newly be available; None if never."""
        raise NotImplementedError


class AlwaysAvailable(Availability):
    def __init__(self, num_clients: int) -> None:
        self.num_clients = num_clients

    def available(self, clients, time_s, decision, attempt=0):
        return np.ones(len(_ids(clients, self.num_clients)), dtype=bool)

    def next_time(self, time_s):
        return None


class BernoulliAvailability(Availability):
    """Client c is online at (decision, attempt) with probability p, independently of everything else.

    The draw is a hash of (seed, decision, attempt, c), so it does not depend on time: a round or dispatch
    sees the same clients whatever the clock says, and runs that differ only in speeds share their draws.
    ``next_time`` is ``time + retry_s``: bernoulli availability has no schedule to jump to.
    """

    def __init__(self, num_clients: int, p: float, seed: int, retry_s: float = DEFAULT_RETRY_S) -> None:
        if not 0 <= p <= 1:
            fail("availability_p", p, "a value in [0, 1]")
        if not (retry_s > 0 and math.isfinite(retry_s)):
            raise ValueError(f"bernoulli availability retry_s must be a finite value > 0, got {retry_s!r}")
        self.num_clients, self.p, self.seed, self.retry_s = num_clients, p, seed, retry_s
        self._key: tuple[tuple[int, int], int] = ((-1, -1), 0)

    def _key_for(self, decision: int, attempt: int) -> int:
        # derive_seed costs tens of microseconds; the async planner asks about one decision many times.
        if self._key[0] != (decision, attempt):
            self._key = ((decision, attempt), derive_seed(self.seed, "availability", decision, attempt))
        return self._key[1]

    def available(self, clients, time_s, decision, attempt=0):
        ids = _ids(clients, self.num_clients)
        return hashed_uniforms(self._key_for(decision, attempt), ids) < self.p

    def next_time(self, time_s):
        return None if self.p == 0 else time_s + self.retry_s


class TraceAvailability(Availability):
    """Online intervals [start_s, end_s) per client from a trace; clients not listed are never online.

    The online state at time t is kept as a per-client counter swept over the sorted interval boundaries.
    Moving the sweep is reversible, so queries may come in any time order (forward is the cheap direction)
    and the answer is a pure function of t. Memory: O(N + number of intervals).
    """

    def __init__(self, num_clients: int, intervals: dict[int, list[tuple[float, float]]]) -> None:
        self.num_clients = num_clients
        clients = [c for c, spans in intervals.items() for _ in spans]
        starts = [s for spans in intervals.values() for s, _ in spans]
        ends = [e for spans in intervals.values() for _, e in spans]
        times = np.array(starts + ends, dtype=np.float64)
        order = np.argsort(times, kind="stable")
        self._times = times[order]
        self._clients = np.array(clients + clients, dtype=np.int64)[order]
        self._deltas = np.array([1] * len(starts) + [-1] * len(ends), dtype=np.int8)[order]
        self._starts = np.sort(np.array(starts, dtype=np.float64))
        self._online = np.zeros(num_clients, dtype=np.int8)
        self._applied = 0  # boundaries applied to _online so far

    @classmethod
    def from_file(cls, path: str, num_clients: int) -> "TraceAvailability":
        return cls(num_clients, load_availability_trace(path, num_clients))

    def _sweep_to(self, time_s: float) -> None:
        target = int(np.searchsorted(self._times, time_s, side="right"))
        lo, hi = sorted((self._applied, target))
        sign = 1 if target > self._applied else -1
        np.add.at(self._online, self._clients[lo:hi], sign * self._deltas[lo:hi])
        self._applied = target

    def available(self, clients, time_s, decision, attempt=0):
        ids = _ids(clients, self.num_clients)
        self._sweep_to(time_s)
        return self._online[ids] > 0

    def next_time(self, time_s):
        i = int(np.searchsorted(self._starts, time_s, side="right"))
        return float(self._starts[i]) if i < len(self._starts) else None


class FedScaleAvailability(Availability):
    """FedScale's client_behave_trace replayed by N clients: client c is online at t iff its trace client
    ``map_trace_clients(seed, N, M)[c]`` is, i.e. t mod finish_time lies in one of its closed intervals
    [active[i], inactive[i]] (FedScale's ClientMetadata.is_active, without its one-step index cursor).

    Only the trace clients someone replays are kept, so memory and a query cost O(N + their intervals).
    """

    def __init__(self, num_clients: int, trace: BehaveTrace, seed: int) -> None:
        self.num_clients = num_clients
        used, self._trace_of = np.unique(map_trace_clients(seed, num_clients, trace.num_clients),
                                         return_inverse=True)
        kept = np.isin(trace.owner, used)
        self._period = trace.period[used]
        self._start, self._end = trace.start[kept], trace.end[kept]
        self._owner = np.searchsorted(used, trace.owner[kept])
        self._online_at: tuple[float, np.ndarray] = (math.nan, np.zeros(0, dtype=bool))

    @classmethod
    def from_file(cls, path: str, num_clients: int, seed: int) -> "FedScaleAvailability":
        return cls(num_clients, read_behave_trace("availability_trace", path), seed)

    def _trace_online(self, time_s: float) -> np.ndarray:
        # The async planner asks about one instant many times: keep the last answer.
        if self._online_at[0] != time_s:
            phase = np.mod(time_s, self._period)[self._owner]
            inside = (self._start <= phase) & (phase <= self._end)
            online = np.zeros(len(self._period), dtype=bool)
            online[self._owner[inside]] = True
            self._online_at = (time_s, online)
        return self._online_at[1]

    def available(self, clients, time_s, decision, attempt=0):
        trace_of = self._trace_of if clients is None else self._trace_of[_ids(clients, self.num_clients)]
        return self._trace_online(float(time_s))[trace_of]

    def next_time(self, time_s):
        if not len(self._start):
            return None
        phase = np.mod(time_s, self._period)
        cycle = (time_s - phase)[self._owner]
        phase = phase[self._owner]
        later = cycle + np.where(self._start > phase, self._start, self._start + self._period[self._owner])
        # Rounding in t - (t mod period) must not hand back a time <= t: the planner would spin.
        return max(float(later.min()), float(np.nextafter(time_s, math.inf)))


def load_availability_trace(path: str, num_clients: int) -> dict[int, list[tuple[float, float]]]:
    """Read and check ``{"<client id>": [[start_s, end_s], ...]}``: sorted, non-overlapping, start < end."""
    out: dict[int, list[tuple[float, float]]] = {}
    for client, spans in load_client_json("availability_trace", path, num_clients).items():
        where = f"client {client}"
        if not isinstance(spans, list):
            raise trace_error("availability_trace", path,
                              f"has {spans!r} for {where}: expected a list of [start_s, end_s] intervals")
        checked: list[tuple[float, float]] = []
        for span in spans:
            if not (isinstance(span, list) and len(span) == 2 and all(is_number(v) for v in span)):
                raise trace_error("availability_trace", path,
                                  f"has interval {span!r} for {where}: expected [start_s, end_s], two numbers")
            start, end = float(span[0]), float(span[1])
            if not (math.isfinite(start) and not math.isnan(end) and start < end):
                raise trace_error("availability_trace", path, f"has interval {span!r} for {where}: expected "
                                  f"a finite start_s < end_s")
            if checked and start < checked[-1][1]:
                raise trace_error("availability_trace", path, f"has interval {span!r} for {where} starting "
                                  f"before the previous one {list(checked[-1])} ends: intervals must be "
                                  f"sorted by start and must not overlap")
            checked.append((start, end))
        out[client] = checked
    return out


AvailabilityBuilder = Callable[[SchedulerConfig, int, int], Availability]

AVAILABILITY: dict[str, AvailabilityBuilder] = {
    "always": lambda cfg, n, seed: AlwaysAvailable(n),
    "bernoulli": lambda cfg, n, seed: BernoulliAvailability(n, cfg.availability_p, seed),
    "trace": lambda cfg, n, seed: TraceAvailability.from_file(cfg.availability_trace, n),
    "fedscale": lambda cfg, n, seed: FedScaleAvailability.from_file(cfg.availability_trace, n, seed),
}


def check_availability_config(cfg: SchedulerConfig) -> None:
    if cfg.availability not in AVAILABILITY:
        fail("availability", cfg.availability, "one of " + ", ".join(sorted(AVAILABILITY)))
    if not 0 <= cfg.availability_p <= 1:
        fail("availability_p", cfg.availability_p, "a value in [0, 1]")
    if cfg.availability in ("trace", "fedscale") and not cfg.availability_trace:
        fail("availability_trace", cfg.availability_trace,
             f"a path to a trace file when scheduler.availability is {cfg.availability!r}")


def build_availability(cfg: SchedulerConfig, num_clients: int, seed: int) -> Availability:
    """The availability model named by ``cfg.availability``."""
    check_availability_config(cfg)
    return AVAILABILITY[cfg.availability](cfg, num_clients, seed)
