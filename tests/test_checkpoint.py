"""Checkpoints and resume: a run killed mid-way and resumed ends where an uninterrupted run ends."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from fedsim.checkpoint import Checkpoint, read_checkpoint, write_checkpoint
from fedsim.cli import main
from fedsim.output import read_metrics
from fedsim.statestore import StateManifest

from conftest import REPO

SMALL = ["data.num_train=240", "data.num_test=40", "partition.num_clients=6", "federation.clients_per_round=3",
         "federation.rounds=4", "training.local_epochs=1", "eval.every=2", "eval.zero_shot=true",
         "output.progress=never", "runtime.engine=sequential", "runtime.num_threads=1", "checkpoint.every=1"]
QUICKSTART = str(REPO / "experiments" / "quickstart.yaml")


def test_checkpoint_round_trip_is_safetensors_and_json(tmp_path):
    ckpt = Checkpoint(3, {"global/w": torch.arange(4.0), "version": torch.tensor(3)},
                      StateManifest(np.array([0, 5]), np.array([2, 7])),
                      {"tally": {"updates": 9}, "metrics": {"accuracy": 0.5}},
                      {2: ({"a.lora_A": torch.ones(3)}, {}), 3: ({"a.lora_A": torch.zeros(3)}, {"c/a": torch.ones(1)})})
    write_checkpoint(tmp_path, ckpt)
    files = sorted(p.name for p in (tmp_path / "checkpoint").iterdir())
    assert files == ["clients.safetensors", "published.safetensors", "server.safetensors", "state.json"]
    back = read_checkpoint(tmp_path)
    assert back.round == 3 and back.state == ckpt.state
    assert back.clients.clients.tolist() == [0, 5] and back.clients.generations.tolist() == [2, 7]
    assert torch.equal(back.server["global/w"], ckpt.server["global/w"])
    assert set(back.published) == {2, 3} and back.published[2][1] == {}
    assert torch.equal(back.published[3][0]["a.lora_A"], torch.zeros(3))
    assert torch.equal(back.published[3][1]["c/a"], torch.ones(1))
    write_checkpoint(tmp_path, Checkpoint(4, ckpt.server, StateManifest(), {}))  # replaces the previous one whole
    assert read_checkpoint(tmp_path).round == 4 and len(read_checkpoint(tmp_path).clients.clients) == 0
    assert read_checkpoint(tmp_path).published == {}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging folder left behind
    state = tmp_path / "checkpoint" / "state.json"
    state.write_text(json.dumps({**json.loads(state.read_text()), "format": 2}))
    with pytest.raises(ValueError, match="not a fedsim checkpoint of format 3 \\(it says 2\\)"):
        read_checkpoint(tmp_path)


def test_resume_without_a_checkpoint_names_the_folder(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("name: x\n")
    assert main(["run", "--resume", str(run)]) == 2
    assert str(run / "checkpoint") in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("algo", [
    ["algorithm.server.name=fedadagrad"],
    ["algorithm.server.name=scaffold", "algorithm.client.name=scaffold", "training.optimizer=sgd", "training.lr=0.05"],
    # Asynchronous: 4 clients in flight for a buffer of 2, so stale tasks are in flight at each checkpoint.
    ["algorithm.server.name=fedbuff", "algorithm.server.buffer_size=2", "scheduler.concurrency=4",
     "scheduler.speed=lognormal"],
], ids=["fedadagrad", "scaffold", "fedbuff"])
def test_a_killed_run_resumes_to_the_same_adapter(tmp_path, algo):
    """The driver is killed (SIGKILL) after its second checkpoint; ``fedsim run --resume`` finishes the
    run with the same adapter_sha256, metrics and counters as a run that was never interrupted."""
    whole = tmp_path / "whole"
    assert main(["run", QUICKSTART, *SMALL, *algo, f"output.dir={whole}"]) == 0
    expected = json.loads((whole / "summary.json").read_text())

    cut = tmp_path / "cut"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "fedsim.cli", "run", QUICKSTART, *SMALL, *algo,
                             f"output.dir={cut}"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        state = cut / "checkpoint" / "state.json"
        if state.exists() and json.loads(state.read_text())["round"] >= 2:
            break
        time.sleep(0.2)
    assert proc.poll() is None, "the run ended before it could be interrupted"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (cut / "summary.json").exists()
    ckpt = read_checkpoint(cut)
    if "planner" in ckpt.state:  # asynchronous: tasks were in flight, some from an older (stale) version
        assert ckpt.state["in_flight"] and min(ckpt.published) < ckpt.round

    assert main(["run", "--resume", str(cut)]) == 0
    resumed = json.loads((cut / "summary.json").read_text())
    assert resumed["adapter_sha256"] == expected["adapter_sha256"]
    assert resumed["resumed_after_round"] >= 2
    for key in ("final_metrics", "zero_shot_metrics", "client_updates", "bytes_up", "bytes_down",
                "simulated_seconds", "staleness", "stale_updates"):
        assert resumed[key] == expected[key], key
    assert [r["round"] for r in read_metrics(cut)] == [1, 2, 3, 4]
    assert [r["eval"] for r in read_metrics(cut) if "eval" in r] == \
        [r["eval"] for r in read_metrics(whole) if "eval" in r]
