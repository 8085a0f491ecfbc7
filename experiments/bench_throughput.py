"""Client updates per second and worker busy fraction: the sequential engine against the Ray runtime.

One fixed workload (tiny preset, N registered clients, K per round, S local steps or E local epochs), run on
each engine in one invocation; prints updates/s, the ratio to sequential, and each Ray worker's busy
fraction: its time in client tasks over the wall time of the rounds (``summary.json``'s ``train_seconds``).
The busy time is read from Ray's own task timeline (``ray.timeline()``, the ``ClientWorker.train`` spans),
so the figure does not depend on the code under test reporting it; runs that report ``busy_fraction`` in
their summary print it beside. Engines use the same torch thread count per training process, so the
comparison measures the runtime's overhead, not a thread-count difference.

    python experiments/bench_throughput.py --clients 200 --per-round 20 --steps 5 --rounds 3
    # quantity-skewed clients (task durations follow shard sizes), 2 workers, no sequential run:
    python experiments/bench_throughput.py --scheme quantity --steps 0 --epochs 1 \\
        --samples-per-client 40 --clients 100 --per-round 20 --rounds 5 --workers 2 --no-sequential

Measuring other code (a checkout of an older commit) with this script: run it from that checkout with
``PYTHONPATH`` pointing there, so that ``fedsim`` and ``actors`` (and the Ray workers) import from it.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import ray

from actors.runtime import run_ray
from fedsim.engine import run_sequential
from fedsim.validation import load_config

QUICKSTART = Path(__file__).resolve().parent / "quickstart.yaml"
TRAIN_SPAN = "task::ClientWorker.train"
TIMELINE_FLUSH_S = 3.0  # Ray reports task events every second; let the last ones arrive


def workload(args: argparse.Namespace, out: Path, *extra: str):
    local = ([f"training.local_steps={args.steps}"] if args.steps
             else ["training.local_steps=0", f"training.local_epochs={args.epochs}"])
    return load_config(QUICKSTART, [
        f"partition.num_clients={args.clients}", f"federation.clients_per_round={args.per_round}",
        *local, f"federation.rounds={args.rounds}", f"partition.scheme={args.scheme}",
        f"partition.alpha={args.alpha}", f"data.num_train={args.clients * args.samples_per_client}",
        "data.num_test=32", "eval.zero_shot=false", f"eval.every={args.rounds}", "output.progress=never",
        "checkpoint.every=0", f"output.dir={out}", *extra])


def timeline_busy_seconds() -> list[float]:
    """Seconds each worker process spent in ``ClientWorker.train`` on this Ray instance, largest first."""
    time.sleep(TIMELINE_FLUSH_S)
    per_worker: dict[str, float] = defaultdict(float)
    for event in ray.timeline():
        if event.get("cat") == TRAIN_SPAN:
            per_worker[event["tid"]] += event["dur"] / 1e6
    return sorted(per_worker.values(), reverse=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=200)
    parser.add_argument("--per-round", type=int, default=20)
    parser.add_argument("--steps", type=int, default=5, help="local steps per task (0: use --epochs)")
    parser.add_argument("--epochs", type=int, default=1, help="local epochs per task when --steps is 0")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--scheme", default="iid", choices=["iid", "quantity", "dirichlet"])
    parser.add_argument("--alpha", type=float, default=0.5, help="partition.alpha (quantity: size skew)")
    parser.add_argument("--samples-per-client", type=int, default=10, help="data.num_train = clients x this")
    parser.add_argument("--workers", default="1,2", help="Ray worker counts to run, comma-separated")
    parser.add_argument("--no-sequential", action="store_true", help="skip the sequential engine")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per training process")
    args = parser.parse_args()

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        if not args.no_sequential:
            seq = run_sequential(workload(args, Path(tmp) / "seq", f"runtime.num_threads={args.threads}"),
                                 Path(tmp) / "seq")
            rows.append(("sequential", seq, []))
        for workers in (int(w) for w in args.workers.split(",")):
            out = Path(tmp) / f"ray{workers}"
            cfg = workload(args, out, "runtime.engine=ray", f"runtime.num_workers={workers}",
                           f"runtime.cpus_per_worker={args.threads}")
            # A fresh instance per run: its timeline holds this run's tasks only.
            ray.init(address="local", num_cpus=max(2, workers * args.threads), include_dashboard=False,
                     log_to_driver=False)
            try:
                summary = run_ray(cfg, out)
                rows.append((f"ray, {workers} worker{'s' * (workers > 1)}", summary, timeline_busy_seconds()))
            finally:
                ray.shutdown()

    local = f"S={args.steps} local steps" if args.steps else f"E={args.epochs} local epoch(s)"
    print(f"workload: N={args.clients} clients ({args.scheme}, alpha={args.alpha}, {args.samples_per_client} "
          f"samples per client on average), K={args.per_round} per round, {local}, {args.rounds} rounds, "
          f"{args.threads} torch thread(s) per training process")
    print(f"{'engine':<16} {'updates':>8} {'train s':>9} {'updates/s':>10} {'vs first':>9}  busy fraction per worker "
          "(timeline | summary)")
    base = rows[0][1]["updates_per_second"]
    for name, summary, busy in rows:
        timeline = " ".join(f"{b / summary['train_seconds']:.1%}" for b in busy) or "-"
        reported = " ".join(f"{w['busy_fraction']:.1%}" for w in summary.get("workers", []) if "busy_fraction" in w)
        print(f"{name:<16} {summary['client_updates']:>8} {summary['train_seconds']:>9.1f} "
              f"{summary['updates_per_second']:>10.2f} {summary['updates_per_second'] / base:>8.2f}x  "
              f"{timeline} | {reported or '-'}")
    same = {s["adapter_sha256"] for _, s, _ in rows}
    print("identical final adapters across engines:", len(same) == 1)


if __name__ == "__main__":
    main()
