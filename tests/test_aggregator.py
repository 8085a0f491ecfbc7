"""The server side of a run: guard in front of a sync or async strategy, with counted outcomes."""

import math

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


def test_any_fault_while_folding_an_update_rejects_it_by_reason_and_the_run_goes_on():
    agg = Aggregator(build_server_strategy(ServerAlgoConfig(name="scaffold"), num_clients=4), UpdateGuard())
    agg.init({"w": torch.zeros(2)})
    control = {"control/w": torch.ones(2)}
    faults = {
        "overflow": ClientUpdate(0, {"w": torch.tensor([1e10, 0.0])}, 1, extras=control),
        "mismatch": ClientUpdate(1, {"w": torch.ones(3)}, 1, extras=control),  # a shape from another model
        "mismatch ": ClientUpdate(2, {"v": torch.ones(2)}, 1, extras=control),  # a name from another model
        "missing control": ClientUpdate(3, {"w": torch.ones(2)}, 1),
        "non_finite": ClientUpdate(0, {"w": torch.ones(2)}, 1, extras={"control/w": torch.tensor([0.0, -math.inf])}),
    }
    for update in faults.values():
        assert agg.submit(update) == "rejected"
    assert agg.submit(ClientUpdate(1, {"w": torch.ones(2)}, 1, extras=control)) == "accepted"
    assert agg.close_round() == 1
    assert torch.equal(agg.snapshot()[1][0]["w"], torch.ones(2))  # only the good update reached the model
    assert torch.equal(agg.snapshot()[1][1]["control/w"], torch.full((2,), 0.25))
    stats = agg.stats()
    assert stats["rejected_updates"] == 5 and stats["accepted_updates"] == 1
    assert stats["rejected_by_reason"] == {"overflow": 1, "mismatch": 3, "non_finite": 1}


def test_a_running_sum_about_to_wrap_rejects_the_update_that_would_wrap_it():
    agg = aggregator()
    assert agg.submit(update(0, 6e8)) == "accepted"
    assert agg.submit(update(1, 6e8)) == "rejected"  # 1.2e9 is beyond the fixed-point range of ±2**30
    assert agg.submit(update(2, -1e8)) == "accepted"
    agg.close_round()
    assert torch.equal(agg.snapshot()[1][0]["w"], torch.full((2,), 2.5e8))  # the mean of the two accepted
    assert agg.stats()["rejected_by_reason"] == {"overflow": 1}


def test_an_async_update_ahead_of_the_server_or_without_its_base_is_rejected():
    agg = aggregator(name="fedasync")
    base = agg.snapshot()[1]
    assert agg.submit(update(0, 1.0, base_version=3), base) == "rejected"  # from a version not yet published
    assert agg.submit(update(1, 1.0)) == "rejected"  # fedasync_rule=mix without the version it trained from
    assert agg.submit(update(2, 1.0), base) == "accepted"
    assert agg.version == 1
    assert agg.stats()["rejected_by_reason"] == {"ahead_of_server": 1, "missing_base": 1}
