"""Several clients in one forward pass (runtime.clients_per_batch): each client's update is the one it gets
trained alone, whatever else shares its batch; the engines pass the setting through; bad settings fail early."""

from __future__ import annotations

import pytest
import torch

from fedsim.algorithms import LocalContext, build_client_strategy
from fedsim.client import ClientTrainer
from fedsim.clients_per_batch import auto_batch_size, cohort_size, engine_workers
from fedsim.clientdata import load_client_data
from fedsim.config import ClientAlgoConfig, ConfigError, ModelConfig, TrainingConfig
from fedsim.data.collator import Collator
from fedsim.data.synthetic import generate
from fedsim.engine import run_sequential
from fedsim.messages import ClientTask
from fedsim.models.adapter import get_weights, set_weights
from fedsim.models.loading import LoadedModel, load_model
from fedsim.training import LocalRun, local_optimizer, train_locally, train_together

from conftest import small_config

STRATEGIES = {
    "plain": ClientAlgoConfig(name="plain"),
    "fedprox": ClientAlgoConfig(name="fedprox", mu=0.5),
    "fedmllm_reg": ClientAlgoConfig(name="fedmllm_reg", mu=0.5, window=0.25),
    "scaffold": ClientAlgoConfig(name="scaffold"),
}


@pytest.fixture(scope="module")
def tiny(tiny_path) -> LoadedModel:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield load_model(ModelConfig(name=str(tiny_path)), seed=0)
    torch.set_num_threads(threads)


def uneven_clients(count: int = 4, seed: int = 0) -> list[list[list[dict]]]:
    """``count`` clients' mini-batches: 3, 2, 1, 2... batches of uneven sizes (the last one partial), with
    image-only and text-only samples mixed in."""
    samples = list(generate("classification", 40, "train", seed=seed))
    for i in range(0, len(samples), 5):
        samples[i] = dict(samples[i], image=None, has_image=False)
    for i in range(2, len(samples), 7):
        samples[i] = dict(samples[i], text=None, has_text=False)
    shapes = [[4, 4, 3], [4, 2], [1], [3, 4]]
    clients, start = [], 0
    for sizes in (shapes * count)[:count]:
        batches = []
        for size in sizes:
            batches.append(samples[start:start + size])
            start += size
        clients.append(batches)
    return clients


def one_by_one_and_together(loaded: LoadedModel, clients: list[list[list[dict]]], strategy: ClientAlgoConfig,
                            training: TrainingConfig, lr: float = 0.02) -> tuple[list[dict], list[dict]]:
    """Every client's delta trained alone (train_locally on the resident adapter, as ClientTrainer.train
    does), and trained all together (train_together); each with the same seeds, starting point and state."""
    collate = Collator(loaded.processor, 256, train=True)
    start = get_weights(loaded.model)
    generator = torch.Generator().manual_seed(7)
    noise = {n: torch.randn(t.shape, generator=generator) * 1e-3 for n, t in start.items()}
    extras = {"control/" + n: t for n, t in noise.items()} if strategy.name == "scaffold" else {}
    state = {n: -t for n, t in noise.items()} if strategy.name == "scaffold" else None

    def context() -> LocalContext:
        return LocalContext(start, extras, state, loaded.layer_of, loaded.num_layers)

    alone = []
    params = {n: p for n, p in loaded.model.named_parameters() if p.requires_grad}
    for client, batches in enumerate(clients):
        set_weights(loaded.model, start)
        torch.manual_seed(100 + client)
        train_locally(loaded.model, params, (collate(b) for b in batches), build_client_strategy(strategy), context(),
                      training, lr)
        alone.append({n: w - start[n] for n, w in get_weights(loaded.model).items()})
    set_weights(loaded.model, start)

    runs = []
    for client, batches in enumerate(clients):
        own = {n: start[n].clone().requires_grad_() for n in params}
        runs.append(LocalRun(own, iter(batches), build_client_strategy(strategy), context(),
                             local_optimizer(own, training, lr), torch.Generator().manual_seed(100 + client)))
    train_together(loaded.model, runs, collate, loaded.device, training)
    together = [{n: p.detach() - start[n] for n, p in run.params.items()} for run in runs]
    assert [run.steps for run in runs] == [len(b) for b in clients]
    return alone, together


def relative_difference(a: dict, b: dict) -> float:
    num = sum((a[n] - b[n]).double().pow(2).sum() for n in a).sqrt()
    den = sum(a[n].double().pow(2).sum() for n in a).sqrt()
    return float(num / den)


@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_each_client_in_a_batch_gets_its_update_alone(tiny, strategy):
    """Uneven batch counts (a client stops while others go on), a partial last batch, mixed modalities, LoRA
    dropout on, clipping on: the update of one-by-one training, within 1e-4 relative. It differs at all only
    where padding does: attention kernels block over the batch's padded length (a text-only sample is
    shorter), so a client whose sequences have the batch's length gets its update bit for bit."""
    training = TrainingConfig(batch_size=4, max_grad_norm=0.05,
                              optimizer="sgd" if strategy == "scaffold" else "adamw")
    alone, together = one_by_one_and_together(tiny, uneven_clients(), STRATEGIES[strategy], training)
    for mine, reference in zip(together, alone):
        assert any(t.abs().sum() > 0 for t in reference.values())
        assert relative_difference(mine, reference) <= 1e-4
    assert any(all(torch.equal(m[n], r[n]) for n in r) for m, r in zip(together, alone))


def test_with_equal_lengths_a_batch_reproduces_one_by_one_bit_for_bit(tiny):
    clients = [[[s] for s in generate("classification", 3, "train", seed=seed)] for seed in range(3)]
    lengths = {len(Collator(tiny.processor, 256, train=True)(batch)["input_ids"][0])
               for client in clients for batch in client}
    assert len(lengths) == 1  # the synthetic task's image+text prompts all tokenize to one length
    alone, together = one_by_one_and_together(tiny, clients, STRATEGIES["fedprox"], TrainingConfig(batch_size=1))
    for mine, reference in zip(together, alone):
        assert all(torch.equal(mine[n], reference[n]) for n in reference)


def test_a_clients_update_does_not_depend_on_its_batch_mates_weights(tiny):
    """The same batch twice, the mates starting from other weights: client 0's update is the same, bit for bit."""
    collate = Collator(tiny.processor, 256, train=True)
    start = get_weights(tiny.model)
    clients = uneven_clients(3)

    def client_zero(mates_shift: float) -> dict:
        runs = []
        for client, batches in enumerate(clients):
            shift = mates_shift if client else 0.0
            own = {n: (start[n] + shift).requires_grad_() for n in start}
            runs.append(LocalRun(own, iter(batches), build_client_strategy(STRATEGIES["plain"]),
                                 LocalContext(start, {}, None, tiny.layer_of, tiny.num_layers),
                                 local_optimizer(own, TrainingConfig(), 0.02), torch.Generator().manual_seed(client)))
        train_together(tiny.model, runs, collate, tiny.device, TrainingConfig())
        return {n: p.detach() - start[n] for n, p in runs[0].params.items()}

    first, second = client_zero(0.0), client_zero(0.3)
    assert all(torch.equal(first[n], second[n]) for n in first)


@pytest.mark.parametrize("cohort, workers, most, expected", [
    (20, 2, 100, 10),  # one batch per worker: 10 and 10, not 8, 8 and 4
    (20, 1, 100, 20),
    (20, 2, 4, 4),  # 10 per worker in 3 batches of at most 4
    (21, 2, 8, 6),  # 11 per worker in 2 batches: 6 and 5
    (20, 2, 0, 1),  # not even one more client fits: one at a time
    (3, 4, 10, 1),  # fewer clients than workers
])
def test_auto_splits_the_cohort_evenly_across_workers_within_memory(cohort, workers, most, expected):
    assert auto_batch_size(cohort, workers, most) == expected


def test_auto_sizes_the_cohort_it_runs(tmp_path):
    assert cohort_size(small_config(tmp_path, "federation.clients_per_round=3", "scheduler.overcommit=1.5")) == 5
    assert cohort_size(small_config(tmp_path, "algorithm.server.name=fedbuff", "scheduler.concurrency=5")) == 5
    assert engine_workers(small_config(tmp_path, "runtime.num_workers=3")) == 3
    assert engine_workers(small_config(tmp_path, "runtime.engine=sequential", "runtime.num_workers=3")) == 1


def test_the_trainer_batches_and_measures_what_an_extra_client_costs(tmp_path, tiny):
    # 3 clients a round on 2 workers: 2 per batch, with the memory free here (no budget given)
    cfg = small_config(tmp_path, "runtime.clients_per_batch=auto", "partition.scheme=quantity")
    data = load_client_data(cfg)
    trainer = ClientTrainer(cfg, tiny, data)
    assert trainer.clients_per_batch == 2
    cost = trainer.extra_client_bytes
    adapter = sum(p.numel() * 4 for p in trainer.params.values())
    # weights, gradients, AdamW's two moments, and its step count (a float32 scalar per tensor)
    assert cost["adapter_and_optimizer"] == 4 * adapter + 4 * len(trainer.params)
    assert cost["activations"] > adapter
    one_client = 1.5 * sum(cost.values()) / 2**30  # a budget that holds one client, not two
    assert ClientTrainer(small_config(tmp_path, "runtime.clients_per_batch=auto", f"runtime.batch_memory_gb={one_client}",
                                      "partition.scheme=quantity"), tiny, data).clients_per_batch == 1
    weights = get_weights(tiny.model)
    tasks = [ClientTask(c, 1, 0, 0.01) for c in range(3)]
    batched = trainer.train_batch(tasks, weights, {}, [None] * 3)
    for task, (update, _) in zip(tasks, batched):
        alone, _ = trainer.train(task, weights, {}, None)
        assert update.client_id == task.client_id and update.metrics["steps"] == alone.metrics["steps"]
        assert all(torch.equal(update.delta[n], alone.delta[n]) for n in alone.delta)


def test_a_client_trains_the_same_from_cached_samples(tmp_path, tiny):
    """The second task of a client reads its samples from the cache: the update is the one a trainer that
    encodes every batch afresh gives (the batch built from cached samples must not alter them)."""
    updates, weights = {}, get_weights(tiny.model)  # train() leaves the resident adapter trained: start anew
    for cache_mb in (0, 256):
        cfg = small_config(tmp_path, f"runtime.sample_cache_mb={cache_mb}", "runtime.clients_per_batch=2")
        trainer = ClientTrainer(cfg, tiny, load_client_data(cfg))
        tasks = [ClientTask(c, 1, 0, 0.01) for c in (0, 1)]
        for _ in range(2):  # the second time round, client 0 and 1's samples come from the cache
            batched = trainer.train_batch(tasks, weights, {}, [None, None])
            alone, _ = trainer.train(ClientTask(0, 2, 0, 0.01), weights, {}, None)
        updates[cache_mb] = [u.delta for u, _ in batched] + [alone.delta]
        assert bool(trainer.encoded.cache) == bool(cache_mb)
    for fresh, cached in zip(updates[0], updates[256]):
        assert all(torch.equal(fresh[n], cached[n]) for n in fresh)


@pytest.mark.parametrize("override, message", [
    ("runtime.clients_per_batch=0", "an integer >= 1, or auto"),
    ("runtime.clients_per_batch=many", "an integer >= 1, or auto"),
    ("model.lora.modules_to_save=[multi_modal_projector]", "modules_to_save"),
])
def test_bad_batching_settings_are_refused_before_anything_loads(tmp_path, override, message):
    with pytest.raises(ConfigError, match=message):
        small_config(tmp_path, "runtime.clients_per_batch=2", override)


def test_lora_on_a_vision_tower_is_refused_in_a_batch_naming_the_layer(tmp_path, tiny_path):
    cfg = small_config(tmp_path, "runtime.clients_per_batch=2", "model.lora.target_regex=.*vision_tower.*q_proj$")
    loaded = load_model(cfg.model, seed=0)
    samples = list(generate("classification", 4, "train", seed=0))
    samples[1] = dict(samples[1], image=None, has_image=False)  # 3 images for 4 samples
    runs = [LocalRun({n: p.detach().clone().requires_grad_() for n, p in loaded.model.named_parameters()
                      if p.requires_grad}, iter([samples[2 * c:2 * c + 2]]), build_client_strategy(STRATEGIES["plain"]),
                     LocalContext({}, {}, None, loaded.layer_of, loaded.num_layers),
                     torch.optim.SGD([torch.zeros(1)]), torch.Generator()) for c in range(2)]
    with pytest.raises(ValueError, match=r"vision_tower.*q_proj.*leading size 3 for 4 samples"):
        train_together(loaded.model, runs, Collator(loaded.processor, 256, train=True), loaded.device, TrainingConfig())


@pytest.mark.slow
def test_the_sequential_engine_gives_the_same_adapter_for_any_batch_size(tmp_path):
    common = ("runtime.engine=sequential", "runtime.num_threads=1", "partition.scheme=quantity",
              "eval.zero_shot=false")
    one = run_sequential(small_config(tmp_path / "one", *common), tmp_path / "one" / "run")
    three = run_sequential(small_config(tmp_path / "three", *common, "runtime.clients_per_batch=3"),
                           tmp_path / "three" / "run")
    assert three["adapter_sha256"] == one["adapter_sha256"]
    assert three["final_metrics"] == one["final_metrics"]
    assert three["batching"]["clients_per_batch"] == 3 and three["batching"]["extra_client_bytes"]["activations"] > 0
    assert one["batching"] == {"clients_per_batch": 1, "extra_client_bytes": {}}
