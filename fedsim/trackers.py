"""Experiment trackers: a run's metrics, config, summary and adapter, also sent to TensorBoard, MLflow or W&B.

``output.trackers`` names them (``TRACKERS``). Each library is an optional extra (``pip install 'fedsim[mlflow]'``),
imported only once a run starts; ``fedsim.validation`` refuses a config that names one not installed, before
any model loads. The federation loop calls one ``Trackers`` fan-out: ``start`` as the run (or its resume)
begins, ``log_step`` with each metrics.jsonl record, ``finish`` with the summary, or ``fail`` if the run raises.

Every tracker is offline by default, its files under the run directory (or ``output.tracker_dir``, a sweep's
directory), and keeps in ``RUN_DIR/trackers.json`` the ids that ``fedsim run --resume`` needs to continue the
same tracker runs. docs/trackers.md is the user's guide.
"""

from __future__ import annotations

import dataclasses
import fcntl
import importlib.util
import json
import logging
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Iterator, Mapping, Optional, Sequence

from fedsim.config import ExperimentConfig
from fedsim.output import RunWriter, atomic_write_text

log = logging.getLogger(__name__)

STATE_FILE = "trackers.json"  # in the run directory: {tracker name: what its start returned}
SUMMARY_PREFIX = "summary/"  # summary metrics are named apart from the per-step ones (bytes_up: a round's, or all)


@dataclass
class TrackedRun:
    """What a tracker knows of the run it follows."""

    name: str  # the run directory's name (a sweep point's label): the run's name in every tracker
    run_dir: Path
    root: Path  # output.tracker_dir, else the run directory
    experiment: str  # the experiment's name (``name`` in the config)
    group: Optional[str]  # output.tracker_group: a sweep's name
    params: dict[str, Any]  # the resolved config, flattened to dotted keys (``config_params``)
    resumed_after: Optional[int]  # a resumed run continues after this round (version); None: a fresh run


@dataclass
class RunOutcome:
    """What a finished run hands its trackers."""

    step: int  # the last round (asynchronous runs: version)
    metrics: dict[str, float]  # summary.json's numeric fields, flattened under SUMMARY_PREFIX
    summary_path: Path
    adapter_dir: Optional[Path]  # None: no adapter saved (output.save_adapter=false, a personalized run)


class Tracker:
    """One tracking library, following one run. A subclass sets ``module`` (the import a run needs, checked with
    the config) and ``requirement`` (what pip installs it from), overrides ``log_step`` and, as needed, ``start``
    and ``finish``, and is registered in ``TRACKERS`` under the name ``output.trackers`` gives it."""

    module: ClassVar[Optional[str]] = None  # None: nothing to install
    requirement: ClassVar[str] = ""

    def __init__(self, run: TrackedRun):
        self.run = run

    @classmethod
    def installed(cls) -> bool:
        return cls.module is None or importlib.util.find_spec(cls.module) is not None

    def start(self, saved: dict[str, Any]) -> dict[str, Any]:
        """Open the tracker's run, or reopen the one ``saved`` names (what this returned when a resumed run first
        started; {} for a fresh run); returns what a resume needs, kept in the run directory's STATE_FILE."""
        return {}

    def log_step(self, step: int, metrics: dict[str, float]) -> None:
        """One metrics.jsonl record: ``step`` is its round (version), ``metrics`` its numbers (``numeric_fields``)."""
        raise NotImplementedError

    def finish(self, outcome: Optional[RunOutcome]) -> None:
        """Close the tracker's run: finished with ``outcome``, or failed when it is None."""


class TensorBoardTracker(Tracker):
    """Event files in ROOT/tensorboard/<run name>/: scalars per step, the config as hyperparameters (the HParams
    tab), the summary's numbers as ``summary/...`` scalars at the last step and summary.json as text."""

    module, requirement = "tensorboard", "fedsim[tensorboard]"

    def start(self, saved: dict[str, Any]) -> dict[str, Any]:
        from torch.utils.tensorboard import SummaryWriter
        from torch.utils.tensorboard.summary import hparams

        resumed_after = self.run.resumed_after
        # A resumed run runs the steps after its checkpoint again: purge_step hides the ones logged before the
        # crash, so that no step shows twice.
        self.writer = SummaryWriter(str(self.run.root / "tensorboard" / self.run.name),
                                    purge_step=None if resumed_after is None else resumed_after + 1)
        if resumed_after is None:  # the hyperparameters once per run, at step 0: a purge leaves them
            _, session_start, _ = hparams(self.run.params, {})
            self.writer.file_writer.add_summary(session_start)
        return {}  # the log directory follows from the config

    def log_step(self, step: int, metrics: dict[str, float]) -> None:
        for tag, value in metrics.items():
            self.writer.add_scalar(tag, value, step)
        self.writer.flush()  # visible in TensorBoard now, and not lost if the run dies

    def finish(self, outcome: Optional[RunOutcome]) -> None:
        if outcome is not None:
            for tag, value in outcome.metrics.items():
                self.writer.add_scalar(tag, value, outcome.step)
            text = outcome.summary_path.read_text()
            self.writer.add_text("summary.json", "    " + text.replace("\n", "\n    "), outcome.step)  # code block
        self.writer.close()


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Hold an exclusive flock on ``path`` (waiting for it) until the block ends."""
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


class MlflowTracker(Tracker):
    """A run of the MLflow experiment named after the group (else the experiment), in the tracking server of
    MLFLOW_TRACKING_URI if set, else in a file store at ROOT/mlruns: the config as params, metrics per step,
    the summary's numbers as ``summary/...`` metrics, summary.json and adapter/ as artifacts."""

    module, requirement = "mlflow", "fedsim[mlflow]"
    PARAMS_PER_BATCH = 100  # MLflow's limit for one log_batch call

    def start(self, saved: dict[str, Any]) -> dict[str, Any]:
        # MLflow 3 refuses its file store (maintenance mode) unless told otherwise; it is the store that needs no
        # database or server, and mlflow-skinny brings none.
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        # a resumed run goes on in the store it began in
        uri = saved.get("tracking_uri") or os.environ.get("MLFLOW_TRACKING_URI") or \
            (self.run.root / "mlruns").resolve().as_uri()
        self.client = MlflowClient(uri)
        self.logged_until = 0  # steps up to here were logged before the crash a resumed run continues after
        if "run_id" in saved:
            self.run_id = saved["run_id"]
            self.client.update_run(self.run_id, status="RUNNING")
            logged = self.client.get_metric_history(self.run_id, "round")  # every record has a round
            self.logged_until = max((m.step for m in logged), default=0)
        else:
            tags = {"fedsim.run_dir": str(self.run.run_dir.resolve())}
            self.run_id = self.client.create_run(self.experiment_id(), run_name=self.run.name, tags=tags).info.run_id
            params = [Param(k, str(v)) for k, v in self.run.params.items()]
            for first in range(0, len(params), self.PARAMS_PER_BATCH):
                self.client.log_batch(self.run_id, params=params[first:first + self.PARAMS_PER_BATCH])
        return {"tracking_uri": uri, "run_id": self.run_id}

    def experiment_id(self) -> str:
        """The id of the group's (or experiment's) MLflow experiment, created by the first run that needs it: the
        runs of a parallel sweep take turns, so that they cannot make two of the same name."""
        name = self.run.group or self.run.experiment
        self.run.root.mkdir(parents=True, exist_ok=True)
        with _locked(self.run.root / ".mlflow-experiment.lock"):
            found = self.client.get_experiment_by_name(name)
            return found.experiment_id if found else self.client.create_experiment(name)

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in metrics.items()])

    def log_step(self, step: int, metrics: dict[str, float]) -> None:
        if step > self.logged_until:
            self.log_metrics(step, metrics)

    def finish(self, outcome: Optional[RunOutcome]) -> None:
        if outcome is not None:
            self.log_metrics(outcome.step, outcome.metrics)
            self.client.log_artifact(self.run_id, str(outcome.summary_path))
            if outcome.adapter_dir is not None:
                self.client.log_artifacts(self.run_id, str(outcome.adapter_dir), "adapter")
        self.client.set_terminated(self.run_id, "FINISHED" if outcome is not None else "FAILED")


class WandbTracker(Tracker):
    """A W&B run in RUN_DIR/wandb/, offline unless WANDB_MODE says otherwise (``wandb sync`` uploads it later), in
    the project named after the experiment (or WANDB_PROJECT), grouped by the group: the config, a history row
    per step, the summary's numbers in the run's summary, summary.json as a file and adapter/ as an artifact."""

    module, requirement = "wandb", "fedsim[wandb]"

    def start(self, saved: dict[str, Any]) -> dict[str, Any]:
        import wandb

        self.wandb = wandb
        # reinit: a run of this process's own (a notebook's, say) stays open beside this one; symlink: files saved
        # are hard-linked (or copied), never linked by a path that breaks when the run directory moves
        self.wandb_run = wandb.init(
            dir=str(self.run.run_dir), mode=None if "WANDB_MODE" in os.environ else "offline",
            project=None if "WANDB_PROJECT" in os.environ else self.run.experiment, group=self.run.group,
            name=self.run.name, id=saved.get("id"), resume="allow" if saved else None, config=self.run.params,
            settings=wandb.Settings(reinit="create_new", symlink=False))
        return {"id": self.wandb_run.id}

    def log_step(self, step: int, metrics: dict[str, float]) -> None:
        self.wandb_run.log(metrics, step=step)

    def finish(self, outcome: Optional[RunOutcome]) -> None:
        if outcome is not None:
            self.wandb_run.summary.update(outcome.metrics)
            self.wandb_run.save(str(outcome.summary_path), base_path=str(self.run.run_dir), policy="now", glob=False)
            if outcome.adapter_dir is not None:
                artifact = self.wandb.Artifact(f"adapter-{self.wandb_run.id}", type="model")
                artifact.add_dir(str(outcome.adapter_dir), policy="immutable")  # never rewritten: no staging copy
                self.wandb_run.log_artifact(artifact)
        self.wandb_run.finish(exit_code=0 if outcome is not None else 1)


TRACKERS: dict[str, type[Tracker]] = {
    "tensorboard": TensorBoardTracker,
    "mlflow": MlflowTracker,
    "wandb": WandbTracker,
}


def numeric_fields(record: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """The numbers in ``record`` (booleans, strings, lists and nulls left out), nested mappings flattened with
    '/': ``{"eval": {"accuracy": 0.5}}`` -> ``{"eval/accuracy": 0.5}``."""
    numbers = {}
    for key, value in record.items():
        if isinstance(value, Mapping):
            numbers.update(numeric_fields(value, f"{prefix}{key}/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            numbers[f"{prefix}{key}"] = value
    return numbers


def config_params(section: Any, prefix: str = "") -> dict[str, Any]:
    """A config (an ``ExperimentConfig``) as flat dotted keys, ``algorithm.server.name``: one per leaf key, a
    list, mapping or null value as JSON."""
    params = {}
    for item in dataclasses.fields(section):
        value = getattr(section, item.name)
        if dataclasses.is_dataclass(value):
            params.update(config_params(value, f"{prefix}{item.name}."))
        else:
            params[f"{prefix}{item.name}"] = value if isinstance(value, (str, int, float, bool)) else json.dumps(value)
    return params


class Trackers:
    """The trackers of one run (``output.trackers``), each told what the run logs."""

    def __init__(self, trackers: Sequence[Tracker] = ()):
        self.trackers = list(trackers)

    @classmethod
    def start(cls, cfg: ExperimentConfig, run_dir: Path, resumed_after: Optional[int] = None) -> "Trackers":
        """Start ``cfg``'s trackers for the run in ``run_dir``, or, with ``resumed_after`` (the checkpoint's round),
        continue the tracker runs it started, from the ids its STATE_FILE kept."""
        if not cfg.output.trackers:
            return cls()
        run = TrackedRun(name=run_dir.resolve().name, run_dir=run_dir,
                         root=Path(cfg.output.tracker_dir) if cfg.output.tracker_dir else run_dir,
                         experiment=cfg.name, group=cfg.output.tracker_group, params=config_params(cfg),
                         resumed_after=resumed_after)
        state_path = run_dir / STATE_FILE
        saved = json.loads(state_path.read_text()) if resumed_after is not None and state_path.exists() else {}
        trackers = {name: TRACKERS[name](run) for name in cfg.output.trackers}
        state = {name: tracker.start(saved.get(name, {})) for name, tracker in trackers.items()}
        atomic_write_text(state_path, json.dumps(state, indent=1, sort_keys=True) + "\n")
        return cls(list(trackers.values()))

    def log_step(self, record: dict[str, Any]) -> None:
        """A metrics.jsonl record, at its round (version)."""
        metrics = numeric_fields(record)
        for tracker in self.trackers:
            tracker.log_step(record["round"], metrics)

    def finish(self, summary: dict[str, Any], writer: RunWriter) -> None:
        """The run finished: its summary (``writer`` has written summary.json) and adapter (if saved) go to every
        tracker."""
        adapter_dir = writer.adapter_dir if writer.adapter_dir.is_dir() else None
        outcome = RunOutcome(summary["rounds"], numeric_fields(summary, SUMMARY_PREFIX), writer.dir / "summary.json",
                             adapter_dir)
        for tracker in self.trackers:
            tracker.finish(outcome)

    def fail(self) -> None:
        """The run raised: each tracker closes its run as failed (an error in one closes the others still, and
        is logged, never raised over the run's own)."""
        for tracker in self.trackers:
            try:
                tracker.finish(None)
            except Exception:
                log.exception("could not close %s's run as failed", type(tracker).__name__)
