"""The server side of a run: guard in front of a sync or async strategy, with counted outcomes."""

import logging
import math
import random

import pytest
import torch

from fedsim.aggregator import Aggregator
from fedsim.algorithms import build_server_strategy
from fedsim.algorithms.fixedpoint import FIXED_POINT_BITS
from fedsim.config import ServerAlgoConfig
from fedsim.guard import UpdateGuard
from fedsim.messages import ClientUpdate, NamedTensors, Published


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


# The flat, vectorized fixed-point path against the per-tensor arithmetic it replaced, on an adapter-like layout.
SHAPES = {"q.lora_A": (4, 16), "q.lora_B": (16, 4), "v.lora_B": (8, 4), "scale": (), "empty": (0, 3), "bias": (5,)}


def random_updates(seed: int, count: int = 12) -> list[ClientUpdate]:
    """Deltas of LoRA size (1e-6 to 1e-3), some in bfloat16, each listing its tensors in its own order, from
    clients of 1 to 8 samples: small means, whose float32 bits show each term's fixed-point rounding."""
    g = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    updates = []
    for client in range(count):
        scale = 10.0 ** float(torch.randint(-6, -2, (1,), generator=g))
        delta = {k: torch.randn(shape, generator=g) * scale for k, shape in SHAPES.items()}
        if rng.random() < 0.3:
            delta["q.lora_B"] = delta["q.lora_B"].to(torch.bfloat16)
        names = rng.sample(list(delta), len(delta))
        extras = {f"control/{k}": torch.randn(SHAPES[k], generator=g) for k in names}
        updates.append(ClientUpdate(client, {k: delta[k] for k in names}, rng.randint(1, 8), extras=extras))
    return updates


def per_tensor_mean(groups: list[NamedTensors], weights: list[float], divisor: float) -> NamedTensors:
    """The fixed-point weighted mean written plainly, tensor by tensor: Σ round(w·x·2**32) / 2**32 / divisor."""
    mean = {}
    for k, shape in SHAPES.items():
        total = torch.zeros(shape, dtype=torch.int64)
        for tensors, w in zip(groups, weights):
            total += tensors[k].to(torch.float64).mul(w).mul_(2.0 ** FIXED_POINT_BITS).round_().to(torch.int64)
        mean[k] = (total.to(torch.float64) / 2.0 ** FIXED_POINT_BITS / divisor).to(torch.float32)
    return mean


def run_round(name: str, initial: NamedTensors, updates: list[ClientUpdate]) -> Published:
    agg = Aggregator(build_server_strategy(ServerAlgoConfig(name=name, weighting="samples"), num_clients=50,
                                           client_sizes=list(range(1, 51))), UpdateGuard(max_norm=1e9))
    agg.init(initial)
    assert all(agg.submit(u) == "accepted" for u in updates)
    agg.close_round()
    return agg.snapshot()[1]


def same_bits(a: NamedTensors, b: NamedTensors) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k].view(torch.int32), b[k].view(torch.int32)) for k in a)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_flat_sums_equal_the_per_tensor_reference_bit_for_bit_in_any_arrival_order(seed: int):
    updates = random_updates(seed)
    initial = {k: torch.randn(shape, generator=torch.Generator().manual_seed(99)) * 1e-4 for k, shape in SHAPES.items()}
    arrival = random.Random(seed).sample(updates, len(updates))
    weights = [float(u.num_samples) for u in arrival]
    mean = per_tensor_mean([u.delta for u in arrival], weights, sum(weights))
    expected = {k: initial[k].clone().add_(mean[k], alpha=1.0) for k in SHAPES}  # FedAvg, server lr 1
    weights_after, _ = run_round("fedavg", initial, arrival)
    assert same_bits(weights_after, expected)

    # SCAFFOLD: two flat sums side by side; its control variate divides by the population's samples.
    controls = per_tensor_mean([{k[len("control/"):]: t for k, t in u.extras.items()} for u in arrival], weights,
                               sum(range(1, 51)))
    weights_after, extras = run_round("scaffold", initial, arrival)
    assert same_bits(weights_after, expected)
    assert same_bits({k[len("control/"):]: t for k, t in extras.items()}, controls)


def test_the_result_does_not_depend_on_the_arrival_order_where_float_sums_would():
    updates = random_updates(seed=3, count=20)
    initial = {k: torch.zeros(shape) for k, shape in SHAPES.items()}
    orders = [random.Random(i).sample(updates, len(updates)) for i in range(6)]
    results = [run_round("fedavg", initial, order)[0] for order in orders]
    assert all(same_bits(r, results[0]) for r in results[1:])
    # The inputs have teeth: a float32 running sum of the same weighted deltas does depend on the order.
    float_sums = [sum(u.num_samples * u.delta["q.lora_A"].float() for u in order) for order in orders]
    assert any(not torch.equal(s, float_sums[0]) for s in float_sums[1:])


def test_the_cheap_range_bound_falls_back_to_the_exact_check():
    agg = aggregator()
    # The terms' peaks add up beyond 2**62 after the second update, but the sum itself stays in range.
    assert [agg.submit(update(i, v)) for i, v in enumerate([6e8, -6e8, 6e8])] == ["accepted"] * 3
    assert agg.submit(update(3, 6e8)) == "rejected"  # now the sum would be 1.2e9 > 2**30
    agg.close_round()
    assert torch.equal(agg.snapshot()[1][0]["w"], torch.full((2,), 2e8))


def test_a_fault_is_named_by_its_tensor_and_finite_values_with_an_infinite_sum_are_not_non_finite(caplog):
    agg = Aggregator(build_server_strategy(ServerAlgoConfig(), num_clients=4), UpdateGuard())
    agg.init({"a": torch.zeros(3), "b": torch.zeros(2), "c": torch.zeros(1)})
    # float32 3e38 + 3e38 overflows to inf, yet every value is finite: beyond the fixed-point range, not NaN/Inf
    huge = ClientUpdate(0, {"a": torch.zeros(3), "b": torch.full((2,), 3e38), "c": torch.ones(1)}, 1)
    with caplog.at_level(logging.WARNING):
        assert agg.submit(huge) == "rejected"
    assert agg.stats()["rejected_by_reason"] == {"overflow": 1}
    assert "delta 'b'" in caplog.text
