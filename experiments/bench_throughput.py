"""Client updates per second, clients per batch, memory and start-up: the sequential engine and the Ray runtime.

One fixed workload (tiny preset, N registered clients, K per round, S local steps or E local epochs), run on
each engine and each ``runtime.clients_per_batch`` B in one invocation; prints updates/s, the ratio to the
first row and to B=1 on the same engine, each Ray worker's busy fraction (its time in client tasks over the
wall time of the rounds, ``summary.json``'s ``train_seconds``), the peak memory of this process and every
process it started, Ray's included (PSS: shared libraries counted once, split among the processes; RSS
summed: counted in every process, as ``ps`` or a per-process monitor adds them up), and the time
from launch (``ray.init`` included) to the start of round 1. The busy time is read from Ray's own task
timeline (``ray.timeline()``, the ``ClientWorker.train_batch`` spans), so the figure does not depend on the
code under test reporting it; runs that report ``busy_fraction`` in their summary print it beside. Engines use
the same torch thread count per training process, so the comparison measures the runtime, not threads.

    python experiments/bench_throughput.py --clients 200 --per-round 20 --steps 5 --rounds 3
    # clients trained together: B = 1, 2, 4, 8, 16 on both engines (the figures in docs/results.md)
    python experiments/bench_throughput.py --clients 200 --per-round 20 --steps 2 --batch-size 4 --rounds 5 \\
        --workers 2 --batch 1,2,4,8,16
    # quantity-skewed clients (task durations follow shard sizes), 2 workers, no sequential run:
    python experiments/bench_throughput.py --scheme quantity --steps 0 --epochs 1 \\
        --samples-per-client 40 --clients 100 --per-round 20 --rounds 5 --workers 2 --no-sequential

Measuring other code (a checkout of an older commit) with this script: run it from that checkout with
``PYTHONPATH`` pointing there, so that ``fedsim`` and ``actors`` (and the Ray workers) import from it.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

import psutil
import ray

from actors.local_ray import start_local_ray
from actors.runtime import run_ray
from fedsim.engine import run_sequential
from fedsim.validation import load_config

QUICKSTART = Path(__file__).resolve().parent / "quickstart.yaml"
TRAIN_SPAN = "task::ClientWorker.train_batch"
TIMELINE_FLUSH_S = 3.0  # Ray reports task events every second; let the last ones arrive


def workload(args: argparse.Namespace, out: Path, *extra: str):
    local = ([f"training.local_steps={args.steps}"] if args.steps
             else ["training.local_steps=0", f"training.local_epochs={args.epochs}"])
    return load_config(QUICKSTART, [
        f"partition.num_clients={args.clients}", f"federation.clients_per_round={args.per_round}",
        *local, f"federation.rounds={args.rounds}", f"partition.scheme={args.scheme}",
        f"partition.alpha={args.alpha}", f"data.num_train={args.clients * args.samples_per_client}",
        f"training.batch_size={args.batch_size}",
        "data.num_test=32", "eval.zero_shot=false", f"eval.every={args.rounds}", "output.progress=never",
        "checkpoint.every=0", f"output.dir={out}", *extra])


class Monitor:
    """Samples, in a thread, the memory of this process tree and the run's first metrics record."""

    def __init__(self, run_dir: Path, every_s: float = 0.5) -> None:
        self.run_dir, self.every_s = run_dir, every_s
        self.launched = time.perf_counter()
        self.peak_bytes = 0  # proportional set size: shared pages split among the processes that map them
        self.peak_rss_bytes = 0  # resident set size: shared pages counted in every process
        self.first_record_at: float | None = None
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()

    def _sample(self) -> None:
        me = psutil.Process()
        while not self.stop.is_set():
            pss = rss = 0
            for process in [me, *me.children(recursive=True)]:
                try:
                    info = process.memory_full_info()
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    continue
                pss, rss = pss + info.pss, rss + info.rss
            self.peak_bytes, self.peak_rss_bytes = max(self.peak_bytes, pss), max(self.peak_rss_bytes, rss)
            metrics = self.run_dir / "metrics.jsonl"
            if self.first_record_at is None and metrics.exists() and metrics.stat().st_size:
                self.first_record_at = time.perf_counter()
            self.stop.wait(self.every_s)

    def finish(self) -> dict[str, float]:
        """Peak memory (GB, PSS and summed RSS), and seconds from launch to the start of round 1 (its record's time less the
        round's own wall time)."""
        self.stop.set()
        self.thread.join()
        lines = (self.run_dir / "metrics.jsonl").read_text().splitlines()
        first_round = next(json.loads(line) for line in lines if json.loads(line).get("round") == 1)
        startup = (self.first_record_at - self.launched - first_round["wall_seconds"]
                   if self.first_record_at is not None else float("nan"))
        return {"peak_gb": self.peak_bytes / 2**30, "peak_rss_gb": self.peak_rss_bytes / 2**30, "startup_s": startup}


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
    parser.add_argument("--batch-size", type=int, default=8, help="training.batch_size (samples per local step)")
    parser.add_argument("--scheme", default="iid", choices=["iid", "quantity", "dirichlet"])
    parser.add_argument("--alpha", type=float, default=0.5, help="partition.alpha (quantity: size skew)")
    parser.add_argument("--samples-per-client", type=int, default=10, help="data.num_train = clients x this")
    parser.add_argument("--workers", default="1,2", help="Ray worker counts to run, comma-separated")
    parser.add_argument("--no-sequential", action="store_true", help="skip the sequential engine")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per training process")
    parser.add_argument("--batch", default="1", help="runtime.clients_per_batch values to run, comma-separated")
    args = parser.parse_args()

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for batch in (int(b) for b in args.batch.split(",")):
            per_batch = f"runtime.clients_per_batch={batch}"
            if not args.no_sequential:
                out = Path(tmp) / f"seq-b{batch}"
                monitor = Monitor(out)
                seq = run_sequential(workload(args, out, f"runtime.num_threads={args.threads}", per_batch), out)
                rows.append(("sequential", batch, seq, [], monitor.finish()))
            for workers in (int(w) for w in args.workers.split(",") if w):
                out = Path(tmp) / f"ray{workers}-b{batch}"
                cfg = workload(args, out, "runtime.engine=ray", f"runtime.num_workers={workers}",
                               f"runtime.cpus_per_worker={args.threads}", per_batch)
                monitor = Monitor(out)
                # A fresh instance per run: its timeline holds this run's tasks only.
                start_local_ray(num_cpus=max(2, workers * args.threads), log_to_driver=False)
                try:
                    summary = run_ray(cfg, out)
                    busy = timeline_busy_seconds()
                    rows.append((f"ray, {workers} worker{'s' * (workers > 1)}", batch, summary, busy,
                                 monitor.finish()))
                finally:
                    ray.shutdown()

    local = f"S={args.steps} local steps" if args.steps else f"E={args.epochs} local epoch(s)"
    print(f"workload: N={args.clients} clients ({args.scheme}, alpha={args.alpha}, {args.samples_per_client} "
          f"samples per client on average), K={args.per_round} per round, {local} of {args.batch_size} samples, "
          f"{args.rounds} rounds, "
          f"{args.threads} torch thread(s) per training process")
    print(f"{'engine':<16} {'B':>3} {'updates':>8} {'train s':>8} {'updates/s':>10} {'vs first':>9} {'vs B=1':>7} "
          f"{'PSS GB':>7} {'RSS GB':>7} {'start s':>8}  busy fraction per worker (timeline | summary)")
    base = rows[0][2]["updates_per_second"]
    unbatched = {name: summary["updates_per_second"] for name, batch, summary, _, _ in rows if batch == 1}
    for name, batch, summary, busy, measured in rows:
        timeline = " ".join(f"{b / summary['train_seconds']:.1%}" for b in busy) or "-"
        reported = " ".join(f"{w['busy_fraction']:.1%}" for w in summary.get("workers", []) if "busy_fraction" in w)
        rate = summary["updates_per_second"]
        versus_one = f"{rate / unbatched[name]:>6.2f}x" if name in unbatched else f"{'-':>7}"
        print(f"{name:<16} {batch:>3} {summary['client_updates']:>8} {summary['train_seconds']:>8.1f} {rate:>10.2f} "
              f"{rate / base:>8.2f}x {versus_one} {measured['peak_gb']:>7.2f} {measured['peak_rss_gb']:>7.2f} {measured['startup_s']:>8.1f}  "
              f"{timeline} | {reported or '-'}")
    extra = {b: s["batching"].get("extra_client_bytes") for _, b, s, _, _ in rows if b > 1 and "batching" in s}
    for batch, cost in sorted(extra.items()):
        print(f"B={batch}: each extra client in a batch costs " +
              ", ".join(f"{kind} {size / 2**20:.1f} MiB" for kind, size in cost.items()))
    same = {s["adapter_sha256"] for _, _, s, _, _ in rows}
    print("identical final adapters across engines and batch sizes:", len(same) == 1)


if __name__ == "__main__":
    main()
