"""Small helpers around local training: lr schedule, batches, cohort sampling, seeds and the run directory."""

import json
import os

import numpy as np
import pytest

from fedsim.config import TrainingConfig
from fedsim.output import RunWriter, atomic_write_bytes, atomic_write_text, read_metrics
from fedsim.seeding import STREAMS, derive_seed, rng_for
from fedsim.training import batch_indices, round_lr

# --- round_lr ---------------------------------------------------------------------------------------------


def test_constant_lr_every_round():
    cfg = TrainingConfig(lr=0.02, lr_schedule="constant", min_lr=0.001)
    assert [round_lr(cfg, r, 5) for r in (1, 3, 5)] == [0.02, 0.02, 0.02]


def test_cosine_lr_first_middle_last():
    cfg = TrainingConfig(lr=0.5, lr_schedule="cosine", min_lr=0.1)
    # min + (lr - min) * (1 + cos(pi * (r - 1) / (R - 1))) / 2 with R = 5
    assert round_lr(cfg, 1, 5) == pytest.approx(0.5)
    assert round_lr(cfg, 2, 5) == pytest.approx(0.1 + 0.2 * (1 + np.sqrt(0.5)))  # cos(pi/4)
    assert round_lr(cfg, 3, 5) == pytest.approx(0.3)
    assert round_lr(cfg, 5, 5) == pytest.approx(0.1)


def test_cosine_lr_decreases_and_single_round_keeps_lr():
    cfg = TrainingConfig(lr=1.0, lr_schedule="cosine")
    lrs = [round_lr(cfg, r, 10) for r in range(1, 11)]
    assert all(a > b for a, b in zip(lrs, lrs[1:]))
    assert lrs[-1] == pytest.approx(0.0)
    assert round_lr(cfg, 1, 1) == 1.0


def test_fedmllm_warmup_under_one_round_puts_round_one_above_lr():
    """The FedMLLM code's cosine_warm_learning_rate(r, lr, T, 0.01 T) with T = 50: W = 0.5."""
    cfg = TrainingConfig(lr=2.0, lr_schedule="cosine", warmup_fraction=0.01)
    assert round_lr(cfg, 1, 50) == pytest.approx(4.0)  # r = 0 < W: lr (0 + 1) / 0.5
    # r = 1: (1 + cos(pi (1 - 0.5) / 49.5)) / 2 · lr
    assert round_lr(cfg, 2, 50) == pytest.approx(1 + np.cos(np.pi * 0.5 / 49.5))
    assert round_lr(cfg, 50, 50) == pytest.approx(1 + np.cos(np.pi * 48.5 / 49.5))  # never reaches min_lr


def test_warmup_over_several_rounds_then_cosine_or_constant():
    cosine = TrainingConfig(lr=1.0, lr_schedule="cosine", min_lr=0.2, warmup_fraction=0.1)
    # T = 30: W = 3 warm-up rounds at 1/3, 2/3, 1; then 0.2 + 0.8 (1 + cos(pi (r - 3) / 27)) / 2
    assert [round_lr(cosine, r, 30) for r in (1, 2, 3)] == pytest.approx([1 / 3, 2 / 3, 1.0])
    assert round_lr(cosine, 4, 30) == pytest.approx(1.0)
    assert round_lr(cosine, 17, 30) == pytest.approx(0.2 + 0.4 * (1 + np.cos(np.pi * 13 / 27)))
    constant = TrainingConfig(lr=1.0, lr_schedule="constant", warmup_fraction=0.1)
    assert [round_lr(constant, r, 30) for r in (1, 2, 3, 4, 30)] == pytest.approx([1 / 3, 2 / 3, 1, 1, 1])


# --- batch_indices ----------------------------------------------------------------------------------------

SHARD = np.arange(100, 110)  # client shards hold global dataset indices, not 0..n-1


def _batches(cfg: TrainingConfig, seed: int = 0, shard: np.ndarray = SHARD) -> list[np.ndarray]:
    return list(batch_indices(shard, cfg, np.random.default_rng(seed)))


def test_epochs_cover_the_shard_once_per_epoch():
    batches = _batches(TrainingConfig(local_epochs=2, batch_size=4))
    assert [len(b) for b in batches] == [4, 4, 2, 4, 4, 2]
    for epoch in (batches[:3], batches[3:]):
        np.testing.assert_array_equal(np.sort(np.concatenate(epoch)), SHARD)
    # Each epoch reshuffles.
    assert not np.array_equal(np.concatenate(batches[:3]), np.concatenate(batches[3:]))


def test_steps_give_exactly_that_many_batches():
    batches = _batches(TrainingConfig(local_epochs=1, local_steps=5, batch_size=4))
    assert [len(b) for b in batches] == [4, 4, 2, 4, 4]  # wraps into a second shuffled pass
    np.testing.assert_array_equal(np.sort(np.concatenate(batches[:3])), SHARD)
    second = np.concatenate(batches[3:])
    assert len(set(second.tolist())) == 8 and set(second.tolist()) <= set(SHARD.tolist())


def test_steps_fewer_than_an_epoch():
    batches = _batches(TrainingConfig(local_epochs=3, local_steps=2, batch_size=3))
    assert [len(b) for b in batches] == [3, 3]
    assert len(set(np.concatenate(batches).tolist())) == 6


def test_batch_larger_than_shard():
    batches = _batches(TrainingConfig(local_epochs=2, batch_size=64))
    assert len(batches) == 2
    for b in batches:
        np.testing.assert_array_equal(np.sort(b), SHARD)


def test_batches_deterministic_by_rng():
    cfg = TrainingConfig(local_epochs=2, batch_size=3)
    same = zip(_batches(cfg, seed=1), _batches(cfg, seed=1), strict=True)
    assert all(np.array_equal(a, b) for a, b in same)
    assert not np.array_equal(np.concatenate(_batches(cfg, seed=1)), np.concatenate(_batches(cfg, seed=2)))


# --- seeding ----------------------------------------------------------------------------------------------


def test_derive_seed_deterministic_and_63_bit():
    seeds = [derive_seed(s, stream, 1, 2) for s in range(5) for stream in STREAMS]
    assert seeds == [derive_seed(s, stream, 1, 2) for s in range(5) for stream in STREAMS]
    assert all(0 <= x < 2**63 for x in seeds)
    assert len(set(seeds)) == len(seeds)  # seeds and streams do not collide


def test_derive_seed_distinct_per_round_and_client():
    seeds = {derive_seed(0, "client", r, c) for r in range(1, 21) for c in range(50)}
    assert len(seeds) == 20 * 50
    assert derive_seed(0, "client", 1, 2) != derive_seed(0, "client", 2, 1)  # coordinates are ordered


def test_unknown_stream():
    with pytest.raises(KeyError):
        derive_seed(0, "nope")


def test_rng_for_reproduces_draws():
    a = rng_for(7, "partition").random(5)
    np.testing.assert_array_equal(a, rng_for(7, "partition").random(5))
    assert not np.array_equal(a, rng_for(7, "data").random(5))


# --- output -----------------------------------------------------------------------------------------------


def _stray_temp_files(directory) -> list[str]:
    return [p.name for p in directory.iterdir() if p.name.startswith(".")]


def test_run_writer_creates_nested_dir(tmp_path):
    writer = RunWriter(tmp_path / "runs" / "a")
    assert writer.dir.is_dir()
    assert read_metrics(writer.dir) == []


def test_run_writer_refuses_a_finished_or_started_run(tmp_path):
    first = RunWriter(tmp_path / "run")
    first.log_round({"round": 1})
    with pytest.raises(FileExistsError, match="output.dir"):
        RunWriter(tmp_path / "run")
    other = tmp_path / "other"
    RunWriter(other).write_summary({"done": True})
    with pytest.raises(FileExistsError):
        RunWriter(other)


def test_run_writer_accepts_a_dir_with_only_a_config(tmp_path):
    RunWriter(tmp_path / "run").write_config("seed: 0\n")
    RunWriter(tmp_path / "run")  # no round logged yet: nothing to overwrite


def test_log_round_readable_after_each_call(tmp_path):
    writer = RunWriter(tmp_path / "run")
    records = [{"round": r, "loss": 1.0 / r, "clients": [r, r + 1]} for r in range(1, 4)]
    for n, record in enumerate(records, start=1):
        writer.log_round(record)
        assert read_metrics(writer.dir) == records[:n]
    lines = (writer.dir / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == records


def test_summary_and_config_written_without_temp_files(tmp_path):
    writer = RunWriter(tmp_path / "run")
    writer.write_config("seed: 0\n")
    writer.write_summary({"accuracy": 0.5, "rounds": 2})
    writer.write_summary({"accuracy": 0.75, "rounds": 3})  # replaces the earlier summary
    assert json.loads((writer.dir / "summary.json").read_text()) == {"accuracy": 0.75, "rounds": 3}
    assert (writer.dir / "config.yaml").read_text() == "seed: 0\n"
    assert _stray_temp_files(writer.dir) == []


def test_atomic_write_keeps_old_file_when_write_fails(tmp_path):
    path = tmp_path / "summary.json"
    atomic_write_text(path, "old\n")
    with pytest.raises(TypeError):
        atomic_write_bytes(path, 123)  # fails inside f.write, after the temp file exists
    assert path.read_text() == "old\n"
    assert os.listdir(tmp_path) == ["summary.json"]


def test_atomic_write_failure_without_previous_file(tmp_path):
    path = tmp_path / "config.yaml"
    with pytest.raises(TypeError):
        atomic_write_bytes(path, None)  # fails inside f.write
    assert os.listdir(tmp_path) == []


def test_derive_seed_tells_trailing_zero_coordinates_apart():
    assert derive_seed(0, "client", 1, 0) != derive_seed(0, "client", 1)
    assert derive_seed(3, "cohort") != derive_seed(3, "cohort", 0)
    with pytest.raises(ValueError, match="2\\*\\*32"):
        derive_seed(0, "client", 2**32)


def test_an_empty_shard_cannot_train():
    with pytest.raises(ValueError, match="min_samples"):
        next(batch_indices(np.array([], dtype=np.int64), TrainingConfig(local_steps=3), np.random.default_rng(0)))
