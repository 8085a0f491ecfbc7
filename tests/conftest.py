"""Shared fixtures: the shipped tiny preset, small configs, one Ray instance per session."""

from __future__ import annotations

from pathlib import Path

import pytest

import fedsim.engine.loop as loop_module
from fedsim.config import ExperimentConfig
from fedsim.models.tiny import tiny_model_path
from fedsim.validation import load_config

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_path() -> Path:
    return tiny_model_path()


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
    """One local Ray instance for the whole session, with two logical GPUs on this CPU machine."""
    import ray

    ray.init(address="local", num_cpus=2, num_gpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


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
