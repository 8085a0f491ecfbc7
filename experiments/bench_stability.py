"""Is the quickstart's learning a result or a coin toss? Run it over several seeds and report the spread.

Runs `fedsim run experiments/quickstart.yaml` for each seed as one `fedsim sweep` (resumable: run the same
command again to continue), on the sequential engine with one torch thread per run, two runs at once, then
prints every seed's final accuracy, the mean, the sample standard deviation, a 95% t-interval of the mean
and whether the targets hold (every seed >= 85%, standard deviation <= 3 points), with the library versions
the runs recorded. Writes the same as JSON beside the sweep.

    python experiments/bench_stability.py                       # seeds 0-4, runs/stability
    python experiments/bench_stability.py --seeds 0 1 --out runs/stability-2
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import subprocess
import sys
from pathlib import Path

QUICKSTART = Path(__file__).resolve().parent / "quickstart.yaml"
# Two-sided 95% Student t quantiles by degrees of freedom (n - 1).
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}
MIN_ACCURACY, MAX_STD_POINTS = 0.85, 3.0


def run_sweep(seeds: list[int], out: Path, parallel: int) -> None:
    command = [sys.executable, "-m", "fedsim.cli", "sweep", str(QUICKSTART), "--grid",
               "seed=" + ",".join(map(str, seeds)), "--parallel", str(parallel), "--out", str(out),
               "runtime.engine=sequential", "runtime.num_threads=1", "output.progress=never"]
    subprocess.run(command, check=True)


def summarize(out: Path) -> dict:
    with open(out / "sweep.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["status"] == "done"]
    accuracy = {int(r["seed"]): float(r["final_accuracy"]) for r in rows}
    values = list(accuracy.values())
    mean = statistics.mean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    half = T95.get(len(values) - 1, 1.96) * std / len(values) ** 0.5 if len(values) > 1 else float("nan")
    first = json.loads((Path(rows[0]["run_dir"]) / "summary.json").read_text())
    return {"accuracy_by_seed": accuracy, "mean": mean, "std": std, "ci95": [mean - half, mean + half],
            "every_seed_at_least": MIN_ACCURACY, "holds_min": min(values) >= MIN_ACCURACY,
            "holds_std": std * 100 <= MAX_STD_POINTS, "zero_shot_accuracy": first["zero_shot_metrics"].get("accuracy"),
            "versions": first["versions"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--parallel", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("runs/stability"))
    args = parser.parse_args()
    run_sweep(args.seeds, args.out, args.parallel)
    result = summarize(args.out)
    (args.out / "stability.json").write_text(json.dumps(result, indent=1) + "\n")
    for seed, acc in sorted(result["accuracy_by_seed"].items()):
        print(f"seed {seed}: {100 * acc:.1f}%")
    low, high = result["ci95"]
    print(f"mean {100 * result['mean']:.1f}%, std {100 * result['std']:.1f} points, "
          f"95% interval of the mean [{100 * low:.1f}, {100 * high:.1f}]; zero-shot "
          f"{100 * result['zero_shot_accuracy']:.1f}%")
    print(f"every seed >= {100 * MIN_ACCURACY:.0f}%: {result['holds_min']}; "
          f"std <= {MAX_STD_POINTS:g} points: {result['holds_std']}")
    print("versions:", ", ".join(f"{k} {v}" for k, v in result["versions"].items()))


if __name__ == "__main__":
    main()
