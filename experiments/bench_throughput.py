"""Client updates and samples per second against the compute floor, clients per batch, memory and start-up.

One fixed workload (tiny preset, N registered clients, K per round, S local steps or E local epochs), run on
each engine and each ``runtime.clients_per_batch`` B (``auto`` included) in one invocation. First and last,
in a process of its own, it measures the floor: the backbone's forward and backward pass per sample at the
batch size where that is cheapest, on the workload's own samples, with the runs' torch threads. Per row it
prints updates/s and samples/s, samples/s as a fraction of the floor times the row's training processes
(cores here, GPUs on a GPU machine), the ratio to the first row and to B=1 on the same engine, each Ray
worker's busy fraction (its time in client tasks over the wall time of the rounds, ``summary.json``'s
``train_seconds``), the peak memory of this process and every process it started, Ray's included (PSS:
shared libraries counted once, split among the processes; RSS summed: counted in every process, as ``ps``
or a per-process monitor adds them up), and the time from launch (``ray.init`` included) to the start of
round 1. Then, per row, where its core-seconds went, per sample: the floor, each in-process stage above it
(the pass at the row's batch size, the worker's call with samples already encoded: per-client LoRA hooks and
dropout, optimizer steps, updates; then encoding), what the run's worker calls took beyond that, and the
time the workers sat idle. The busy time is read from Ray's own task timeline (``ray.timeline()``, the
``ClientWorker.train_batch`` spans), so the figure does not depend on the code under test reporting it;
runs that report ``busy_fraction`` in their summary print it beside. Engines use the same torch thread
count per training process, so the comparison measures the runtime, not threads.

    python experiments/bench_throughput.py --clients 200 --per-round 20 --steps 5 --rounds 3
    # clients trained together: B = 1, 8, auto on Ray with 2 workers (the figures in docs/results.md)
    python experiments/bench_throughput.py --clients 200 --per-round 20 --steps 2 --batch-size 4 --rounds 5 \\
        --workers 2 --batch 1,8,auto --no-sequential
    # quantity-skewed clients (task durations follow shard sizes), 2 workers, no sequential run:
    python experiments/bench_throughput.py --scheme quantity --steps 0 --epochs 1 \\
        --samples-per-client 40 --clients 100 --per-round 20 --rounds 5 --workers 2 --no-sequential

Measuring other code (a checkout of an older commit) with this script: run it from that checkout with
``PYTHONPATH`` pointing there, so that ``fedsim`` and ``actors`` (and the Ray workers) import from it.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import statistics
import tempfile
import threading
import time
from collections import defaultdict
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import psutil
import ray
import torch

from actors.local_ray import start_local_ray
from actors.runtime import run_ray
from fedsim.config import ExperimentConfig
from fedsim.validation import load_config

if TYPE_CHECKING:  # the model's libraries load in the floor's own process only: not in the measured tree
    from fedsim.client import ClientTrainer
    from fedsim.clientdata import ClientData
    from fedsim.models.loading import LoadedModel

QUICKSTART = Path(__file__).resolve().parent / "quickstart.yaml"
TRAIN_SPAN = "task::ClientWorker.train_batch"
TIMELINE_FLUSH_S = 3.0  # Ray reports task events every second; let the last ones arrive
FLOOR_BATCHES = (16, 32, 64)  # samples per pass where the floor is sought: it is the cheapest per sample
REPEATS = 5  # timed passes per measurement (after one untimed), their median taken


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


BENCH_HELPER = "multiprocessing.resource_tracker"  # the process pool's helper, left running by the floor's pool
# Ray's own processes, by what their command line holds: (substring, name)
RAY_SERVICES = (("gcs_server", "gcs_server"), ("raylet", "raylet"), ("dashboard/dashboard.py", "api server (dashboard)"),
                ("log_monitor.py", "log monitor"), ("autoscaler/_private/monitor.py", "autoscaler monitor"),
                ("ray::DashboardAgent", "dashboard agent"), ("ray::RuntimeEnvAgent", "runtime env agent"),
                ("ray::ClientWorker", "worker"), ("ray::AggregatorActor", "aggregator"), ("ray::IDLE", "idle Ray worker"))


def process_role(process: psutil.Process, driver: psutil.Process) -> str:
    """What a process of the tree is: the driver, a fedsim actor, one of Ray's services, or its command."""
    if process.pid == driver.pid:
        return "driver"
    command = " ".join(process.cmdline())
    return next((name for part, name in RAY_SERVICES if part in command), command[:60] or process.name())


class Monitor:
    """Samples, in a thread, the memory of this process tree (in total, and per process at the peak) and the
    run's first metrics record."""

    def __init__(self, run_dir: Path, every_s: float = 0.5) -> None:
        self.run_dir, self.every_s = run_dir, every_s
        self.launched = time.time()
        self.process_started = psutil.Process().create_time()  # this process's launch: imports included
        self.peak_bytes = 0  # proportional set size: shared pages split among the processes that map them
        self.peak_rss_bytes = 0  # resident set size: shared pages counted in every process
        self.peak_processes: list[tuple[str, int, int, int]] = []  # (role, pid, PSS, RSS) at the PSS peak
        self.first_record_at: float | None = None
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()

    def _sample(self) -> None:
        me = psutil.Process()
        while not self.stop.is_set():
            processes = []
            for process in [me, *me.children(recursive=True)]:
                try:
                    if BENCH_HELPER in " ".join(process.cmdline()):
                        continue  # this script's own (it measures the floor in a process pool), not the run's
                    info = process.memory_full_info()
                    processes.append((process_role(process, me), process.pid, info.pss, info.rss))
                except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                    continue
            pss, rss = sum(p[2] for p in processes), sum(p[3] for p in processes)
            if pss > self.peak_bytes:
                self.peak_processes = processes
            self.peak_bytes, self.peak_rss_bytes = max(self.peak_bytes, pss), max(self.peak_rss_bytes, rss)
            metrics = self.run_dir / "metrics.jsonl"
            if self.first_record_at is None and metrics.exists() and metrics.stat().st_size:
                self.first_record_at = time.time()
            self.stop.wait(self.every_s)

    def finish(self) -> dict[str, float]:
        """Peak memory (GB, PSS and summed RSS), and the start of round 1 (its record's time less the round's own
        wall time) in seconds after two origins: ``startup_s`` from this monitor's creation (just before the
        run starts Ray: ``ray.init`` included, this process's imports not), ``startup_from_launch_s`` from this
        process's launch (imports included; the first run of an invocation only pays them)."""
        self.stop.set()
        self.thread.join()
        lines = (self.run_dir / "metrics.jsonl").read_text().splitlines()
        first_round = next(json.loads(line) for line in lines if json.loads(line).get("round") == 1)
        round_one = (self.first_record_at - first_round["wall_seconds"] if self.first_record_at is not None
                     else float("nan"))
        return {"peak_gb": self.peak_bytes / 2**30, "peak_rss_gb": self.peak_rss_bytes / 2**30,
                "startup_s": round_one - self.launched, "startup_from_launch_s": round_one - self.process_started}

    def breakdown(self) -> list[str]:
        """The processes at the peak (PSS), one line each, largest first, then the total: role, pid, PSS and RSS
        in MB; workers numbered by pid."""
        rows, workers = [], 0
        for role, pid, pss, rss in sorted(self.peak_processes, key=lambda p: (p[0] != "worker", p[1])):
            if role == "worker":
                workers += 1
                role = f"worker {workers}"
            rows.append((role, pid, pss, rss))
        lines = [f"  {role:<28} {pid:>8} {pss / 2**20:>8.0f} {rss / 2**20:>8.0f}"
                 for role, pid, pss, rss in sorted(rows, key=lambda r: -r[2])]
        return [f"  {'process':<28} {'pid':>8} {'PSS MB':>8} {'RSS MB':>8}", *lines,
                f"  {'total':<28} {'':>8} {sum(r[2] for r in rows) / 2**20:>8.0f} {sum(r[3] for r in rows) / 2**20:>8.0f}"]


def timeline_busy_seconds() -> list[float]:
    """Seconds each worker process spent in ``ClientWorker.train`` on this Ray instance, largest first."""
    time.sleep(TIMELINE_FLUSH_S)
    per_worker: dict[str, float] = defaultdict(float)
    for event in ray.timeline():
        if event.get("cat") == TRAIN_SPAN:
            per_worker[event["tid"]] += event["dur"] / 1e6
    return sorted(per_worker.values(), reverse=True)


def median_seconds(step, repeats: int = REPEATS) -> float:
    """The median wall time of ``step()`` over ``repeats`` calls, after one untimed call."""
    step()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        step()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def workload_samples(data: ClientData, count: int) -> list[dict]:
    """The first ``count`` training samples of the workload, client by client (its own sequence lengths)."""
    samples: list[dict] = []
    for client in range(data.num_clients):
        samples += data.samples(client, data.shard(client)[:count - len(samples)])
        if len(samples) == count:
            return samples
    raise ValueError(f"the workload has fewer than {count} training samples")


def fwd_bwd_seconds_per_sample(loaded: LoadedModel, trainer: ClientTrainer, samples: list[dict]) -> float:
    """One forward and backward pass of the backbone (its resident adapter only) over ``samples`` in one batch,
    per sample: no optimizer, no encoding, no per-client work."""
    batch = {k: v.to(loaded.device) for k, v in trainer.collate(samples).items()}

    def step() -> None:
        loaded.model(**batch).loss.backward()
        loaded.model.zero_grad(set_to_none=True)

    return median_seconds(step) / len(samples)


class Floor:
    """The compute floor of the workload on this machine, and the in-process cost of each stage above it.

    The floor is the backbone's forward and backward pass per sample at the batch size (of FLOOR_BATCHES)
    where it is cheapest, on the workload's own samples, in one process with the run's torch threads: what
    no engine can beat. Measured before and after the runs (a shared machine drifts); the faster is used.
    """

    def __init__(self, cfg: ExperimentConfig, threads: int) -> None:
        from fedsim.client import ClientTrainer
        from fedsim.clientdata import load_client_data
        from fedsim.models.loading import load_model
        from fedsim.seeding import derive_seed

        torch.set_num_threads(threads)
        self.cfg, self.data = cfg, load_client_data(cfg)
        self.loaded = load_model(cfg.model, derive_seed(cfg.seed, "lora_init"))
        self.loaded.model.train()
        self.trainer = ClientTrainer(cfg, self.loaded, self.data)
        self.samples = workload_samples(self.data, max(FLOOR_BATCHES))
        self.measured: list[tuple[float, int]] = []

    def measure(self) -> None:
        self.measured += [(fwd_bwd_seconds_per_sample(self.loaded, self.trainer, self.samples[:n]), n)
                          for n in FLOOR_BATCHES]

    @property
    def seconds_per_sample(self) -> float:
        return min(self.measured)[0]

    def stages(self, batch: int) -> list[tuple[str, float]]:
        """Seconds per sample of one worker call of ``batch`` clients, in process, stage by stage: the pass
        alone at that call's batch size, then the whole call with the samples already encoded (each client's
        LoRA through its own hooks and dropout masks, optimizer steps, updates), then encoding included."""
        from fedsim.client import ClientTrainer
        from fedsim.messages import ClientTask
        from fedsim.models.adapter import get_weights
        from fedsim.training import samples_per_task

        cfg = self.cfg
        sizes = self.data.shard_sizes()
        per_call = sum(samples_per_task(int(sizes[c]), cfg.training) for c in range(batch))  # shards may differ
        tasks = [ClientTask(c, 1, 0, cfg.training.lr) for c in range(batch)]
        stages = [(f"forward+backward, {batch * cfg.training.batch_size} samples a pass",
                   fwd_bwd_seconds_per_sample(self.loaded, self.trainer, workload_samples(
                       self.data, batch * cfg.training.batch_size)))]
        for name, cache_mb in (("worker call, samples encoded before", 256), ("worker call, encoding included", 0)):
            runtime = replace(cfg.runtime, clients_per_batch=batch, sample_cache_mb=cache_mb)
            trainer = ClientTrainer(replace(cfg, runtime=runtime), self.loaded, self.data)
            weights = get_weights(self.loaded.model)
            seconds = median_seconds(lambda: trainer.train_batch(tasks, weights, {}, [None] * batch))
            stages.append((name, seconds / per_call))
        return stages


def measure_floor(cfg: ExperimentConfig, threads: int, batches: list[int], run_dirs: list[Path]
                  ) -> tuple[list[tuple[float, int]], dict[int, list[tuple[str, float]]], list[int]]:
    """In a process of its own (no model, nor its libraries, in the measured process tree): the floor, the
    stages of each B, and the samples each run of ``run_dirs`` trained on."""
    floor = Floor(cfg, threads)
    floor.measure()
    return (floor.measured, {batch: floor.stages(batch) for batch in batches},
            [samples_trained(run_dir, floor.data, cfg) for run_dir in run_dirs])


def in_subprocess(fn, *args):
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()


def samples_trained(run_dir: Path, data: ClientData, cfg: ExperimentConfig) -> int:
    """Samples the run's accepted updates trained on: each round's clients, by their shard sizes."""
    from fedsim.training import samples_per_task

    sizes = data.shard_sizes()
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return sum(samples_per_task(int(sizes[c]), cfg.training) for r in records if "round" in r for c in r["clients"])


@dataclass
class Row:
    """One configuration's run: its summary, its workers' busy seconds, its memory and start-up."""

    name: str
    summary: dict
    busy: list[float]
    measured: dict[str, float]
    processes: float  # the cores (or GPUs) its floor counts: units()
    out: Path
    memory: list[str]  # the process tree at its peak, one line per process (Monitor.breakdown)
    samples: int = 0

    @property
    def batch(self) -> int:
        return self.summary.get("batching", {}).get("clients_per_batch", 1)


def print_breakdown(row: Row, floor_s: float, stages: list[tuple[str, float]]) -> None:
    """Where the row's core-seconds went, per sample trained: the floor, each in-process stage above it
    (measured alone, on one process), the worker calls beyond that (the run's busy time: serialization, Ray's
    per-call work, contention with the run's other processes) and the workers' idle time (the driver, the
    aggregator, Ray's per-task cost between calls, batches that leave a worker waiting)."""
    per_sample = row.summary["train_seconds"] * row.processes / row.samples
    reported = [w["busy_seconds"] for w in row.summary.get("workers", []) if "busy_seconds" in w]
    busy = sum(reported or row.busy) / row.samples  # the timeline's spans when the run reports none
    parts = [("model compute at the floor", floor_s)]
    previous = floor_s
    for name, seconds in stages:
        parts.append((f"+ {name}", seconds - previous))
        previous = seconds
    parts += [("+ in the run's worker calls beyond that", busy - previous),
              ("+ workers idle", per_sample - busy)]
    print(f"where the time goes, {row.name}, B={row.batch} (ms per sample trained, per core; share):")
    for name, seconds in parts:
        print(f"  {name:<58} {seconds * 1e3:>7.2f} {seconds / per_sample:>7.1%}")


def units(args: argparse.Namespace, workers: int) -> float:
    """What a row's floor counts: the GPUs its workers use (a GPU shared by workers counts once), else its
    cores (processes x torch threads)."""
    if args.gpus_per_worker > 0:
        return math.ceil(workers * args.gpus_per_worker)
    return workers * args.threads


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
    parser.add_argument("--gpus-per-worker", type=float, default=0.0,
                        help="runtime.gpus_per_worker of the Ray rows (0: CPU); the floor then counts GPUs, not cores")
    parser.add_argument("--batch", default="1",
                        help="runtime.clients_per_batch values to run (integers or auto), comma-separated")
    args = parser.parse_args()

    batches = [b if b == "auto" else int(b) for b in args.batch.split(",")]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        floor_cfg = workload(args, Path(tmp) / "floor")
        before, _, _ = in_subprocess(measure_floor, floor_cfg, args.threads, [], [])
        # Ray rows first: a sequential run leaves the model in this process, which is the Ray rows' driver.
        for batch in batches:
            for workers in (int(w) for w in args.workers.split(",") if w):
                out = Path(tmp) / f"ray{workers}-b{batch}"
                cfg = workload(args, out, "runtime.engine=ray", f"runtime.num_workers={workers}",
                               f"runtime.cpus_per_worker={args.threads}",
                               f"runtime.gpus_per_worker={args.gpus_per_worker}", f"runtime.clients_per_batch={batch}")
                monitor = Monitor(out)
                # A fresh instance per run: its timeline holds this run's tasks only.
                start_local_ray(num_cpus=max(2, workers * args.threads), log_to_driver=False)
                try:
                    summary = run_ray(cfg, out)
                    busy = timeline_busy_seconds()
                    rows.append(Row(f"ray, {workers} worker{'s' * (workers > 1)}", summary, busy, monitor.finish(),
                                    units(args, workers), out, monitor.breakdown()))
                finally:
                    ray.shutdown()
        if not args.no_sequential:  # imported only now: it loads the model's libraries into this process
            from fedsim.engine import run_sequential
        for batch in ([] if args.no_sequential else batches):
            out = Path(tmp) / f"seq-b{batch}"
            monitor = Monitor(out)
            seq = run_sequential(workload(args, out, f"runtime.num_threads={args.threads}",
                                          f"runtime.clients_per_batch={batch}"), out)
            rows.append(Row("sequential", seq, [seq["train_seconds"]], monitor.finish(), units(args, 1), out,
                            monitor.breakdown()))
        after, stages, samples = in_subprocess(measure_floor, floor_cfg, args.threads, sorted({r.batch for r in rows}),
                                               [row.out for row in rows])
        for row, trained in zip(rows, samples):
            row.samples = trained

    floor_s, floor_batch = min(before + after)
    slower_floor_s = max(min(before)[0], min(after)[0])  # the machine's drift between the two measurements
    local = f"S={args.steps} local steps" if args.steps else f"E={args.epochs} local epoch(s)"
    print(f"workload: N={args.clients} clients ({args.scheme}, alpha={args.alpha}, {args.samples_per_client} "
          f"samples per client on average), K={args.per_round} per round, {local} of {args.batch_size} samples, "
          f"{args.rounds} rounds, "
          f"{args.threads} torch thread(s) per training process")
    print(f"floor: the backbone's forward+backward pass takes {floor_s * 1e3:.2f} ms per sample at its cheapest "
          f"(batch of {floor_batch}, {args.threads} thread(s); best before the runs "
          f"{min(before)[0] * 1e3:.2f} ms, after {min(after)[0] * 1e3:.2f} ms): {1 / floor_s:.1f} samples/s per "
          f"process; a row's floor is that times its training processes (cores, or GPUs); '(slower)': the fraction "
          f"against the slower of the two measurements, for how far this machine drifted meanwhile")
    print(f"{'engine':<16} {'B':>3} {'updates':>8} {'samples':>8} {'train s':>8} {'updates/s':>10} {'samples/s':>10} "
          f"{'of floor':>9} {'(slower)':>9} {'vs first':>9} {'vs B=1':>7} {'PSS GB':>7} {'RSS GB':>7} {'start s':>8}  "
          f"busy fraction per worker (timeline | summary)")
    base = rows[0].summary["updates_per_second"]
    unbatched = {row.name: row.summary["updates_per_second"] for row in rows if row.batch == 1}
    for row in rows:
        summary, measured = row.summary, row.measured
        timeline = " ".join(f"{b / summary['train_seconds']:.1%}" for b in row.busy) if row.name != "sequential" else "-"
        reported = " ".join(f"{w['busy_fraction']:.1%}" for w in summary.get("workers", []) if "busy_fraction" in w)
        rate = summary["updates_per_second"]
        versus_one = f"{rate / unbatched[row.name]:>6.2f}x" if row.name in unbatched else f"{'-':>7}"
        samples_rate = row.samples / summary["train_seconds"]
        print(f"{row.name:<16} {row.batch:>3} {summary['client_updates']:>8} {row.samples:>8} "
              f"{summary['train_seconds']:>8.1f} {rate:>10.2f} {samples_rate:>10.1f} "
              f"{samples_rate * floor_s / row.processes:>9.1%} {samples_rate * slower_floor_s / row.processes:>9.1%} "
              f"{rate / base:>8.2f}x {versus_one} "
              f"{measured['peak_gb']:>7.2f} {measured['peak_rss_gb']:>7.2f} {measured['startup_s']:>8.1f}  "
              f"{timeline} | {reported or '-'}")
    for row in rows:
        print_breakdown(row, floor_s, stages[row.batch])
        print(f"memory at the peak, {row.name}, B={row.batch}; round 1 started {row.measured['startup_s']:.1f} s "
              f"after the run began, {row.measured['startup_from_launch_s']:.1f} s after this process launched:")
        print("\n".join(row.memory))
    extra = {r.batch: r.summary["batching"].get("extra_client_bytes") for r in rows
             if r.batch > 1 and "batching" in r.summary}
    for batch, cost in sorted(extra.items()):
        print(f"B={batch}: each extra client in a batch costs " +
              ", ".join(f"{kind} {size / 2**20:.1f} MiB" for kind, size in cost.items()))
    same = {r.summary["adapter_sha256"] for r in rows}
    print("identical final adapters across engines and batch sizes:", len(same) == 1)


if __name__ == "__main__":
    main()
