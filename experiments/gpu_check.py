"""The first check on a machine with a CUDA GPU: the tiny preset and a tiny Qwen2-VL model on 4 Ray workers
that share one GPU at 0.25 each, through fedsim's own entry points.

    python experiments/gpu_check.py                  # on the GPU machine; a few minutes
    python experiments/gpu_check.py --cpu-rehearsal  # the same steps on CPU, GPU checks skipped

For each model (``tiny``, and a random Qwen2-VL built offline the way tests/test_model_families.py builds it):

- a probe starts the 4 workers as runs start them (``actors.worker.ClientWorker`` with the run's config and
  resources), has each train one client and evaluate once, then looks inside each worker process: it sees its
  GPU (``torch.cuda.is_available()``, ``CUDA_VISIBLE_DEVICES`` = the GPU Ray assigned, the model on cuda),
  computes in bfloat16 (every bitsandbytes ``Linear4bit``), keeps its 4-bit layers on the GPU, and has its
  memory capped at its share (``torch.cuda.get_per_process_memory_fraction`` <= ``runtime.gpus_per_worker``,
  peak reserved memory under that share of the card);
- ``fedsim run`` (``fedsim.cli.main``) runs a small federation with 1 and with 4 workers (2 rounds of 4 of 8
  clients, 160 samples); each ``summary.json`` must show client updates on cuda workers, and both the same
  ``adapter_sha256``. Their updates/s are printed.

Each check prints PASS, FAIL or SKIP with what it saw; ``OUT/gpu_check.json`` keeps them all with the
per-worker figures. Exit status: 0 every check passed, 1 a check failed, 2 no CUDA GPU (nothing was run).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "experiments" / "quickstart.yaml"
WORKERS = 4
GPU_SHARE = 1 / WORKERS
TIME_BUDGET_S = 300
NO_GPU = 2
MODELS = ("tiny", "qwen2_vl")
GPU_CHECKS = ("each worker sees its GPU", "bf16 compute", "4-bit layers on the GPU", "GPU memory within the cap")


@dataclass
class Check:
    name: str
    status: str  # PASS | FAIL | SKIP
    detail: str
    data: dict[str, Any] = field(default_factory=dict)


class Report:
    def __init__(self) -> None:
        self.checks: list[Check] = []
        self.workers: dict[str, list[dict[str, Any]]] = {}  # model -> what the probe saw in each worker

    def add(self, name: str, ok: bool | None, detail: str, **data: Any) -> None:
        """Record and print one check: ``ok`` None is a skip."""
        check = Check(name, "SKIP" if ok is None else "PASS" if ok else "FAIL", detail, data)
        self.checks.append(check)
        print(f"[{check.status}] {name}: {detail}", flush=True)

    def failed(self) -> list[Check]:
        return [c for c in self.checks if c.status == "FAIL"]


def no_cuda_message() -> str:
    return (f"gpu_check: no CUDA GPU: torch.cuda.is_available() is False here (torch {torch.__version__}, built "
            f"with CUDA {torch.version.cuda}, CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}); "
            "nothing was checked. Run it on a machine with an NVIDIA GPU and a CUDA build of torch and "
            "bitsandbytes, or pass --cpu-rehearsal to exercise the script on CPU.")


def run_overrides(model: str, workers: int, out: Path, gpu: bool) -> list[str]:
    """The config of every run and probe: a small federation of one model on ``workers`` Ray workers."""
    share = GPU_SHARE if gpu else 0.0
    return [
        f"model.name={model}", "model.device=auto", "runtime.engine=ray", f"runtime.num_workers={workers}",
        f"runtime.gpus_per_worker={share:g}", "runtime.cpus_per_worker=1", "runtime.num_threads=1",
        "runtime.resource_timeout_s=0", "data.num_train=160", "data.num_test=40", "partition.num_clients=8",
        "federation.clients_per_round=4", "federation.rounds=2", "training.local_epochs=1", "training.batch_size=8",
        "eval.every=2", "eval.zero_shot=false", "checkpoint.every=0", "output.progress=never", f"output.dir={out}",
    ]


def build_qwen2_vl(folder: Path) -> Path:
    """The tiny random Qwen2-VL of tests/test_model_families.py, saved to ``folder`` (no download)."""
    if not (folder / "config.json").is_file():
        sys.path.insert(0, str(REPO / "tests"))
        from test_model_families import build_qwen2_vl as build

        build(folder)
    return folder


# -- inside a worker ---------------------------------------------------------------------------------------


def inspect_worker(worker: Any) -> dict[str, Any]:
    """What one ``ClientWorker`` process sees and holds; runs inside the actor (``__ray_call__``)."""
    import bitsandbytes as bnb
    import ray

    loaded = worker.loaded
    layers = [m for m in loaded.model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    info: dict[str, Any] = {
        "worker": worker.index, "pid": os.getpid(), "cuda_available": torch.cuda.is_available(),
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "gpu_ids": [str(i) for i in ray.get_runtime_context().get_accelerator_ids().get("GPU", [])],
        "device": str(loaded.device), "linear4bit": len(layers),
        "linear4bit_devices": sorted({str(m.weight.device) for m in layers}),
        "compute_dtypes": sorted({str(m.compute_dtype) for m in layers}),
        "embedding_dtype": str(loaded.model.get_input_embeddings().weight.dtype),
        "trainable_dtypes": sorted({str(p.dtype) for p in loaded.model.parameters() if p.requires_grad}),
    }
    if torch.cuda.is_available():
        device = loaded.device if loaded.device.type == "cuda" else torch.device("cuda", torch.cuda.current_device())
        read_cap = getattr(torch.cuda, "get_per_process_memory_fraction", None)  # older torch cannot read it
        info.update(total_memory=torch.cuda.get_device_properties(device).total_memory,
                    memory_fraction=read_cap(device) if read_cap else None,
                    max_memory_allocated=torch.cuda.max_memory_allocated(device),
                    max_memory_reserved=torch.cuda.max_memory_reserved(device))
    return info


def probe_workers(cfg: Any) -> list[dict[str, Any]]:
    """Start the run's workers as the runtime does, train one client and evaluate once on each, inspect each."""
    import ray

    from actors.worker import ClientWorker
    from fedsim.messages import ClientTask

    runtime = cfg.runtime
    workers = [ClientWorker.options(num_cpus=runtime.cpus_per_worker, num_gpus=runtime.gpus_per_worker,
                                    max_restarts=0).remote(cfg, False, i) for i in range(runtime.num_workers)]
    try:
        weights = ray.get(workers[0].initial_weights.remote())
        trained = [w.train_batch.options(num_returns=3).remote([ClientTask(i, 1, 0, cfg.training.lr)], (weights, {}),
                                                               None)
                   for i, w in enumerate(workers)]
        ray.get([ref for refs in trained for ref in refs])
        ray.get([w.evaluate.remote(weights) for w in workers])
        return ray.get([w.__ray_call__.remote(inspect_worker) for w in workers])
    finally:
        for w in workers:
            ray.kill(w, no_restart=True)


def check_workers(report: Report, model: str, infos: list[dict[str, Any]], gpu: bool) -> None:
    """The per-worker GPU checks of one model's probe."""
    def each(test: Callable[[dict], bool], show: Callable[[dict], str]) -> tuple[bool, str]:
        bad = [i for i in infos if not test(i)]
        shown = bad or infos
        return not bad, "; ".join(f"worker {i['worker']}: {show(i)}" for i in shown)

    name = f"{model}, {len(infos)} workers"
    if not gpu:
        for what in GPU_CHECKS:
            report.add(f"{name}: {what}", None, "CPU rehearsal")
        ok, detail = each(lambda i: i["linear4bit"] > 0, lambda i: f"{i['linear4bit']} Linear4bit on {i['device']}")
        report.add(f"{name}: workers hold a 4-bit model", ok, detail)
        return
    ok, detail = each(
        lambda i: (i["cuda_available"] and bool(i["cuda_visible_devices"]) and i["device"].startswith("cuda")
                   and i["cuda_visible_devices"] == ",".join(i["gpu_ids"])),
        lambda i: (f"cuda available={i['cuda_available']}, CUDA_VISIBLE_DEVICES={i['cuda_visible_devices']!r}, "
                   f"Ray GPU ids={i['gpu_ids']}, model on {i['device']}"))
    report.add(f"{name}: each worker sees its GPU", ok, detail)
    ok, detail = each(lambda i: i["compute_dtypes"] == ["torch.bfloat16"] and i["embedding_dtype"] == "torch.bfloat16",
                      lambda i: f"Linear4bit compute {i['compute_dtypes']}, embeddings {i['embedding_dtype']}, "
                                f"LoRA {i['trainable_dtypes']}")
    report.add(f"{name}: bf16 compute", ok, detail)
    ok, detail = each(lambda i: i["linear4bit"] > 0 and all(d.startswith("cuda") for d in i["linear4bit_devices"]),
                      lambda i: f"{i['linear4bit']} Linear4bit on {i['linear4bit_devices']}")
    report.add(f"{name}: 4-bit layers on the GPU", ok, detail)
    mib = 2**20

    def within_cap(i: dict) -> bool:
        if "total_memory" not in i:  # no CUDA in that worker
            return False
        capped = i["memory_fraction"] is None or i["memory_fraction"] <= GPU_SHARE + 1e-6
        return capped and i["max_memory_reserved"] <= GPU_SHARE * i["total_memory"]

    def memory(i: dict) -> str:
        if "total_memory" not in i:
            return "no CUDA device in this worker"
        cap = "unknown (this torch cannot read it)" if i["memory_fraction"] is None else f"{i['memory_fraction']:.3f}"
        return (f"cap fraction {cap} (expected <= {GPU_SHARE:g}), peak reserved "
                f"{i['max_memory_reserved'] / mib:.0f} MiB, peak allocated {i['max_memory_allocated'] / mib:.0f} MiB, "
                f"share {GPU_SHARE * i['total_memory'] / mib:.0f} MiB of {i['total_memory'] / mib:.0f} MiB")

    ok, detail = each(within_cap, memory)
    report.add(f"{name}: GPU memory within the cap", ok, detail)


# -- runs ------------------------------------------------------------------------------------------------


def fedsim_run(overrides: list[str]) -> dict[str, Any]:
    """``fedsim run experiments/quickstart.yaml OVERRIDES`` in this process; its summary.json."""
    from fedsim.cli import main as fedsim_main

    out = Path(next(o for o in overrides if o.startswith("output.dir=")).split("=", 1)[1])
    with contextlib.redirect_stdout(io.StringIO()):  # the printed summary: summary.json has it all
        code = fedsim_main(["run", str(QUICKSTART), *overrides])
    if code != 0:
        raise RuntimeError(f"fedsim run exited with {code} (its error is printed above)")
    return json.loads((out / "summary.json").read_text())


def check_model(report: Report, model: str, name: str, out: Path, gpu: bool) -> None:
    """Probe the workers of ``name`` (a model.name), then run it with 1 and 4 workers and compare."""
    from fedsim.validation import load_config

    started = time.perf_counter()
    try:
        infos = probe_workers(load_config(QUICKSTART, run_overrides(name, WORKERS, out / f"{model}-probe", gpu)))
        report.workers[model] = infos
        check_workers(report, model, infos, gpu)
    except Exception as err:  # noqa: BLE001 - every failure is a finding to report, not a crash
        report.add(f"{model}: probe of {WORKERS} workers", False, f"{type(err).__name__}: {err}",
                   traceback=traceback.format_exc())
    summaries = {}
    for workers in (1, WORKERS):
        what = f"{model}: fedsim run with {workers} worker{'s' * (workers > 1)}"
        try:
            summary = fedsim_run(run_overrides(name, workers, out / f"{model}-{workers}w", gpu))
        except Exception as err:  # noqa: BLE001
            report.add(what, False, f"{type(err).__name__}: {err}", traceback=traceback.format_exc())
            continue
        summaries[workers] = summary
        devices = sorted({w.get("device", "?") for w in summary.get("workers", [])})
        on_gpu = all(d.startswith("cuda") for d in devices) if gpu else True
        report.add(what, on_gpu and summary["client_updates"] > 0,
                   f"{summary['client_updates']} updates, {summary['updates_per_second']:.2f} updates/s, "
                   f"{summary['wall_seconds']:.1f} s wall, workers on {devices}, "
                   f"adapter {summary['adapter_sha256'][:16]}",
                   updates_per_second=summary["updates_per_second"], adapter_sha256=summary["adapter_sha256"],
                   workers=summary.get("workers"))
    if len(summaries) == 2:
        shas = {w: s["adapter_sha256"] for w, s in summaries.items()}
        same = len(set(shas.values())) == 1
        hint = "" if same else (" - the federation's result depends on the worker count, or GPU kernels are not "
                                "deterministic run to run (rerun the 1-worker run twice to tell which)")
        report.add(f"{model}: same adapter_sha256 with 1 and {WORKERS} workers", same,
                   ", ".join(f"{w} worker(s): {sha[:16]}" for w, sha in shas.items()) + hint)
    print(f"gpu_check: {model} took {time.perf_counter() - started:.0f} s", flush=True)


def connect(gpu: bool, report: Report) -> bool:
    """Start or join Ray as fedsim runs do (RAY_ADDRESS, else a local instance); False if it has no GPU."""
    import ray

    if gpu:
        from actors.runtime import connect as fedsim_connect
        from fedsim.config import ExperimentConfig

        fedsim_connect(ExperimentConfig())
    else:  # room for 4 one-CPU workers on a small machine
        from actors.local_ray import start_local_ray

        start_local_ray(num_cpus=max(WORKERS, os.cpu_count() or 1), log_to_driver=True)
    gpus = ray.cluster_resources().get("GPU", 0)
    if not gpu:
        return True
    report.add("Ray sees a GPU", gpus >= 1, f"the Ray cluster has {gpus:g} GPU(s)")
    return gpus >= 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="folder for the runs and gpu_check.json "
                                                 "(default runs/gpu-check-<time>)")
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, of {', '.join(MODELS)}")
    parser.add_argument("--cpu-rehearsal", action="store_true",
                        help="run every step on CPU (GPU checks skipped), to check the script without a GPU")
    args = parser.parse_args(argv)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = sorted(set(models) - set(MODELS))
    if unknown or not models:
        parser.error(f"--models: unknown {unknown}; expected some of {', '.join(MODELS)}")
    gpu = not args.cpu_rehearsal
    if gpu and not torch.cuda.is_available():
        print(no_cuda_message(), file=sys.stderr)
        return NO_GPU

    started = time.perf_counter()
    out = (args.out or REPO / "runs" / f"gpu-check-{time.strftime('%Y%m%d-%H%M%S')}").resolve()
    out.mkdir(parents=True, exist_ok=True)
    report = Report()
    if gpu:
        props = torch.cuda.get_device_properties(0)
        print(f"gpu_check: {torch.cuda.device_count()} GPU(s), {props.name}, {props.total_memory / 2**30:.0f} GiB; "
              f"torch {torch.__version__} (CUDA {torch.version.cuda}); writing to {out}", flush=True)
    import ray

    try:
        if connect(gpu, report):
            for model in models:
                name = "tiny" if model == "tiny" else str(build_qwen2_vl(out / "tiny-qwen2-vl"))
                check_model(report, model, name, out, gpu)
    finally:
        if ray.is_initialized():
            ray.shutdown()
    wall = time.perf_counter() - started
    (out / "gpu_check.json").write_text(json.dumps({"wall_seconds": wall, "gpu": gpu, "workers": report.workers,
                                                    "checks": [asdict(c) for c in report.checks]}, indent=1))
    failed = report.failed()
    over = f" (over the {TIME_BUDGET_S} s budget: shrink the federations)" if gpu and wall > TIME_BUDGET_S else ""
    print(f"gpu_check: {len(report.checks) - len(failed)} of {len(report.checks)} checks passed or skipped, "
          f"{len(failed)} failed, in {wall:.0f} s{over}; details in {out / 'gpu_check.json'}")
    for check in failed:
        print(f"gpu_check: FAILED {check.name}: {check.detail}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
