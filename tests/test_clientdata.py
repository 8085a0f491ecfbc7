"""Per-client synthetic data (``data.samples_per_client``): rows derived on demand from (seed, client, row), and
the cohort draw that costs the same at any number of clients."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import small_config
from fedsim.clientdata import BLOCK, GeneratedClients, PartitionedClients, load_client_data
from fedsim.config import ConfigError
from fedsim.engine import run_sequential
from fedsim.scheduler.availability import AlwaysAvailable, BernoulliAvailability
from fedsim.scheduler.planner import SyncPlanner


def generated(tmp_path, *overrides: str) -> GeneratedClients:
    data = load_client_data(small_config(tmp_path, "data.samples_per_client=6", "data.num_test=8", *overrides))
    assert isinstance(data, GeneratedClients)
    return data


def same_rows(a: list[dict], b: list[dict]) -> bool:
    return all(x["text"] == y["text"] and x["label"] == y["label"]
               and np.array_equal(np.asarray(x["image"]), np.asarray(y["image"])) for x, y in zip(a, b))


def test_a_row_depends_on_seed_client_and_row_only(tmp_path):
    data = generated(tmp_path, "partition.num_clients=1000000")
    rows = data.samples(123_456, np.arange(6))
    assert same_rows(data.samples(123_456, np.array([4, 1])), [rows[4], rows[1]])  # any subset, any order
    assert same_rows(generated(tmp_path / "again", "partition.num_clients=10").samples(7, np.arange(6)),
                     data.samples(7, np.arange(6)))  # whatever N is
    assert not same_rows(data.samples(123_457, np.arange(6)), rows)
    assert not same_rows(generated(tmp_path / "s1", "partition.num_clients=1000000", "seed=1").samples(
        123_456, np.arange(6)), rows)
    assert all(row["source"] == "synthetic/classification" for row in rows)
    assert len(data.shard(999_999)) == 6 and data.shard_sizes().shape == (1_000_000,)


def test_quantity_skew_sizes_agree_one_by_one_and_all_at_once(tmp_path):
    n = BLOCK + 500  # two blocks of draws
    data = generated(tmp_path, f"partition.num_clients={n}", "partition.scheme=quantity", "partition.alpha=0.5",
                     "partition.min_samples=2")
    sizes = data.shard_sizes()
    picks = [0, 17, BLOCK - 1, BLOCK, n - 1]
    assert [data.shard_size(c) for c in picks] == sizes[picks].tolist()
    assert sizes.min() == 2 and sizes.max() > 30  # Gamma(0.5) sizes: many at the floor, a long tail
    assert abs(sizes.mean() - 6) < 0.3


def test_label_skew_rows_follow_each_clients_mix(tmp_path):
    data = generated(tmp_path, "partition.num_clients=100", "partition.scheme=dirichlet", "partition.alpha=0.1",
                     "data.samples_per_client=40")
    for client in (3, 50):
        wanted = data.labels(client)
        assert [row["label"] for row in data.samples(client, np.arange(40))] == wanted.tolist()
    # alpha = 0.1: most clients hold one or two of the four classes
    dominant = [np.bincount(data.labels(c), minlength=4).max() / 40 for c in range(100)]
    assert np.median(dominant) > 0.7
    assert generated(tmp_path / "iid", "partition.num_clients=100", "partition.scheme=iid").labels(3) is None


def test_fixed_split_configs_keep_their_partition(tmp_path):
    assert isinstance(load_client_data(small_config(tmp_path)), PartitionedClients)


@pytest.mark.parametrize("override, key", [
    ("data.dataset=vqa_rad", "data.samples_per_client"),
    ("data.scenarios.missing.beta=0.5", "data.scenarios"),
])
def test_generated_clients_refuse_what_they_cannot_do(tmp_path, override, key):
    with pytest.raises(ConfigError, match=key):
        small_config(tmp_path, "data.samples_per_client=4", override)


def test_cohort_of_everyone_online_is_the_draw_over_all_ids(tmp_path):
    """The O(K) draw for always-available clients picks what the draw over the id list picks."""
    scheduler = small_config(tmp_path).scheduler
    for n in (50, 1_000_000):
        fast = SyncPlanner(scheduler, n, 20, 0, availability=AlwaysAvailable(n))
        listed = SyncPlanner(scheduler, n, 20, 0, availability=BernoulliAvailability(n, 1.0, 0))
        for round_idx in range(3):
            assert fast.select(round_idx, 0.0).dispatched == listed.select(round_idx, 0.0).dispatched


@pytest.mark.slow
def test_a_million_clients_federate_in_process(tmp_path):
    cfg = small_config(tmp_path, "partition.num_clients=1000000", "data.samples_per_client=4",
                       "federation.clients_per_round=3", "federation.rounds=1", "training.batch_size=4",
                       "data.num_test=16", "eval.zero_shot=false", "checkpoint.every=0")
    summary = run_sequential(cfg, tmp_path / "run")
    assert summary["num_clients"] == 1_000_000 and summary["client_updates"] == 3
