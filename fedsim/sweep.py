"""Sweeps: the cross product of a grid of config values, one run per point, under one sweep directory.

A sweep directory holds ``sweep.json`` (the base config and the grid), one run directory per point, named
after its values, and ``sweep.csv`` with one row per point. Each run is a ``fedsim run`` child process,
so runs are isolated, several can share a Ray cluster (``RAY_ADDRESS``) at once, and an interrupted sweep
loses only the runs in flight: running the same command again skips finished runs, resumes those that
left a checkpoint and restarts the rest (their directories set aside, never deleted). The runs die with the
sweep, however it dies. Runs on the Ray engine that would each start a local Ray instance (no ``RAY_ADDRESS``,
no ``runtime.address``) join one that the sweep starts for them all instead, and stops when it ends.
"""

from __future__ import annotations

import csv
import ctypes
import io
import itertools
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ContextManager, Mapping, Sequence

from fedsim.checkpoint import check_checkpoint
from fedsim.cli import resume_overrides
from fedsim.config import ConfigError, ExperimentConfig, to_yaml
from fedsim.output import atomic_write_text
from fedsim.runlock import run_lock
from fedsim.validation import load_config

log = logging.getLogger(__name__)

MANIFEST, TABLE = "sweep.json", "sweep.csv"
DONE, FAILED, PENDING = "done", "failed", "pending"
STOP_GRACE_S = 30  # a run told to stop gets this long to exit before it is killed
PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>
# Summary fields copied into sweep.csv after the grid values and final metrics.
SUMMARY_COLUMNS = ("rounds", "client_updates", "simulated_seconds", "wall_seconds", "train_seconds",
                   "bytes_up", "bytes_down", "stale_updates", "dropped_updates")


def parse_grid_arg(item: str) -> tuple[str, list[str]]:
    """``key=v1,v2`` -> (key, [v1, v2])."""
    key, sep, values = item.partition("=")
    parts = [v.strip() for v in values.split(",")]
    if not sep or not key.strip() or not all(parts):
        raise ConfigError(f"--grid {item!r} is not of the form key=value1,value2,...")
    return key.strip(), parts


def _as_override_value(value: Any) -> str:
    """A grid value from YAML as the right side of a ``key=value`` override (types survive the trip)."""
    return value if isinstance(value, str) else json.dumps(value)


def short_key(key: str) -> str:
    """``partition.num_clients`` -> ``num_clients``; ``algorithm.server.name`` -> ``server.name``."""
    parts = key.split(".")
    return ".".join(parts[-2:]) if parts[-1] == "name" else parts[-1]


def _label(key: str, keys: Sequence[str], value: str) -> str:
    """``partition.num_clients=100`` -> ``num_clients=100`` (the full key when the short one is ambiguous)."""
    short = short_key(key)
    name = short if sum(short_key(k) == short for k in keys) == 1 else key
    return re.sub(r"[^A-Za-z0-9._=+-]", "_", f"{name}={value}")


@dataclass
class Point:
    values: dict[str, str]  # grid key -> value, as given in the override
    label: str  # the run directory's name

    def overrides(self) -> list[str]:
        return [f"{k}={v}" for k, v in self.values.items()]


@dataclass
class Sweep:
    configs: list[str]
    overrides: list[str]
    grid: dict[str, list[str]]
    dir: Path

    @classmethod
    def plan(cls, configs: list[str], overrides: list[str], grid_args: list[str], out: str | None) -> "Sweep":
        """Read the grid (the YAML's ``sweep.grid``, then ``--grid`` arguments) and check every point's config
        before any run starts."""
        base = load_config(configs, overrides)
        grid = {key: [_as_override_value(v) for v in (values if isinstance(values, list) else [values])]
                for key, values in base.sweep.grid.items()}
        grid.update(parse_grid_arg(item) for item in grid_args)
        if not grid:
            raise ConfigError("the sweep has no grid: give --grid key=v1,v2 or a sweep.grid section in the YAML")
        for key, values in grid.items():
            if key.split(".")[0] in ("sweep", "output", "name") or not values:
                raise ConfigError(f"grid key {key!r} cannot be swept" if values else f"grid key {key!r} has no values")
            if len(set(values)) != len(values):
                raise ConfigError(f"grid key {key!r} repeats a value: {values}")
        sweep = cls(list(configs), list(overrides), grid, Path(out) if out else Path("runs") / f"sweep-{base.name}")
        for point in sweep.points():
            try:
                sweep.point_config(point)
            except ConfigError as err:
                raise ConfigError(f"grid point {point.label}: {err}") from None
        return sweep

    def points(self) -> list[Point]:
        keys = list(self.grid)
        return [Point(dict(zip(keys, combo)), "-".join(_label(k, keys, v) for k, v in zip(keys, combo)))
                for combo in itertools.product(*self.grid.values())]

    def base_config(self) -> ExperimentConfig:
        cfg = load_config(self.configs, self.overrides)
        cfg.sweep.grid = {}
        return cfg

    def check_manifest(self) -> None:
        """A sweep directory continues only the sweep it was made for (the grid may grow or shrink)."""
        path = self.dir / MANIFEST
        if not path.exists():
            return
        earlier = json.loads(path.read_text())["base_config"]
        if earlier != to_yaml(self.base_config()):
            raise ConfigError(f"{self.dir} holds a sweep over a different base config; give another --out, "
                              "or the same configs and overrides as before")

    def write_manifest(self) -> None:
        manifest = {"configs": self.configs, "overrides": self.overrides, "grid": self.grid,
                    "base_config": to_yaml(self.base_config()),
                    "runs": [{"label": p.label, "values": p.values} for p in self.points()]}
        atomic_write_text(self.dir / MANIFEST, json.dumps(manifest, indent=1))

    # ------------------------------------------------------------------------------------------ running
    def tracker_overrides(self) -> list[str]:
        """The sweep's runs are one group to their trackers (output.trackers): one TensorBoard log directory and
        MLflow store in the sweep directory, one MLflow experiment and W&B group named after it. Given before the
        sweep's own overrides, which may set them otherwise."""
        return [f"output.tracker_dir={self.dir}", f"output.tracker_group={self.dir.resolve().name}"]

    def command(self, point: Point) -> list[str]:
        """The ``fedsim run`` that continues ``point``: a resume from its checkpoint, else a fresh run (an
        earlier directory without a checkpoint set aside first)."""
        run_dir = self.dir / point.label
        cli = [sys.executable, "-m", "fedsim.cli", "run"]
        try:
            check_checkpoint(run_dir)
        except FileNotFoundError:
            if run_dir.exists():  # interrupted or failed before its first checkpoint
                set_aside(run_dir)
            return cli + [*self.configs, *self.tracker_overrides(), *self.overrides, *point.overrides(),
                          f"output.dir={run_dir}", "output.progress=never"]
        # --resume trusts some saved values only when told again: this sweep's own config tells it
        return cli + ["--resume", str(run_dir), *resume_overrides(self.point_config(point))]

    def point_config(self, point: Point) -> ExperimentConfig:
        return load_config(self.configs, self.overrides + point.overrides())

    def shared_ray(self, points: Sequence[Point], parallel: int) -> ContextManager[Mapping[str, str] | None]:
        """One local Ray instance for the runs of ``points`` that would each start their own (the Ray engine, no
        ``runtime.address``, no RAY_ADDRESS), holding the CPUs ``parallel`` of the largest reserve at once: a
        context yielding the environment of a run that joins it, None (this process's own) when no run needs it."""
        if os.environ.get("RAY_ADDRESS"):
            return nullcontext(None)
        cfgs = [self.point_config(point) for point in points]
        local = [cfg for cfg in cfgs if cfg.runtime.engine == "ray" and not cfg.runtime.address]
        if not local:
            return nullcontext(None)
        from actors.local_ray import local_ray_for_other_processes  # imported only here: fedsim stays free of Ray

        return local_ray_for_other_processes(min_cpus=cpus_at_once(local, parallel))

    def run(self, parallel: int = 1) -> list[Point]:
        """Run every unfinished point, ``parallel`` at a time; returns the points that failed."""
        if parallel < 1:
            raise ConfigError(f"--parallel must be >= 1, got {parallel}")
        self.dir.mkdir(parents=True, exist_ok=True)
        with run_lock(self.dir):  # one sweep per sweep directory
            return self._run_points(parallel)

    def _run_points(self, parallel: int) -> list[Point]:
        self.check_manifest()
        self.write_manifest()
        self.write_table()
        todo = [p for p in self.points() if status(self.dir / p.label) != DONE]
        log.info("sweep %s: %d runs, %d finished earlier, %d to run", self.dir, len(self.points()),
                 len(self.points()) - len(todo), len(todo))
        running: dict[str, tuple[Point, subprocess.Popen]] = {}
        failed: list[Point] = []
        with self.shared_ray(todo, parallel) as run_env:  # stopped after the runs, however the sweep ends
            try:
                while todo or running:
                    while todo and len(running) < parallel:
                        point = todo.pop(0)
                        log_path = self.dir / f"{point.label}.log"
                        with open(log_path, "a") as log_file:
                            proc = subprocess.Popen(self.command(point), stdout=log_file, stderr=subprocess.STDOUT,
                                                    env=run_env, preexec_fn=die_with_parent())
                        running[point.label] = (point, proc)
                        log.info("started %s (log: %s)", point.label, log_path)
                    for label, (point, proc) in list(running.items()):
                        if proc.poll() is None:
                            continue
                        del running[label]
                        if proc.returncode == 0:
                            log.info("finished %s", label)
                        else:
                            failed.append(point)
                            log.error("%s failed (exit %d); see %s", label, proc.returncode, self.dir / f"{label}.log")
                        self.write_table(failed)
                    time.sleep(0.2)
            finally:  # interrupted: stop the runs in flight, they continue from their checkpoint next time
                stop([proc for _, proc in running.values()])
        self.write_table(failed)
        return failed

    # ------------------------------------------------------------------------------------------ results
    def rows(self, failed: Sequence[Point] = ()) -> list[dict[str, Any]]:
        failed_labels = {p.label for p in failed}
        rows = []
        for point in self.points():
            run_dir = self.dir / point.label
            state = FAILED if point.label in failed_labels else status(run_dir)
            row: dict[str, Any] = {"run": point.label, **point.values, "status": state}
            if state == DONE:
                summary = json.loads((run_dir / "summary.json").read_text())
                row.update({f"final_{k}": v for k, v in sorted(summary["final_metrics"].items())})
                row.update({k: summary[k] for k in SUMMARY_COLUMNS})
                if summary.get("privacy"):
                    row["epsilon"] = summary["privacy"]["epsilon"]
            row["run_dir"] = str(run_dir)
            rows.append(row)
        return rows

    def write_table(self, failed: Sequence[Point] = ()) -> Path:
        rows = self.rows(failed)
        columns = list(dict.fromkeys(k for row in rows for k in row if k != "run_dir")) + ["run_dir"]
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=columns, restval="")
        writer.writeheader()
        writer.writerows(rows)
        path = self.dir / TABLE
        atomic_write_text(path, text.getvalue())
        return path


def cpus_at_once(cfgs: Sequence[ExperimentConfig], parallel: int) -> float:
    """The CPUs that ``parallel`` runs (at most one per config) of the largest of ``cfgs`` reserve for their
    workers at once (a run's driver and aggregator reserve none)."""
    largest = max(cfg.runtime.num_workers * cfg.runtime.cpus_per_worker for cfg in cfgs)
    return min(parallel, len(cfgs)) * largest


def status(run_dir: Path) -> str:
    return DONE if (run_dir / "summary.json").exists() else PENDING


def set_aside(run_dir: Path) -> Path:
    """Rename a run directory out of its point's way (``<label>.failed-<time>``), never deleting it: it may
    hold the metrics of finished rounds. Refused (DirectoryInUse) while a process runs in it."""
    aside = run_dir.with_name(f"{run_dir.name}.failed-{time.strftime('%Y%m%d-%H%M%S')}")
    with run_lock(run_dir):
        run_dir.rename(aside)  # onto a non-empty namesake: OSError, nothing lost
    log.warning("%s has no checkpoint to resume from: moved to %s, and the run starts again", run_dir, aside)
    return aside


def die_with_parent() -> Callable[[], None] | None:
    """A ``preexec_fn`` after which the kernel sends the child SIGTERM when this process dies, even by SIGKILL
    (Linux; elsewhere None: a child outlives a killed sweep)."""
    if not sys.platform.startswith("linux"):
        return None
    prctl, parent = ctypes.CDLL(None, use_errno=True).prctl, os.getpid()  # looked up before the fork

    def preexec() -> None:
        if prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
        if os.getppid() != parent:  # the sweep died before the request took effect
            os.kill(os.getpid(), signal.SIGTERM)

    return preexec


def stop(procs: Sequence[subprocess.Popen]) -> None:
    """SIGTERM each process, then SIGKILL those still running after STOP_GRACE_S."""
    for proc in procs:
        proc.terminate()
    deadline = time.monotonic() + STOP_GRACE_S
    for proc in procs:
        try:
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
