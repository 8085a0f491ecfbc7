"""Checkpoints of a running federation, in safetensors and JSON (never pickle), written atomically.

``RUN_DIR/checkpoint/`` holds the last checkpoint:

- ``server.safetensors``: the server strategy's state (global adapter, optimizer slots, version, buffer);
- ``clients.safetensors``: per-client state (SCAFFOLD control variates, personal adapters) as
  ``<client>/<tensor name>``;
- ``state.json``: everything else needed to continue: the round reached, the loop's counters and metrics,
  the aggregator's counts, and the scheduler's state.

It is written into a staging folder that replaces the previous checkpoint in one rename, so a crash at any
moment leaves either the old or the new checkpoint whole. The scheduler draws every random choice from the
seed and the round (``fedsim.seeding``), so its state is the virtual clock and nothing else.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file

from fedsim.messages import NamedTensors
from fedsim.output import atomic_dir

CHECKPOINT = "checkpoint"
FILES = ("server.safetensors", "clients.safetensors", "state.json")
FORMAT = 1


@dataclass
class Checkpoint:
    round: int  # the last finished round (synchronous) or global version (asynchronous)
    server: NamedTensors
    clients: dict[int, NamedTensors]
    state: dict[str, Any]  # JSON: loop counters, metrics, aggregator counts


def write_checkpoint(run_dir: Path, ckpt: Checkpoint) -> None:
    flat = {f"{client}/{name}": t.contiguous() for client, tensors in ckpt.clients.items()
            for name, t in tensors.items()}
    with atomic_dir(Path(run_dir) / CHECKPOINT) as staging:
        save_file({k: t.contiguous() for k, t in ckpt.server.items()}, str(staging / "server.safetensors"))
        save_file(flat, str(staging / "clients.safetensors"))
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
    if state.pop("format", None) != FORMAT:
        raise ValueError(f"{folder / 'state.json'} is not a fedsim checkpoint of format {FORMAT}")
    clients: dict[int, NamedTensors] = {}
    for key, tensor in load_file(str(folder / "clients.safetensors")).items():
        client, name = key.split("/", 1)
        clients.setdefault(int(client), {})[name] = tensor
    return Checkpoint(round=int(state.pop("round")), server=load_file(str(folder / "server.safetensors")),
                      clients=clients, state=state)
