"""Client states (SCAFFOLD's c_i, personal adapters) on disk, one safetensors file per state, with a bounded
cache in memory.

A state is as large as the adapter (8.7 MB for a 2B model's): a thousand stateful clients held in memory
would take 8.7 GB. The store keeps them in ``RUN_DIR/client_states/``, as
``<client // 1000>/<client>.<generation>.safetensors``: one file per state, so that writing one is one
atomic rename (an append-only shard would need compaction, and a torn append could spoil its neighbours),
in folders of at most a thousand clients, so that a million clients make a thousand folders, none of them
huge. Per-file overhead (an inode, a few KB) is nothing next to a state's megabytes.

In memory: two 4-byte generation counters per registered client, whatever their number of states, and the
most recently used states up to ``cache_bytes``.

Files are immutable: storing a client's state writes the next generation to a temporary name and renames
it into place, so a crash at any moment leaves every stored state readable. The superseded file is deleted
at once, unless a checkpoint refers to it (copy-on-write): ``pin()`` gives the manifest a checkpoint
records (clients and generations) and keeps its files; ``release()``, once that checkpoint is durable on
disk, deletes those that only the checkpoint before it referred to, so that whichever of the two a crash
leaves complete finds its states. A store opened from a manifest (``fedsim run --resume``) holds exactly
the checkpoint's states; files written after it are deleted then. Files and the folders they are renamed
into are fsynced.

A state file that cannot be read (missing, or not safetensors) raises ``StateStoreError`` naming it: the
run stops there, since going on without the state would silently change the client's training.

Where it lives: in the process that keeps client states (the sequential engine's; on Ray, the aggregator
actor, which runs on the driver's node), on that node's disk, in the run directory the driver writes. On a
cluster, workers never touch it, so it needs no shared storage; the run directory's disk must hold every
stateful client's state (twice, for the clients updated since the last checkpoint), and a resumed run must
see the same run directory (the same node, or a shared file system).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import numpy as np
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from fedsim.lru import BytesLRU
from fedsim.messages import NamedTensors, WireTensors
from fedsim.output import atomic_write_bytes, make_dirs

STATES_DIR = "client_states"  # in the run directory
CLIENTS_PER_FOLDER = 1000
SUFFIX = ".safetensors"


class StateStoreError(Exception):
    """A client state file the store refers to cannot be read: not a client's failure to count as its dropout,
    but damage to the run directory that stops the run."""

    def __init__(self, path: str | Path, reason: str):
        super().__init__(str(path), reason)  # both in args: the error pickles (across Ray) as it was raised
        self.path = Path(path)
        self.reason = reason

    def __str__(self) -> str:
        return (f"client state file {self.path} cannot be read ({self.reason}): the run cannot go on without "
                f"that client's state (was the run directory's {STATES_DIR}/ folder changed or damaged?)")


@dataclass(frozen=True)
class StateManifest:
    """The client states a checkpoint holds: client ids (ascending) and the generation of each one's file."""

    clients: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    generations: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))


class ClientSet:
    """A set of client ids as one byte per registered client (a Python set costs some 60 bytes per member)."""

    def __init__(self, num_clients: int):
        self.member = np.zeros(num_clients, dtype=bool)

    def __contains__(self, client: int) -> bool:
        return bool(self.member[client])

    def add(self, client: int) -> None:
        self.member[client] = True

    def update(self, clients: Iterable[int]) -> None:
        self.member[np.fromiter(clients, dtype=np.int64)] = True


class ClientStateStore:
    """States of clients ``0 .. num_clients - 1`` under ``directory``, opened with the states of ``manifest``
    (None: none; files of an earlier process that the manifest does not name are deleted)."""

    def __init__(self, directory: Path, num_clients: int, cache_bytes: int, manifest: StateManifest | None = None):
        self.directory = Path(directory)
        self.cache_bytes = cache_bytes
        self.generation = np.zeros(num_clients, dtype=np.uint32)  # of the client's current file; 0: no state
        self.kept = np.zeros(num_clients, dtype=np.uint32)  # the file the last written checkpoint refers to
        self.pinned: np.ndarray | None = None  # generations of a checkpoint being written
        self.cache = BytesLRU(cache_bytes)  # cache_bytes=0 caches nothing
        manifest = manifest or StateManifest()
        if len(manifest.clients) and not 0 <= manifest.clients.min() <= manifest.clients.max() < num_clients:
            raise ValueError(f"the checkpoint's client states name clients outside 0..{num_clients - 1}: "
                             "it belongs to a run with another partition.num_clients")
        self.generation[manifest.clients] = manifest.generations
        self.kept[manifest.clients] = manifest.generations
        self._sweep(manifest)

    def path(self, client: int, generation: int) -> Path:
        return self.directory / f"{client // CLIENTS_PER_FOLDER:04d}" / f"{client}.{generation}{SUFFIX}"

    def _sweep(self, manifest: StateManifest) -> None:
        """Delete every file but the manifest's (and temporaries a crash left); fail if one of those is missing."""
        found = np.zeros(len(self.generation), dtype=bool)
        unreferenced = []
        folders = [e for e in os.scandir(self.directory) if e.is_dir()] if self.directory.is_dir() else []
        for folder in folders:
            for entry in os.scandir(folder.path):
                client, generation = _parse(entry.name)
                if client is not None and client < len(self.generation) and self.generation[client] == generation:
                    found[client] = True
                elif client is not None or entry.name.startswith("."):
                    unreferenced.append(entry.path)
        missing = manifest.clients[~found[manifest.clients]]
        if len(missing):  # before deleting anything: the wrong checkpoint must not cost the right one's files
            example = self.path(int(missing[0]), int(self.generation[missing[0]]))
            raise FileNotFoundError(f"{len(missing)} client state file(s) the checkpoint refers to are missing, "
                                    f"e.g. {example}: a checkpoint needs the {STATES_DIR}/ folder of its run "
                                    "directory as the run left it")
        for path in unreferenced:
            os.unlink(path)

    # ------------------------------------------------------------------------------- states
    def __contains__(self, client: int) -> bool:
        return bool(self.generation[client])

    def __len__(self) -> int:
        return int(np.count_nonzero(self.generation))

    def clients(self) -> np.ndarray:
        """The clients that have a state, ascending."""
        return np.flatnonzero(self.generation)

    def get(self, client: int) -> NamedTensors | None:
        generation = int(self.generation[client])
        if not generation:
            return None
        state = self.cache.lookup(client)
        if state is None:
            path = self.path(client, generation)
            try:
                state = load_file(str(path))
            except (OSError, SafetensorError) as err:
                raise StateStoreError(path, str(err)) from err
            self.cache.keep(client, state)
        return WireTensors(state)

    def put(self, client: int, state: NamedTensors) -> None:
        old = int(self.generation[client])
        path = self.path(client, old + 1)
        make_dirs(path.parent)
        atomic_write_bytes(path, save({name: t.contiguous() for name, t in state.items()}))
        self.generation[client] = old + 1
        if old and not self._referenced(client, old):
            self.path(client, old).unlink()
        self.cache.keep(client, state)

    def _referenced(self, client: int, generation: int) -> bool:
        """Whether a checkpoint (written, or being written) refers to that file."""
        return generation == self.kept[client] or (self.pinned is not None and generation == self.pinned[client])

    @property
    def cached_bytes(self) -> int:
        return self.cache.bytes

    # ------------------------------------------------------------------------------- checkpoints
    def pin(self) -> StateManifest:
        """The current states, for a checkpoint to record; their files stay, whatever is stored later, until
        ``release()`` after the next checkpoint."""
        self.pinned = self.generation.copy()
        clients = np.flatnonzero(self.pinned)
        return StateManifest(clients.astype(np.int64), self.pinned[clients].astype(np.int64))

    def release(self) -> None:
        """The checkpoint of the last ``pin()`` is durable (its predecessor deleted): delete the files only that
        predecessor referred to."""
        if self.pinned is None:
            raise RuntimeError("release() without pin(): no checkpoint is being written")
        stale = np.flatnonzero((self.kept != 0) & (self.kept != self.pinned) & (self.kept != self.generation))
        for client in stale.tolist():
            self.path(client, int(self.kept[client])).unlink()
        self.kept, self.pinned = self.pinned, None


def _parse(name: str) -> tuple[int | None, int]:
    """(client, generation) of a state file's name; (None, 0) for any other name."""
    stem, _, generation = name.removesuffix(SUFFIX).partition(".")
    if not name.endswith(SUFFIX) or not (stem.isdigit() and generation.isdigit()):
        return None, 0
    return int(stem), int(generation)
