"""The FedMLLM heterogeneity table on the CPU twin: every scenario x method x seed as ``fedsim sweep`` runs,
then the table of means with 95% t-intervals over seeds.

    python experiments/fedmllm_table.py --tune           # once, before the table: server lr per method (~25 min)
    python experiments/fedmllm_table.py                  # the paper's grid: 12 scenarios x 8 methods x 3 seeds
    python experiments/fedmllm_table.py --scenarios aligned-0.5 missing-0.5 cross-5-5 hybrid-0.6 \\
        --methods local fedavg fedyogi fedmllm           # the small table: 4 x 4 x 3 = 48 runs
    python experiments/fedmllm_table.py --table-only     # the table from the runs finished so far
    python experiments/fedmllm_table.py --list           # the fedsim sweep commands, without running them

The full grid is the default: scenarios aligned alpha 5.0/1.0/0.5, missing beta 0.3/0.4/0.5, cross 3-7/5-5/7-3
and hybrid p 0.8/0.7/0.6 (experiments/fedmllm/scenarios/), methods local (the paper's local baseline: every
client, every round), FedAvg, FedProx, FedAvgM, FedAdagrad, FedYogi, FedAdam and FedMLLM
(experiments/fedmllm/methods/), seeds 0 1 2: 288 runs, about 6 hours on 2 CPU cores (2 runs at once, about a
minute of machine time per run, 2.5 for a local run, which trains all 10 clients a round); the small table
above about 70 minutes. ``--scenarios``, ``--methods`` and ``--seeds`` pick a
subset (any file in those folders); ``key=value`` arguments are passed to every run (a smoke check:
``federation.rounds=1 data.num_train=80``; give it its own ``--out``, a sweep refuses a changed config).

Each (scenario, method) pair is one ``fedsim sweep`` of experiments/fedmllm/cpu.yaml + the scenario + the
method (+ cpu-adaptive.yaml for the adaptive server optimizers, + tuning/<method>.yaml once ``--tune`` has
written it) over ``--grid seed=...``, in ``--out``/<scenario>--<method>/ (runs in seed=<s>/, the sweep's
sweep.csv beside them, its console log in ``--out``/logs/<scenario>--<method>.log). ``--jobs`` runs at once:
``--jobs`` sweeps of one run each, or fewer sweeps running several of their seeds. Every seed runs for every
method, so differences to FedAvg are paired by seed.

Resuming is fedsim sweep's: run the same command again and finished runs are skipped, runs that left a
checkpoint (every 5 rounds) resume from it, the rest start over. A sweep refuses a folder made for another
config (after ``--tune`` changed a server lr, with RAY_ADDRESS set or unset, other overrides), and this
script checks that for every sweep before anything runs: give another ``--out``.
With RAY_ADDRESS set, every run joins that Ray cluster with ``runtime.engine=ray`` (cpu.yaml's
``sequential`` engine would ignore the cluster and train inside the run's own process); raise ``--jobs`` to
what the cluster holds (each run takes runtime.num_workers x cpus_per_worker = 2 CPUs there).

``--tune`` runs FedAdagrad, FedYogi, FedAdam, FedMLLM (a FedAdagrad server) and FedAvgM (eta 1 in the
paper's code) over a short list of server lrs (``--lrs``) on one held-out cell that no table reports:
aligned alpha=1.0 with seed 100, a draw of data, partition and initialisation of its own (the table refuses
seed 100; it reports aligned alpha=1.0 with its own seeds). It writes the best lr per method, with every
measured number as comments, to experiments/fedmllm/tuning/<method>.yaml, which the table's runs then layer
last. Its sweeps live in ``--out``/tune/<method>/.

Writes ``table.md`` and ``table.json`` to ``--out``: per scenario and method the mean and 95% t-interval over
seeds of the runs' headline metric (summary.json ``headline_metric``, else accuracy), in points (x100), best
mean per row in bold; the same for the metric without images and without text (``eval.ablations``); the
per-seed difference to FedAvg; the server lr each method ran with, the library versions and the dates.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Mapping, NamedTuple, Sequence

import numpy as np
import yaml

REPO = Path(__file__).resolve().parents[1]
HERE = REPO / "experiments" / "fedmllm"
TUNING = HERE / "tuning"  # tuning/<method>.yaml, written by --tune

SCENARIOS = {"aligned-5.0": "aligned α=5.0", "aligned-1.0": "aligned α=1.0", "aligned-0.5": "aligned α=0.5",
             "missing-0.3": "missing β=0.3", "missing-0.4": "missing β=0.4", "missing-0.5": "missing β=0.5",
             "cross-3-7": "cross 3-7", "cross-5-5": "cross 5-5", "cross-7-3": "cross 7-3",
             "hybrid-0.8": "hybrid p=0.8", "hybrid-0.7": "hybrid p=0.7", "hybrid-0.6": "hybrid p=0.6"}
METHODS = {"local": "local", "fedavg": "FedAvg", "fedprox": "FedProx", "fedavgm": "FedAvgM",
           "fedadagrad": "FedAdagrad", "fedyogi": "FedYogi", "fedadam": "FedAdam", "fedmllm": "FedMLLM"}
SEEDS = (0, 1, 2)
BASELINE = "fedavg"  # paired differences are taken against it
ADAPTIVE = ("fedadagrad", "fedyogi", "fedadam", "fedmllm")  # server optimizers that take cpu-adaptive.yaml
ABLATIONS = ("no_image", "no_text")

# Server-lr tuning: one held-out cell, outside every reported table (the seed is refused there).
TUNE_SCENARIO, TUNE_SEED = "aligned-1.0", 100
TUNE_LRS = {"fedavgm": (0.5, 1.0, 2.0), **{m: (1e-3, 1e-2, 3e-2, 1e-1, 3e-1) for m in ADAPTIVE}}


# ------------------------------------------------------------------------------------------------ the grid
def layers(scenario: str, method: str, tuning: Path = TUNING) -> list[str]:
    """The YAML layers of one table cell, in order: base, scenario, method, then the server-lr layers."""
    files = [HERE / "cpu.yaml", HERE / "scenarios" / f"{scenario}.yaml", HERE / "methods" / f"{method}.yaml"]
    if method in ADAPTIVE:
        files.append(HERE / "cpu-adaptive.yaml")
    if (tuning / f"{method}.yaml").exists():
        files.append(tuning / f"{method}.yaml")
    return [str(f) for f in files]


def engine_overrides(env: Mapping[str, str] = os.environ) -> list[str]:
    """``runtime.engine=ray`` when RAY_ADDRESS names a cluster: cpu.yaml's sequential engine would not use it."""
    return ["runtime.engine=ray"] if env.get("RAY_ADDRESS") else []


class SweepSpec(NamedTuple):
    """One ``fedsim sweep`` of a (scenario, method) cell: its layers, overrides and grid, in ``dir``."""

    scenario: str
    method: str
    configs: list[str]
    overrides: list[str]
    grid: dict[str, list[str]]
    dir: Path

    @property
    def name(self) -> str:
        return self.dir.name if self.dir.parent.name != "tune" else f"tune-{self.dir.name}"

    def command(self, parallel: int = 1) -> list[str]:
        grid = [arg for key, values in self.grid.items() for arg in ("--grid", f"{key}={','.join(values)}")]
        return [sys.executable, "-m", "fedsim.cli", "sweep", *self.configs, *self.overrides, *grid,
                "--parallel", str(parallel), "--out", str(self.dir)]

    def run_dirs(self) -> dict[str, Path]:
        """Grid value -> run directory, named as fedsim sweep names it (a one-key grid)."""
        from fedsim.sweep import Sweep  # its own naming, so the table finds exactly the runs the sweep wrote

        (key,) = self.grid
        sweep = Sweep(self.configs, self.overrides, self.grid, self.dir)
        return {point.values[key]: self.dir / point.label for point in sweep.points()}


def check_seeds(seeds: Sequence[int]) -> None:
    if TUNE_SEED in seeds:
        raise SystemExit(f"seed {TUNE_SEED} is the server-lr tuning cell's ({TUNE_SCENARIO}); the table must not "
                         "report it: choose other --seeds")
    if len(set(seeds)) != len(seeds):
        raise SystemExit(f"--seeds repeats a seed: {list(seeds)}")


def plan_table(scenarios: Sequence[str], methods: Sequence[str], seeds: Sequence[int], out: Path,
               overrides: Sequence[str] = (), tuning: Path = TUNING) -> list[SweepSpec]:
    """One sweep over the seeds per (scenario, method), scenario-major."""
    check_seeds(seeds)
    return [SweepSpec(s, m, layers(s, m, tuning), list(overrides), {"seed": [str(x) for x in seeds]},
                      out / f"{s}--{m}")
            for s in scenarios for m in methods]


def plan_tuning(methods: Sequence[str], out: Path, lrs: Sequence[float] | None = None,
                overrides: Sequence[str] = ()) -> list[SweepSpec]:
    """One sweep over server lrs per method, on the held-out cell; no cpu-adaptive or tuning layer (the grid
    sets the lr)."""
    specs = []
    for m in methods:
        files = [HERE / "cpu.yaml", HERE / "scenarios" / f"{TUNE_SCENARIO}.yaml", HERE / "methods" / f"{m}.yaml"]
        values = [repr(float(lr)) for lr in (lrs or TUNE_LRS[m])]
        specs.append(SweepSpec(TUNE_SCENARIO, m, [str(f) for f in files], [*overrides, f"seed={TUNE_SEED}"],
                               {"algorithm.server.lr": values}, out / "tune" / m))
    return specs


def check_configs(specs: Iterable[SweepSpec]) -> None:
    """Before anything runs: load every sweep's first point (the rest differ only in seed or lr), and refuse
    a sweep folder made for another config (fedsim sweep's own check, e.g. after --tune changed an lr)."""
    from fedsim.config import ConfigError
    from fedsim.sweep import Sweep
    from fedsim.validation import load_config

    for spec in specs:
        first = [f"{key}={values[0]}" for key, values in spec.grid.items()]
        try:
            load_config(spec.configs, [*spec.overrides, *first])
            Sweep(spec.configs, spec.overrides, spec.grid, spec.dir).check_manifest()
        except ConfigError as err:
            raise SystemExit(f"{spec.name}: {err}") from None


def finished(spec: SweepSpec) -> bool:
    """Every run of the sweep finished, by fedsim sweep's own test (it would skip them all)."""
    from fedsim.sweep import DONE, status

    return all(status(run_dir) == DONE for run_dir in spec.run_dirs().values())


def run_sweeps(specs: Sequence[SweepSpec], jobs: int, logs: Path) -> list[SweepSpec]:
    """Run the sweeps as ``fedsim sweep`` processes, ``jobs`` runs at once; returns the sweeps that failed.

    Stopping this script (Ctrl-C, SIGTERM) stops the sweeps, which stop their runs: each continues from its
    checkpoint next time."""
    if jobs < 1:
        raise SystemExit(f"--jobs must be >= 1, got {jobs}")
    logs.mkdir(parents=True, exist_ok=True)
    todo, running, failed = [], {}, []
    for spec in specs:  # a sweep with nothing left to run is not started (saves a process start-up each)
        if finished(spec):
            print(f"done     {spec.name}: {_scores(spec)}", flush=True)
        else:
            todo.append(spec)
    parallel = max(1, jobs // max(1, len(todo)))  # few sweeps: each runs several of its points at once
    slots = max(1, jobs // parallel)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))  # so that `finally` stops them
    try:
        while todo or running:
            while todo and len(running) < slots:
                spec = todo.pop(0)
                with open(logs / f"{spec.name}.log", "a") as log:
                    running[spec.name] = (spec, subprocess.Popen(spec.command(parallel), stdout=log,
                                                                 stderr=subprocess.STDOUT))
                print(f"started  {spec.name}", flush=True)
            for name, (spec, proc) in list(running.items()):
                if proc.poll() is None:
                    continue
                del running[name]
                if proc.returncode == 0:
                    print(f"finished {name}: {_scores(spec)}", flush=True)
                else:
                    failed.append(spec)
                    tail = (logs / f"{name}.log").read_text().splitlines()[-5:]
                    print(f"FAILED   {name} (exit {proc.returncode}); {logs / (name + '.log')}:\n  "
                          + "\n  ".join(tail), flush=True)
            time.sleep(0.5)
    finally:
        for _, proc in running.values():
            proc.terminate()
        for _, proc in running.values():
            proc.wait()
    return failed


def _scores(spec: SweepSpec) -> str:
    runs = read_runs(spec.run_dirs())
    return ", ".join(f"{v} {100 * headline(s)[1]:.1f}" for v, s in runs.items()) or "no finished runs"


# ---------------------------------------------------------------------------------------------- the results
def read_runs(run_dirs: Mapping[str, Path]) -> dict[str, dict[str, Any]]:
    """Grid value -> summary.json, for the finished runs only."""
    out = {}
    for value, run_dir in run_dirs.items():
        path = run_dir / "summary.json"
        if path.exists():
            summary = json.loads(path.read_text())
            summary["_finished"] = path.stat().st_mtime
            summary["_run_dir"] = str(run_dir)
            out[value] = summary
    return out


def headline(summary: Mapping[str, Any]) -> tuple[str, float]:
    """(metric name, value): summary.json's ``headline_metric``, else accuracy."""
    metrics = summary["final_metrics"]
    name = summary.get("headline_metric")
    if not name or name not in metrics:
        name = "accuracy"
    return name, float(metrics[name])


def t_quantile(df: int, p: float = 0.975) -> float:
    """Student's t quantile, by bisection on the CDF (Simpson's rule on the density): no scipy needed."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    log_c = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)

    def cdf(t: float) -> float:
        x = np.linspace(0.0, t, 4001)
        pdf = np.exp(log_c - (df + 1) / 2 * np.log1p(x * x / df))
        h = t / 4000
        return 0.5 + h / 3 * (pdf[0] + pdf[-1] + 4 * pdf[1:-1:2].sum() + 2 * pdf[2:-1:2].sum())

    low, high = 0.0, 1000.0
    for _ in range(60):
        mid = (low + high) / 2
        low, high = (mid, high) if cdf(mid) < p else (low, mid)
    return (low + high) / 2


def interval(values: Sequence[float]) -> dict[str, Any]:
    """Mean and 95% t-interval (mean ± t_{0.975, n-1} s / sqrt(n)); no interval for one value."""
    x = np.asarray(values, dtype=float)
    out: dict[str, Any] = {"n": len(x), "mean": float(x.mean()) if len(x) else None,
                           "half_width": None, "low": None, "high": None}
    if len(x) > 1:
        half = t_quantile(len(x) - 1) * float(x.std(ddof=1)) / math.sqrt(len(x))
        out.update(half_width=half, low=out["mean"] - half, high=out["mean"] + half)
    return out


def paired_difference(values: Mapping[str, float], baseline: Mapping[str, float]) -> dict[str, Any]:
    """The per-seed difference ``values - baseline`` over the seeds both have, with its mean and t-interval."""
    common = [seed for seed in values if seed in baseline]
    diffs = {seed: values[seed] - baseline[seed] for seed in common}
    return {"values": diffs, **interval(list(diffs.values()))}


def server_lr(run_dir: str) -> float | None:
    """The server lr a run resolved (its config.yaml); None when the strategy takes none."""
    config = yaml.safe_load((Path(run_dir) / "config.yaml").read_text())
    return config.get("algorithm", {}).get("server", {}).get("lr")


def build_table(results: Mapping[tuple[str, str], Mapping[str, Mapping[str, Any]]], scenarios: Sequence[str],
                methods: Sequence[str], seeds: Sequence[int]) -> dict[str, Any]:
    """table.json's content from {(scenario, method): {seed: summary}}; values in points (x100)."""
    summaries = [s for runs in results.values() for s in runs.values()]
    metrics = sorted({headline(s)[0] for s in summaries})
    cells: dict[str, dict[str, Any]] = {}
    for scenario in scenarios:
        row = cells[scenario] = {}
        for method in methods:
            runs = results.get((scenario, method), {})
            cell = row[method] = _cell({seed: 100 * headline(s)[1] for seed, s in runs.items()})
            for ablation in ABLATIONS:
                cell[ablation] = _cell({seed: 100 * s["final_metrics"][name] for seed, s in runs.items()
                                        if (name := f"{ablation}/{headline(s)[0]}") in s["final_metrics"]})
        means = [c["mean"] for c in row.values() if c["mean"] is not None]
        for method, cell in row.items():
            cell["best"] = bool(means) and cell["mean"] is not None and cell["mean"] == max(means)
            if BASELINE in row and method != BASELINE:
                cell[f"minus_{BASELINE}"] = paired_difference(cell["values"], row[BASELINE]["values"])

    version_sets = {}
    for s in summaries:
        key = json.dumps(s.get("versions"), sort_keys=True)
        version_sets.setdefault(key, {"versions": s.get("versions"), "runs": 0})["runs"] += 1
    finished = sorted(s["_finished"] for s in summaries)
    lrs: dict[str, list] = {}
    for (scenario, method), runs in results.items():
        for s in runs.values():
            lr = server_lr(s["_run_dir"])
            if lr not in lrs.setdefault(method, []):
                lrs[method].append(lr)
    return {
        "metric": metrics[0] if len(metrics) == 1 else metrics,
        "units": "points: the metric x 100",
        "interval": "95% Student t-interval over seeds: mean ± t(0.975, n-1) * sd / sqrt(n)",
        "seeds": list(seeds), "scenarios": list(scenarios), "methods": list(methods), "baseline": BASELINE,
        "date": datetime.date.today().isoformat(),
        "runs_finished": [_day(finished[0]), _day(finished[-1])] if finished else None,
        "runs": len(summaries), "runs_expected": len(scenarios) * len(methods) * len(seeds),
        "wall_seconds": sum(s["wall_seconds"] for s in summaries),
        "engines": sorted({s.get("engine", "?") for s in summaries}),
        "server_lr": {m: (v[0] if len(v) == 1 else v) for m, v in lrs.items()},
        "versions": list(version_sets.values()),
        "tuning_cell": {"scenario": TUNE_SCENARIO, "seed": TUNE_SEED},
        "cells": cells,
    }


def _cell(values: Mapping[str, float]) -> dict[str, Any]:
    return {"values": dict(values), **interval(list(values.values()))}


def _day(stamp: float) -> str:
    return datetime.datetime.fromtimestamp(stamp).date().isoformat()


def _label(method: str) -> str:
    return METHODS.get(method, method)


def _header(methods: Sequence[str]) -> list[str]:
    return ["| scenario | " + " | ".join(map(_label, methods)) + " |", "|---|" + "---|" * len(methods)]


def _fmt(cell: Mapping[str, Any], expected: int, signed: bool = False, brackets: bool = False) -> str:
    """``mean ± half-width`` (or ``mean [low, high]``), with ``(n=k)`` when fewer seeds than asked finished."""
    if cell["mean"] is None:
        return "–"
    sign = "+" if signed else ""
    text = f"{cell['mean']:{sign}.1f}"
    if cell["half_width"] is not None:
        text += (f" [{cell['low']:{sign}.1f}, {cell['high']:{sign}.1f}]" if brackets
                 else f" ± {cell['half_width']:.1f}")
    return text + (f" (n={cell['n']})" if cell["n"] < expected else "")


def render_markdown(table: Mapping[str, Any]) -> str:
    scenarios, methods, cells = table["scenarios"], table["methods"], table["cells"]
    expected = len(table["seeds"])
    metric = table["metric"] if isinstance(table["metric"], str) else "/".join(table["metric"])
    seeds = ", ".join(map(str, table["seeds"]))

    lines = [f"**{metric} (points), mean ± 95% t-interval half-width over seeds {seeds}**; best mean per row "
             "in bold.", "", *_header(methods)]
    for s in scenarios:
        texts = [_fmt(cells[s][m], expected) for m in methods]
        texts = [f"**{t}**" if cells[s][m]["best"] else t for t, m in zip(texts, methods)]
        lines.append(f"| {SCENARIOS.get(s, s)} | " + " | ".join(texts) + " |")

    lines += ["", f"**Which modality the model relies on: {metric} without images / without text** "
                  "(means over seeds; the full-input mean is above).", "", *_header(methods)]
    for s in scenarios:
        texts = []
        for m in methods:
            a, b = (cells[s][m][k]["mean"] for k in ABLATIONS)
            texts.append("–" if a is None or b is None else f"{a:.1f} / {b:.1f}")
        lines.append(f"| {SCENARIOS.get(s, s)} | " + " | ".join(texts) + " |")

    others = [m for m in methods if m != table["baseline"]]
    if table["baseline"] in methods and others:
        lines += ["", f"**Difference to {_label(table['baseline'])}, paired by seed: mean [95% t-interval]** "
                      "(points; an interval that excludes 0 is a difference these seeds resolve).", "",
                  *_header(others)]
        for s in scenarios:
            texts = [_fmt(cells[s][m][f"minus_{table['baseline']}"], expected, signed=True, brackets=True)
                     for m in others]
            lines.append(f"| {SCENARIOS.get(s, s)} | " + " | ".join(texts) + " |")

    lrs = ", ".join(f"{_label(m)} {lr}" for m, lr in table["server_lr"].items() if lr is not None)
    lines += ["", f"{table['runs']} of {table['runs_expected']} runs finished "
                  f"({table['runs_finished'][0]} to {table['runs_finished'][1]}), "
                  f"{table['wall_seconds'] / 60:.0f} min of run wall time in all, engine "
                  f"{'/'.join(table['engines'])}; table written {table['date']}. "
                  "(n=k): only k seeds finished; – : none." if table["runs"] else "No finished runs.",
              f"Server lr: {lrs or 'n/a'} (tuned on {TUNE_SCENARIO}, seed {TUNE_SEED}, where "
              "experiments/fedmllm/tuning/<method>.yaml exists; else cpu-adaptive.yaml or the method file)."]
    for entry in table["versions"]:
        versions = ", ".join(f"{k} {v}" for k, v in (entry["versions"] or {}).items() if v)
        lines.append(f"Versions ({entry['runs']} runs): {versions or 'not recorded'}.")
    return "\n".join(lines) + "\n"


def write_table(specs: Sequence[SweepSpec], scenarios: Sequence[str], methods: Sequence[str],
                seeds: Sequence[int], out: Path) -> str:
    results = {}
    for spec in specs:
        runs = read_runs(spec.run_dirs())
        results[(spec.scenario, spec.method)] = {seed: runs[seed] for seed in map(str, seeds) if seed in runs}
    table = build_table(results, scenarios, methods, seeds)
    markdown = render_markdown(table)
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.json").write_text(json.dumps(table, indent=1) + "\n")
    (out / "table.md").write_text(markdown)
    return markdown


# ------------------------------------------------------------------------------------------------- tuning
def choose_lr(scores: Mapping[float, float]) -> float:
    """The lr with the best score; a tie goes to the smaller lr."""
    return max(sorted(scores), key=lambda lr: scores[lr])


def tuning_yaml(method: str, scores: Mapping[float, float], metric: str, versions: Mapping[str, Any] | None,
                date: str) -> str:
    """A layer setting ``algorithm.server.lr`` to the chosen lr, with every measured score as a comment."""
    chosen = choose_lr(scores)
    measured = ", ".join(f"{lr:g}: {100 * v:.1f}" for lr, v in sorted(scores.items()))
    versions_text = ", ".join(f"{k} {v}" for k, v in (versions or {}).items() if v) or "not recorded"
    return (f"# Server lr for {METHODS.get(method, method)} on the CPU twin, chosen by\n"
            f"# `python experiments/fedmllm_table.py --tune` on {date}: the best final {metric} (points) on the\n"
            f"# held-out cell {TUNE_SCENARIO}, seed {TUNE_SEED} (no table reports that seed), one run per lr:\n"
            f"#   {measured}\n"
            f"# Versions: {versions_text}.\n"
            f"# Layered last by experiments/fedmllm_table.py; delete this file to fall back to cpu-adaptive.yaml.\n"
            f"algorithm:\n  server:\n    lr: {chosen!r}\n")


def write_tuning(specs: Sequence[SweepSpec], tuning: Path = TUNING) -> list[Path]:
    """Write tuning/<method>.yaml for every tuning sweep whose runs all finished."""
    written = []
    for spec in specs:
        method = spec.method
        runs = read_runs(spec.run_dirs())
        if len(runs) < len(spec.grid["algorithm.server.lr"]):
            print(f"{method}: {len(runs)} of {len(spec.grid['algorithm.server.lr'])} tuning runs finished; "
                  "no tuning file written", flush=True)
            continue
        scores = {float(lr): headline(s)[1] for lr, s in runs.items()}
        first = next(iter(runs.values()))
        tuning.mkdir(parents=True, exist_ok=True)
        path = tuning / f"{method}.yaml"
        path.write_text(tuning_yaml(method, scores, headline(first)[0], first.get("versions"),
                                    datetime.date.today().isoformat()))
        print(f"{method}: server lr {choose_lr(scores)!r} -> {path}", flush=True)
        written.append(path)
    return written


# --------------------------------------------------------------------------------------------------- main
def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    all_scenarios = sorted(p.stem for p in (HERE / "scenarios").glob("*.yaml"))
    all_methods = sorted(p.stem for p in (HERE / "methods").glob("*.yaml"))
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides for every run")
    parser.add_argument("--scenarios", nargs="+", default=list(SCENARIOS), choices=all_scenarios, metavar="S",
                        help="scenario files (experiments/fedmllm/scenarios/); default: the paper's 12")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=all_methods, metavar="M",
                        help="method files (experiments/fedmllm/methods/); default: the 8 of the table")
    parser.add_argument("--seeds", nargs="+", type=int, default=list(SEEDS), help="default: 0 1 2")
    parser.add_argument("--jobs", type=int, default=2, help="runs at once (default 2: one per core here)")
    parser.add_argument("--out", type=Path, default=Path("runs/fedmllm-table"))
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--tune", action="store_true", help="tune the server lr on the held-out cell, write tuning/")
    mode.add_argument("--table-only", action="store_true", help="write the table from finished runs; run nothing")
    parser.add_argument("--list", action="store_true", help="print the fedsim sweep commands; run nothing")
    parser.add_argument("--lrs", nargs="+", type=float, help="with --tune: the server lrs to try (default per method)")
    args = parser.parse_args(argv)
    bad = [o for o in args.overrides if "=" not in o]
    if bad:
        parser.error(f"expected key=value overrides, got {bad}")
    overrides = [*engine_overrides(), *args.overrides]

    if args.tune:
        specs = plan_tuning([m for m in args.methods if m in TUNE_LRS], args.out, args.lrs, overrides)
    else:
        specs = plan_table(args.scenarios, args.methods, args.seeds, args.out, overrides)
    if args.list:
        print("\n".join(" ".join(spec.command()) for spec in specs))
        return 0
    failed = []
    if not args.table_only:
        check_configs(specs)
        failed = run_sweeps(specs, args.jobs, args.out / "logs")
    if args.tune:
        write_tuning(specs)
    else:
        print(write_table(specs, args.scenarios, args.methods, args.seeds, args.out))
        print(f"wrote {args.out / 'table.md'} and {args.out / 'table.json'}")
    if failed:
        print(f"{len(failed)} sweeps failed: {', '.join(s.name for s in failed)}; run the same command again "
              "to retry them", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
