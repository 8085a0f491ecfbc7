"""The server side of a run: guard in front of a sync or async strategy, with counted outcomes."""

import torch

from fedsim.aggregator import Aggregator
from fedsim.algorithms import build_server_strategy
from fedsim.config import ServerAlgoConfig
from fedsim.guard import UpdateGuard
from fedsim.messages import ClientUpdate


def update(client: int, value: float, base_version: int = 0) -> ClientUpdate:
    return ClientUpdate(client, {"w": torch.tensor([value, value])}, num_samples=1, base_version=base_version)


def aggregator(max_norm: float = 0.0, **server) -> Aggregator:
    agg = Aggregator(build_server_strategy(ServerAlgoConfig(**server), num_clients=4), UpdateGuard(max_norm))
    agg.init({"w": torch.zeros(2)})
    return agg


def test_rejected_updates_are_counted_and_leave_the_model_untouched():
    agg = aggregator(max_norm=1.0)
    assert agg.submit(update(0, float("nan"))) == "rejected"
    assert agg.submit(update(1, 5.0)) == "rejected"  # norm 7.07 > 1
    assert agg.submit(update(2, 0.5)) == "accepted"
    assert agg.close_round() == 1
    version, (weights, extras) = agg.snapshot()
    assert version == 1 and torch.equal(weights["w"], torch.tensor([0.5, 0.5])) and extras == {}
    stats = agg.stats()
    assert stats["rejected_updates"] == 2 and stats["accepted_updates"] == 1
    assert stats["rejected_by_reason"] == {"non_finite": 1, "norm": 1}


def test_async_updates_beyond_max_staleness_are_dropped_and_counted():
    agg = aggregator(name="fedbuff", buffer_size=1, max_staleness=1)
    assert agg.submit(update(0, 1.0, base_version=0)) == "accepted"  # staleness 0 -> version 1
    assert agg.submit(update(1, 1.0, base_version=0)) == "accepted"  # staleness 1 -> version 2
    assert agg.submit(update(2, 1.0, base_version=0)) == "stale"  # staleness 2 > 1
    assert agg.version == 2
    stats = agg.stats()
    assert stats["stale_updates"] == 1
    assert stats["staleness_histogram"] == {"0": 1, "1": 1, "2": 1}


def test_digest_follows_the_global_weights():
    agg = aggregator()
    before = agg.stats()["adapter_sha256"]
    agg.submit(update(0, 1.0))
    assert agg.stats()["adapter_sha256"] == before  # nothing applied until the round closes
    agg.close_round()
    assert agg.stats()["adapter_sha256"] != before
