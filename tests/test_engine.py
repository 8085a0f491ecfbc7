"""End-to-end runs of the reference engine on the tiny preset."""

import json

import pytest
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


def test_training_beats_zero_shot_and_writes_a_complete_run(tmp_path, tiny_path):
    # 100 samples per client, as in the quickstart: with the 40 of small_config the tiny preset may not move
    # off a constant answer within 4 rounds. Measured on the shipped preset over seeds 0-4: zero-shot 18-28%,
    # after 4 rounds 45-62%, a gain of 17 to 42 points; the bar asks for 10.
    cfg = small_config(tmp_path, "federation.rounds=4", "training.local_epochs=2", "partition.scheme=iid",
                       "data.num_train=600")
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


@pytest.mark.parametrize("server,client", [("fedadagrad", "fedmllm_reg"), ("fedyogi", "fedprox")])
def test_algorithms_run_end_to_end(tmp_path, server, client):
    cfg = small_config(tmp_path, f"algorithm.server.name={server}", f"algorithm.client.name={client}",
                       "eval.zero_shot=false", "federation.rounds=2")
    summary = run_sequential(cfg, tmp_path / "run")
    assert summary["rounds"] == 2 and 0.0 <= summary["final_metrics"]["accuracy"] <= 1.0
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
    """missing beta=0.5: clients train on samples without image and without text; the test split stays whole."""
    from fedsim.clientdata import load_client_data

    cfg = small_config(tmp_path, "data.scenarios.missing.beta=0.5", "federation.rounds=1", "data.prompt=modality")
    data = load_client_data(cfg)
    train = data.splits.train
    assert 0 < sum(train["has_image"]) < len(train) and 0 < sum(train["has_text"]) < len(train)
    assert all(data.splits.test["has_image"]) and all(data.splits.test["has_text"])
    summary = run_sequential(cfg, tmp_path / "run")
    assert summary["client_updates"] == 3


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
