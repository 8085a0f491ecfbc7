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
  loop's counters and metrics, the aggregator's counts, the scheduler's state and the tasks in flight;
- ``COMPLETE``: written last, once the others are fsynced: the round, and the size and sha256 of each file.

It is written into a staging folder (``fedsim.output.atomic_dir``) that replaces the previous checkpoint
durably: the previous one is renamed aside, the new one renamed in, and the old one deleted only then; the
store deletes the state files that only the old one referred to after that. A crash or power loss at any
moment leaves a complete checkpoint: ``checkpoint/``, or the one set aside, or a finished staged one;
resuming takes the newest complete one (the ``COMPLETE`` marker tells complete from cut short). The
scheduler draws every random choice from the seed and its coordinates (``fedsim.seeding``), so its state is
the virtual clock and counters, no generator.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load, save

from fedsim.messages import NamedTensors, Published
from fedsim.output import atomic_dir, staged_dirs, write_file
from fedsim.statestore import StateManifest

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint"
FILES = ("server.safetensors", "clients.safetensors", "published.safetensors", "state.json")
COMPLETE = "COMPLETE"  # the seal, written last: round, and size and sha256 of each of FILES
FORMAT = 4  # 4: sealed by COMPLETE; 3: client states referred to in the store, no longer copied


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


def _seal(round_idx: int, contents: dict[str, bytes]) -> bytes:
    files = {name: {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()} for name, data in contents.items()}
    return json.dumps({"round": round_idx, "files": files}, indent=1, sort_keys=True).encode()


def write_checkpoint(run_dir: Path, ckpt: Checkpoint) -> None:
    published = {f"{version}/{part}": tensors for version, (weights, extras) in ckpt.published.items()
                 for part, tensors in (("weights", weights), ("extras", extras))}
    contents = {
        "server.safetensors": save({k: t.contiguous() for k, t in ckpt.server.items()}),
        "clients.safetensors": save({"client": torch.from_numpy(ckpt.clients.clients.astype(np.int64)),
                                     "generation": torch.from_numpy(ckpt.clients.generations.astype(np.int64))}),
        "published.safetensors": save(_flatten(published)),
        "state.json": json.dumps({"format": FORMAT, "round": ckpt.round, **ckpt.state}, indent=1,
                                 sort_keys=True).encode(),
    }
    with atomic_dir(Path(run_dir) / CHECKPOINT) as staging:
        for name, data in contents.items():
            write_file(staging / name, data)  # fsynced: the seal below must never outlive them
        write_file(staging / COMPLETE, _seal(ckpt.round, contents))


def _sealed_round(folder: Path) -> int | None:
    """The round of the checkpoint in ``folder`` if it is complete (sealed, and every file of the size its seal
    records: cheap, no reading), else None."""
    try:
        seal = json.loads((folder / COMPLETE).read_text())
        files = seal["files"]
        complete = set(files) == set(FILES) and all((folder / n).stat().st_size == files[n]["size"] for n in FILES)
        return int(seal["round"]) if complete else None
    except (OSError, ValueError, KeyError, TypeError):  # no seal, one cut short, or a file missing
        return None


def check_checkpoint(run_dir: Path) -> Path:
    """The folder of ``run_dir``'s newest complete checkpoint: ``checkpoint/``, or, if a crash cut the writing of
    one short, the one set aside or a finished staged one beside it (cheap: no reading). FileNotFoundError
    naming the folder if there is none."""
    target = Path(run_dir) / CHECKPOINT
    rounds = {folder: r for folder in (target, *staged_dirs(target)) if (r := _sealed_round(folder)) is not None}
    if not rounds:
        raise FileNotFoundError(f"{target} holds no complete checkpoint (nor does any copy a crash left beside "
                                "it); a run writes one every checkpoint.every rounds")
    return max(rounds, key=lambda folder: (rounds[folder], folder == target))  # a tie: checkpoint/ itself


def _read_verified(path: Path, sha256: str) -> bytes:
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != sha256:
        raise ValueError(f"{path} does not match the sha256 its checkpoint recorded in {COMPLETE}: it was changed "
                         "or damaged after the checkpoint was written")
    return data


def read_checkpoint(run_dir: Path) -> Checkpoint:
    folder = check_checkpoint(run_dir)
    if folder.name != CHECKPOINT:
        log.warning("resuming from %s: a crash cut the writing of a checkpoint short, and it is the newest complete "
                    "one", folder)
    seal = json.loads((folder / COMPLETE).read_text())
    data = {name: _read_verified(folder / name, seal["files"][name]["sha256"]) for name in FILES}
    state = json.loads(data["state.json"])
    found = state.pop("format", None)
    if found != FORMAT:
        raise ValueError(f"{folder / 'state.json'} is not a fedsim checkpoint of format {FORMAT} (it says "
                         f"{found}): a run checkpointed by another fedsim version resumes with that version")
    manifest = load(data["clients.safetensors"])
    if set(manifest) != {"client", "generation"}:
        raise ValueError(f"{folder / 'clients.safetensors'} holds {sorted(manifest)}, not the client and "
                         "generation vectors of a checkpoint's client states")
    clients = StateManifest(manifest["client"].numpy(), manifest["generation"].numpy())
    published = {}
    for version, tensors in _unflatten(load(data["published.safetensors"])).items():
        parts = _unflatten(tensors)
        published[int(version)] = (parts.get("weights", {}), parts.get("extras", {}))
    return Checkpoint(round=int(state.pop("round")), server=load(data["server.safetensors"]),
                      clients=clients, state=state, published=published)
