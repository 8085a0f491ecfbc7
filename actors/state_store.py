"""Per-client state (SCAFFOLD control variates, personalized adapters) kept apart from the workers.

It lives in its own actor, so the death of the worker that produced a state loses nothing; memory per
registered client is that client's state and nothing else.
"""

from __future__ import annotations

import ray

from fedsim.messages import NamedTensors, nbytes


@ray.remote
class ClientStateStore:
    def __init__(self) -> None:
        self.states: dict[int, NamedTensors] = {}

    def get(self, client_id: int) -> NamedTensors | None:
        return self.states.get(client_id)

    def get_many(self, client_ids: list[int]) -> list[NamedTensors | None]:
        return [self.states.get(c) for c in client_ids]

    def put(self, client_id: int, state: NamedTensors | None) -> None:
        if state is not None:
            self.states[client_id] = state

    def all(self) -> dict[int, NamedTensors]:
        return dict(self.states)

    def put_many(self, states: dict[int, NamedTensors]) -> None:
        self.states.update(states)

    def size(self) -> dict[str, int]:
        return {"clients": len(self.states), "bytes": sum(nbytes(s) for s in self.states.values())}
