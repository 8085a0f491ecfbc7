"""The simulator's own cost curves, on the Ray runtime: wall seconds per round against the cohort size K
(should grow linearly: each client is one task), against the number of registered clients N at a fixed K
(should stay flat: N costs only bookkeeping), and the peak memory of the whole run against N.

Every run uses the tiny preset, the same data (2 samples per client at the largest N, batches of 2, so
every local step costs the same whatever N is), 2 workers and one Ray instance. Seconds per round are the
median over rounds after the first (which includes warm-up). Prints a table and the ratios that should hold,
and plots the three curves.

    python experiments/bench_scaling.py --out experiments/figures/scaling.png
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import ray  # noqa: E402

from actors.runtime import run_ray  # noqa: E402
from bench_memory import PeakMemory  # noqa: E402  (this folder is on sys.path when run as a script)
from fedsim.validation import load_config  # noqa: E402
from fedsim.output import read_metrics  # noqa: E402

QUICKSTART = Path(__file__).resolve().parent / "quickstart.yaml"


def measure(num_clients: int, cohort: int, args: argparse.Namespace, out: Path) -> dict:
    cfg = load_config(QUICKSTART, [
        f"partition.num_clients={num_clients}", f"federation.clients_per_round={cohort}",
        f"federation.rounds={args.rounds}", f"training.local_steps={args.steps}", "training.batch_size=2",
        "partition.scheme=iid", f"data.num_train={2 * max(args.clients)}", "data.num_test=32",
        "eval.zero_shot=false", f"eval.every={args.rounds}", "checkpoint.every=0",
        "runtime.engine=ray", f"runtime.num_workers={args.workers}", "runtime.num_threads=1",
        "output.progress=never", "output.save_adapter=false", f"output.dir={out}"])
    with PeakMemory() as peak:
        summary = run_ray(cfg, out)
    later_rounds = [r["wall_seconds"] for r in read_metrics(out)][1:]
    return {"clients": num_clients, "cohort": cohort, "seconds_per_round": statistics.median(later_rounds),
            "peak_mib": peak.peak / 2**20, "updates": summary["client_updates"]}


def plot(by_cohort: list[dict], by_clients: list[dict], out: Path) -> None:
    fig, axs = plt.subplots(1, 3, figsize=(13, 3.8), dpi=110)
    k = np.array([r["cohort"] for r in by_cohort])
    s = np.array([r["seconds_per_round"] for r in by_cohort])
    slope, intercept = np.polyfit(k, s, 1)
    axs[0].plot(k, s, "o", label="measured")
    axs[0].plot(k, slope * k + intercept, "--", label=f"linear fit: {slope:.2f} s per client")
    axs[0].set(title=f"wall time per round vs cohort K (N={by_cohort[0]['clients']})", xlabel="clients per round K",
               ylabel="wall seconds per round")
    n = [r["clients"] for r in by_clients]
    axs[1].plot(n, [r["seconds_per_round"] for r in by_clients], "o-")
    axs[1].set(title=f"wall time per round vs N (K={by_clients[0]['cohort']})", xlabel="registered clients N",
               ylabel="wall seconds per round", xscale="log", ylim=(0, None))
    peaks = [r["peak_mib"] for r in by_clients]
    axs[2].plot(n, peaks, "o-")
    axs[2].set(title="peak memory of the run vs N", xlabel="registered clients N",
               ylabel="peak RSS, all processes (MiB)", xscale="log", ylim=(0, 1.15 * max(peaks)))
    for ax in axs:
        ax.grid(alpha=0.3)
    axs[0].legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cohorts", type=int, nargs="+", default=[4, 8, 16, 32], help="K values (at N=1000)")
    parser.add_argument("--clients", type=int, nargs="+", default=[100, 1000, 5000], help="N values (at K=8)")
    parser.add_argument("--fixed-clients", type=int, default=1000)
    parser.add_argument("--fixed-cohort", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=4, help="local steps per client")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("scaling.png"), help="figure to write")
    args = parser.parse_args()

    ray.init(address="local", num_cpus=max(2, args.workers), include_dashboard=False, log_to_driver=False)
    results: dict[tuple[int, int], dict] = {}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            points = [(args.fixed_clients, k) for k in args.cohorts] + [(n, args.fixed_cohort) for n in args.clients]
            for n, k in dict.fromkeys(points):
                results[n, k] = measure(n, k, args, Path(tmp) / f"n{n}-k{k}")
                print(json.dumps(results[n, k]), flush=True)
    finally:
        ray.shutdown()

    by_cohort = [results[args.fixed_clients, k] for k in args.cohorts]
    by_clients = [results[n, args.fixed_cohort] for n in args.clients]
    print(f"\n{'N':>6} {'K':>4} {'s/round':>8} {'s/round/K':>10} {'peak MiB':>9}")
    for r in results.values():
        print(f"{r['clients']:>6} {r['cohort']:>4} {r['seconds_per_round']:>8.2f} "
              f"{r['seconds_per_round'] / r['cohort']:>10.3f} {r['peak_mib']:>9.0f}")
    first, last = by_cohort[0], by_cohort[-1]
    print(f"K x{last['cohort'] / first['cohort']:.0f}: s/round x"
          f"{last['seconds_per_round'] / first['seconds_per_round']:.2f} (linear: x{last['cohort'] / first['cohort']:.0f})")
    first, last = by_clients[0], by_clients[-1]
    print(f"N x{last['clients'] / first['clients']:.0f}: s/round x"
          f"{last['seconds_per_round'] / first['seconds_per_round']:.2f} (flat: x1), peak memory x"
          f"{last['peak_mib'] / first['peak_mib']:.2f}")
    plot(by_cohort, by_clients, args.out)
    print(f"figure: {args.out}")


if __name__ == "__main__":
    main()
