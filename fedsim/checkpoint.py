"""Checkpoints of a running federation, in safetensors and JSON (never pickle), written atomically.

``RUN_DIR/checkpoint/`` holds the last checkpoint:

- ``server.safetensors``: the server strategy's state (global adapter, optimizer slots, version, buffer);
- ``clients.safetensors``: which client states (SCAFFOLD control variates, personal adapters) the
  checkpoint holds, as ``client`` and ``generation`` (int64 vectors): the states themselves stay in the
  run's client state store (``RUN_DIR/client_states/``, ``fedsim.statestore``), whose files are immutable
  and kept while a checkpoint refers to them, so a checkpoint copies no state through the driver;
- ``published.safetensors``: the global versions that asynchronous tasks still in flight train from, as
  ``<version>/weights/<name>`` and ``<version>/extras/<name>`` (empty for synchronous runs);
- ``state.json``: everything else needed to continue: the round (or asynchronous version) reached, the
  loop's counters and metrics, the aggregator's counts, the scheduler's state and the tasks in flight.

It is written into a staging folder that replaces the previous checkpoint in one rename, so a crash at any
moment leaves either the old or the new checkpoint whole; the store deletes the state files that only the
old one referred to after that rename. The scheduler draws every random choice from the seed and its
coordinates (``fedsim.seeding``), so its state is the virtual clock and counters, no generator.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from fedsim.messages import NamedTensors, Published
from fedsim.output import atomic_dir
from fedsim.statestore import StateManifest

CHECKPOINT = "checkpoint"
FILES = ("server.safetensors", "clients.safetensors", "published.safetensors", "state.json")
FORMAT = 3  # 3: client states referred to in the store, no longer copied


@dataclass
class Checkpoint:
    round: int  # the last finished round (synchronous) or global version (asynchronous)
    server: NamedTensors
    clients: StateManifest  # the client states, in the run's client state store
    state: dict[str, Any]  # JSON: loop counters, metrics, aggregator counts, scheduler and in-flight tasks
    published: dict[int, Published] = field(default_factory=dict)  # version -> what in-flight tasks train from


def _flatten(groups: dict[Any, NamedTensors]) -> NamedTensors:
    return {f"{key}/{name}": t.contiguous() for key, tensors in groups.items() for name, t in tensors.items()}


def _unflatten(flat: NamedTensors) -> dict[str, NamedTensors]:
    groups: dict[str, NamedTensors] = {}
    for key, tensor in flat.items():
        group, name = key.split("/", 1)
        groups.setdefault(group, {})[name] = tensor
    return groups


def write_checkpoint(run_dir: Path, ckpt: Checkpoint) -> None:
    published = {f"{version}/{part}": tensors for version, (weights, extras) in ckpt.published.items()
                 for part, tensors in (("weights", weights), ("extras", extras))}
    with atomic_dir(Path(run_dir) / CHECKPOINT) as staging:
        save_file({k: t.contiguous() for k, t in ckpt.server.items()}, str(staging / "server.safetensors"))
        save_file({"client": torch.from_numpy(ckpt.clients.clients.astype(np.int64)),
                   "generation": torch.from_numpy(ckpt.clients.generations.astype(np.int64))},
                  str(staging / "clients.safetensors"))
        save_file(_flatten(published), str(staging / "published.safetensors"))
        (staging / "state.json").write_text(json.dumps({"format": FORMAT, "round": ckpt.round, **ckpt.state},
                                                       indent=1, sort_keys=True))


def check_checkpoint(run_dir: Path) -> None:
    """FileNotFoundError naming the folder unless ``run_dir`` holds a complete checkpoint (cheap: no reading)."""
    folder = Path(run_dir) / CHECKPOINT
    missing = [n for n in FILES if not (folder / n).is_file()]
    if missing:
        raise FileNotFoundError(f"{folder} holds no complete checkpoint (missing {', '.join(missing)}); "
                                "a run writes one every checkpoint.every rounds")


def read_checkpoint(run_dir: Path) -> Checkpoint:
    check_checkpoint(run_dir)
    folder = Path(run_dir) / CHECKPOINT
    state = json.loads((folder / "state.json").read_text())
    found = state.pop("format", None)
    if found != FORMAT:
        raise ValueError(f"{folder / 'state.json'} is not a fedsim checkpoint of format {FORMAT} (it says "
                         f"{found}): a run checkpointed by another fedsim version resumes with that version")
    manifest = load_file(str(folder / "clients.safetensors"))
    if set(manifest) != {"client", "generation"}:
        raise ValueError(f"{folder / 'clients.safetensors'} holds {sorted(manifest)}, not the client and "
                         "generation vectors of a checkpoint's client states")
    clients = StateManifest(manifest["client"].numpy(), manifest["generation"].numpy())
    published = {}
    for version, tensors in _unflatten(load_file(str(folder / "published.safetensors"))).items():
        parts = _unflatten(tensors)
        published[int(version)] = (parts.get("weights", {}), parts.get("extras", {}))
    return Checkpoint(round=int(state.pop("round")), server=load_file(str(folder / "server.safetensors")),
                      clients=clients, state=state, published=published)
