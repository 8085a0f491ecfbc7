"""Client updates per second: the sequential engine against the Ray runtime with 1 and 2 workers.

One fixed workload (tiny preset, N registered clients, K per round, S local steps), run on each engine in
one invocation; prints updates/s and the ratio to sequential. Engines use the same torch thread count per
training process, so the comparison measures the runtime's overhead, not a thread-count difference.

    python experiments/bench_throughput.py --clients 200 --per-round 20 --steps 5 --rounds 3
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import ray

from actors.runtime import run_ray
from fedsim.validation import load_config
from fedsim.engine import run_sequential

QUICKSTART = Path(__file__).resolve().parent / "quickstart.yaml"


def workload(args: argparse.Namespace, out: Path, *extra: str):
    return load_config(QUICKSTART, [
        f"partition.num_clients={args.clients}", f"federation.clients_per_round={args.per_round}",
        f"training.local_steps={args.steps}", f"federation.rounds={args.rounds}", "partition.scheme=iid",
        f"data.num_train={args.clients * 10}", "data.num_test=32", "eval.zero_shot=false",
        f"eval.every={args.rounds}", "output.progress=never", f"output.dir={out}", *extra])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=200)
    parser.add_argument("--per-round", type=int, default=20)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per training process")
    args = parser.parse_args()

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        seq = run_sequential(workload(args, Path(tmp) / "seq", f"runtime.num_threads={args.threads}"),
                             Path(tmp) / "seq")
        rows.append(("sequential", seq))
        ray.init(address="local", num_cpus=max(2, 2 * args.threads), include_dashboard=False, log_to_driver=False)
        try:
            for workers in (1, 2):
                out = Path(tmp) / f"ray{workers}"
                cfg = workload(args, out, "runtime.engine=ray", f"runtime.num_workers={workers}",
                               f"runtime.cpus_per_worker={args.threads}")
                rows.append((f"ray, {workers} worker{'s' * (workers > 1)}", run_ray(cfg, out)))
        finally:
            ray.shutdown()

    base = seq["updates_per_second"]
    print(f"workload: N={args.clients} clients, K={args.per_round} per round, S={args.steps} local steps, "
          f"{args.rounds} rounds, {args.threads} torch thread(s) per training process")
    print(f"{'engine':<16} {'updates':>8} {'train s':>9} {'updates/s':>10} {'vs sequential':>14}")
    for name, summary in rows:
        print(f"{name:<16} {summary['client_updates']:>8} {summary['train_seconds']:>9.1f} "
              f"{summary['updates_per_second']:>10.2f} {summary['updates_per_second'] / base:>13.2f}x")
    same = {s["adapter_sha256"] for _, s in rows}
    print("identical final adapters across engines:", len(same) == 1)


if __name__ == "__main__":
    main()
