"""Peak memory of the Ray runtime against the number of registered clients, at a fixed cohort size.

Runs the same workload (fixed data size, K clients per round, 2 workers) with N=100 and N=1000 registered
clients and samples the resident memory of every process of the run (driver, workers, aggregator) twice
a second. Prints the peaks and the growth per registered client.

    python experiments/bench_memory.py --per-round 50 --rounds 3
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
from pathlib import Path

import psutil
import ray

from actors.local_ray import start_local_ray
from actors.runtime import run_ray
from fedsim.validation import load_config

QUICKSTART = Path(__file__).resolve().parent / "quickstart.yaml"


class PeakMemory:
    """Samples the summed RSS of this process and its descendants (Ray's workers are the raylet's children)."""

    def __init__(self, interval_s: float = 0.5):
        self.interval_s = interval_s
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> int:
        me = psutil.Process()
        total = me.memory_info().rss
        for child in me.children(recursive=True):
            try:
                if "python" in child.name() or "ray::" in " ".join(child.cmdline()[:1]):
                    total += child.memory_info().rss
            except psutil.Error:
                pass
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._sample())
            time.sleep(self.interval_s)

    def __enter__(self) -> "PeakMemory":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def measure(num_clients: int, args: argparse.Namespace, out: Path) -> tuple[float, dict]:
    cfg = load_config(QUICKSTART, [
        f"partition.num_clients={num_clients}", f"federation.clients_per_round={args.per_round}",
        f"federation.rounds={args.rounds}", "training.local_steps=2", "partition.scheme=iid",
        "data.num_train=2000", "data.num_test=32", "eval.zero_shot=false", f"eval.every={args.rounds}",
        "runtime.engine=ray", "runtime.num_workers=2", "output.progress=never", f"output.dir={out}"])
    start_local_ray(num_cpus=2, log_to_driver=False)
    try:
        with PeakMemory() as peak:
            summary = run_ray(cfg, out)
    finally:
        ray.shutdown()
    return peak.peak / 2**20, summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--per-round", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--clients", type=int, nargs=2, default=(100, 1000))
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.clients:
            results[n] = measure(n, args, Path(tmp) / f"n{n}")
    print(f"{'clients':>8} {'per round':>10} {'updates':>8} {'peak MiB':>9} {'updates/s':>10}")
    for n, (peak, summary) in results.items():
        print(f"{n:>8} {args.per_round:>10} {summary['client_updates']:>8} {peak:>9.0f} "
              f"{summary['updates_per_second']:>10.2f}")
    (small, (p_small, _)), (large, (p_large, _)) = sorted(results.items())
    print(f"growth: {(p_large - p_small) / (large - small) * 1024:.1f} KiB per registered client "
          f"(target: under 1024)")


if __name__ == "__main__":
    main()
