"""The FedMLLM heterogeneity table on the CPU twin: every scenario x method x seed as ``fedsim sweep`` runs, each
finished run's numbers kept in the repository (experiments/fedmllm/results/), and the table of means with 95%
t-intervals over seeds built from those files alone, so that the grid can be measured over several sittings
and machines and the table regenerated from a clone.

    python experiments/fedmllm_table.py --tune           # once, before the table: server lr per method
    python experiments/fedmllm_table.py                  # the paper's grid: 12 scenarios x 8 methods
    python experiments/fedmllm_table.py --max-runs 40    # a sitting of at most 40 runs; run it again to go on
    python experiments/fedmllm_table.py --scenarios aligned-0.5 missing-0.5 cross-5-5 hybrid-0.6 \\
        --methods local fedavg fedyogi fedmllm           # the small table
    python experiments/fedmllm_table.py --table-only     # table.md/table.json from results/ alone; run nothing
    python experiments/fedmllm_table.py --list           # the fedsim sweep commands still to run; run nothing

The grid. Scenarios aligned alpha 5.0/1.0/0.5, missing beta 0.3/0.4/0.5, cross 3-7/5-5/7-3 and hybrid p
0.8/0.7/0.6 (experiments/fedmllm/scenarios/); methods local (the paper's local baseline: every client, every
round), FedAvg, FedProx, FedAvgM, FedAdagrad, FedYogi, FedAdam and FedMLLM (experiments/fedmllm/methods/).
Seeds 1001 1002 1003 in every cell: fresh seeds, not used while the twin was designed (docs/fedmllm-twin.md
lists the seeds its trial runs used). The cells that test
the paper's findings (scenarios aligned-0.5, missing-0.5, cross-3-7, cross-7-3 x methods local, FedAvg,
FedAvgM, FedYogi) run seeds 1004 and 1005 too: 16 x 5 + 80 x 3 = 320 runs. ``--seeds`` replaces the default
seeds in every cell, ``--no-finding-seeds`` drops the extra ones; ``--scenarios`` and ``--methods`` pick a
subset (any file in those folders). ``key=value`` arguments are passed to every run (a smoke check:
``federation.rounds=1 data.num_train=80``; give it its own ``--out``, ``--results`` and ``--table-out``, so
that it writes nothing into the repository). Every seed of a cell runs for FedAvg too, so differences to
FedAvg are paired by seed. Measured cost per run: see experiments/fedmllm/results/README.md.

Runs. Each (scenario, method) cell is one ``fedsim sweep`` of experiments/fedmllm/cpu.yaml + the scenario +
the method (+ cpu-adaptive.yaml for the adaptive server optimizers, + tuning/<method>.yaml once ``--tune`` has
written it) over ``--grid seed=...``, in ``--out``/<scenario>--<method>/ (runs in seed=<s>/, the sweep's console
log in ``--out``/logs/<scenario>--<method>.log). ``--jobs`` runs at once: ``--jobs`` sweeps of one run each,
or fewer sweeps running several of their seeds. ``--max-runs N`` runs at most N runs this sitting, cells in
plan order (the findings' cells first, then scenario-major); the output ends with how many runs remain and
the command that continues. Stopping the script (Ctrl-C, SIGTERM) stops the sweeps, whose runs continue from
their last checkpoint (every 5 rounds) when the same command runs again with the same ``--out``. A sweep
refuses a folder made for another config (after ``--tune`` changed a server lr, with RAY_ADDRESS set or
unset, other overrides), and this script checks that for every sweep before anything runs: give another
``--out``. With RAY_ADDRESS set, every run joins that Ray cluster with ``runtime.engine=ray`` (cpu.yaml's
``sequential`` engine would ignore the cluster); raise ``--jobs`` to what the cluster holds (each run takes
runtime.num_workers x cpus_per_worker = 2 CPUs there).

Results. Each finished run is stored, a few KB, as ``--results``/<scenario>--<method>/seed=<s>.json
(default experiments/fedmllm/results/; layout and fields in its README.md), written atomically right after
its sweep ends, and before planning for runs an earlier sitting finished in ``--out``. A stored result counts
for a cell when its ``config_digest`` (sha256 of the run's resolved config.yaml less ``seed``, ``name``,
``runtime`` and ``output``: how and where a run executes, not what it computes) equals the digest of the
cell's config now; the cell's sweep then runs only its other seeds (fedsim sweep lets the grid change in an
existing folder). A result with another digest is stale (the layers or overrides changed since): counted per
cell in the output and in table.json, never used in the table, never deleted by this script; a run of the
current config for that seed writes over it (git keeps the old one). A result already stored with the
current digest is kept, whichever machine measured it.

The table. ``table.md`` and ``table.json`` in ``--table-out`` (default experiments/fedmllm/), from results/
only: per scenario and method the mean and 95% t-interval over seeds of the headline metric (the run's
``headline_metric``, else accuracy), in points (x100), best mean per row in bold, ``(n=k)`` where only k of the
cell's planned seeds are measured; the same for the metric without images and without text
(``eval.ablations``); the per-seed difference to FedAvg over the seeds both have; how many runs of the plan
are measured, the server lr each method ran with, the library versions and the dates.

Tuning. ``--tune`` runs FedAdagrad, FedYogi, FedAdam, FedMLLM (a FedAdagrad server) and FedAvgM (eta 1 in the
paper's code) over a short list of server lrs (``--lrs``) x seeds 100 and 101 on one held-out cell that no
table reports: aligned alpha=1.0 with seeds of its own (the table refuses them). Per method and lr, one sweep
over the seeds in ``--out``/tune/<method>/lr=<lr>/, its results stored as
``--results``/tune/<method>/lr=<lr>--seed=<s>.json (so tuning resumes from the repository too). Once every
lr x seed of a method is measured, the lr with the best mean final headline metric over the seeds (a tie:
the smaller lr) goes to experiments/fedmllm/tuning/<method>.yaml, with every lr's per-seed values and mean as
comments; the table's runs layer it last (their digests change, so a new lr makes earlier results stale).
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import math
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, NamedTuple, Sequence

import numpy as np
import yaml

from fedsim.output import atomic_write_text, make_dirs, read_metrics

if TYPE_CHECKING:
    from fedsim.sweep import Sweep

REPO = Path(__file__).resolve().parents[1]
HERE = REPO / "experiments" / "fedmllm"
TUNING = HERE / "tuning"  # tuning/<method>.yaml, written by --tune
RESULTS = HERE / "results"  # <scenario>--<method>/seed=<s>.json, tune/<method>/lr=<lr>--seed=<s>.json

SCENARIOS = {"aligned-5.0": "aligned α=5.0", "aligned-1.0": "aligned α=1.0", "aligned-0.5": "aligned α=0.5",
             "missing-0.3": "missing β=0.3", "missing-0.4": "missing β=0.4", "missing-0.5": "missing β=0.5",
             "cross-3-7": "cross 3-7", "cross-5-5": "cross 5-5", "cross-7-3": "cross 7-3",
             "hybrid-0.8": "hybrid p=0.8", "hybrid-0.7": "hybrid p=0.7", "hybrid-0.6": "hybrid p=0.6"}
METHODS = {"local": "local", "fedavg": "FedAvg", "fedprox": "FedProx", "fedavgm": "FedAvgM",
           "fedadagrad": "FedAdagrad", "fedyogi": "FedYogi", "fedadam": "FedAdam", "fedmllm": "FedMLLM"}
SEEDS = (1001, 1002, 1003)  # fresh: none ran in the twin's design trials (docs/fedmllm-twin.md lists theirs)
# The cells that test the paper's findings get more seeds, so that their differences resolve.
FINDING_SCENARIOS = ("aligned-0.5", "missing-0.5", "cross-3-7", "cross-7-3")
FINDING_METHODS = ("local", "fedavg", "fedavgm", "fedyogi")
FINDING_SEEDS = (1004, 1005)
BASELINE = "fedavg"  # paired differences are taken against it
ADAPTIVE = ("fedadagrad", "fedyogi", "fedadam", "fedmllm")  # server optimizers that take cpu-adaptive.yaml
ABLATIONS = ("no_image", "no_text")

# Server-lr tuning: one held-out cell, outside every reported table (its seeds are refused there).
TUNE_SCENARIO, TUNE_SEEDS = "aligned-1.0", (100, 101)
TUNE_LRS = {"fedavgm": (0.5, 1.0, 2.0), **{m: (1e-3, 1e-2, 3e-2, 1e-1, 3e-1) for m in ADAPTIVE}}

# Config keys left out of a result's digest: how and where a run executes (RAY_ADDRESS's engine override, run
# folders, its seed and default name), not what it computes for a cell.
UNDIGESTED = ("seed", "name", "runtime", "output")
# Config that came after results were stored and that, while off or at these values, computes what runs
# without it did: left out of a digest then, so that adding it kept those results current.
NEUTRAL_SECTIONS = {"privacy": ("mode", "none"), "attack": ("kind", "none"), "compression": ("kind", "none")}
NEUTRAL_SERVER_KEYS = {"trim": 1, "f": 1, "multikrum_m": 0, "norm_bound": 1.0}


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


def config_digest(config: Mapping[str, Any]) -> str:
    """sha256 of a resolved config (config.yaml's mapping) less the ``UNDIGESTED`` keys, as sorted-key JSON."""
    kept = _without_neutral({key: value for key, value in config.items() if key not in UNDIGESTED})
    return hashlib.sha256(json.dumps(kept, sort_keys=True).encode()).hexdigest()


def _without_neutral(config: dict[str, Any]) -> dict[str, Any]:
    """``config`` less the sections that are off and the server keys at their neutral values."""
    out = {k: v for k, v in config.items()
           if not (k in NEUTRAL_SECTIONS and v.get(NEUTRAL_SECTIONS[k][0]) == NEUTRAL_SECTIONS[k][1])}
    if isinstance(out.get("algorithm", {}).get("server"), dict):
        server = {k: v for k, v in out["algorithm"]["server"].items() if NEUTRAL_SERVER_KEYS.get(k, object()) != v}
        out["algorithm"] = {**out["algorithm"], "server": server}
    return out


class Cell(NamedTuple):
    """The runs of one table cell (scenario, method), or of one server lr of a tuned method (``lr``): their
    layers, overrides and seeds, their sweep folder in --out and where their results are stored."""

    scenario: str
    method: str
    configs: tuple[str, ...]
    overrides: tuple[str, ...]
    seeds: tuple[int, ...]
    dir: Path  # the fedsim sweep folder
    results: Path  # the folder of its results files
    lr: float | None = None

    @property
    def name(self) -> str:
        return f"tune-{self.method}-{self.dir.name}" if self.lr is not None else self.dir.name

    def result_path(self, seed: int) -> Path:
        return self.results / f"{'' if self.lr is None else f'lr={self.lr!r}--'}seed={seed}.json"

    def digest(self) -> str:
        """The config digest of the cell's runs today (the seed does not enter it); loads the config."""
        from fedsim.config import to_yaml
        from fedsim.validation import load_config

        cfg = load_config(list(self.configs), [*self.overrides, f"seed={self.seeds[0]}"])
        return config_digest(yaml.safe_load(to_yaml(cfg)))

    def sweep(self, seeds: Sequence[int]) -> Sweep:
        """fedsim's Sweep over ``seeds`` in the cell's folder: its own run naming and config checks."""
        from fedsim.sweep import Sweep

        return Sweep(list(self.configs), list(self.overrides), {"seed": [str(s) for s in seeds]}, self.dir)

    def run_dirs(self, seeds: Sequence[int] | None = None) -> dict[int, Path]:
        """Seed -> run folder, named as fedsim sweep names it."""
        sweep = self.sweep(self.seeds if seeds is None else seeds)
        return {int(point.values["seed"]): self.dir / point.label for point in sweep.points()}

    def command(self, seeds: Sequence[int], parallel: int = 1) -> list[str]:
        return [sys.executable, "-m", "fedsim.cli", "sweep", *self.configs, *self.overrides,
                "--grid", f"seed={','.join(map(str, seeds))}", "--parallel", str(parallel), "--out", str(self.dir)]


def check_seeds(seeds: Sequence[int], extra: Sequence[int] = ()) -> None:
    """Refuse the tuning cell's seeds in a table, and a seed given twice."""
    tuning = sorted(set(TUNE_SEEDS) & {*seeds, *extra})
    if tuning:
        raise SystemExit(f"seeds {tuning} belong to the server-lr tuning cell ({TUNE_SCENARIO}, seeds "
                         f"{list(TUNE_SEEDS)}); the table must not report them: choose other --seeds")
    if len(set(seeds)) != len(seeds):
        raise SystemExit(f"--seeds repeats a seed: {list(seeds)}")


def is_finding(scenario: str, method: str) -> bool:
    return scenario in FINDING_SCENARIOS and method in FINDING_METHODS


def plan_table(scenarios: Sequence[str], methods: Sequence[str], seeds: Sequence[int], out: Path,
               overrides: Sequence[str] = (), tuning: Path = TUNING, results: Path = RESULTS,
               finding_seeds: Sequence[int] = FINDING_SEEDS) -> list[Cell]:
    """One cell per (scenario, method): the findings' cells first (``seeds`` then ``finding_seeds``), then the
    rest, each group scenario-major."""
    check_seeds(seeds, finding_seeds)
    pairs = sorted(((s, m) for s in scenarios for m in methods), key=lambda pair: not is_finding(*pair))
    cells = []
    for s, m in pairs:
        extra = [x for x in finding_seeds if x not in seeds] if is_finding(s, m) else []
        cells.append(Cell(s, m, tuple(layers(s, m, tuning)), tuple(overrides), (*seeds, *extra), out / f"{s}--{m}",
                          results / f"{s}--{m}"))
    return cells


def plan_tuning(methods: Sequence[str], out: Path, lrs: Sequence[float] | None = None,
                overrides: Sequence[str] = (), results: Path = RESULTS) -> list[Cell]:
    """One cell per method and server lr on the held-out cell, over ``TUNE_SEEDS``; no cpu-adaptive or tuning
    layer (the cell's override sets the lr)."""
    cells = []
    for m in methods:
        files = [HERE / "cpu.yaml", HERE / "scenarios" / f"{TUNE_SCENARIO}.yaml", HERE / "methods" / f"{m}.yaml"]
        for lr in map(float, lrs or TUNE_LRS[m]):
            cells.append(Cell(TUNE_SCENARIO, m, tuple(map(str, files)), (*overrides, f"algorithm.server.lr={lr!r}"),
                              TUNE_SEEDS, out / "tune" / m / f"lr={lr!r}", results / "tune" / m, lr))
    return cells


# ------------------------------------------------------------------------------------------- the results
def read_result(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.exists() else None


def run_result(cell: Cell, seed: int, run_dir: Path) -> dict[str, Any]:
    """A finished run's stored result: its summary's metrics, its eval curve, its config's digest and lr."""
    summary = json.loads((run_dir / "summary.json").read_text())
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    finished = datetime.datetime.fromtimestamp((run_dir / "summary.json").stat().st_mtime, datetime.timezone.utc)
    return {
        "scenario": cell.scenario, "method": cell.method, "seed": seed,
        "server_lr": config.get("algorithm", {}).get("server", {}).get("lr"),
        "config_digest": config_digest(config),
        "headline_metric": summary.get("headline_metric"),
        "final_metrics": summary["final_metrics"],
        "zero_shot_metrics": summary.get("zero_shot_metrics") or {},
        "curve": [{"round": r["round"], "eval": r["eval"]} for r in read_metrics(run_dir) if "eval" in r],
        "wall_seconds": summary["wall_seconds"],
        "engine": summary.get("engine"),
        "versions": summary.get("versions"),
        "finished": finished.isoformat(timespec="seconds"),
    }


def harvest(cell: Cell) -> list[int]:
    """Store every finished run of the cell's seeds in its sweep folder that ran the cell's config of today,
    unless a result of that config is stored already (it is kept); returns the seeds stored."""
    finished = {seed: d for seed, d in cell.run_dirs().items() if (d / "summary.json").exists()}
    digest = cell.digest() if finished else None
    stored = []
    for seed, run_dir in finished.items():
        current = read_result(cell.result_path(seed))
        if current is not None and current["config_digest"] == digest:
            continue
        result = run_result(cell, seed, run_dir)
        if result["config_digest"] != digest:
            continue  # a run of another config: it is not this cell's result
        make_dirs(cell.results)
        atomic_write_text(cell.result_path(seed), json.dumps(result, indent=1, sort_keys=True) + "\n")
        stored.append(seed)
    return stored


class CellPlan(NamedTuple):
    """A cell against the results store: its measured results (the current digest) and what is left."""

    cell: Cell
    done: dict[int, dict[str, Any]]  # seed -> stored result of the cell's config of today
    stale: list[int]  # seeds whose stored result is of another config: left out, run again
    todo: list[int]  # seeds to run: missing or stale


def plan_cell(cell: Cell) -> CellPlan:
    stored = {seed: result for seed in cell.seeds if (result := read_result(cell.result_path(seed))) is not None}
    digest = cell.digest() if stored else None
    done = {seed: result for seed, result in stored.items() if result["config_digest"] == digest}
    stale = [seed for seed in stored if seed not in done]
    return CellPlan(cell, done, stale, [seed for seed in cell.seeds if seed not in done])


def schedule(plans: Sequence[CellPlan], max_runs: int | None = None) -> list[tuple[Cell, list[int]]]:
    """The sweeps of this sitting, (cell, seeds to run), in plan order, at most ``max_runs`` runs in all."""
    sweeps, left = [], max_runs
    for plan in plans:
        seeds = plan.todo if left is None else plan.todo[:left]
        if seeds:
            sweeps.append((plan.cell, seeds))
            left = None if left is None else left - len(seeds)
    return sweeps


def report_stale(plans: Sequence[CellPlan]) -> None:
    for plan in plans:
        if plan.stale:
            print(f"stale    {plan.cell.name}: {len(plan.stale)} stored for another config (seeds "
                  f"{', '.join(map(str, plan.stale))}): left out of the table, run again", flush=True)


def check_configs(sweeps: Sequence[tuple[Cell, list[int]]]) -> None:
    """Before anything runs: load every sweep's first point (the rest differ only in seed), and refuse a sweep
    folder made for another config (fedsim sweep's own check, e.g. after --tune changed an lr)."""
    from fedsim.config import ConfigError
    from fedsim.validation import load_config

    for cell, seeds in sweeps:
        try:
            load_config(list(cell.configs), [*cell.overrides, f"seed={seeds[0]}"])
            cell.sweep(seeds).check_manifest()
        except ConfigError as err:
            raise SystemExit(f"{cell.name}: {err}") from None


def run_sweeps(sweeps: Sequence[tuple[Cell, list[int]]], jobs: int, logs: Path) -> list[Cell]:
    """Run the sweeps as ``fedsim sweep`` processes, ``jobs`` runs at once, storing each sweep's finished runs
    as it ends (also a failed one's); returns the cells whose sweep failed.

    Stopping this script (Ctrl-C, SIGTERM) stops the sweeps, which stop their runs: each continues from its
    checkpoint next time."""
    if jobs < 1:
        raise SystemExit(f"--jobs must be >= 1, got {jobs}")
    logs.mkdir(parents=True, exist_ok=True)
    todo, running, failed = list(sweeps), {}, []
    parallel = max(1, jobs // max(1, len(todo)))  # few sweeps: each runs several of its points at once
    slots = max(1, jobs // parallel)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))  # so that `finally` stops them
    try:
        while todo or running:
            while todo and len(running) < slots:
                cell, seeds = todo.pop(0)
                with open(logs / f"{cell.name}.log", "a") as log:
                    running[cell.name] = (cell, subprocess.Popen(cell.command(seeds, parallel), stdout=log,
                                                                 stderr=subprocess.STDOUT))
                print(f"started  {cell.name}: seeds {', '.join(map(str, seeds))}", flush=True)
            for name, (cell, proc) in list(running.items()):
                if proc.poll() is None:
                    continue
                del running[name]
                harvest(cell)
                if proc.returncode == 0:
                    print(f"finished {name}: {_scores(cell)}", flush=True)
                else:
                    failed.append(cell)
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


def _scores(cell: Cell) -> str:
    done = plan_cell(cell).done
    return ", ".join(f"seed {s} {100 * headline(r)[1]:.1f}" for s, r in done.items()) or "no stored results"


# ------------------------------------------------------------------------------------------------ the maths
def headline(result: Mapping[str, Any]) -> tuple[str, float]:
    """(metric name, value): the run's ``headline_metric``, else accuracy."""
    metrics = result["final_metrics"]
    name = result.get("headline_metric")
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


# ------------------------------------------------------------------------------------------------ the table
def build_table(plans: Sequence[CellPlan], scenarios: Sequence[str], methods: Sequence[str]) -> dict[str, Any]:
    """table.json's content from the cells' stored results of today's configs; values in points (x100)."""
    by_cell = {(p.cell.scenario, p.cell.method): p for p in plans}
    results = [r for p in plans for r in p.done.values()]
    metrics = sorted({headline(r)[0] for r in results})
    cells: dict[str, dict[str, Any]] = {}
    for scenario in scenarios:
        row = cells[scenario] = {}
        for method in methods:
            plan = by_cell[(scenario, method)]
            planned = [str(seed) for seed in plan.cell.seeds]
            runs = {str(seed): r for seed, r in plan.done.items()}
            cell = row[method] = _cell({seed: 100 * headline(r)[1] for seed, r in runs.items()}, planned)
            for ablation in ABLATIONS:
                cell[ablation] = _cell({seed: 100 * r["final_metrics"][name] for seed, r in runs.items()
                                        if (name := f"{ablation}/{headline(r)[0]}") in r["final_metrics"]}, planned)
        means = [c["mean"] for c in row.values() if c["mean"] is not None]
        for method, cell in row.items():
            cell["best"] = bool(means) and cell["mean"] is not None and cell["mean"] == max(means)
            if BASELINE in row and method != BASELINE:
                baseline = row[BASELINE]
                cell[f"minus_{BASELINE}"] = {
                    **paired_difference(cell["values"], baseline["values"]),
                    "seeds_planned": [s for s in cell["seeds_planned"] if s in baseline["seeds_planned"]]}

    version_sets = {}
    for r in results:
        key = json.dumps(r.get("versions"), sort_keys=True)
        version_sets.setdefault(key, {"versions": r.get("versions"), "runs": 0})["runs"] += 1
    finished = sorted(r["finished"] for r in results)
    lrs: dict[str, list] = {}
    for r in results:
        if r["server_lr"] not in lrs.setdefault(r["method"], []):
            lrs[r["method"]].append(r["server_lr"])
    shown = [by_cell[(s, m)] for s in scenarios for m in methods]
    common = [seed for seed in shown[0].cell.seeds if all(seed in p.cell.seeds for p in shown)] if shown else []
    extra: dict[str, dict[str, list[int]]] = {}
    for p in shown:
        if len(p.cell.seeds) > len(common):
            extra.setdefault(p.cell.scenario, {})[p.cell.method] = [x for x in p.cell.seeds if x not in common]
    return {
        "metric": metrics[0] if len(metrics) == 1 else metrics,
        "units": "points: the metric x 100",
        "interval": "95% Student t-interval over seeds: mean ± t(0.975, n-1) * sd / sqrt(n)",
        "seeds": common,
        "extra_seeds": extra,  # scenario -> method -> the seeds it runs beyond ``seeds``
        "scenarios": list(scenarios), "methods": list(methods), "baseline": BASELINE,
        "date": datetime.date.today().isoformat(),
        "runs_finished": [finished[0][:10], finished[-1][:10]] if finished else None,
        "runs": len(results), "runs_planned": sum(len(p.cell.seeds) for p in shown),
        "stale_results": {p.cell.name: len(p.stale) for p in shown if p.stale},
        "wall_seconds": sum(r["wall_seconds"] for r in results),
        "engines": sorted({r.get("engine") or "?" for r in results}),
        "server_lr": {m: (v[0] if len(v) == 1 else v) for m, v in lrs.items()},
        "versions": list(version_sets.values()),
        "tuning_cell": {"scenario": TUNE_SCENARIO, "seeds": list(TUNE_SEEDS)},
        "results": _shown_path(shown[0].cell.results.parent) if shown else None,
        "cells": cells,
    }


def _shown_path(path: Path) -> str:
    """``path`` relative to the repository when inside it: the table names no one's home folder."""
    path = path.resolve()
    return path.relative_to(REPO).as_posix() if path.is_relative_to(REPO) else str(path)


def _cell(values: Mapping[str, float], planned: Sequence[str]) -> dict[str, Any]:
    return {"values": dict(values), "seeds_planned": list(planned), **interval(list(values.values()))}


def _label(method: str) -> str:
    return METHODS.get(method, method)


def _header(methods: Sequence[str]) -> list[str]:
    return ["| scenario | " + " | ".join(map(_label, methods)) + " |", "|---|" + "---|" * len(methods)]


def _fmt(cell: Mapping[str, Any], signed: bool = False, brackets: bool = False) -> str:
    """``mean ± half-width`` (or ``mean [low, high]``), with ``(n=k)`` when fewer seeds than planned are measured."""
    if cell["mean"] is None:
        return "–"
    sign = "+" if signed else ""
    text = f"{cell['mean']:{sign}.1f}"
    if cell["half_width"] is not None:
        text += (f" [{cell['low']:{sign}.1f}, {cell['high']:{sign}.1f}]" if brackets
                 else f" ± {cell['half_width']:.1f}")
    return text + (f" (n={cell['n']})" if cell["n"] < len(cell["seeds_planned"]) else "")


def _extra_seeds_text(extra: Mapping[str, Mapping[str, Sequence[str | int]]]) -> list[str]:
    """One line per set of extra seeds: the cells (scenario: methods) that run them."""
    groups: dict[str, list[str]] = {}
    for scenario, methods in extra.items():
        by_seeds: dict[str, list[str]] = {}
        for method, seeds in methods.items():
            by_seeds.setdefault(", ".join(map(str, seeds)), []).append(_label(method))
        for seeds, labels in by_seeds.items():
            groups.setdefault(seeds, []).append(f"{SCENARIOS.get(scenario, scenario)} ({', '.join(labels)})")
    return [f"Seeds {seeds} too in: {'; '.join(cells)}." for seeds, cells in groups.items()]


def render_markdown(table: Mapping[str, Any]) -> str:
    scenarios, methods, cells = table["scenarios"], table["methods"], table["cells"]
    metric = table["metric"] if isinstance(table["metric"], str) else "/".join(table["metric"])
    seeds = ", ".join(map(str, table["seeds"]))

    lines = [f"**{metric} (points), mean ± 95% t-interval half-width over seeds {seeds}**; best mean per row "
             "in bold.", "", *_header(methods)]
    for s in scenarios:
        texts = [_fmt(cells[s][m]) for m in methods]
        texts = [f"**{t}**" if cells[s][m]["best"] else t for t, m in zip(texts, methods)]
        lines.append(f"| {SCENARIOS.get(s, s)} | " + " | ".join(texts) + " |")
    extra = _extra_seeds_text(table["extra_seeds"])
    if extra:
        lines += ["", *extra]

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
            texts = [_fmt(cells[s][m][f"minus_{table['baseline']}"], signed=True, brackets=True) for m in others]
            lines.append(f"| {SCENARIOS.get(s, s)} | " + " | ".join(texts) + " |")

    lrs = ", ".join(f"{_label(m)} {lr}" for m, lr in table["server_lr"].items() if lr is not None)
    stale = sum(table["stale_results"].values())
    lines += ["", (f"{table['runs']} of {table['runs_planned']} runs of the plan measured "
                   f"(finished {table['runs_finished'][0]} to {table['runs_finished'][1]}), "
                   f"{table['wall_seconds'] / 60:.0f} min of run wall time in all, engine "
                   f"{'/'.join(table['engines'])}; " if table["runs"]
                   else f"0 of {table['runs_planned']} runs of the plan measured; ")
              + f"table written {table['date']} from {table['results']}/. (n=k): only k of the cell's "
                "planned seeds measured; – : none."
              + (f" {stale} stored results of an earlier config left out (table.json's stale_results)."
                 if stale else ""),
              f"Server lr: {lrs or 'n/a'} (tuned on {TUNE_SCENARIO}, seeds "
              f"{', '.join(map(str, table['tuning_cell']['seeds']))}, where "
              "experiments/fedmllm/tuning/<method>.yaml exists; else cpu-adaptive.yaml or the method file)."]
    for entry in table["versions"]:
        versions = ", ".join(f"{k} {v}" for k, v in (entry["versions"] or {}).items() if v)
        lines.append(f"Versions ({entry['runs']} runs): {versions or 'not recorded'}.")
    return "\n".join(lines) + "\n"


def write_table(plans: Sequence[CellPlan], scenarios: Sequence[str], methods: Sequence[str], out: Path) -> str:
    """Write table.json and table.md to ``out`` from the stored results; returns the markdown."""
    table = build_table(plans, scenarios, methods)
    markdown = render_markdown(table)
    make_dirs(out)
    atomic_write_text(out / "table.json", json.dumps(table, indent=1) + "\n")
    atomic_write_text(out / "table.md", markdown)
    return markdown


# ------------------------------------------------------------------------------------------------- tuning
def choose_lr(scores: Mapping[float, Mapping[int, float]]) -> float:
    """The lr with the best mean score over seeds; a tie goes to the smaller lr."""
    return max(sorted(scores), key=lambda lr: float(np.mean(list(scores[lr].values()))))


def tuning_yaml(method: str, scores: Mapping[float, Mapping[int, float]], metric: str,
                versions: Mapping[str, Any] | None, date: str) -> str:
    """A layer setting ``algorithm.server.lr`` to the chosen lr, with every measured score as a comment."""
    chosen = choose_lr(scores)
    measured = "\n".join(
        f"#   lr {lr:g}: " + ", ".join(f"seed {seed} {100 * v:.1f}" for seed, v in sorted(per_seed.items()))
        + f"; mean {100 * float(np.mean(list(per_seed.values()))):.1f}" for lr, per_seed in sorted(scores.items()))
    seeds = " and ".join(map(str, TUNE_SEEDS))
    versions_text = ", ".join(f"{k} {v}" for k, v in (versions or {}).items() if v) or "not recorded"
    return (f"# Server lr for {METHODS.get(method, method)} on the CPU twin, chosen by\n"
            f"# `python experiments/fedmllm_table.py --tune` on {date}: the best mean final {metric} (points) over\n"
            f"# seeds {seeds} of the held-out cell {TUNE_SCENARIO} (no table reports those seeds), one run per lr\n"
            f"# and seed (results in experiments/fedmllm/results/tune/{method}/):\n"
            f"{measured}\n"
            f"# Versions: {versions_text}.\n"
            f"# Layered last by experiments/fedmllm_table.py; delete this file to fall back to cpu-adaptive.yaml.\n"
            f"algorithm:\n  server:\n    lr: {chosen!r}\n")


def write_tuning(plans: Sequence[CellPlan], tuning: Path = TUNING) -> list[Path]:
    """Write tuning/<method>.yaml for every tuned method whose lr x seed runs are all measured."""
    by_method: dict[str, list[CellPlan]] = {}
    for plan in plans:
        by_method.setdefault(plan.cell.method, []).append(plan)
    written = []
    for method, method_plans in by_method.items():
        left = sum(len(p.todo) for p in method_plans)
        if left:
            print(f"{method}: {left} of {sum(len(p.cell.seeds) for p in method_plans)} tuning runs not measured "
                  "yet; no tuning file written", flush=True)
            continue
        scores = {p.cell.lr: {seed: headline(r)[1] for seed, r in p.done.items()} for p in method_plans}
        first = next(iter(method_plans[0].done.values()))
        make_dirs(tuning)
        path = tuning / f"{method}.yaml"
        atomic_write_text(path, tuning_yaml(method, scores, headline(first)[0], first.get("versions"),
                                            datetime.date.today().isoformat()))
        print(f"{method}: server lr {choose_lr(scores)!r} -> {path}", flush=True)
        written.append(path)
    return written


# --------------------------------------------------------------------------------------------------- main
def progress(plans: Sequence[CellPlan], argv: Sequence[str]) -> str:
    """How many runs of the plan remain, and the command that continues (the same arguments)."""
    left, total = sum(len(p.todo) for p in plans), sum(len(p.cell.seeds) for p in plans)
    if not left:
        return f"all {total} runs of the plan are measured"
    again = [arg for arg in argv if arg not in ("--table-only", "--list")]
    return (f"{left} of {total} runs of the plan remain; continue with (from the repository root):\n  "
            + shlex.join(["python", "experiments/fedmllm_table.py", *again]))


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    all_scenarios = sorted(p.stem for p in (HERE / "scenarios").glob("*.yaml"))
    all_methods = sorted(p.stem for p in (HERE / "methods").glob("*.yaml"))
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides for every run")
    parser.add_argument("--scenarios", nargs="+", default=list(SCENARIOS), choices=all_scenarios, metavar="S",
                        help="scenario files (experiments/fedmllm/scenarios/); default: the paper's 12")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=all_methods, metavar="M",
                        help="method files (experiments/fedmllm/methods/); default: the 8 of the table")
    parser.add_argument("--seeds", nargs="+", type=int, default=list(SEEDS),
                        help=f"every cell's seeds (default: {' '.join(map(str, SEEDS))})")
    parser.add_argument("--no-finding-seeds", action="store_true",
                        help=f"no extra seeds ({' '.join(map(str, FINDING_SEEDS))}) in the findings' cells")
    parser.add_argument("--jobs", type=int, default=2, help="runs at once (default 2: one per core here)")
    parser.add_argument("--max-runs", type=int, metavar="N", help="run at most N runs this sitting")
    parser.add_argument("--out", type=Path, default=Path("runs/fedmllm-table"), help="the sweeps' run folders")
    parser.add_argument("--results", type=Path, default=RESULTS, help="the results store (default: %(default)s)")
    parser.add_argument("--table-out", type=Path, default=HERE, help="where table.md/json go (default: %(default)s)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--tune", action="store_true", help="tune the server lr on the held-out cell, write tuning/")
    mode.add_argument("--table-only", action="store_true", help="write the table from the results store; run nothing")
    parser.add_argument("--list", action="store_true", help="print the fedsim sweep commands; run nothing")
    parser.add_argument("--lrs", nargs="+", type=float, help="with --tune: the server lrs to try (default per method)")
    args = parser.parse_args(argv)
    bad = [o for o in args.overrides if "=" not in o]
    if bad:
        parser.error(f"expected key=value overrides, got {bad}")
    if args.max_runs is not None and args.max_runs < 0:
        parser.error(f"--max-runs must be >= 0, got {args.max_runs}")
    overrides = [*engine_overrides(), *args.overrides]

    if args.tune:
        cells = plan_tuning([m for m in args.methods if m in TUNE_LRS], args.out, args.lrs, overrides, args.results)
    else:
        cells = plan_table(args.scenarios, args.methods, args.seeds, args.out, overrides, results=args.results,
                           finding_seeds=() if args.no_finding_seeds else FINDING_SEEDS)
    if not (args.table_only or args.list):
        for cell in cells:  # runs that an earlier sitting finished but did not store (it was stopped)
            harvest(cell)
    plans = [plan_cell(cell) for cell in cells]
    report_stale(plans)
    sweeps = [] if args.table_only else schedule(plans, args.max_runs)
    if args.list:
        print("\n".join(shlex.join(cell.command(seeds)) for cell, seeds in sweeps))
        return 0
    failed = []
    if sweeps:
        check_configs(sweeps)
        failed = run_sweeps(sweeps, args.jobs, args.out / "logs")
        plans = [plan_cell(cell) for cell in cells]
    if args.tune:
        write_tuning(plans)
    else:
        print(write_table(plans, args.scenarios, args.methods, args.table_out))
        print(f"wrote {args.table_out / 'table.md'} and {args.table_out / 'table.json'}")
    if failed:
        print(f"{len(failed)} sweeps failed: {', '.join(c.name for c in failed)}; run the same command again "
              "to retry them", file=sys.stderr)
    print(progress(plans, argv))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
