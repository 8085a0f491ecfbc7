"""End-to-end runs of the reference engine on the tiny preset."""

import json

import pytest
import torch
from peft import PeftModel

from fedsim.config import ModelConfig
from fedsim.engine import run_sequential
from fedsim.evaluation import Evaluator
from fedsim.data import load_dataset_splits
from fedsim.models.loading import load_backbone
from fedsim.output import read_metrics
from fedsim.seeding import derive_seed

from conftest import small_config

pytestmark = pytest.mark.slow

# 100 samples per client, as in the quickstart: with the 40 of small_config the tiny preset may not move off a
# constant answer within 4 rounds (4 rounds of 3 clients x 2 epochs: 12 updates of 26 steps).
LEARNS = ("federation.rounds=4", "training.local_epochs=2", "partition.scheme=iid", "data.num_train=600")
# The learning tests below, as measured: one torch thread (the figures are these very runs'), evaluated at the end.
MEASURED = (*LEARNS, "runtime.num_threads=1", "eval.every=4")


@pytest.fixture(autouse=True)
def torch_threads():
    """runtime.num_threads sets torch's thread count for the whole process: the next test gets it back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_training_beats_zero_shot_and_writes_a_complete_run(tmp_path, tiny_path):
    # Measured on the shipped preset over seeds 0-4: zero-shot 18-28%, after 4 rounds 45-62%, a gain of 17 to
    # 42 points; the bar asks for 10.
    cfg = small_config(tmp_path, *LEARNS)
    summary = run_sequential(cfg, tmp_path / "run")
    run = tmp_path / "run"
    assert summary["final_metrics"]["accuracy"] >= summary["zero_shot_metrics"]["accuracy"] + 0.1
    assert json.loads((run / "summary.json").read_text()) == summary
    for key in ("final_metrics", "zero_shot_metrics", "rounds", "client_updates", "wall_seconds",
                "updates_per_second", "bytes_up", "bytes_down", "adapter_sha256"):
        assert key in summary
    assert summary["client_updates"] == 4 * 3
    assert summary["bytes_up"] == summary["bytes_down"] == 12 * summary["adapter_bytes"]
    rounds = read_metrics(run)
    assert [r["round"] for r in rounds] == [1, 2, 3, 4]
    assert all(len(r["clients"]) == 3 and "eval" in r and r["wall_seconds"] > 0 for r in rounds)
    assert "seed: 0" in (run / "config.yaml").read_text()

    # The saved adapter, loaded by peft onto a fresh 4-bit backbone, reproduces the final accuracy.
    base, processor, device = load_backbone(ModelConfig(name=str(tiny_path)))
    model = PeftModel.from_pretrained(base, run / "adapter", is_trainable=True)
    splits = load_dataset_splits(cfg.data, derive_seed(cfg.seed, "data"))
    evaluator = Evaluator(processor, splits.test, cfg.eval, cfg.data.max_length, device, cfg.seed)
    assert evaluator.evaluate(model) == summary["final_metrics"]


def test_same_seed_same_adapter(tmp_path):
    first = run_sequential(small_config(tmp_path / "a", "eval.zero_shot=false"), tmp_path / "a" / "run")
    second = run_sequential(small_config(tmp_path / "b", "eval.zero_shot=false"), tmp_path / "b" / "run")
    other = run_sequential(small_config(tmp_path / "c", "eval.zero_shot=false", "seed=1"), tmp_path / "c" / "run")
    assert first["adapter_sha256"] == second["adapter_sha256"]
    assert other["adapter_sha256"] != first["adapter_sha256"]


# method -> its overrides and its gains of final over zero-shot accuracy measured on seeds 0, 1 and 2.
# The adaptive servers' default eta = 1e-3 moves each coordinate by about eta a round:
# FedAdam gained 0.017 on seed 0 with it, so they run with a tuned eta, as Reddi et al. tune theirs. SCAFFOLD is
# missing: under the SGD it needs, the training loss stayed at 0.463 in this config for lr 0.05 to 10 (lr 1:
# a gain of 0.017 on seeds 0 and 1) and diverged at 50, so no learning margin exists yet.
LEARNING_METHODS = {
    "fedadagrad+fedmllm_reg": (("algorithm.server.name=fedadagrad", "algorithm.server.lr=0.1",
                                "algorithm.client.name=fedmllm_reg"), (0.217, 0.333, 0.167)),
    "fedyogi+fedprox": (("algorithm.server.name=fedyogi", "algorithm.server.lr=0.01", "algorithm.client.name=fedprox"),
                        (0.217, 0.333, 0.167)),
    "fedadam": (("algorithm.server.name=fedadam", "algorithm.server.lr=0.01"), (0.217, 0.333, 0.167)),
    # Asynchronous, 12 updates applied in both, trained from older versions as lognormal device speeds reorder them.
    "fedbuff": (("algorithm.server.name=fedbuff", "algorithm.server.buffer_size=3", "scheduler.concurrency=4",
                 "scheduler.speed=lognormal"), (0.217, 0.333, 0.167)),
    "fedasync": (("algorithm.server.name=fedasync", "scheduler.concurrency=3", "scheduler.speed=lognormal",
                  "federation.rounds=12", "eval.every=12"), (0.217, 0.333, 0.167)),
}


@pytest.mark.parametrize("method", list(LEARNING_METHODS))
def test_algorithms_learn_end_to_end(tmp_path, method):
    """Seed 0 ends above zero-shot by half the smallest gain measured (60 test questions, 4 classes;
    2026-12-06, the pinned constraints), with, for seed S and the method's overrides:

        fedsim run experiments/quickstart.yaml runtime.engine=sequential runtime.num_threads=1 data.num_train=600
            data.num_test=60 partition.num_clients=6 partition.scheme=iid federation.clients_per_round=3
            federation.rounds=4 training.batch_size=8 training.local_epochs=2 eval.every=4 seed=S <overrides>

    and summary.json's final_metrics.accuracy - zero_shot_metrics.accuracy. Every method measured reached the
    same final accuracy on a seed (0.483, 0.517, 0.450): the tiny preset's plateau within 12 updates.
    """
    overrides, measured_gains = LEARNING_METHODS[method]
    summary = run_sequential(small_config(tmp_path, *MEASURED, *overrides), tmp_path / "run")
    assert summary["client_updates"] >= 12
    gain = summary["final_metrics"]["accuracy"] - summary["zero_shot_metrics"]["accuracy"]
    assert gain >= min(measured_gains) / 2, (gain, measured_gains)
    if method in ("fedbuff", "fedasync"):
        assert summary["staleness"]["mean"] > 0  # asynchronous indeed: updates trained from older versions
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").exists()


def test_local_only_keeps_personal_adapters_and_sends_nothing(tmp_path):
    cfg = small_config(tmp_path, "algorithm.server.name=local_only")
    summary = run_sequential(cfg, tmp_path / "run")
    assert summary["bytes_up"] == summary["bytes_down"] == 0
    assert summary["client_updates"] == 6
    assert not (tmp_path / "run" / "adapter").exists()


def test_zero_shot_trains_nothing(tmp_path):
    summary = run_sequential(small_config(tmp_path, "algorithm.server.name=zero_shot"), tmp_path / "run")
    assert summary["rounds"] == 0 and summary["client_updates"] == 0
    assert summary["final_metrics"] == summary["zero_shot_metrics"]


def test_vqa_task_runs_with_generation(tmp_path):
    cfg = small_config(tmp_path, "data.task=vqa", "federation.rounds=1")
    summary = run_sequential(cfg, tmp_path / "run")
    # colour answers are open questions (no yes/no reference): no closed accuracy, open equals overall
    metrics = summary["final_metrics"]
    assert set(metrics) == {"accuracy", "token_f1", "open_accuracy", "open_token_f1"}
    assert metrics["open_accuracy"] == metrics["accuracy"] and metrics["open_token_f1"] == metrics["token_f1"]


def test_scheduler_overcommit_dropouts_and_clock_are_accounted(tmp_path):
    cfg = small_config(tmp_path, "scheduler.overcommit=1.5", "scheduler.dropout=0.3", "scheduler.speed=lognormal",
                       "eval.zero_shot=false", "federation.rounds=3")
    summary = run_sequential(cfg, tmp_path / "run")
    dispatched = 3 * 5  # ceil(3 clients x 1.5) per round
    dropped = summary["dropped_by_reason"]
    assert summary["client_updates"] + dropped["late"] + dropped["dropout"] + dropped["no_quorum"] == dispatched
    assert summary["dropped_updates"] == dispatched - summary["client_updates"] > 0
    assert summary["bytes_down"] == dispatched * summary["adapter_bytes"]
    rounds = read_metrics(tmp_path / "run")
    times = [r["simulated_seconds"] for r in rounds]
    assert times == sorted(times) and times[0] > 0 and summary["simulated_seconds"] == times[-1]


def test_measured_compute_time_and_a_deadline_without_quorum(tmp_path):
    """A deadline shorter than any task closes every round without a quorum: nothing is applied."""
    cfg = small_config(tmp_path, "scheduler.compute_time=measured", "scheduler.deadline_s=0.000001",
                       "scheduler.quorum=1.0", "eval.zero_shot=true", "federation.rounds=1")
    summary = run_sequential(cfg, tmp_path / "run")
    assert summary["client_updates"] == 0
    assert summary["dropped_by_reason"]["no_quorum"] + summary["dropped_by_reason"]["late"] == 3
    assert summary["final_metrics"] == summary["zero_shot_metrics"]


def test_a_modality_scenario_reaches_client_training(tmp_path):
    """missing beta=0.5: clients train on samples without image and without text; the test split stays whole.
    The ablations are scored at the rounds eval.ablations_every names and after the last round only."""
    from fedsim.clientdata import load_client_data

    cfg = small_config(tmp_path, "data.scenarios.missing.beta=0.5", "federation.rounds=3", "data.prompt=modality",
                       "federation.clients_per_round=1", "data.num_test=16", "eval.ablations=[no_image]",
                       "eval.ablations_every=2")
    data = load_client_data(cfg)
    train = data.splits.train
    assert 0 < sum(train["has_image"]) < len(train) and 0 < sum(train["has_text"]) < len(train)
    assert all(data.splits.test["has_image"]) and all(data.splits.test["has_text"])
    summary = run_sequential(cfg, tmp_path / "run")
    assert summary["client_updates"] == 3
    evals = {r["round"]: r["eval"] for r in read_metrics(tmp_path / "run") if "eval" in r}
    assert {r: "no_image/accuracy" in e for r, e in evals.items()} == {1: False, 2: True, 3: True}
    assert "no_image/accuracy" in summary["final_metrics"]


def test_modality_task_clients_train_on_two_sources_and_are_scored_per_source(tmp_path):
    """Image+question VQA clients beside text-only QA clients: each group holds only its own source, and
    the final metrics score both test splits."""
    from fedsim.clientdata import load_client_data

    cfg = small_config(tmp_path, "data.task=vqa", "data.scenarios.modality_task.image_clients=2",
                       "federation.rounds=1", "eval.max_new_tokens=3", "eval.zero_shot=false")
    data = load_client_data(cfg)
    train, test = data.splits.train, data.splits.test
    assert len(data.shards) == 6 and len(train) == 480 and len(test) == 120
    for client, idx in enumerate(data.shards):
        rows = train.select(idx)
        assert all(rows["has_image"]) if client < 2 else not any(rows["has_image"])
        assert set(rows["question"]) <= ({"What colour is the item the note points to?"} if client < 2
                                         else {"Can other parcels be stacked on it?"})
    assert sum(len(s) for s in data.shards[:2]) == 240 and sum(len(s) for s in data.shards[2:]) == 240
    summary = run_sequential(cfg, tmp_path / "run")
    metrics = summary["final_metrics"]
    assert {"synthetic/vqa/accuracy", "synthetic/textqa/accuracy", "synthetic/textqa/closed_accuracy",
            "accuracy"} <= set(metrics)
    assert metrics["accuracy"] == pytest.approx((metrics["synthetic/vqa/accuracy"]
                                                 + metrics["synthetic/textqa/accuracy"]) / 2)


def test_test_scenarios_transform_the_test_split(tmp_path):
    from fedsim.clientdata import load_client_data

    cfg = small_config(tmp_path, "data.test_scenarios.missing.beta=0.5",
                       "data.test_scenarios.multilingual.languages=[de]")
    test = load_client_data(cfg).splits.test
    assert 0 < sum(test["has_image"]) < len(test) and 0 < sum(test["has_text"]) < len(test)
    assert set(test["question"]) == {"Wie soll das Paket beschriftet werden?"}
