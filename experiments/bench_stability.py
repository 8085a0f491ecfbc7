"""Is the CPU twin an instrument? Its calibration and the stability checks of issue 25, in one command.

    python experiments/bench_stability.py              # run what is missing, then print every check
    python experiments/bench_stability.py --report     # print the checks from the stored results only
    python experiments/bench_stability.py --quickstart # the quickstart over seeds 0-4: its spread

The quickstart check runs `fedsim run experiments/quickstart.yaml` for each seed as one `fedsim sweep`
(sequential engine, one torch thread per run, ``--jobs`` at once) and prints every seed's final accuracy,
the mean, the standard deviation and a 95% t-interval of the mean, against the Bayes ceiling.

Three measurements, each stored like the table's runs under experiments/fedmllm/results/ (so that the
checks, like the table, are regenerated from the repository alone; run folders go to ``--out``):
- **calibration**: centralized fine-tuning (experiments/fedmllm/centralized.yaml: one client holding all the
  data, a third of its images and notes removed) on seeds 1001-1003; its accuracy with both modalities,
  without images and without text against the generator's Bayes ceilings (fedsim.data.synthetic.Cues):
  target within 3 points of each;
- **learning-rate sensitivity**: FedAvg on aligned-0.5 and missing-0.5 with the client lr x0.5 and x2 (x1 is
  the table's own run), seeds 1001-1003: the mean must move smoothly (no step over CLIFF_POINTS);
- **the table's runs** (experiments/fedmllm_table.py): the largest round-to-round jump of each run's
  accuracy curve (median over runs <= 8 points), the share of runs ending more than 10 points below the
  centralized accuracy, the seed standard deviation per cell (<= 3 points in >= 90% of the cells) and the
  standard deviation of the paired differences to FedAvg.
Writes the same as JSON to experiments/fedmllm/stability.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

HERE = Path(__file__).resolve().parent


sys.path.insert(0, str(HERE))  # experiments/ is not a package: its table script is a sibling module
import fedmllm_table as T  # noqa: E402
SEEDS = T.SEEDS  # the table's fresh seeds (docs/fedmllm-twin.md lists those the design trials used)
LR_CELLS = ("aligned-0.5", "missing-0.5")
LR_FACTORS = (0.5, 2.0)
MAX_MEDIAN_JUMP, MAX_CELL_STD, MIN_STEADY_CELLS, CALIBRATION_POINTS, CLIFF_POINTS = 8.0, 3.0, 0.9, 3.0, 10.0
ABLATION_MODALITIES = {"accuracy": (True, True), "no_image/accuracy": (False, True), "no_text/accuracy": (True, False)}


def curve(result: Mapping[str, Any]) -> list[tuple[int, float]]:
    """(round, accuracy in points) of a stored run, zero-shot first when it was evaluated."""
    points = [(int(p["round"]), 100 * p["eval"]["accuracy"]) for p in result["curve"] if "accuracy" in p["eval"]]
    zero = (result.get("zero_shot_metrics") or {}).get("accuracy")
    if zero is not None and (not points or points[0][0] > 0):
        points.insert(0, (0, 100 * zero))
    return points


def largest_jump(points: Sequence[tuple[int, float]]) -> float:
    """The largest change of accuracy between consecutive evaluations, in points."""
    return max((abs(b[1] - a[1]) for a, b in zip(points, points[1:])), default=0.0)


def std(values: Sequence[float]) -> float | None:
    return statistics.stdev(values) if len(values) > 1 else None


def table_checks(results: Mapping[tuple[str, str], Mapping[int, Mapping[str, Any]]],
                 centralized_accuracy: float | None) -> dict[str, Any]:
    """The checks over the table's runs: {(scenario, method): {seed: stored result}}."""
    runs = [r for cell in results.values() for r in cell.values()]
    jumps = [largest_jump(curve(r)) for r in runs]
    finals = {key: {seed: 100 * r["final_metrics"]["accuracy"] for seed, r in cell.items()}
              for key, cell in results.items()}
    stds = {key: std(list(v.values())) for key, v in finals.items()}
    stds = {key: s for key, s in stds.items() if s is not None}
    paired = {}
    for (scenario, method), values in finals.items():
        base = finals.get((scenario, T.BASELINE), {})
        spread = std([values[s] - base[s] for s in values if s in base])
        if method != T.BASELINE and spread is not None:
            paired[(scenario, method)] = spread
    below = None
    if centralized_accuracy is not None and runs:
        below = sum(100 * r["final_metrics"]["accuracy"] < centralized_accuracy - 10 for r in runs) / len(runs)
    steady = sum(s <= MAX_CELL_STD for s in stds.values()) / len(stds) if stds else None
    return {
        "runs": len(runs), "cells": len(results),
        "median_largest_jump": statistics.median(jumps) if jumps else None,
        "largest_jump_quartiles": statistics.quantiles(jumps, n=4) if len(jumps) > 1 else None,
        "holds_jump": bool(jumps) and statistics.median(jumps) <= MAX_MEDIAN_JUMP,
        "share_ending_10_below_centralized": below,
        "cells_with_std": len(stds), "share_cells_std_within": steady,
        "holds_std": steady is not None and steady >= MIN_STEADY_CELLS,
        "cell_std": {f"{s}--{m}": v for (s, m), v in sorted(stds.items())},
        "median_paired_difference_std": statistics.median(paired.values()) if paired else None,
        "paired_difference_std": {f"{s}--{m}": v for (s, m), v in sorted(paired.items())},
    }


def calibration(runs: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """Centralized accuracy (mean over seeds) per input against the generator's Bayes ceilings."""
    from fedsim.data.synthetic import Cues

    runs = list(runs)
    out: dict[str, Any] = {"seeds": len(runs)}
    for metric, (image, text) in ABLATION_MODALITIES.items():
        values = [100 * r["final_metrics"][metric] for r in runs if metric in r["final_metrics"]]
        ceiling = 100 * Cues().bayes_accuracy(image, text)
        mean = statistics.mean(values) if values else None
        out[metric] = {"values": values, "mean": mean, "std": std(values), "bayes_ceiling": ceiling,
                       "holds": mean is not None and abs(mean - ceiling) <= CALIBRATION_POINTS}
    return out


def lr_sensitivity(by_factor: Mapping[str, Mapping[float, Sequence[float]]]) -> dict[str, Any]:
    """{cell: {lr factor: final accuracies (points)}} -> means per factor and whether a step exceeds CLIFF_POINTS."""
    out = {}
    for cell, factors in by_factor.items():
        means = {f: statistics.mean(v) for f, v in sorted(factors.items()) if v}
        steps = [abs(b - a) for a, b in zip(list(means.values()), list(means.values())[1:])]
        out[cell] = {"means": means, "largest_step": max(steps, default=None),
                     "smooth": len(means) == len(LR_FACTORS) + 1 and max(steps) <= CLIFF_POINTS}
    return out


# ---------------------------------------------------------------------------------------------- the runs
def calibration_cell(out: Path, results: Path) -> Any:
    configs = (str(T.HERE / "cpu.yaml"), str(T.HERE / "centralized.yaml"))
    return T.Cell("centralized", "centralized", configs, tuple(T.engine_overrides()), SEEDS, out / "centralized",
                  results / "centralized")


def lr_cells(out: Path, results: Path) -> dict[tuple[str, float], Any]:
    """FedAvg on LR_CELLS with the client lr scaled by each of LR_FACTORS (x1 is the table's own cell)."""
    from fedsim.validation import load_config

    base_lr = load_config([T.HERE / "cpu.yaml"]).training.lr
    cells = {}
    for scenario in LR_CELLS:
        for factor in LR_FACTORS:
            name = f"{scenario}--fedavg--lr-x{factor:g}"
            cells[(scenario, factor)] = T.Cell(scenario, "fedavg", tuple(T.layers(scenario, "fedavg")),
                                               (*T.engine_overrides(), f"training.lr={base_lr * factor!r}"),
                                               SEEDS, out / name, results / "lr-sensitivity" / name)
    return cells


def finals(plan: Any) -> list[float]:
    """Final accuracies (points) of a cell's measured runs on SEEDS: every lr factor on the same seeds (the
    table's own cell has two more in the findings' cells)."""
    return [100 * r["final_metrics"]["accuracy"] for seed, r in plan.done.items() if seed in SEEDS]


def measure(out: Path, results: Path, jobs: int, parts: Sequence[str]) -> dict[str, Any]:
    """Run what is missing of ``parts`` (calibration, lr), then every check from the stored results."""
    calibrating, sensitivity = calibration_cell(out, results), lr_cells(out, results)
    table = T.plan_table(list(T.SCENARIOS), list(T.METHODS), list(T.SEEDS), out / "table", results=results)
    for cell in [calibrating, *sensitivity.values()]:  # runs an earlier, stopped sitting finished
        T.harvest(cell)
    own = [calibrating] * ("calibration" in parts) + list(sensitivity.values()) * ("lr" in parts)
    if own:
        sweeps = T.schedule([T.plan_cell(cell) for cell in own])
        if sweeps:
            T.check_configs(sweeps)
            T.run_sweeps(sweeps, jobs, out / "logs")
    central = T.plan_cell(calibrating)
    calibrated = calibration(central.done.values())
    by_factor: dict[str, dict[float, list[float]]] = {}
    for (scenario, factor), cell in sensitivity.items():
        by_factor.setdefault(scenario, {})[factor] = finals(T.plan_cell(cell))
    table_results = {}
    for cell in table:
        plan = T.plan_cell(cell)
        if plan.done:
            table_results[(cell.scenario, cell.method)] = plan.done
            if cell.method == "fedavg" and cell.scenario in by_factor:
                by_factor[cell.scenario][1.0] = finals(plan)
    return {"calibration": calibrated, "lr_sensitivity": lr_sensitivity(by_factor),
            "table": table_checks(table_results, calibrated["accuracy"]["mean"])}


def _points(value: float | None) -> str:
    return "–" if value is None else f"{value:.1f}"


def render(checks: Mapping[str, Any]) -> str:
    lines = ["Calibration: centralized fine-tuning (experiments/fedmllm/centralized.yaml) against the Bayes ceilings"]
    for metric, c in checks["calibration"].items():
        if metric == "seeds":
            continue
        lines.append(f"  {metric:<18} {_points(c['mean'])} (sd {_points(c['std'])}, {len(c['values'])} seeds), "
                     f"ceiling {c['bayes_ceiling']:.1f}: within {CALIBRATION_POINTS:g} points: {c['holds']}")
    lines.append("Learning-rate sensitivity (FedAvg, client lr x0.5 / x1 / x2, mean final accuracy)")
    for cell, s in checks["lr_sensitivity"].items():
        means = " / ".join(f"x{f:g} {_points(m)}" for f, m in s["means"].items())
        lines.append(f"  {cell:<12} {means}; largest step {_points(s['largest_step'])}: "
                     f"no step over {CLIFF_POINTS:g} points: {s['smooth']}")
    t = checks["table"]
    below, steady = t["share_ending_10_below_centralized"], t["share_cells_std_within"]
    lines += [f"The table's runs: {t['runs']} runs in {t['cells']} cells",
              f"  largest round-to-round jump of a run's curve: median {_points(t['median_largest_jump'])} points "
              f"(quartiles {', '.join(map(_points, t['largest_jump_quartiles'] or [None]))}); "
              f"<= {MAX_MEDIAN_JUMP:g}: {t['holds_jump']}",
              f"  runs ending more than 10 points below the centralized accuracy: "
              f"{_points(None if below is None else 100 * below)}%",
              f"  cells with seed sd <= {MAX_CELL_STD:g} points: {_points(None if steady is None else 100 * steady)}% "
              f"of {t['cells_with_std']} (target >= {100 * MIN_STEADY_CELLS:.0f}%): {t['holds_std']}",
              "  sd of the paired differences to FedAvg: median over cells "
              f"{_points(t['median_paired_difference_std'])} points"]
    return "\n".join(lines)


def quickstart(out: Path, jobs: int, seeds: Sequence[int] = (0, 1, 2, 3, 4)) -> str:
    from fedsim.data.synthetic import Cues

    cell = T.Cell("quickstart", "fedavg", (str(HERE / "quickstart.yaml"),),
                  ("runtime.engine=sequential", "runtime.num_threads=1", "output.progress=never"), tuple(seeds),
                  out / "quickstart", out / "quickstart-results")
    T.harvest(cell)
    sweeps = T.schedule([T.plan_cell(cell)])
    if sweeps:
        T.run_sweeps(sweeps, jobs, out / "logs")
    done = T.plan_cell(cell).done
    values = [100 * done[s]["final_metrics"]["accuracy"] for s in sorted(done)]
    zero = [100 * done[s]["zero_shot_metrics"]["accuracy"] for s in sorted(done)]
    summary = T.interval(values)
    lines = [f"seed {s}: zero-shot {z:.1f}%, final {v:.1f}%" for s, z, v in zip(sorted(done), zero, values)]
    lines.append(f"mean {summary['mean']:.1f}%, sd {_points(std(values))} points, 95% interval of the mean "
                 f"[{_points(summary['low'])}, {_points(summary['high'])}]; Bayes ceiling "
                 f"{100 * Cues().bayes_accuracy():.1f}%; versions: {done[min(done)]['versions']}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--report", action="store_true", help="run nothing: the checks from the stored results")
    parser.add_argument("--parts", nargs="+", choices=("calibration", "lr"), default=("calibration", "lr"),
                        help="what to run when missing (default: both)")
    parser.add_argument("--quickstart", action="store_true", help="the quickstart's spread over seeds 0-4 instead")
    parser.add_argument("--jobs", type=int, default=2, help="runs at once (default 2: one per core here)")
    parser.add_argument("--out", type=Path, default=Path("runs/stability"), help="the runs' folders")
    parser.add_argument("--results", type=Path, default=T.RESULTS, help="the results store (default: %(default)s)")
    parser.add_argument("--json", type=Path, default=T.HERE / "stability.json", help="where the checks go")
    args = parser.parse_args(argv)
    if args.quickstart:
        print(quickstart(args.out, args.jobs))
        return 0
    checks = measure(args.out, args.results, args.jobs, () if args.report else args.parts)
    args.json.write_text(json.dumps(checks, indent=1) + "\n")
    print(render(checks))
    return 0


if __name__ == "__main__":
    sys.exit(main())
