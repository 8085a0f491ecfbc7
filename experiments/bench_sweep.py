"""What a sweep costs beyond its runs' rounds: ``fedsim sweep`` of short runs of the quickstart on the Ray engine
(one round of 2 clients out of 4, small data, one worker; a grid over seed=0..N-1), one at a time, as one child
process without RAY_ADDRESS. Prints the sweep's wall time (launch to exit), the runs' own round time (the sum
of their metrics.jsonl wall_seconds) and the time beyond the rounds per run: each run's process start and
imports, joining or starting Ray, the workers' start and model loads, the run's writes, and the sweep's own
start (its imports, and the Ray instance it starts once for all its runs).

    python experiments/bench_sweep.py --runs 20
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

QUICKSTART = Path(__file__).resolve().parent / "quickstart.yaml"
SHORT_RUN = ["federation.rounds=1", "partition.num_clients=4", "federation.clients_per_round=2", "data.num_train=120",
             "data.num_test=24", "training.local_epochs=1", "eval.zero_shot=false", "runtime.engine=ray",
             "runtime.num_workers=1", "runtime.num_threads=1", "output.save_adapter=false"]


def round_seconds(run_dir: Path) -> float:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return sum(r["wall_seconds"] for r in records if "round" in r)


def bench(runs: int, parallel: int, out: Path) -> dict:
    command = [sys.executable, "-m", "fedsim.cli", "sweep", str(QUICKSTART), "--grid",
               "seed=" + ",".join(map(str, range(runs))), *SHORT_RUN, "--parallel", str(parallel), "--out", str(out)]
    env = {name: value for name, value in os.environ.items() if name != "RAY_ADDRESS"}
    out.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with open(out.with_suffix(".log"), "w") as log:
        code = subprocess.run(command, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
    wall = time.perf_counter() - started
    with open(out / "sweep.csv") as table:
        rows = list(csv.DictReader(table))
    if code or any(row["status"] != "done" for row in rows):
        raise RuntimeError(f"the sweep failed (exit {code}); see {out.with_suffix('.log')}")
    rounds = sum(round_seconds(Path(row["run_dir"])) for row in rows)
    return {"runs": runs, "parallel": parallel, "sweep_wall_s": round(wall, 1), "rounds_s": round(rounds, 1),
            "beyond_rounds_per_run_s": round((wall - rounds) / runs, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--parallel", type=int, default=1)
    parser.add_argument("--out", type=Path, help="sweep directory (default: a fresh temporary one)")
    args = parser.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="bench-sweep-")) / "sweep"
    result = bench(args.runs, args.parallel, out)
    print(f"{result['runs']} runs, {result['parallel']} at a time: sweep {result['sweep_wall_s']} s, the runs' rounds "
          f"{result['rounds_s']} s, beyond the rounds {result['beyond_rounds_per_run_s']} s per run ({out})")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
