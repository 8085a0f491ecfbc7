"""Experiment trackers (output.trackers): what TensorBoard, MLflow and W&B hold after real runs, read back with
each library's own reader; the sweep's grouping, the missing-extra refusal and the docs' example tracker."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import psutil
import pytest

from fedsim.cli import main
from fedsim.config import ConfigError
from fedsim.engine import run_sequential
from fedsim.output import RunWriter, read_metrics
from fedsim.sweep import Sweep
from fedsim.trackers import TRACKERS, Trackers, config_params, numeric_fields
from fedsim.validation import load_config

from conftest import REPO, one_model_for_every_run, run_killed_while_checkpointing

QUICKSTART = str(REPO / "experiments" / "quickstart.yaml")
# 2 clients, one of them in each of 2 rounds (FedBuff: both in flight, 2 versions of 2 updates), one optimizer
# step of 4 samples per update, evaluated on 8 samples after the last round only
TINY = ["data.num_train=40", "data.num_test=8", "partition.num_clients=2", "federation.clients_per_round=1",
        "scheduler.concurrency=2", "federation.rounds=2", "training.local_steps=1", "training.batch_size=4",
        "algorithm.server.buffer_size=2", "eval.every=2", "eval.zero_shot=false", "runtime.engine=sequential",
        "output.progress=never"]


def point_config(sweep: Sweep, point):
    """The config that the ``fedsim run`` of a sweep's point runs with, read from its command line."""
    command = sweep.command(point)
    args = command[command.index("run") + 1:]
    return load_config([a for a in args if "=" not in a], [a for a in args if "=" in a])


def wandb_core_processes() -> list[psutil.Process]:
    return [p for p in psutil.Process().children(recursive=True) if "wandb-core" in " ".join(p.cmdline())]


@pytest.fixture(scope="module")
def grouped_runs(tmp_path_factory):
    """The two runs of a sweep over algorithm.server.name, in this process, as the sweep's commands configure
    them: one sweep directory and name for their trackers. FedAvg's run has all three trackers and is killed
    while it checkpoints its last round, then resumed; FedBuff's (asynchronous) has TensorBoard and MLflow.
    No W&B setting of the environment applies, and W&B's own files stay in the test's folder."""
    sweep = Sweep.plan([QUICKSTART], [*TINY, "output.trackers=[tensorboard,mlflow,wandb]", "checkpoint.every=1"],
                       ["algorithm.server.name=fedavg,fedbuff"], str(tmp_path_factory.mktemp("s") / "sweep-trackers"))
    fedavg, fedbuff = sweep.points()
    sync_cfg = point_config(sweep, fedavg)
    async_cfg = point_config(sweep, fedbuff)
    async_cfg.output.trackers = ["tensorboard", "mlflow"]
    with pytest.MonkeyPatch.context() as env:
        for name in [n for n in os.environ if n.startswith(("WANDB_", "MLFLOW_"))]:
            env.delenv(name)
        env.setenv("MLFLOW_ALLOW_FILE_STORE", "")  # recorded first, so that the value the tracker sets is undone
        env.delenv("MLFLOW_ALLOW_FILE_STORE")
        for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
            env.setenv(name, str(sweep.dir / ".wandb-home"))
        one_model_for_every_run(env, sync_cfg)
        sync_dir, async_dir = Path(sync_cfg.output.dir), Path(async_cfg.output.dir)
        import wandb

        try:
            with pytest.MonkeyPatch.context() as crash:
                run_killed_while_checkpointing(crash, 2, run_sequential, sync_cfg, sync_dir)
            sync_summary = run_sequential(sync_cfg, sync_dir, resume=True)
            async_summary = run_sequential(async_cfg, async_dir)
        finally:
            wandb.teardown()  # stops W&B's service process (wandb-core), which outlives the runs otherwise
        yield SimpleNamespace(sweep=sweep, sync_cfg=sync_cfg, sync_dir=sync_dir, sync_summary=sync_summary,
                              async_dir=async_dir, async_summary=async_summary,
                              wandb_left_running=wandb_core_processes())


def tensorboard_events(logdir: Path):
    """TensorBoard's view of a log directory: its EventAccumulator, every event file loaded in order."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    return events


def expected_steps(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Each number of the run's metrics.jsonl as (step, value) pairs, as a tracker should hold them."""
    steps: dict[str, list[tuple[int, float]]] = {}
    for record in read_metrics(run_dir):
        for key, value in numeric_fields(record).items():
            steps.setdefault(key, []).append((record["round"], value))
    return steps


def test_numbers_are_flattened_with_slashes_and_the_config_with_dots():
    assert numeric_fields({"round": 2, "clients": [0, 1], "eval": {"accuracy": 0.5, "no_image": {"accuracy": 0.25}},
                           "engine": "ray", "resumed": True, "epsilon": None}) == \
        {"round": 2, "eval/accuracy": 0.5, "eval/no_image/accuracy": 0.25}
    params = config_params(load_config(QUICKSTART, [*TINY, "output.trackers=[tensorboard,mlflow]"]))
    assert (params["algorithm.server.name"], params["output.trackers"], params["model.revision"],
            params["federation.rounds"]) == ("fedavg", '["tensorboard", "mlflow"]', "null", 2)
    assert len(params) == len(re.findall(r"^\| `", (REPO / "docs" / "configuration.md").read_text(), re.M))


@pytest.mark.slow  # the runs of grouped_runs
def test_tensorboard_holds_each_step_once_the_config_and_the_summary(grouped_runs):
    from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData

    run = grouped_runs
    logdir = run.sweep.dir / "tensorboard" / run.sync_dir.name
    assert len(list(logdir.glob("events.out.tfevents.*"))) == 2  # one before the crash, one after the resume
    events = tensorboard_events(logdir)
    expected = expected_steps(run.sync_dir)
    summary = {f"summary/{k}": v for k, v in numeric_fields(run.sync_summary).items()}
    assert set(events.Tags()["scalars"]) == set(expected) | set(summary)
    # round 2 was logged before the crash and again after the resume: the first is purged (wall_seconds differ)
    for tag, steps in expected.items():
        assert [(e.step, e.value) for e in events.Scalars(tag)] == [(s, pytest.approx(v, rel=1e-6)) for s, v in steps]
    for tag, value in summary.items():
        assert [(e.step, e.value) for e in events.Scalars(tag)] == [(2, pytest.approx(value, rel=1e-6))]
    [text] = events.Tensors("summary.json/text_summary")
    assert json.loads(text.tensor_proto.string_val[0].decode()) == run.sync_summary
    [content] = events.PluginTagToContent("hparams").values()
    hparams = HParamsPluginData.FromString(content).session_start_info.hparams
    params = config_params(run.sync_cfg)
    assert set(hparams) == set(params)
    for key, value in params.items():
        kind = hparams[key].WhichOneof("kind")
        assert getattr(hparams[key], kind) == (float(value) if kind == "number_value" else value), key


def mlflow_runs(run) -> tuple[Any, dict[str, Any]]:
    """An MlflowClient of the sweep's file store, and the runs of the sweep's experiment by name."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient((run.sweep.dir / "mlruns").resolve().as_uri())
    experiment = client.get_experiment_by_name(run.sweep.dir.name)
    return client, {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}


@pytest.mark.slow  # the runs of grouped_runs
def test_mlflow_holds_params_metrics_per_step_and_the_artifacts(grouped_runs, tmp_path):
    run = grouped_runs
    client, runs = mlflow_runs(run)
    mlflow_run = runs[run.sync_dir.name]
    assert mlflow_run.info.status == "FINISHED"
    saved_config = load_config(run.sync_dir / "config.yaml")
    assert mlflow_run.data.params == {k: str(v) for k, v in config_params(saved_config).items()}
    run_id = mlflow_run.info.run_id
    for key, steps in expected_steps(run.sync_dir).items():
        history = [(m.step, m.value) for m in client.get_metric_history(run_id, key)]
        assert [step for step, _ in history] == [step for step, _ in steps], key  # each step once
        if key != "wall_seconds":  # a resumed run gives the numbers it gave before the crash, but wall time
            assert history == [(s, pytest.approx(v)) for s, v in steps], key
    for key, value in numeric_fields(run.sync_summary, "summary/").items():
        assert [(m.step, m.value) for m in client.get_metric_history(run_id, key)] == [(2, pytest.approx(value))]
    summary = client.download_artifacts(run_id, "summary.json", str(tmp_path))
    assert Path(summary).read_bytes() == (run.sync_dir / "summary.json").read_bytes()
    adapter = Path(client.download_artifacts(run_id, "adapter", str(tmp_path)))
    assert {p.name: p.read_bytes() for p in adapter.iterdir()} == \
        {p.name: p.read_bytes() for p in (run.sync_dir / "adapter").iterdir()}


def wandb_records(offline_run: Path) -> list[dict]:
    """The records of a W&B run's transaction log (run-<id>.wandb), read by wandb's own reader."""
    out = subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(offline_run)],
                         capture_output=True, text=True, check=True).stdout
    return [json.loads(line) for line in out.splitlines()]


def of_type(records: list[dict], kind: str) -> list[dict]:
    return [r[kind] for r in records if r["type"] == kind]


@pytest.mark.slow  # the runs of grouped_runs
def test_wandb_holds_the_config_history_summary_and_adapter_offline(grouped_runs):
    run = grouped_runs
    wandb_id = json.loads((run.sync_dir / "trackers.json").read_text())["wandb"]["id"]
    crashed, resumed = [wandb_records(folder) for folder in sorted((run.sync_dir / "wandb").glob("offline-run-*"))]
    expected = expected_steps(run.sync_dir)
    params = config_params(run.sync_cfg)
    for records, steps, exit_code in ((crashed, [1, 2], 1), (resumed, [2], 0)):
        [header] = of_type(records, "run")
        assert (header["run_id"], header["run_group"], header["display_name"], header["project"]) == \
            (wandb_id, "sweep-trackers", run.sync_dir.name, "quickstart")
        assert {k: v for k, v in header["config"]["update"].items() if k != "_wandb"} == params
        rows = {h["step"]["num"]: h["item"] for h in of_type(records, "history")}
        assert sorted(rows) == steps
        for key, values in expected.items():
            for step, value in values:
                if step in rows and key != "wall_seconds":
                    assert rows[step][key] == pytest.approx(value), (key, step)
        assert [e["exit_code"] for e in of_type(records, "exit")] == [exit_code]
    assert of_type(resumed, "run")[0]["resume"] is True
    summary = {k: v for s in of_type(resumed, "summary") for k, v in s["update"].items()}
    for key, value in numeric_fields(run.sync_summary, "summary/").items():
        assert summary[key] == pytest.approx(value), key
    assert {"path": "summary.json"} in [f for files in of_type(resumed, "files") for f in files["files"]]
    [artifact] = of_type(resumed, "artifact")
    assert artifact["name"] == f"adapter-{wandb_id}" and artifact["type"] == "model"
    assert sorted(c["path"] for c in artifact["manifest"]["contents"]) == \
        sorted(p.name for p in (run.sync_dir / "adapter").iterdir())
    assert run.wandb_left_running == []  # wandb.teardown stopped W&B's service


@pytest.mark.slow  # the runs of grouped_runs
def test_asynchronous_steps_are_global_versions(grouped_runs):
    run = grouped_runs
    versions = list(range(1, run.async_summary["global_version"] + 1))
    assert versions == [1, 2] and run.async_summary["client_updates"] == 4  # 2 updates a version
    events = tensorboard_events(run.sweep.dir / "tensorboard" / run.async_dir.name)
    assert [e.step for e in events.Scalars("train_loss")] == versions
    client, runs = mlflow_runs(run)
    history = client.get_metric_history(runs[run.async_dir.name].info.run_id, "round")
    assert [(m.step, m.value) for m in history] == [(v, v) for v in versions]


@pytest.mark.slow  # the runs of grouped_runs
def test_a_sweep_groups_its_runs(grouped_runs, tmp_path):
    run = grouped_runs
    assert {p.name for p in (run.sweep.dir / "tensorboard").iterdir()} == {run.sync_dir.name, run.async_dir.name}
    _, runs = mlflow_runs(run)  # one experiment, named after the sweep, a run per point
    assert set(runs) == {run.sync_dir.name, run.async_dir.name}
    for run_dir in (run.sync_dir, run.async_dir):
        assert runs[run_dir.name].data.tags["fedsim.run_dir"] == str(run_dir.resolve())
    # the sweep's own overrides win over the grouping it sets
    sweep = Sweep.plan([QUICKSTART], [*TINY, "output.tracker_group=mine"], ["seed=1,2"], str(tmp_path / "x"))
    for point in sweep.points():
        cfg = point_config(sweep, point)
        assert (cfg.output.tracker_dir, cfg.output.tracker_group) == (str(sweep.dir), "mine")


def test_a_tracker_whose_library_is_missing_is_refused_before_any_work(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if wandb were not installed: importing it fails
    run_dir = tmp_path / "run"
    assert main(["run", QUICKSTART, *TINY, "output.trackers=[tensorboard,wandb]", f"output.dir={run_dir}"]) == 2
    assert "config key 'output.trackers' has invalid value 'wandb': expected trackers whose library is installed: " \
           "wandb needs pip install 'fedsim[wandb]'" in capsys.readouterr().err
    assert not run_dir.exists()  # refused before the run began
    for trackers, error in (("[neptune]", "one of mlflow, tensorboard, wandb"), ("[mlflow,mlflow]", "distinct")):
        with pytest.raises(ConfigError, match=re.escape(error)):
            load_config(QUICKSTART, [*TINY, f"output.trackers={trackers}"])


def test_the_docs_example_tracker_runs_as_written(tmp_path, monkeypatch):
    section = (REPO / "docs" / "trackers.md").read_text().split("\n## Writing a tracker\n", 1)[1]
    [code] = re.findall(r"```python\n(.*?)```", section, re.S)
    monkeypatch.setitem(TRACKERS, "jsonl", None)  # the entry the example makes is removed after the test
    exec(compile(code, "docs/trackers.md", "exec"), {"__name__": "trackers_example"})
    cfg = load_config(QUICKSTART, [*TINY, "output.trackers=[jsonl]"])
    trackers = Trackers.start(cfg, tmp_path)
    trackers.log_step({"round": 1, "clients": [0, 1], "train_loss": 0.5})
    trackers.log_step({"round": 2, "clients": [1], "train_loss": 0.25, "eval": {"accuracy": 0.75}})
    summary = {"rounds": 2, "engine": "sequential", "final_metrics": {"accuracy": 0.75}}
    writer = RunWriter(tmp_path)
    writer.write_summary(summary)
    trackers.finish(summary, writer)
    assert [json.loads(line) for line in (tmp_path / "steps.jsonl").read_text().splitlines()] == [
        {"step": 1, "round": 1, "train_loss": 0.5},
        {"step": 2, "round": 2, "train_loss": 0.25, "eval/accuracy": 0.75},
        {"step": 2, "summary/rounds": 2, "summary/final_metrics/accuracy": 0.75},
    ]
    assert json.loads((tmp_path / "trackers.json").read_text()) == {"jsonl": {}}
