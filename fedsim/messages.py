"""Messages exchanged between the server side and the client side of a federation.

Tensors travel as named tensors (``dict[str, Tensor]``) keyed by the trainable parameter names of the
adapter, never as pickled modules, so the same messages serve the in-process engine and Ray actors.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

NamedTensors = dict[str, torch.Tensor]
Published = tuple[NamedTensors, NamedTensors]  # a global version as workers receive it: (weights, extras)


@dataclass
class ClientUpdate:
    """What one client sends back after local training.

    ``delta`` is ``local_weights - global_weights`` for every trainable tensor; ``extras`` carries
    algorithm-specific tensors (SCAFFOLD's control-variate delta) keyed ``"<kind>/<param name>"``.
    """

    client_id: int
    delta: NamedTensors
    num_samples: int
    base_version: int = 0
    extras: NamedTensors = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)


def nbytes(tensors: NamedTensors) -> int:
    """Bytes the tensors occupy on the wire (payload only)."""
    return sum(t.numel() * t.element_size() for t in tensors.values())


@dataclass(frozen=True)
class ClientTask:
    """One client's local training, as the scheduler dispatches it.

    ``seed_round`` is the coordinate its randomness derives from (the round in synchronous mode, the
    dispatch number in asynchronous mode), so whichever worker runs it, it trains identically.
    """

    client_id: int
    seed_round: int
    base_version: int
    lr: float
