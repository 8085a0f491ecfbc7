"""The FedMLLM heterogeneity table on the CPU twin: final accuracy per scenario and method, over seeds.

    python experiments/fedmllm_table.py                # the README's table: 5 scenarios x 4 methods x 3 seeds
    python experiments/fedmllm_table.py --jobs 2 --seeds 0 1 2 --scenarios missing-0.3 cross-3-7

Each cell is one ``fedsim run`` of experiments/fedmllm/cpu.yaml layered with a scenario and a method file
(plus ``cpu-adaptive.yaml`` for the adaptive server optimizers, see there), one process per run, ``--jobs``
at once. Runs that finished (a summary.json) are reused, so an interrupted table resumes where it stopped;
an unfinished run directory is started over. Writes ``table.md`` and ``table.json`` under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent / "fedmllm"
SCENARIOS = {"aligned-5.0": "aligned α=5", "aligned-0.5": "aligned α=0.5", "missing-0.5": "missing β=0.5",
             "cross-5-5": "cross 5-5", "hybrid-0.6": "hybrid p=0.6"}
METHODS = {"local-only": "local-only", "fedavg": "FedAvg", "fedadagrad": "FedAdagrad", "fedmllm": "FedMLLM"}
ADAPTIVE = ("fedadagrad", "fedyogi", "fedadam", "fedmllm")  # server optimizers that take cpu-adaptive.yaml


def layers(scenario: str, method: str) -> list[str]:
    files = [HERE / "cpu.yaml", HERE / "scenarios" / f"{scenario}.yaml", HERE / "methods" / f"{method}.yaml"]
    if method in ADAPTIVE:
        files.append(HERE / "cpu-adaptive.yaml")
    return [str(f) for f in files]


def run_cell(scenario: str, method: str, seed: int, out: Path) -> dict:
    run_dir = out / "runs" / f"{scenario}--{method}--seed{seed}"
    summary = run_dir / "summary.json"
    if not summary.exists():
        shutil.rmtree(run_dir, ignore_errors=True)  # an interrupted run starts over
        cmd = [sys.executable, "-m", "fedsim.cli", "run", *layers(scenario, method), f"seed={seed}",
               f"output.dir={run_dir}"]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    result = json.loads(summary.read_text())
    print(f"{scenario:>12} {method:>10} seed {seed}: accuracy {result['final_metrics']['accuracy']:.3f} "
          f"({result['wall_seconds']:.0f} s)", flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenarios", nargs="+", default=list(SCENARIOS), choices=list(SCENARIOS))
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--jobs", type=int, default=2, help="runs at once (each uses one torch thread)")
    parser.add_argument("--out", type=Path, default=Path("runs/fedmllm-table"))
    args = parser.parse_args()

    cells = [(s, m, seed) for s in args.scenarios for m in args.methods for seed in args.seeds]
    with ThreadPoolExecutor(args.jobs) as pool:
        results = list(pool.map(lambda cell: run_cell(*cell, args.out), cells))
    accuracy = {cell: 100 * r["final_metrics"]["accuracy"] for cell, r in zip(cells, results)}
    wall = sum(r["wall_seconds"] for r in results)

    table = {s: {m: [accuracy[(s, m, seed)] for seed in args.seeds] for m in args.methods} for s in args.scenarios}
    lines = ["| scenario | " + " | ".join(METHODS[m] for m in args.methods) + " |",
             "|---|" + "---|" * len(args.methods)]
    for s in args.scenarios:
        cells_text = []
        for m in args.methods:
            values = np.array(table[s][m])
            spread = f" ± {values.std(ddof=1):.1f}" if len(values) > 1 else ""
            best = max(np.mean(table[s][k]) for k in args.methods)
            text = f"{values.mean():.1f}{spread}"
            cells_text.append(f"**{text}**" if values.mean() == best else text)
        lines.append(f"| {SCENARIOS[s]} | " + " | ".join(cells_text) + " |")
    note = (f"Final test accuracy (%), mean ± sample standard deviation over seeds {args.seeds}; "
            f"best per row in bold. {len(cells)} runs, {wall / 60:.0f} min of run wall time in all.")
    markdown = "\n".join(lines) + "\n\n" + note + "\n"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "table.md").write_text(markdown)
    (args.out / "table.json").write_text(json.dumps({"seeds": args.seeds, "accuracy": table}, indent=2) + "\n")
    print(markdown)


if __name__ == "__main__":
    main()
