"""The simulator's own cost against the number of registered clients N, on the Ray runtime.

Each point is one ``fedsim run`` of the quickstart (tiny preset, FedAvg, 2 workers, one torch thread each) as
a child process, with its own Ray instance, on per-client synthetic data (``data.samples_per_client``), so
N can exceed any fixed split and every local step costs the same whatever N is. Measured per point:

- wall seconds per round: the median over rounds after the first (which includes warm-up);
- start-up: seconds from launching the command to the start of round 1 (imports, Ray, the workers' model
  loads, the driver's per-client arrays);
- peak memory of the run's whole process tree (driver, Ray's own processes, workers, aggregator), as PSS
  (shared pages split among the processes) and as summed RSS, sampled twice a second.

It prints a table (with each point's samples per second as a fraction of the compute floor: the backbone's
forward and backward pass per sample, measured by ``bench_throughput.py``'s method, times the workers) and
the ratios that should hold (s/round flat in N, linear in the cohort size K; memory growth per registered
client well under 1 KB), and plots the curves. ``--scaffold N`` adds SCAFFOLD (per-client control variates
in the disk-backed state store) at N beside FedAvg at N, then kills a SCAFFOLD run once its first checkpoint is
written, resumes it and checks that it ends on the uninterrupted run's ``adapter_sha256``.

    python experiments/bench_scaling.py --out docs/figures/scaling.png --scaffold 100000
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import psutil  # noqa: E402

from bench_throughput import in_subprocess, measure_floor  # noqa: E402  (this folder: run as a script)
from fedsim.training import samples_per_task  # noqa: E402
from fedsim.validation import load_config  # noqa: E402

QUICKSTART = Path(__file__).resolve().parent / "quickstart.yaml"


def overrides(args: argparse.Namespace, num_clients: int, out: Path, *extra: str) -> list[str]:
    return [f"partition.num_clients={num_clients}", f"data.samples_per_client={args.samples_per_client}",
            "partition.scheme=iid", f"federation.clients_per_round={args.cohort}", f"federation.rounds={args.rounds}",
            f"training.local_steps={args.steps}", f"training.batch_size={args.batch_size}", "data.num_test=32",
            "eval.zero_shot=false", f"eval.every={args.rounds}", "runtime.engine=ray",
            f"runtime.num_workers={args.workers}", "runtime.num_threads=1", "output.progress=never",
            "output.save_adapter=false", f"output.dir={out}", *extra]


class TreeMemory:
    """Peak PSS and summed RSS of a process and its descendants, and when ``metrics.jsonl`` first had a line."""

    def __init__(self, process: subprocess.Popen, run_dir: Path, every_s: float = 0.5) -> None:
        self.root, self.run_dir, self.every_s = psutil.Process(process.pid), run_dir, every_s
        self.peak_pss = self.peak_rss = 0
        self.first_record_at: float | None = None
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()

    def _sample(self) -> None:
        while not self.stop.is_set():
            pss = rss = 0
            try:
                tree = [self.root, *self.root.children(recursive=True)]
            except psutil.NoSuchProcess:
                return
            for process in tree:
                try:
                    info = process.memory_full_info()
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    continue
                pss, rss = pss + info.pss, rss + info.rss
            self.peak_pss, self.peak_rss = max(self.peak_pss, pss), max(self.peak_rss, rss)
            metrics = self.run_dir / "metrics.jsonl"
            if self.first_record_at is None and metrics.exists() and metrics.stat().st_size:
                self.first_record_at = time.perf_counter()
            self.stop.wait(self.every_s)

    def finish(self) -> None:
        self.stop.set()
        self.thread.join()


def launch(args: argparse.Namespace, command: list[str], run_dir: Path) -> tuple[subprocess.Popen, TreeMemory, float]:
    env = {**os.environ, "RAY_ADDRESS": "", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    launched = time.perf_counter()
    process = subprocess.Popen([sys.executable, "-m", "fedsim.cli", *command], env=env, stdout=subprocess.DEVNULL,
                               stderr=open(run_dir.parent / f"{run_dir.name}.log", "w"), start_new_session=True)
    return process, TreeMemory(process, run_dir), launched


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def run_once(args: argparse.Namespace, num_clients: int, run_dir: Path, *extra: str) -> dict:
    process, memory, launched = launch(args, ["run", str(QUICKSTART), *overrides(args, num_clients, run_dir, *extra)],
                                       run_dir)
    code = process.wait()
    memory.finish()
    if code:
        raise RuntimeError(f"the run at N={num_clients} failed (exit {code}); see {run_dir}.log")
    rounds = [r for r in records(run_dir) if "round" in r]
    summary = json.loads((run_dir / "summary.json").read_text())
    return {"later_rounds": [r["wall_seconds"] for r in rounds[1:]],
            "startup_s": memory.first_record_at - launched - rounds[0]["wall_seconds"],
            "peak_pss_mib": memory.peak_pss / 2**20, "peak_rss_mib": memory.peak_rss / 2**20,
            "updates": summary["client_updates"], "adapter_sha256": summary["adapter_sha256"]}


def measure(args: argparse.Namespace, num_clients: int, run_dir: Path, *extra: str) -> dict:
    """``args.repeats`` runs: the median round after the first over all of them, the median start-up and the
    highest peaks (a 3-round run has only two later rounds to take a median of)."""
    runs = [run_once(args, num_clients, run_dir.with_name(f"{run_dir.name}-{i}"), *extra) for i in range(args.repeats)]
    return {"clients": num_clients,
            "seconds_per_round": statistics.median(s for r in runs for s in r["later_rounds"]),
            "startup_s": statistics.median(r["startup_s"] for r in runs),
            "peak_pss_mib": max(r["peak_pss_mib"] for r in runs), "peak_rss_mib": max(r["peak_rss_mib"] for r in runs),
            "updates": runs[0]["updates"], "adapter_sha256": runs[0]["adapter_sha256"]}


def kill_and_resume(args: argparse.Namespace, num_clients: int, run_dir: Path, *extra: str) -> str:
    """SIGKILL a run (its whole process group, Ray included) once its first checkpoint exists, resume it, and
    return the resumed run's final adapter_sha256."""
    command = ["run", str(QUICKSTART), *overrides(args, num_clients, run_dir, *extra)]
    process, memory, _ = launch(args, command, run_dir)
    checkpoint = run_dir / "checkpoint" / "state.json"
    while not checkpoint.exists() and process.poll() is None:
        time.sleep(0.2)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    memory.finish()
    if json.loads(checkpoint.read_text())["round"] >= args.rounds:
        raise RuntimeError("the run finished before it could be killed; raise --rounds")
    resumed, memory, _ = launch(args, ["run", "--resume", str(run_dir)], run_dir)
    code = resumed.wait()
    memory.finish()
    if code:
        raise RuntimeError(f"the resumed run failed (exit {code}); see {run_dir}.log")
    return json.loads((run_dir / "summary.json").read_text())["adapter_sha256"]


def plot(points: list[dict], by_cohort: list[dict], out: Path) -> None:
    n = [p["clients"] for p in points]
    panels = [("seconds_per_round", "wall seconds per round"), ("startup_s", "seconds from launch to round 1"),
              ("peak_pss_mib", "peak memory, all processes (PSS, MiB)")]
    fig, axs = plt.subplots(1, len(panels) + bool(by_cohort), figsize=(4.3 * (len(panels) + bool(by_cohort)), 3.8),
                            dpi=110)
    for ax, (key, label) in zip(axs, panels):
        values = [p[key] for p in points]
        ax.plot(n, values, "o-")
        ax.set(title=f"K={points[0]['cohort']}", xlabel="registered clients N", ylabel=label, xscale="log",
               ylim=(0, 1.15 * max(values)))
    if by_cohort:
        k = [p["cohort"] for p in by_cohort]
        axs[-1].plot(k, [p["seconds_per_round"] for p in by_cohort], "o-")
        axs[-1].set(title=f"N={by_cohort[0]['clients']:,}", xlabel="clients per round K",
                    ylabel="wall seconds per round", ylim=(0, None))
    for ax in axs:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, nargs="+", default=[1000, 10_000, 100_000, 1_000_000])
    parser.add_argument("--cohort", type=int, default=20, help="clients per round K")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2, help="runs per point")
    parser.add_argument("--samples-per-client", type=int, default=8)
    parser.add_argument("--steps", type=int, default=2, help="local steps per client")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--cohorts", type=int, nargs="*", default=[4, 8, 16, 32],
                        help="K values, at the first N, for time per round against K")
    parser.add_argument("--scaffold", type=int, default=0, metavar="N",
                        help="also run SCAFFOLD at this N (against FedAvg at N) and a kill-and-resume of it")
    parser.add_argument("--out", type=Path, default=Path("scaling.png"), help="figure to write")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        points = []
        for n in args.clients:
            points.append({**measure(args, n, Path(tmp) / f"fedavg-{n}"), "cohort": args.cohort})
            print(json.dumps(points[-1]), flush=True)
        floor_cfg = load_config(QUICKSTART, overrides(args, args.clients[0], Path(tmp) / "floor"))
        measured, _, _ = in_subprocess(measure_floor, floor_cfg, 1, [], [])
        floor_s, floor_batch = min(measured)
        per_round = args.cohort * samples_per_task(args.samples_per_client, floor_cfg.training)
        print(f"\nfloor: the backbone's forward+backward pass, {floor_s * 1e3:.2f} ms per sample at its cheapest "
              f"(batch of {floor_batch}, one thread; experiments/bench_throughput.py): {args.workers / floor_s:.0f} "
              f"samples/s on the {args.workers} workers' cores; a round trains {per_round} samples")
        print(f"{'N':>9} {'s/round':>8} {'of floor':>9} {'start s':>8} {'PSS MiB':>8} {'RSS MiB':>8}")
        for p in points:
            reached = per_round / p["seconds_per_round"] * floor_s / args.workers
            print(f"{p['clients']:>9} {p['seconds_per_round']:>8.2f} {reached:>9.1%} {p['startup_s']:>8.1f} "
                  f"{p['peak_pss_mib']:>8.0f} {p['peak_rss_mib']:>8.0f}")
        first, last = points[0], points[-1]
        growth = last["clients"] - first["clients"]
        print(f"N x{last['clients'] / first['clients']:.0f}: s/round x"
              f"{last['seconds_per_round'] / first['seconds_per_round']:.2f} (target: at most x1.25); memory "
              f"+{(last['peak_pss_mib'] - first['peak_pss_mib']) * 2**20 / growth:.0f} B (PSS) / "
              f"+{(last['peak_rss_mib'] - first['peak_rss_mib']) * 2**20 / growth:.0f} B (RSS) per registered "
              "client (target: under 1024)")
        by_cohort = []
        for k in args.cohorts:
            by_cohort.append({**measure(args, args.clients[0], Path(tmp) / f"cohort-{k}",
                                        f"federation.clients_per_round={k}"), "cohort": k})
            print(json.dumps(by_cohort[-1]), flush=True)
        if by_cohort:
            first, last = by_cohort[0], by_cohort[-1]
            print(f"at N={args.clients[0]}, K x{last['cohort'] / first['cohort']:.0f}: s/round x"
                  f"{last['seconds_per_round'] / first['seconds_per_round']:.2f} (linear: x"
                  f"{last['cohort'] / first['cohort']:.0f})")
        plot(points, by_cohort, args.out)
        print(f"figure: {args.out}")

        if args.scaffold:
            scaffold = ["algorithm.server.name=scaffold", "algorithm.client.name=scaffold", "training.optimizer=sgd",
                        "training.lr=0.05", "checkpoint.every=1"]
            fedavg = measure(args, args.scaffold, Path(tmp) / "scaffold-fedavg", "checkpoint.every=1")
            ran = measure(args, args.scaffold, Path(tmp) / "scaffold", *scaffold)
            resumed_sha = kill_and_resume(args, args.scaffold, Path(tmp) / "scaffold-killed", *scaffold)
            print(f"\nN={args.scaffold}: SCAFFOLD peak PSS {ran['peak_pss_mib']:.0f} MiB against FedAvg's "
                  f"{fedavg['peak_pss_mib']:.0f} MiB: x{ran['peak_pss_mib'] / fedavg['peak_pss_mib']:.2f} "
                  f"(target: at most x1.5); s/round {ran['seconds_per_round']:.2f} against "
                  f"{fedavg['seconds_per_round']:.2f}")
            print(f"killed after its first checkpoint and resumed: adapter_sha256 {resumed_sha[:16]}, uninterrupted "
                  f"{ran['adapter_sha256'][:16]}: {'identical' if resumed_sha == ran['adapter_sha256'] else 'DIFFERENT'}")


if __name__ == "__main__":
    main()
