"""The Ray runtime on a real local Ray instance (two logical GPUs, two CPUs), shared across the session."""

import json
import threading
import time

import datasets
import numpy as np
import pytest
import torch

from actors import worker as worker_module
from actors.executor import RayExecutor
from actors.runtime import run_ray
from fedsim.config import EvalConfig, ModelConfig
from fedsim.data.synthetic import generate
from fedsim.engine import run_sequential
from fedsim.evaluation import Evaluator, combine
from fedsim.models.adapter import adapter_sha256
from fedsim.models.loading import load_model
from fedsim.output import read_metrics

from conftest import run_killed_while_checkpointing, small_config
from outputs_check import check_run_dir

pytestmark = pytest.mark.slow

# Ray workers run torch on their reserved cores (one each here); the reference engine must use the same
# thread count, since thread count changes the order of floating-point reductions.
SAME_THREADS = ("runtime.num_threads=1", "eval.zero_shot=false", "federation.rounds=2")


def test_fractional_gpus_place_two_workers_per_gpu_and_match_the_reference(ray_cluster, tmp_path):
    reference = run_sequential(small_config(tmp_path / "seq", *SAME_THREADS), tmp_path / "seq" / "run")
    cfg = small_config(tmp_path / "ray", *SAME_THREADS, "runtime.engine=ray", "runtime.num_workers=4",
                       "runtime.gpus_per_worker=0.5", "runtime.cpus_per_worker=0.5")
    summary = run_ray(cfg, tmp_path / "ray" / "run")
    workers = summary["workers"]
    assert len(workers) == 4
    per_gpu = {}
    for worker in workers:
        assert worker["cuda_visible_devices"] == ",".join(worker["gpu_ids"])  # what Ray assigned, as seen inside
        per_gpu.setdefault(tuple(worker["gpu_ids"]), []).append(worker["worker"])
    assert sorted(per_gpu) == [("0",), ("1",)] and all(len(w) == 2 for w in per_gpu.values())
    assert sum(w["tasks"] for w in workers) == summary["client_updates"] == 6
    assert summary["adapter_sha256"] == reference["adapter_sha256"]


@pytest.mark.parametrize("workers", [1, 2])
def test_sync_result_does_not_depend_on_worker_count(ray_cluster, tmp_path, workers):
    reference = run_sequential(small_config(tmp_path / "seq", *SAME_THREADS), tmp_path / "seq" / "run")
    cfg = small_config(tmp_path / "ray", *SAME_THREADS, f"runtime.num_workers={workers}")
    summary = run_ray(cfg, tmp_path / "ray" / "run")
    assert summary["adapter_sha256"] == reference["adapter_sha256"]
    # Evaluation is sharded over the workers (60 test rows: batches of 32 and 28): pooled, not averaged.
    assert summary["final_metrics"] == reference["final_metrics"]
    assert summary["engine"] == "ray" and summary["simulated_seconds"] > 0
    assert all("simulated_seconds" in r for r in read_metrics(tmp_path / "ray" / "run"))
    assert len(summary["workers"]) == workers and 0 < summary["busy_fraction"] <= 1
    assert all(0 < w["busy_fraction"] <= 1 and w["busy_seconds"] > 0 for w in summary["workers"])
    check_run_dir(tmp_path / "ray" / "run")  # what docs/outputs.md says a Ray run writes


@pytest.mark.parametrize("clients_per_batch", [1, 2])
def test_async_fedbuff_matches_the_reference(ray_cluster, tmp_path, clients_per_batch):
    """With clients_per_batch=2, the 3 clients dispatched at the start train as a batch of 2 and one alone."""
    async_cfg = ("algorithm.server.name=fedbuff", "algorithm.server.buffer_size=2", "federation.rounds=4",
                 "scheduler.concurrency=3", "scheduler.speed=lognormal", "runtime.num_threads=1",
                 "training.local_epochs=2", f"runtime.clients_per_batch={clients_per_batch}")
    reference = run_sequential(small_config(tmp_path / "seq", *async_cfg), tmp_path / "seq" / "run")
    summary = run_ray(small_config(tmp_path / "ray", *async_cfg, "runtime.num_workers=2"), tmp_path / "ray" / "run")
    assert summary["mode"] == "async"
    assert summary["adapter_sha256"] == reference["adapter_sha256"]
    # Whether 4 versions already beat zero-shot depends on the preset's numerics; that training learns is
    # test_engine's job (over more samples). Here: the same adapter as the reference on the same clock.
    histogram = summary["staleness"]["histogram"]
    assert sum(histogram.values()) == summary["client_updates"] + summary["stale_updates"] >= 8
    assert any(int(s) > 0 for s in histogram)  # with 3 in flight and a buffer of 2, some updates are stale
    check_run_dir(tmp_path / "ray" / "run")  # what docs/outputs.md says a Ray run writes


@pytest.mark.parametrize("axes", [
    # sync: a robust rule over the round's updates, int8 uploads, attackers training on flipped labels
    ("algorithm.server.name=trimmed_mean", "algorithm.server.trim=1", "compression.kind=int8",
     "attack.kind=label_flip", "attack.fraction=0.34"),
    # async: central DP with adaptive clipping under FedBuff, random-k with error feedback, noise-sending attackers
    ("algorithm.server.name=fedbuff", "algorithm.server.buffer_size=2", "scheduler.concurrency=3",
     "federation.rounds=4", "privacy.mode=central", "privacy.noise_multiplier=0.5", "privacy.clip_norm=0.1",
     "privacy.adaptive_clip=true", "privacy.count_noise_std=1", "compression.kind=randk", "compression.density=0.2",
     "attack.kind=gaussian", "attack.fraction=0.34", "attack.scale=0.01"),
], ids=["sync-robust", "async-private"])
def test_study_axes_on_ray_match_the_reference(ray_cluster, tmp_path, axes):
    """Attacks, compression (its residuals in the aggregator's state store), DP and robust rules run where the
    workers and the aggregator actor are, and end on the reference engine's adapter and epsilon."""
    reference = run_sequential(small_config(tmp_path / "seq", *SAME_THREADS, *axes), tmp_path / "seq" / "run")
    summary = run_ray(small_config(tmp_path / "ray", *SAME_THREADS, *axes), tmp_path / "ray" / "run")
    assert summary["adapter_sha256"] == reference["adapter_sha256"]
    for key in ("privacy", "attack", "compression", "bytes_up", "final_metrics"):
        assert summary[key] == reference[key], key


def test_a_worker_loss_is_counted_once_whichever_way_it_surfaces(ray_cluster):
    import ray
    from ray.exceptions import ObjectLostError, RayActorError

    from actors.executor import WorkerSlot

    @ray.remote(num_cpus=0)
    class Answers:  # a real actor answering what a loss's bookkeeping calls: placement() and the server's version()
        def placement(self):
            import os

            return {"pid": os.getpid(), "node_id": ray.get_runtime_context().get_node_id()}

        def version(self):
            return 0

    actor = Answers.remote()
    here = ray.get(actor.placement.remote())
    executor = RayExecutor.__new__(RayExecutor)  # only the loss bookkeeping, on a real actor
    executor.server, executor.revivals, executor.reviving_since = actor, {}, {}

    def lose(err, placement):
        slot = WorkerSlot(index=0, actor=actor, placement=dict(placement))
        executor._lost(slot, actor, err)
        counted_at_once = slot.restarts
        executor._revived(slot)  # the actor answers: from the same process here, as after a lost object only
        return counted_at_once, slot.restarts

    lost_object = ObjectLostError("ab" * 20, "owner", "call site")
    # A lost result on a live node: not a loss until the worker answers from a new process (it did not).
    assert lose(lost_object, here) == (0, 0)
    # The same on a node the control store does not list alive: counted at once, and once.
    assert lose(lost_object, {**here, "node_id": "ff" * 28}) == (1, 1)
    # An actor error is a loss at once; its revival does not count it again, even from a new process.
    assert lose(RayActorError(), here) == (1, 1)
    assert lose(RayActorError(), {**here, "pid": -1}) == (1, 1)
    # Unseen by any call (a new pid found at revival): counted then.
    slot = WorkerSlot(index=0, actor=actor, placement={**here, "pid": -1})
    executor._await_revival(slot)
    executor._revived(slot)
    assert slot.restarts == 1 and slot.placement["pid"] == here["pid"]
    ray.kill(actor)


def test_a_killed_worker_is_replaced_and_the_result_is_unchanged(ray_cluster, tmp_path):
    overrides = (*SAME_THREADS, "federation.rounds=3", "runtime.num_workers=2")
    fault_free = run_ray(small_config(tmp_path / "a", *overrides), tmp_path / "a" / "run")
    run_dir = tmp_path / "b" / "run"
    cfg = small_config(tmp_path / "b", *overrides)
    outcome = {}
    thread = threading.Thread(target=lambda: outcome.update(run_ray(cfg, run_dir)))
    thread.start()
    deadline = time.time() + 600
    while len(read_metrics(run_dir)) < 1 and time.time() < deadline:  # round 2 is being trained now
        time.sleep(0.2)
    victims = [n for n in ray_cluster.util.list_named_actors() if ":worker0:" in n and cfg.name in n]
    assert victims, "the run's worker 0 was not found"
    ray_cluster.kill(ray_cluster.get_actor(victims[-1]), no_restart=True)
    thread.join(timeout=900)
    assert not thread.is_alive()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["worker_restarts"] >= 1
    assert summary["client_updates"] == fault_free["client_updates"] == 3 * 3
    assert summary["adapter_sha256"] == fault_free["adapter_sha256"]


def test_rejected_updates_leave_client_state_untouched_on_ray(ray_cluster, tmp_path):
    """Every update is over the norm bound, so no client may keep the personal adapter it trained: the
    personalized evaluation falls back to the initial adapter for all, and the digest covers no adapter."""
    cfg = small_config(tmp_path, "algorithm.server.name=local_only", "runtime.max_update_norm=1e-9",
                       "federation.rounds=1", "runtime.num_workers=1", "eval.personalized_clients=4")
    summary = run_ray(cfg, tmp_path / "run")
    assert summary["rejected_by_reason"] == {"norm": 3} and summary["client_updates"] == 0
    assert summary["personalized_clients_evaluated"] == 4
    # the mean over clients of the same metrics, up to the float rounding of that mean
    assert summary["final_metrics"] == pytest.approx(summary["zero_shot_metrics"])
    assert summary["adapter_sha256"] == adapter_sha256({})


def test_scaffold_on_ray_resumes_from_the_stored_client_states_to_the_reference_adapter(ray_cluster, tmp_path,
                                                                                        monkeypatch):
    """The driver dies writing its round-2 checkpoint, after the aggregator actor stored round 2's client
    states; resumed from the round-1 checkpoint (whose state files the store kept), the run ends with the
    reference engine's adapter."""
    overrides = (*SAME_THREADS, "algorithm.server.name=scaffold", "algorithm.client.name=scaffold",
                 "training.optimizer=sgd", "training.lr=0.05", "federation.rounds=2", "checkpoint.every=1",
                 "eval.every=2", "runtime.num_workers=1", "runtime.state_cache_mb=0")
    reference = run_sequential(small_config(tmp_path / "seq", *overrides), tmp_path / "seq" / "run")
    cfg, run = small_config(tmp_path / "ray", *overrides), tmp_path / "ray" / "run"
    run_killed_while_checkpointing(monkeypatch, 2, run_ray, cfg, run)
    summary = run_ray(cfg, run, resume=True)
    assert summary["resumed_after_round"] == 1
    assert summary["adapter_sha256"] == reference["adapter_sha256"]
    assert summary["final_metrics"] == reference["final_metrics"]


def test_a_client_that_raises_is_retried_on_another_worker_then_counted_as_its_dropout(ray_cluster, tmp_path):
    """A real fault: Spanish prompts need more tokens than data.max_length allows (English ones fit), so the
    Spanish clients' tasks raise in the collator. Each is tried on both workers, then dropped for its round;
    the run goes on, to the reference engine's adapter."""
    faulty = (*SAME_THREADS, "data.scenarios={multilingual: {languages: [en, es]}}", "data.max_length=100")
    reference = run_sequential(small_config(tmp_path / "seq", *faulty), tmp_path / "seq" / "run")
    summary = run_ray(small_config(tmp_path / "ray", *faulty, "runtime.num_workers=2"), tmp_path / "ray" / "run")
    failed = summary["failed_updates"].get("exception:ValueError", 0)
    assert failed >= 1 and summary["failed_updates"] == reference["failed_updates"] == {"exception:ValueError": failed}
    assert summary["client_updates"] == reference["client_updates"] == 2 * 3 - failed
    assert [w["failed_tasks"] for w in summary["workers"]] == [failed, failed]  # each tried on both workers
    assert summary["dropped_by_reason"]["dropout"] == failed
    assert summary["adapter_sha256"] == reference["adapter_sha256"]


def test_clients_trained_in_batches_give_the_one_by_one_adapter_on_ray(ray_cluster, tmp_path):
    """3 clients a round in batches of 2 (a full batch, then the rest when the loop waits), on 2 workers: the
    synthetic prompts all have one length, so the adapter is the reference's, bit for bit."""
    reference = run_sequential(small_config(tmp_path / "seq", *SAME_THREADS), tmp_path / "seq" / "run")
    cfg = small_config(tmp_path / "ray", *SAME_THREADS, "runtime.num_workers=2", "runtime.clients_per_batch=2")
    summary = run_ray(cfg, tmp_path / "ray" / "run")
    assert summary["adapter_sha256"] == reference["adapter_sha256"]
    assert summary["batching"]["clients_per_batch"] == 2
    assert sum(w["tasks"] for w in summary["workers"]) == summary["client_updates"] == 6


def test_a_batch_with_a_client_that_raises_retries_each_client_alone(ray_cluster, tmp_path):
    """Spanish clients raise in the collator (see above) and fail their whole batch; each client of it runs
    again alone on the other worker, so only the Spanish ones are lost. English and Spanish prompts differ in
    length, so the engines agree bit for bit only if they form the same batches."""
    faulty = (*SAME_THREADS, "data.scenarios={multilingual: {languages: [en, es]}}", "data.max_length=100",
              "runtime.clients_per_batch=3")
    reference = run_sequential(small_config(tmp_path / "seq", *faulty), tmp_path / "seq" / "run")
    summary = run_ray(small_config(tmp_path / "ray", *faulty, "runtime.num_workers=2"), tmp_path / "ray" / "run")
    failed = summary["failed_updates"].get("exception:ValueError", 0)
    assert failed >= 1 and summary["failed_updates"] == reference["failed_updates"] == {"exception:ValueError": failed}
    assert summary["client_updates"] == reference["client_updates"] == 2 * 3 - failed
    assert summary["adapter_sha256"] == reference["adapter_sha256"]


def test_placement_waits_runtime_resource_timeout_then_names_what_is_missing(ray_cluster, tmp_path):
    """Both GPUs held by another placement group: the run's group cannot be placed. With
    resource_timeout_s=0 it fails after the short grace, not after a fixed 300 s."""
    from ray.util.placement_group import placement_group, remove_placement_group

    holder = placement_group([{"GPU": 2}])
    ray_cluster.get(holder.ready(), timeout=60)
    cfg = small_config(tmp_path, "runtime.num_workers=1", "runtime.gpus_per_worker=1",
                       "runtime.resource_timeout_s=0")
    started = time.monotonic()
    try:
        with pytest.raises(RuntimeError, match=r"1 GPU \(0 free\).*runtime.resource_timeout_s"):
            RayExecutor(cfg, personalized=False)
    finally:
        remove_placement_group(holder)
    assert time.monotonic() - started < 60


def test_a_fractional_gpu_worker_caps_its_gpu_memory(monkeypatch):
    """On CUDA, a worker with 0 < gpus_per_worker < 1 caps its allocator at that fraction (CPU: no-op)."""
    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction", lambda f, d: calls.append((f, d)))
    assert worker_module.cap_gpu_memory(0.25) == 0.25 and calls == [(0.25, 0)]
    assert worker_module.cap_gpu_memory(1.0) is None and worker_module.cap_gpu_memory(0.0) is None
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert worker_module.cap_gpu_memory(0.5) is None and len(calls) == 1


def test_sharded_evaluation_pools_to_the_whole_splits_metrics(tiny_path):
    """Any number of shards (workers) gives exactly one worker's metrics: two sources (multiple choice and
    open answers), an ablation, batches of 3."""
    loaded = load_model(ModelConfig(name=str(tiny_path)), seed=0)
    test = datasets.concatenate_datasets([generate("classification", 7, "test", seed=0),
                                          generate("vqa", 4, "test", seed=0)])
    evaluator = Evaluator(loaded.processor, test, EvalConfig(batch_size=3, max_new_tokens=2, ablations=["no_image"]),
                          256, loaded.device, seed=0)
    whole = evaluator.evaluate(loaded.model)
    assert "no_image/accuracy" in whole and len(evaluator.units()) == 2 * (3 + 2)
    for count in (3, 11):  # 11: more shards than batches, some empty
        shards = [evaluator.evaluate_shard(loaded.model, i, count) for i in range(count)]
        np.testing.assert_equal(combine([b for shard in shards for b in shard]), whole)
