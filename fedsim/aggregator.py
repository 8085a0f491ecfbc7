"""The server side of a run: the update guard in front of a server strategy.

A plain object, testable without Ray; the Ray aggregator actor is a thin shell around it. Updates are taken
one at a time and folded into the strategy's running sum (or buffer), so memory is O(adapter size)
whatever the cohort size.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from fedsim.algorithms import ServerStrategy
from fedsim.algorithms.fixedpoint import UpdateError
from fedsim.guard import UpdateGuard
from fedsim.messages import ClientUpdate, NamedTensors, Published
from fedsim.models.adapter import adapter_sha256

ACCEPTED, REJECTED, STALE = "accepted", "rejected", "stale"


class Aggregator:
    def __init__(self, strategy: ServerStrategy, guard: UpdateGuard):
        self.strategy = strategy
        self.guard = guard
        self.outcomes: Counter[str] = Counter()

    def init(self, weights: NamedTensors) -> None:
        self.strategy.init(weights)

    @property
    def needs_base(self) -> bool:
        """Whether ``submit`` needs ``base`` (else it may be left out, and a remote one is not fetched)."""
        return self.strategy.needs_base

    @property
    def version(self) -> int:
        return self.strategy.version

    def submit(self, update: ClientUpdate, base: Published | None = None) -> str:
        """Take one update: ``accepted`` (folded in), ``rejected`` (guard, or any fault while folding it in)
        or ``stale`` (async bound). ``base`` is the published version the client trained from
        (asynchronous mode). One bad update never ends a run: it is rejected, with its reason counted."""
        if self.guard.check(update) is not None:
            outcome = REJECTED
        else:
            try:
                outcome = self._fold(update, base)
            except Exception as err:  # whatever one update does wrong, the run goes on
                # Strategies check everything before changing anything, so a rejected update leaves no trace.
                kind = err.kind if isinstance(err, UpdateError) else type(err).__name__
                self.guard.reject(update, kind, str(err))
                outcome = REJECTED
        self.outcomes[outcome] += 1
        return outcome

    def _fold(self, update: ClientUpdate, base: Published | None) -> str:
        if self.strategy.asynchronous:
            return ACCEPTED if self.strategy.offer(update, None if base is None else base[0]) else STALE
        self.strategy.accumulate(update, self.strategy.weight_of(update))
        return ACCEPTED

    def close_round(self) -> int:
        """Synchronous mode: apply the round's updates; returns the new version."""
        self.strategy.finalize()
        return self.strategy.version

    def flush(self) -> int:
        """Asynchronous mode, end of run: apply a partly filled buffer, if the strategy keeps one."""
        self.strategy.flush()
        return self.strategy.version

    def snapshot(self) -> tuple[int, Published]:
        """(version, (global weights, extras broadcast to clients))."""
        return self.strategy.version, (self.strategy.global_weights, self.strategy.broadcast_extras())

    def state(self) -> tuple[NamedTensors, dict[str, Any]]:
        """For a checkpoint (between rounds): the strategy's tensors and the counts, as JSON."""
        return self.strategy.state_dict(), {"outcomes": dict(self.outcomes), "rejected": dict(self.guard.rejected)}

    def restore(self, tensors: NamedTensors, counts: dict[str, Any]) -> None:
        """Continue from ``state()``'s output."""
        self.strategy.load_state_dict(tensors)
        self.outcomes = Counter(counts["outcomes"])
        self.guard.rejected = dict(counts["rejected"])

    def stats(self) -> dict[str, Any]:
        staleness = dict(sorted(getattr(self.strategy, "staleness_counts", {}).items()))
        total = sum(staleness.values())
        return {
            "accepted_updates": self.outcomes[ACCEPTED],
            "rejected_updates": self.outcomes[REJECTED],
            "rejected_by_reason": dict(self.guard.rejected),
            "stale_updates": self.outcomes[STALE],
            "staleness_histogram": {str(s): n for s, n in staleness.items()},
            "mean_staleness": sum(s * n for s, n in staleness.items()) / total if total else 0.0,
            "adapter_sha256": adapter_sha256(self.strategy.weights),
        }
