"""Checkpoints and resume: a run killed mid-way and resumed ends where an uninterrupted run ends."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from fedsim.checkpoint import FILES, Checkpoint, check_checkpoint, read_checkpoint, write_checkpoint
from fedsim.cli import main
from fedsim.engine import run_sequential
from fedsim.output import read_metrics
from fedsim.statestore import STATES_DIR, StateManifest

from conftest import (REPO, FsSteps, in_background, one_model_for_every_run, record_crashes_while_checkpointing,
                      small_config)

SMALL = ["data.num_train=240", "data.num_test=40", "partition.num_clients=6", "federation.clients_per_round=3",
         "federation.rounds=4", "training.local_epochs=1", "eval.every=2", "eval.zero_shot=true",
         "output.progress=never", "runtime.engine=sequential", "runtime.num_threads=1", "checkpoint.every=1"]
QUICKSTART = str(REPO / "experiments" / "quickstart.yaml")


def checkpoint(round_idx: int) -> Checkpoint:
    return Checkpoint(round_idx, {"global/w": torch.arange(4.0) + round_idx, "version": torch.tensor(round_idx)},
                      StateManifest(np.array([0, 5]), np.array([2, round_idx])),
                      {"tally": {"updates": 9}, "metrics": {"accuracy": 0.5}},
                      {2: ({"a.lora_A": torch.ones(3)}, {}), 3: ({"a.lora_A": torch.zeros(3)}, {"c/a": torch.ones(1)})})


def test_checkpoint_round_trip_is_safetensors_and_json(tmp_path, monkeypatch):
    ckpt = checkpoint(3)
    write_checkpoint(tmp_path, ckpt)
    files = sorted(p.name for p in (tmp_path / "checkpoint").iterdir())
    assert files == ["COMPLETE", "clients.safetensors", "published.safetensors", "server.safetensors", "state.json"]
    back = read_checkpoint(tmp_path)
    assert back.round == 3 and back.state == ckpt.state
    assert back.clients.clients.tolist() == [0, 5] and back.clients.generations.tolist() == [2, 3]
    assert torch.equal(back.server["global/w"], ckpt.server["global/w"])
    assert set(back.published) == {2, 3} and back.published[2][1] == {}
    assert torch.equal(back.published[3][0]["a.lora_A"], torch.zeros(3))
    assert torch.equal(back.published[3][1]["c/a"], torch.ones(1))
    write_checkpoint(tmp_path, Checkpoint(4, ckpt.server, StateManifest(), {}))  # replaces the previous one whole
    assert read_checkpoint(tmp_path).round == 4 and len(read_checkpoint(tmp_path).clients.clients) == 0
    assert read_checkpoint(tmp_path).published == {}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging folder left behind
    server = tmp_path / "checkpoint" / "server.safetensors"
    damaged = bytearray(server.read_bytes())
    damaged[-1] ^= 1  # same size: complete by its seal, but not what was written
    server.write_bytes(bytes(damaged))
    with pytest.raises(ValueError, match=f"{server} does not match the sha256"):
        read_checkpoint(tmp_path)
    monkeypatch.setattr("fedsim.checkpoint.FORMAT", 2)
    write_checkpoint(tmp_path, ckpt)
    monkeypatch.undo()
    with pytest.raises(ValueError, match="not a fedsim checkpoint of format 4 \\(it says 2\\)"):
        read_checkpoint(tmp_path)


def test_a_crash_at_any_step_of_replacing_a_checkpoint_leaves_a_complete_one(tmp_path, monkeypatch):
    """Killed before any filesystem step of writing round 4's checkpoint over round 3's, the run directory holds
    round 3's until round 4's is sealed, then round 4's; the next checkpoint clears what the crash left."""
    run = tmp_path / "run"
    run.mkdir()
    write_checkpoint(run, checkpoint(3))
    fs = FsSteps(monkeypatch, tmp_path / "crashes")
    with fs.recording(run):
        write_checkpoint(run, checkpoint(4))
    monkeypatch.undo()
    rounds = [read_checkpoint(s).round for s in fs.snapshots()]
    assert rounds == sorted(rounds) and rounds[0] == 3 and rounds[-1] == 4
    assert [p.name for p in run.iterdir()] == ["checkpoint"] and read_checkpoint(run).round == 4

    # The order that makes it so on a power loss too: every file fsynced before the seal is written, the
    # staging folder synced before the renames, the run directory fsynced after each, the old one deleted last.
    steps, parent = fs.steps, str(run.resolve())
    seal = steps.index(next(s for s in steps if s[0] == "write" and s[1].endswith("/COMPLETE")))
    staged = os.path.dirname(steps[seal][1])
    assert {("fsync", f"{staged}/{name}") for name in FILES} <= set(steps[:seal])
    renames = [i for i, s in enumerate(steps) if s[0] == "replace"]
    assert [steps[i][1:] for i in renames] == [(f"{parent}/checkpoint", f"{staged}.old"),
                                               (staged, f"{parent}/checkpoint")]
    assert all(steps[i + 1] == ("fsync", parent) for i in renames)
    assert ("fsync", staged) in steps[seal:renames[0]]
    deletes = [i for i, s in enumerate(steps) if s[0] in ("unlink", "rmdir")]
    assert deletes and min(deletes) > renames[-1] + 1 and steps[-1] == ("rmdir", f"{staged}.old")

    for snapshot in fs.snapshots():  # whatever a crash left, the next checkpoint leaves just itself
        write_checkpoint(snapshot, checkpoint(5))
        assert [p.name for p in snapshot.iterdir()] == ["checkpoint"] and read_checkpoint(snapshot).round == 5


def test_resume_without_a_checkpoint_names_the_folder(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("name: x\n")
    assert main(["run", "--resume", str(run)]) == 2
    assert str(run / "checkpoint") in capsys.readouterr().err


def kill_after_checkpoint(proc: subprocess.Popen, run: Path, round_idx: int) -> bool:
    """SIGKILL ``proc`` once ``run`` holds round ``round_idx``'s checkpoint; whether it was still running then."""
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        state = run / "checkpoint" / "state.json"
        if state.exists() and json.loads(state.read_text())["round"] >= round_idx:
            break
        time.sleep(0.2)
    running = proc.poll() is None
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return running


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
    cut = tmp_path / "cut"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "fedsim.cli", "run", QUICKSTART, *SMALL, *algo,
                             f"output.dir={cut}"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    killed = in_background(kill_after_checkpoint, proc, cut, 2)
    # Meanwhile, on the other core (both runs use one thread), the run that is never interrupted.
    whole = tmp_path / "whole"
    assert main(["run", QUICKSTART, *SMALL, *algo, f"output.dir={whole}"]) == 0
    expected = json.loads((whole / "summary.json").read_text())
    assert killed.result(), "the run ended before it could be interrupted"
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


def distinct(snapshots: list[Path]) -> list[Path]:
    """The snapshots whose trees (names and contents) differ: a kill before an fsync leaves what a kill before the
    step ahead of it leaves (a killed process's writes are in the page cache)."""
    seen = {}
    for snapshot in snapshots:
        digest = hashlib.sha256()
        for path in sorted(snapshot.rglob("*")):
            digest.update(str(path.relative_to(snapshot)).encode() + b"\0")
            digest.update(path.read_bytes() if path.is_file() else b"/")
        seen.setdefault(digest.hexdigest(), snapshot)
    return list(seen.values())


@pytest.mark.slow
def test_a_run_killed_at_any_step_of_checkpointing_resumes_to_the_same_adapter(tmp_path, monkeypatch):
    """SCAFFOLD (client states in the store): the run directory as a kill before each filesystem step of round 2's
    checkpoint leaves it (its files, the old one's removal, the release of the client states only the old
    one named), resumed, ends with the uninterrupted run's adapter, from round 1's or round 2's checkpoint."""
    cfg = small_config(tmp_path, "algorithm.server.name=scaffold", "algorithm.client.name=scaffold",
                       "training.optimizer=sgd", "training.lr=0.05", "federation.rounds=2", "checkpoint.every=1",
                       "data.num_train=60", "data.num_test=8", "training.local_steps=1", "training.batch_size=4",
                       "eval.zero_shot=false", "eval.every=2",
                       "runtime.engine=sequential", "runtime.num_threads=1", "runtime.state_cache_mb=0")
    one_model_for_every_run(monkeypatch, cfg)
    with monkeypatch.context() as patch:
        fs = record_crashes_while_checkpointing(patch, 2, tmp_path / "crashes")
        whole = run_sequential(cfg, tmp_path / "run")  # recording changes nothing it does
    assert {step[0] for step in fs.steps} >= {"mkdir", "write", "fsync", "replace", "unlink", "rmdir"}
    assert any(step[0] == "unlink" and f"/{STATES_DIR}/" in step[1] for step in fs.steps)  # round 1's states
    resumed_after, resumed_from = set(), set()
    for snapshot in distinct(fs.snapshots()):
        resumed_from.add(check_checkpoint(snapshot).name.split("~")[0])  # checkpoint, or .checkpoint: staged
        summary = run_sequential(cfg, snapshot, resume=True)
        assert summary["adapter_sha256"] == whole["adapter_sha256"], snapshot.name
        assert summary["final_metrics"] == whole["final_metrics"], snapshot.name
        resumed_after.add(summary["resumed_after_round"])
    assert resumed_after == {1, 2} and resumed_from == {"checkpoint", ".checkpoint"}
