"""The client state store: states in files (folders of a thousand clients), a cache bounded in bytes, writes
that a crash cannot spoil, checkpoints that refer to the files instead of copying them, and a run resumed
from such a checkpoint after states were written past it."""

from __future__ import annotations

import json
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from fedsim.checkpoint import read_checkpoint
from fedsim.engine import run_sequential
from fedsim.messages import NamedTensors, nbytes
from fedsim.output import read_metrics
from fedsim.statestore import STATES_DIR, ClientStateStore, StateManifest, StateStoreError

from conftest import FsSteps, one_model_for_every_run, run_killed_while_checkpointing, small_config


def state(value: int) -> NamedTensors:
    return {"w": torch.full((64, 4), float(value), dtype=torch.bfloat16), "steps": torch.tensor([value, 7])}


def same(a: NamedTensors | None, b: NamedTensors) -> bool:
    return a is not None and a.keys() == b.keys() and all(
        a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in b)


def files(directory: Path) -> list[str]:
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file())


def test_states_round_trip_through_one_file_each_in_folders_of_a_thousand_clients(tmp_path):
    store = ClientStateStore(tmp_path, num_clients=2500, cache_bytes=0)
    for client in (0, 999, 1000, 2499):
        store.put(client, state(client))
    assert files(tmp_path) == ["0000/0.1.safetensors", "0000/999.1.safetensors", "0001/1000.1.safetensors",
                               "0002/2499.1.safetensors"]
    assert all(same(store.get(c), state(c)) for c in (0, 999, 1000, 2499))  # read back from disk
    assert store.get(5) is None and 5 not in store and 999 in store and len(store) == 4
    assert store.clients().tolist() == [0, 999, 1000, 2499]
    store.put(999, state(1))  # the next generation; no checkpoint refers to the old file, so it goes
    assert files(tmp_path)[1] == "0000/999.2.safetensors" and len(files(tmp_path)) == 4
    assert same(store.get(999), state(1))
    assert store.generation.nbytes + store.kept.nbytes == 8 * 2500  # the index: 8 bytes per registered client


def test_the_cache_keeps_the_most_recently_used_states_within_its_bytes(tmp_path):
    size = nbytes(state(0))
    store = ClientStateStore(tmp_path, 10, cache_bytes=3 * size)
    for client in range(5):
        store.put(client, state(client))
    assert list(store.cache) == [2, 3, 4] and store.cached_bytes == 3 * size
    store.get(2)
    assert same(store.get(0), state(0))  # from disk, into the cache; 3, now the least recently used, out
    assert list(store.cache) == [4, 2, 0] and store.cached_bytes == 3 * size
    store.put(4, state(40))  # replaced in the cache, counted once
    assert list(store.cache) == [2, 0, 4] and store.cached_bytes == 3 * size and same(store.get(4), state(40))
    none = ClientStateStore(tmp_path / "none", 10, cache_bytes=size - 1)  # too small for one state
    none.put(1, state(1))
    assert not none.cache and none.cached_bytes == 0 and same(none.get(1), state(1)) and not none.cache


def test_a_write_cut_short_leaves_the_previous_state_readable(tmp_path, monkeypatch):
    store = ClientStateStore(tmp_path, 10, cache_bytes=0)
    store.put(3, state(1))

    def crash(src, dst):  # the new file is written under its temporary name; the rename never happens
        raise OSError("disk gone")

    monkeypatch.setattr("fedsim.output.os.replace", crash)
    with pytest.raises(OSError, match="disk gone"):
        store.put(3, state(2))
    monkeypatch.undo()
    assert same(store.get(3), state(1)) and store.generation[3] == 1
    assert files(tmp_path) == ["0000/3.1.safetensors"]  # the temporary file was removed
    # A process killed mid-write leaves its temporary file: a store opened later reads the state it refers to
    # and deletes the leftover.
    (tmp_path / "0000" / ".3.2.safetensors-x1y2").write_bytes(b"\x00" * 10)
    reopened = ClientStateStore(tmp_path, 10, 0, StateManifest(np.array([3]), np.array([1])))
    assert same(reopened.get(3), state(1)) and files(tmp_path) == ["0000/3.1.safetensors"]


def test_a_stored_state_and_the_folders_it_is_renamed_into_are_fsynced(tmp_path, monkeypatch):
    fs = FsSteps(monkeypatch)
    store = ClientStateStore(tmp_path / "states", 10, cache_bytes=0)
    with fs.recording():
        store.put(3, state(1))
    root, folder = str((tmp_path / "states").resolve()), str((tmp_path / "states" / "0000").resolve())
    tmp = fs.steps[-3][1]  # the temporary name it is written under
    assert fs.steps == [("mkdir", root), ("fsync", str(tmp_path.resolve())), ("mkdir", folder), ("fsync", root),
                        ("write", tmp), ("fsync", tmp), ("replace", tmp, f"{folder}/3.1.safetensors"),
                        ("fsync", folder)]


def test_a_state_file_that_cannot_be_read_is_an_error_naming_it(tmp_path):
    store = ClientStateStore(tmp_path, 10, cache_bytes=0)
    store.put(1, state(1))
    store.put(2, state(2))
    store.path(1, 1).write_bytes(store.path(1, 1).read_bytes()[:-7])  # cut short
    store.path(2, 1).unlink()
    for client in (1, 2):
        with pytest.raises(StateStoreError, match=f"client state file {re.escape(str(store.path(client, 1)))} "
                                                  "cannot be read") as error:
            store.get(client)
        again = pickle.loads(pickle.dumps(error.value))  # as it crosses from a Ray actor
        assert again.path == store.path(client, 1) and str(again) == str(error.value)


def test_a_checkpoint_keeps_its_files_until_the_next_one_is_written(tmp_path):
    store = ClientStateStore(tmp_path, 10, cache_bytes=0)
    store.put(1, state(1))
    store.put(2, state(2))
    first = store.pin()  # the checkpoint being written refers to 1.1 and 2.1
    assert first.clients.tolist() == [1, 2] and first.generations.tolist() == [1, 1]
    store.put(1, state(11))  # while it is written: a new file, the pinned one stays
    store.release()
    store.put(1, state(12))  # 1.2 goes (no checkpoint refers to it); 1.1 stays (the last checkpoint's)
    assert files(tmp_path) == ["0000/1.1.safetensors", "0000/1.3.safetensors", "0000/2.1.safetensors"]
    second = store.pin()
    store.release()  # the second checkpoint is written: 1.1 goes
    assert files(tmp_path) == ["0000/1.3.safetensors", "0000/2.1.safetensors"]
    store.put(2, state(22))
    # Resumed from the second checkpoint: exactly its states; 2.2, written after it, is deleted.
    resumed = ClientStateStore(tmp_path, 10, 0, second)
    assert same(resumed.get(1), state(12)) and same(resumed.get(2), state(2))
    assert files(tmp_path) == ["0000/1.3.safetensors", "0000/2.1.safetensors"]
    with pytest.raises(FileNotFoundError, match=r"1 client state file\(s\) the checkpoint refers to are missing"):
        ClientStateStore(tmp_path, 10, 0, first)  # 1.1 is gone
    assert files(tmp_path) == ["0000/1.3.safetensors", "0000/2.1.safetensors"]  # and nothing was deleted
    with pytest.raises(ValueError, match="partition.num_clients"):
        ClientStateStore(tmp_path, 2, 0, second)


@pytest.mark.slow
def test_scaffold_resumes_from_files_a_crash_left_past_the_checkpoint(tmp_path, monkeypatch):
    """The run dies writing its round-2 checkpoint, after round 2 stored new client states; resumed from the
    round-1 checkpoint, whose states are still on disk, it ends with the uninterrupted run's adapter."""
    overrides = ("algorithm.server.name=scaffold", "algorithm.client.name=scaffold", "training.optimizer=sgd",
                 "training.lr=0.05", "federation.rounds=2", "checkpoint.every=1", "eval.zero_shot=false",
                 "eval.every=2", "runtime.engine=sequential", "runtime.state_cache_mb=0", "runtime.num_threads=1")
    whole = run_sequential(small_config(tmp_path / "whole", *overrides), tmp_path / "whole" / "run")

    cfg, run = small_config(tmp_path / "cut", *overrides), tmp_path / "cut" / "run"
    run_killed_while_checkpointing(monkeypatch, 2, run_sequential, cfg, run)
    ckpt = read_checkpoint(run)
    assert ckpt.round == 1 and len(ckpt.clients.clients) == 3
    on_disk = set(files(run / STATES_DIR))
    referred = {f"{c // 1000:04d}/{c}.{g}.safetensors" for c, g in zip(ckpt.clients.clients.tolist(),
                                                                        ckpt.clients.generations.tolist())}
    assert referred <= on_disk and on_disk - referred  # round 2 wrote new generations beside them

    resumed = run_sequential(cfg, run, resume=True)
    assert resumed["adapter_sha256"] == whole["adapter_sha256"] and resumed["final_metrics"] == whole["final_metrics"]
    assert json.loads((run / "summary.json").read_text())["resumed_after_round"] == 1
    final = read_checkpoint(run).clients
    assert set(files(run / STATES_DIR)) == {f"{c // 1000:04d}/{c}.{g}.safetensors"
                                            for c, g in zip(final.clients.tolist(), final.generations.tolist())}


@pytest.mark.slow
def test_a_damaged_state_file_stops_the_run_naming_it(tmp_path, monkeypatch):
    """A state file the checkpoint names, cut short after the run was killed: the resumed run stops with an error
    naming it when a client drawn again needs it, instead of counting that client's dropout and going on."""
    cfg = small_config(tmp_path, "algorithm.server.name=scaffold", "algorithm.client.name=scaffold",
                       "training.optimizer=sgd", "training.lr=0.05", "federation.clients_per_round=5",
                       "training.local_steps=1", "training.batch_size=4", "data.num_test=8", "checkpoint.every=1",
                       "eval.zero_shot=false", "eval.every=2", "runtime.engine=sequential", "runtime.num_threads=1",
                       "runtime.state_cache_mb=0")
    run = tmp_path / "run"
    one_model_for_every_run(monkeypatch, cfg)
    run_killed_while_checkpointing(monkeypatch, 2, run_sequential, cfg, run)
    stored = read_checkpoint(run).clients  # round 1's
    again = read_metrics(run)[1]["clients"]  # round 2's, drawn again when it resumes; 5 of 6: some of round 1's
    client, generation = next((c, g) for c, g in zip(stored.clients.tolist(), stored.generations.tolist())
                              if c in again)
    damaged = run / STATES_DIR / f"{client // 1000:04d}" / f"{client}.{generation}.safetensors"
    damaged.write_bytes(damaged.read_bytes()[:100])
    with pytest.raises(StateStoreError, match=re.escape(str(damaged))):
        run_sequential(cfg, run, resume=True)
    assert not (run / "summary.json").exists()
