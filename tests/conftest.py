"""Shared fixtures: the shipped tiny preset, small configs, one Ray instance per session."""

from __future__ import annotations

import importlib.util
import os
import shutil
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest

import fedsim.engine.loop as loop_module
from fedsim.config import ExperimentConfig
from fedsim.models.tiny import tiny_model_path
from fedsim.validation import load_config

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_path() -> Path:
    return tiny_model_path()


def experiment_module(name: str):
    """A script of experiments/ (not a package) loaded as a module, for tests of its functions."""
    spec = importlib.util.spec_from_file_location(name, REPO / "experiments" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def in_background(call, *args) -> Future:
    """``call(*args)`` in a thread of its own, from now on: the test does other work (on the other core, or while
    a subprocess waits) and takes the result, or the exception, from the future when it needs it."""
    pool = ThreadPoolExecutor(max_workers=1)
    try:
        return pool.submit(call, *args)
    finally:
        pool.shutdown(wait=False)


def small_config(tmp_path: Path, *overrides: str) -> ExperimentConfig:
    """A federation small enough for a unit test: 6 clients, 3 per round, tiny data."""
    base = [
        "data.num_train=240", "data.num_test=60", "partition.num_clients=6", "federation.clients_per_round=3",
        "federation.rounds=2", "training.batch_size=8", "training.local_epochs=1", "eval.every=1",
        "output.progress=never", f"output.dir={tmp_path / 'run'}",
    ]
    return load_config(REPO / "experiments" / "quickstart.yaml", base + list(overrides))


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray instance for the whole session, with two logical GPUs on this CPU machine (started as
    fedsim starts one: loopback only, token auth)."""
    import ray

    from actors.local_ray import start_local_ray, stop_local_ray

    start_local_ray(num_cpus=2, num_gpus=2, log_to_driver=False)
    yield ray
    stop_local_ray()


def adamw_steps(model, batch: dict, steps: int = 3, lr: float = 1e-2) -> list[float]:
    """Train the model's trainable parameters on one batch for a few AdamW steps; the losses seen."""
    import torch

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(steps):
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def run_killed_while_checkpointing(monkeypatch, at_round: int, run, *args) -> None:
    """``run(*args)`` with the loop dying as it writes round ``at_round``'s checkpoint (after that round's client
    states were stored, before the checkpoint that names them exists)."""
    write = loop_module.write_checkpoint

    def crash(run_dir, ckpt):
        if ckpt.round == at_round:
            raise RuntimeError("killed")
        write(run_dir, ckpt)

    monkeypatch.setattr(loop_module, "write_checkpoint", crash)
    with pytest.raises(RuntimeError, match="killed"):
        run(*args)
    monkeypatch.undo()


FS_STEPS = ("mkdir", "write", "fsync", "replace", "rename", "unlink", "rmdir")  # the os calls that change a disk


def _fd_path(fd: int) -> str:
    return os.readlink(f"/proc/self/fd/{fd}")


def _step_paths(name: str, args: tuple, kwargs: dict) -> tuple[str, ...]:
    """The paths an os call of FS_STEPS acts on (two for a rename), absolute."""
    if name in ("write", "fsync"):
        return (_fd_path(args[0]),)
    dir_fd = kwargs.get("dir_fd", kwargs.get("src_dir_fd"))  # shutil.rmtree works relative to folder fds
    base = _fd_path(dir_fd) if dir_fd is not None else os.getcwd()
    return tuple(os.path.join(base, os.fspath(p)) for p in args[:2 if name in ("replace", "rename") else 1])


class FsSteps:
    """Records the filesystem steps (os calls of FS_STEPS) taken inside ``recording()``, as (call, *paths); with
    ``into``, it first copies the recorded folder to ``into/<k>`` before step k: what a process killed at that
    step leaves on disk (nothing after a kill runs, so no cleanup either)."""

    def __init__(self, monkeypatch, into: Path | None = None):
        self.into = into
        self.steps: list[tuple[str, ...]] = []
        self.folder: Path | None = None
        self.active = False
        for name in FS_STEPS:
            monkeypatch.setattr(os, name, self._wrap(name, getattr(os, name)))

    def _wrap(self, name, call):
        def step(*args, **kwargs):
            if self.active:
                self.active = False  # the copy's own steps are not recorded
                try:
                    self.steps.append((name, *_step_paths(name, args, kwargs)))
                    if self.into is not None:
                        shutil.copytree(self.folder, self.into / f"{len(self.steps):03d}", symlinks=True)
                finally:
                    self.active = True
            return call(*args, **kwargs)
        return step

    @contextmanager
    def recording(self, folder: Path | None = None) -> Iterator[None]:
        self.folder, self.active = folder, True
        try:
            yield
        finally:
            self.active = False

    def snapshots(self) -> list[Path]:
        return sorted(self.into.iterdir())


def record_crashes_while_checkpointing(monkeypatch, at_round: int, into: Path) -> FsSteps:
    """``FsSteps`` of the loop's checkpoint of round ``at_round`` (the checkpoint's files, the old one's removal
    and the release of the client states only it referred to), with the run directory copied before each."""
    steps = FsSteps(monkeypatch, into)
    save = loop_module.FederationLoop.save_checkpoint

    def save_checkpoint(loop, round_idx, *args, **kwargs):
        if round_idx != at_round:
            return save(loop, round_idx, *args, **kwargs)
        with steps.recording(loop.writer.dir):
            return save(loop, round_idx, *args, **kwargs)

    monkeypatch.setattr(loop_module.FederationLoop, "save_checkpoint", save_checkpoint)
    return steps


def one_model_for_every_run(monkeypatch, cfg: ExperimentConfig) -> None:
    """Engines load ``cfg``'s model once for all the runs of a test, each run starting from its initial adapter
    (loading it is most of what a tiny run costs)."""
    from fedsim.models.adapter import get_weights, set_weights
    from fedsim.models.loading import load_model
    from fedsim.seeding import derive_seed

    loaded = load_model(cfg.model, derive_seed(cfg.seed, "lora_init"))
    initial = get_weights(loaded.model)

    def load(model_cfg, seed):
        assert model_cfg == cfg.model and seed == derive_seed(cfg.seed, "lora_init"), "another model than cfg's"
        set_weights(loaded.model, initial)
        return loaded

    monkeypatch.setattr("fedsim.engine.sequential.load_model", load)
