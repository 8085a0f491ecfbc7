"""Messages exchanged between the server side and the client side of a federation.

Tensors travel as named tensors (``dict[str, Tensor]``) keyed by the trainable parameter names of the
adapter, never as pickled modules, so the same messages serve the in-process engine and Ray actors.
``FlatLayout`` maps an adapter's named tensors onto one contiguous vector, for arithmetic over all of them.
``WireTensors`` is the form named tensors take where they leave a process (updates, states, global versions).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

NamedTensors = dict[str, torch.Tensor]
Published = tuple[NamedTensors, NamedTensors]  # a global version as workers receive it: (weights, extras)


class WireTensors(dict):
    """Named tensors (a ``dict``) that pickle as one flat buffer per dtype and device, not tensor by tensor.

    Torch pickles each tensor through its storage machinery, some 0.1-0.2 ms apiece each way: an adapter of
    32 tensors cost ~10 ms per message between Ray processes, more than aggregating it. Packed, the same
    message costs ~0.4 ms. Values come back bit for bit, as views into the buffer of their dtype (detached:
    messages carry values, never autograd history). Producers of messages wrap their dicts in it; consumers
    see a plain dict.
    """

    def __reduce__(self) -> tuple:
        groups: dict[tuple[torch.dtype, torch.device], list[str]] = {}
        for name, tensor in self.items():
            groups.setdefault((tensor.dtype, tensor.device), []).append(name)
        buffers, layout = [], []
        for index, names in enumerate(groups.values()):
            buffers.append(torch.cat([self[name].detach().reshape(-1) for name in names]))
            layout += [(name, index, tuple(self[name].shape)) for name in names]
        return _unpack, (buffers, layout, list(self))


def _unpack(buffers: list[torch.Tensor], layout: list[tuple[str, int, tuple[int, ...]]], order: list[str]
            ) -> WireTensors:
    offsets, tensors = [0] * len(buffers), {}
    for name, index, shape in layout:
        size = torch.Size(shape).numel()
        tensors[name] = buffers[index][offsets[index]:offsets[index] + size].view(shape)
        offsets[index] += size
    return WireTensors((name, tensors[name]) for name in order)


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


class FlatLayout:
    """Where each named tensor of an adapter lives in one contiguous vector: name -> slice, built once.

    Whole-adapter arithmetic then runs as a few passes over one vector instead of a few per tensor.
    """

    def __init__(self, like: NamedTensors) -> None:
        self.shapes = {name: t.shape for name, t in like.items()}
        self.slices: dict[str, slice] = {}
        offset = 0
        for name, shape in self.shapes.items():
            self.slices[name] = slice(offset, offset + shape.numel())
            offset += shape.numel()
        self.numel = offset

    def flatten(self, tensors: NamedTensors, out: torch.Tensor) -> torch.Tensor:
        """Copy ``tensors[name]`` for every name of the layout, in its order, into ``out`` and return it.

        ``out`` is a CPU vector of ``numel`` elements, of any dtype: values are converted as they are copied.
        The tensors must have the layout's shapes (a caller checks them first).
        """
        parts = [tensors[name].detach().to("cpu").reshape(-1) for name in self.shapes]
        return torch.cat(parts, out=out)

    def view(self, flat: torch.Tensor, name: str) -> torch.Tensor:
        """The part of ``flat`` that holds ``name``, in its shape (a view: no copy)."""
        return flat[self.slices[name]].view(self.shapes[name])

    def unflatten(self, flat: torch.Tensor) -> NamedTensors:
        """Every named tensor of ``flat``, as views."""
        return {name: self.view(flat, name) for name in self.shapes}


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
