"""A finished run directory against the output reference (fedsim/run_files.py, rendered as docs/outputs.md).

``check_run_dir`` fails when the run wrote a file or a field the reference does not describe, left out one it
says such a run writes, or wrote a value of another type than it gives. tests/test_outputs_reference.py calls
it on sequential runs, tests/test_ray_runtime.py on Ray runs that those tests make anyway (the fields only
the Ray engine writes).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from fedsim.algorithms import CLIENT_STRATEGIES, SERVER_STRATEGIES
from fedsim.compression import SPARSE
from fedsim.config import ExperimentConfig
from fedsim.output import read_metrics
from fedsim.run_files import (EVAL_ABLATIONS, EVAL_METRICS, FILES, METRIC_NAMES, RECORD, SEAL, STATE, SUMMARY,
                              TRACKER_STATE, Field, RunFile, When)
from fedsim.validation import load_config

_NAMES = "|".join(re.escape(m.name) for m in EVAL_METRICS)
_ABLATIONS = "|".join(re.escape(a) for a in EVAL_ABLATIONS)
# [<ablation>/][<source>/]<metric>, or a backdoor's asr_<trigger>/accuracy (run_files.EVAL_NAMING)
METRIC_KEY = re.compile(rf"(?:(?:{_ABLATIONS})/)?(?:[^/]+/)?(?:{_NAMES})|asr_[^/]+/accuracy")


@dataclass
class FinishedRun:
    dir: Path
    cfg: ExperimentConfig
    summary: dict[str, Any]
    locked: bool  # started the way ``fedsim run`` starts one (holding the directory's lock)


def _client_states_kept(run: FinishedRun) -> bool:
    cfg, server = run.cfg, SERVER_STRATEGIES[run.cfg.algorithm.server.name]
    stateful = (CLIENT_STRATEGIES[cfg.algorithm.client.name].stateful or server.personalized
                or (cfg.compression.kind in SPARSE and cfg.compression.error_feedback))
    return stateful and run.summary["client_updates"] > 0


def _evaluated(run: FinishedRun, record: dict[str, Any]) -> bool:
    return record["round"] % run.cfg.eval.every == 0 or record["round"] == run.summary["rounds"]


# Whether each condition holds for a run (and, for metrics.jsonl, one of its records).
HOLDS: dict[When, Callable[[FinishedRun, dict[str, Any] | None], bool]] = {
    When.ALWAYS: lambda run, record: True,
    When.SYNC: lambda run, record: run.summary["mode"] == "sync",
    When.ASYNC: lambda run, record: run.summary["mode"] == "async",
    When.EVAL_ROUND: _evaluated,
    When.PRIVACY: lambda run, record: run.cfg.privacy.mode != "none",
    When.TRAINED: lambda run, record: run.summary["rounds"] > 0,
    When.BATCHED: lambda run, record: run.cfg.runtime.clients_per_batch != 1,
    When.RAY: lambda run, record: run.summary["engine"] == "ray",
    When.CHECKPOINT: lambda run, record: run.cfg.checkpoint.every > 0 and run.summary["rounds"] > 0,
    When.ADAPTER: lambda run, record: (run.cfg.output.save_adapter
                                       and not SERVER_STRATEGIES[run.cfg.algorithm.server.name].personalized
                                       and SERVER_STRATEGIES[run.cfg.algorithm.server.name].trains),
    When.CLIENT_STATES: lambda run, record: _client_states_kept(run),
    When.LOCKED: lambda run, record: run.locked,
    When.TRACKERS: lambda run, record: bool(run.cfg.output.trackers),
    When.TENSORBOARD: lambda run, record: "tensorboard" in run.cfg.output.trackers,
    When.MLFLOW: lambda run, record: "mlflow" in run.cfg.output.trackers,
    When.WANDB: lambda run, record: "wandb" in run.cfg.output.trackers,
    When.TENSORBOARD_HERE: lambda run, record: HOLDS[When.TENSORBOARD](run, record) and not run.cfg.output.tracker_dir,
    When.MLFLOW_HERE: lambda run, record: HOLDS[When.MLFLOW](run, record) and not run.cfg.output.tracker_dir,
}


def type_matches(value: Any, type_text: str) -> bool:
    """Whether a JSON value is of a reference type (``int or null``, ``list[int]``, ``map[str, float]`` ...)."""
    return any(_is(value, alternative) for alternative in type_text.split(" or "))


def _is(value: Any, kind: str) -> bool:
    if kind.startswith("list[") and kind.endswith("]"):
        return isinstance(value, list) and all(type_matches(v, kind[5:-1]) for v in value)
    if kind.startswith("map[str, ") and kind.endswith("]"):
        return isinstance(value, dict) and all(type_matches(v, kind[9:-1]) for v in value.values())
    scalar = {"int": lambda v: isinstance(v, int) and not isinstance(v, bool),
              "float": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
              "str": lambda v: isinstance(v, str), "bool": lambda v: isinstance(v, bool),
              "null": lambda v: v is None, "object": lambda v: isinstance(v, dict), "any": lambda v: True}
    if kind not in scalar:
        raise ValueError(f"the reference names an unknown type {kind!r}")
    return scalar[kind](value)


def field_problems(obj: dict[str, Any], fields: tuple[Field, ...], holds: Callable[[When], bool], where: str,
                   seen: set[str], prefix: str = "") -> list[str]:
    """What is wrong with the JSON object ``obj`` against ``fields``, as messages naming ``where`` (its file)
    and each field's path; adds the reference paths found (``a.b``, ``a[].b``, ``a.*.b``) to ``seen``."""
    problems = []
    described = {item.name: item for item in fields}
    for key in sorted(obj.keys() - described.keys()):
        problems.append(f"{where}: {prefix}{key} is written, and the reference does not describe it")
    for item in fields:
        path = prefix + item.name
        if item.name not in obj:
            if holds(item.when):
                problems.append(f"{where}: {path} is not written, and the reference says it is "
                                f"({item.when.value})")
            continue
        seen.add(path)
        value = obj[item.name]
        if not holds(item.when):
            problems.append(f"{where}: {path} is written, and the reference says only for {item.when.value}")
        if not type_matches(value, item.type):
            problems.append(f"{where}: {path} is {json.dumps(value)[:80]}, not of the reference's type {item.type}")
            continue
        if item.keys == METRIC_NAMES and value is not None:
            problems += [f"{where}: {path} has {key!r}, which is no evaluation metric name the reference gives"
                         for key in value if not METRIC_KEY.fullmatch(key)]
        if item.is_map:  # values described by its fields, if any
            members = [(f"{path}.*.", v) for v in value.values()] if item.fields else []
        elif item.type.startswith("list[object]"):
            members = [(f"{path}[].", v) for v in value]
        else:  # an object (all of whose fields are described, if it has none too), or a value that is not one
            members = [(f"{path}.", value)] if isinstance(value, dict) else []
        for member_prefix, member in members:
            problems += field_problems(member, item.fields, holds, where, seen, member_prefix)
    return problems


def _pattern(entry: RunFile) -> re.Pattern:
    """A reference path as a pattern: each ``<...>`` a name without ``/``; an opaque folder's with whatever it
    holds."""
    path = "[^/]+".join(re.escape(part) for part in re.split(r"<[^>]*>", entry.path))
    return re.compile(path + ("(?:.+)?" if entry.opaque else ""))


def file_problems(run: FinishedRun, seen: set[str]) -> list[str]:
    """Files and folders on disk that the reference does not describe, or not for this run, and those it says the
    run writes that are not there; adds the reference paths found to ``seen``."""
    holds = lambda when: HOLDS[when](run, None)  # noqa: E731
    on_disk = sorted(p.relative_to(run.dir).as_posix() + ("/" if p.is_dir() else "") for p in run.dir.rglob("*"))
    problems = []
    for path in on_disk:
        entries = [entry for entry in FILES if _pattern(entry).fullmatch(path)]
        seen.update(f"files:{entry.path}" for entry in entries)
        if not entries:
            problems.append(f"{path} is written, and the reference does not describe it")
        elif not any(holds(entry.when) for entry in entries):
            problems.append(f"{path} is written, and the reference says only for "
                            + "; ".join(entry.when.value for entry in entries))
    for entry in FILES:
        if holds(entry.when) and not any(_pattern(entry).fullmatch(path) for path in on_disk):
            problems.append(f"{entry.path} is not written, and the reference says it is ({entry.when.value})")
    return problems


def run_problems(run: FinishedRun, seen: set[str]) -> list[str]:
    """Everything ``check_run_dir`` checks, as messages; the reference paths found, as ``<file>:<path>``, are
    added to ``seen``."""
    found: dict[str, set[str]] = {name: set() for name in ("summary.json", "metrics.jsonl", "state.json", "COMPLETE",
                                                           "trackers.json")}
    holds = lambda when: HOLDS[when](run, None)  # noqa: E731
    problems = file_problems(run, seen)
    problems += field_problems(run.summary, SUMMARY, holds, "summary.json", found["summary.json"])
    for record in read_metrics(run.dir):
        problems += field_problems(record, RECORD, lambda when: HOLDS[when](run, record),
                                   f"metrics.jsonl round {record['round']}", found["metrics.jsonl"])
    for name, path, fields in (("state.json", "checkpoint/state.json", STATE),
                               ("COMPLETE", "checkpoint/COMPLETE", SEAL), ("trackers.json", "trackers.json", TRACKER_STATE)):
        if (run.dir / path).is_file():
            problems += field_problems(json.loads((run.dir / path).read_text()), fields, holds, path, found[name])
    seen.update(f"{name}:{path}" for name, paths in found.items() for path in paths)
    return problems


def finished_run(run_dir: Path, locked: bool = False) -> FinishedRun:
    run_dir = Path(run_dir)
    return FinishedRun(run_dir, load_config(run_dir / "config.yaml"),
                       json.loads((run_dir / "summary.json").read_text()), locked)


def check_run_dir(run_dir: Path, locked: bool = False) -> set[str]:
    """Assert that ``run_dir`` (a finished run; ``locked``: started by ``fedsim run``) holds what the output
    reference says, no more and no less, of the types it gives; returns the reference paths found there."""
    seen: set[str] = set()
    problems = run_problems(finished_run(run_dir, locked), seen)
    assert not problems, ("the run directory and docs/outputs.md disagree; describe what the code writes in "
                          "fedsim/run_files.py and run python -m fedsim.reference --write:\n  " + "\n  ".join(problems))
    return seen
