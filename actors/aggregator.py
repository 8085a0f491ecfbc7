"""The server side of a run in one actor on the driver's node: a thin shell around
``fedsim.aggregator.Aggregator``, and the clients' stored states.

Updates arrive as object references and are resolved here, one at a time, so neither the driver nor this
actor ever holds a whole round of updates. Client states (SCAFFOLD's control variates, personal adapters)
are kept apart from the workers, so the death of the worker that produced one loses nothing. They live in a
``fedsim.statestore.ClientStateStore`` in the run directory, on this node's disk (the driver's node, where
the run directory is): memory holds a few bytes per registered client and a bounded cache of states. One
process holds both: each Ray actor is a whole Python process with torch loaded (some 300 MB), and neither
needs a process of its own.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import ray

from fedsim.aggregator import Aggregator, build_aggregator
from fedsim.config import ExperimentConfig
from fedsim.plugins import import_plugins
from fedsim.messages import ClientUpdate, NamedTensors
from fedsim.statestore import ClientStateStore, StateManifest


@ray.remote
class AggregatorActor:
    def __init__(self) -> None:
        self.aggregator: Aggregator | None = None  # once start() has the initial weights from a worker
        self.last_submit: tuple[int, tuple[str, int]] = (-1, ("", 0))
        self.states: ClientStateStore | None = None  # once open_states() has the run directory

    def start(self, cfg: ExperimentConfig, initial: NamedTensors, client_sizes: Sequence[int]) -> int:
        import_plugins(cfg.plugins)  # a user's server strategy is registered in this process too
        self.aggregator = build_aggregator(cfg, client_sizes)
        self.aggregator.init(initial)
        return self.aggregator.version

    def submit(self, update: ClientUpdate, base: list[ray.ObjectRef | None], number: int) -> tuple[str, int]:
        """The outcome and the version after it (the driver learns a new version without a snapshot).

        ``number`` counts the driver's submissions: a call the driver repeats because its reply was lost
        (the actor unreachable for a moment) is answered again, not applied twice. ``base`` arrives wrapped
        in a list, so Ray leaves it unresolved: the version a client trained from is fetched only for the
        strategies that use it (FedAsync's mix rule), not for every update."""
        if number == self.last_submit[0]:
            return self.last_submit[1]
        needed = self.aggregator.needs_base and base[0] is not None
        outcome = self.aggregator.submit(update, ray.get(base[0]) if needed else None), self.aggregator.version
        self.last_submit = (number, outcome)
        return outcome

    def close_round(self) -> int:
        return self.aggregator.close_round()

    def flush(self) -> int:
        return self.aggregator.flush()

    def version(self) -> int:
        return self.aggregator.version

    def snapshot(self) -> tuple[int, list[ray.ObjectRef]]:
        """The current version, put in the object store once; the list keeps Ray from resolving the ref."""
        version, published = self.aggregator.snapshot()
        return version, [ray.put(published)]

    def state(self) -> tuple[NamedTensors, dict[str, Any]]:
        return self.aggregator.state()

    def restore(self, tensors: NamedTensors, counts: dict[str, Any]) -> int:
        self.aggregator.restore(tensors, counts)
        return self.aggregator.version

    def stats(self) -> dict[str, Any]:
        return self.aggregator.stats()

    # ------------------------------------------------------------------------------- client states
    def open_states(self, directory: str, num_clients: int, cache_bytes: int,
                    checkpointed: StateManifest | None) -> None:
        self.states = ClientStateStore(Path(directory), num_clients, cache_bytes, checkpointed)

    def get_state(self, client_id: int) -> NamedTensors | None:
        return self.states.get(client_id)

    def get_states(self, client_ids: list[int]) -> list[NamedTensors | None]:
        return [self.states.get(c) for c in client_ids]

    def put_state(self, client_id: int, state: NamedTensors | None) -> None:
        if state is not None:
            self.states.put(client_id, state)

    def pin_states(self) -> StateManifest:
        return self.states.pin()

    def release_states(self) -> None:
        self.states.release()

    def personalized_digest(self) -> str:
        from fedsim.engine.inprocess import personalized_digest  # the engine package: not needed before the end

        return personalized_digest(self.states)
