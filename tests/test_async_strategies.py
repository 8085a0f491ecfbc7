"""Asynchronous server strategies (FedBuff, FedAsync) against hand-computed numbers on 2-element tensors."""

from __future__ import annotations

import math
import random

import pytest
import torch

from fedsim.algorithms import AsyncServerStrategy, build_server_strategy
from fedsim.config import ServerAlgoConfig
from fedsim.messages import ClientUpdate


def make(name: str, x0=(0.0, 0.0), **cfg) -> AsyncServerStrategy:
    s = build_server_strategy(ServerAlgoConfig(name=name, **cfg), 4)
    assert isinstance(s, AsyncServerStrategy) and s.asynchronous
    s.init({"w": torch.tensor(x0)})
    s.history = {0: s.global_weights}
    return s


def upd(delta, base: int = 0, n: int = 1, cid: int = 0) -> ClientUpdate:
    return ClientUpdate(client_id=cid, delta={"w": torch.tensor(delta)}, num_samples=n, base_version=base)


def offer(s: AsyncServerStrategy, update: ClientUpdate) -> bool:
    """``s.offer`` with the global weights of the version the update was trained from, as the loop passes
    them; ``s.history`` (set by ``make``) keeps every version the strategy has published."""
    kept = s.offer(update, s.history[update.base_version])
    s.history.setdefault(s.version, s.global_weights)
    return kept


def close(t: torch.Tensor, expected) -> bool:
    return torch.allclose(t, torch.tensor(expected, dtype=torch.float32), rtol=1e-6, atol=1e-7)


def test_defaults() -> None:
    for name in ("fedbuff", "fedasync"):
        s = make(name)
        assert s.lr == 1.0 and s.weighting == "uniform" and not s.personalized and s.trains
    assert make("fedbuff", weighting="samples").weighting == "samples"


@pytest.mark.parametrize("exponent, staleness, expected", [
    (0.5, 0, 1.0), (0.5, 3, 0.5), (1.0, 1, 0.5), (1.0, 4, 0.2), (0.0, 9, 1.0),
])
def test_staleness_weight(exponent: float, staleness: int, expected: float) -> None:
    assert math.isclose(make("fedbuff", staleness_exponent=exponent).staleness_weight(staleness), expected)


@pytest.mark.parametrize("exponent, w2", [(0.5, 1 / math.sqrt(3)), (1.0, 1 / 3)])
def test_fedbuff_two_updates_per_step_with_staleness(exponent: float, w2: float) -> None:
    s = make("fedbuff", buffer_size=2, staleness_exponent=exponent)
    # step 1 (version 0 -> 1): both fresh;  x = ([1, 2] + [3, 0]) / 2 = [2, 1]
    assert s.offer(upd([1.0, 2.0])) and s.pending == 1 and s.version == 0
    assert close(s.global_weights["w"], [0.0, 0.0])  # buffered, not applied
    assert s.offer(upd([3.0, 0.0], cid=1))
    assert s.pending == 0 and s.version == 1 and close(s.global_weights["w"], [2.0, 1.0])
    # step 2 (1 -> 2): both trained from version 1;  x = [2, 1] + ([0, 0] + [2, -2]) / 2 = [3, 0]
    s.offer(upd([0.0, 0.0], base=1))
    s.offer(upd([2.0, -2.0], base=1))
    assert s.version == 2 and close(s.global_weights["w"], [3.0, 0.0])
    # step 3 (2 -> 3): staleness 2 (w2 = 3**-a) and 0;  x = [3, 0] + (w2·[3, 3] + [1, 0]) / 2
    s.offer(upd([3.0, 3.0], base=0))
    s.offer(upd([1.0, 0.0], base=2))
    assert s.version == 3
    assert close(s.global_weights["w"], [3 + (3 * w2 + 1) / 2, 3 * w2 / 2])
    assert s.staleness_counts == {0: 5, 2: 1}


def test_fedbuff_sample_weighting_and_server_lr() -> None:
    s = make("fedbuff", buffer_size=2, staleness_exponent=1.0, lr=0.5, weighting="samples")
    # x ← x + η Σ n_i w(s_i) Δ_i / Σ n_i:  0.5 · (1·[2, 0] + 3·[0, 4]) / 4 = [0.25, 1.5]
    s.offer(upd([2.0, 0.0], n=1))
    s.offer(upd([0.0, 4.0], n=3))
    assert close(s.global_weights["w"], [0.25, 1.5])
    # staleness 1 (w = 0.5) with n = 2, staleness 0 with n = 2:
    # x += 0.5 · (2·0.5·[4, 4] + 2·[0, 2]) / 4 = [0.5, 1]
    s.offer(upd([4.0, 4.0], base=0, n=2))
    s.offer(upd([0.0, 2.0], base=1, n=2))
    assert close(s.global_weights["w"], [0.75, 2.5])
    with pytest.raises(ValueError, match="samples"):
        s.offer(upd([1.0, 1.0], base=2, n=0))
    assert s.pending == 0 and s.staleness_counts == {0: 3, 1: 1}


def test_fedbuff_flush_applies_a_partial_buffer() -> None:
    s = make("fedbuff", x0=(1.0, 1.0), buffer_size=3)
    assert not s.flush()  # nothing buffered: no step
    s.offer(upd([1.0, 0.0]))
    s.offer(upd([0.0, 3.0]))
    with pytest.raises(RuntimeError, match="flush"):
        s.finalize()
    # mean over the 2 buffered updates: x = [1, 1] + [0.5, 1.5]
    assert s.flush()
    assert s.version == 1 and s.pending == 0 and close(s.global_weights["w"], [1.5, 2.5])
    assert not s.flush() and s.version == 1
    assert close(s.finalize()["w"], [1.5, 2.5])


def test_fedbuff_order_within_a_buffer_is_irrelevant() -> None:
    g = torch.Generator().manual_seed(0)
    updates = [ClientUpdate(client_id=i, delta={"w": torch.randn(64, generator=g)}, num_samples=i + 1,
                            base_version=0) for i in range(8)]
    results = []
    for seed in range(4):
        s = build_server_strategy(ServerAlgoConfig(name="fedbuff", buffer_size=8, weighting="samples"), 8)
        s.init({"w": torch.zeros(64)})
        for u in random.Random(seed).sample(updates, len(updates)):
            s.offer(u)
        assert s.version == 1
        results.append(s.global_weights["w"])
    assert all(torch.equal(r, results[0]) for r in results)


def test_fedbuff_buffer_is_one_int64_tensor_per_name() -> None:
    s = make("fedbuff", buffer_size=1000)
    for i in range(100):
        s.offer(upd([float(i), 1.0]))
    assert list(s._sum) == ["w"] and s._sum["w"].dtype == torch.int64 and s.pending == 100


@pytest.mark.parametrize("rule", ["mix", "delta"])
@pytest.mark.parametrize("exponent", [0.5, 1.0])
def test_fedasync_mixes_each_update(exponent: float, rule: str) -> None:
    s = make("fedasync", x0=(1.0, 1.0), mixing=0.5, staleness_exponent=exponent, fedasync_rule=rule)
    # fresh: α = 0.5, x_base = x = [1, 1]; both rules: x = [1, 1] + 0.5·[2, -2] = [2, 0]
    assert offer(s, upd([2.0, -2.0])) and s.version == 1 and s.pending == 0
    assert close(s.global_weights["w"], [2.0, 0.0])
    # staleness 1 (trained from version 0, x_base = [1, 1]): α = 0.5 · 2**-a
    alpha = 0.5 * 2 ** -exponent
    assert math.isclose(s.mixing_weight(1), alpha)
    assert offer(s, upd([4.0, 4.0], base=0))
    if rule == "mix":  # Xie et al.: x = (1 − α)·[2, 0] + α·(x_base + Δ) = (1 − α)·[2, 0] + α·[5, 5]
        x2 = [(1 - alpha) * 2 + alpha * 5, alpha * 5]
    else:  # FLSim: x = [2, 0] + α·[4, 4]
        x2 = [2 + 4 * alpha, 4 * alpha]
    assert s.version == 2 and close(s.global_weights["w"], x2)
    assert s.staleness_counts == {0: 1, 1: 1}
    assert not s.flush() and close(s.finalize()["w"], x2)


def test_fedasync_mix_needs_the_base_version() -> None:
    s = make("fedasync")
    with pytest.raises(ValueError, match="version 0"):
        s.offer(upd([1.0, 1.0]))
    assert s.version == 0 and s.staleness_counts == {}


def test_fedasync_server_lr_scales_the_step() -> None:
    s = make("fedasync", mixing=0.5, lr=0.5)
    offer(s, upd([4.0, 8.0]))
    assert close(s.global_weights["w"], [1.0, 2.0])


@pytest.mark.parametrize("name", ["fedbuff", "fedasync"])
def test_max_staleness_drops_and_counts(name: str) -> None:
    s = make(name, buffer_size=1, max_staleness=1)
    for v in range(3):  # versions 0 -> 3
        assert offer(s, upd([1.0, 1.0], base=v))
    before = s.global_weights["w"]
    assert offer(s, upd([5.0, 5.0], base=2))  # staleness 1: kept
    assert not offer(s, upd([5.0, 5.0], base=1))  # staleness 3: dropped
    assert not offer(s, upd([5.0, 5.0], base=0))  # staleness 4: dropped
    assert s.stale_dropped == 2 and s.version == 4 and s.pending == 0
    assert s.staleness_counts == {0: 3, 1: 1, 3: 1, 4: 1}
    assert not torch.equal(s.global_weights["w"], before)
    summary = s.staleness_summary()
    assert summary == {"offered": 6, "stale_dropped": 2, "staleness_mean": 8 / 6, "staleness_max": 4}


@pytest.mark.parametrize("name", ["fedbuff", "fedasync"])
def test_invalid_updates_leave_no_trace(name: str) -> None:
    s = make(name, buffer_size=2)
    with pytest.raises(ValueError, match="ahead of the server's version 0"):
        s.offer(upd([1.0, 1.0], base=1))
    with pytest.raises(ValueError, match="'w'"):
        s.offer(upd([1.0, 1.0, 1.0]))
    with pytest.raises(ValueError, match="non-finite"):
        s.offer(upd([float("inf"), 1.0]))
    assert s.staleness_counts == {} and s.pending == 0 and s.version == 0
    assert close(s.global_weights["w"], [0.0, 0.0])
    with pytest.raises(RuntimeError, match="offer"):
        s.accumulate(upd([1.0, 1.0]), 1.0)


@pytest.mark.parametrize("cfg, key", [
    (dict(name="fedbuff", buffer_size=0), "buffer_size"),
    (dict(name="fedbuff", staleness_exponent=-0.5), "staleness_exponent"),
    (dict(name="fedbuff", max_staleness=-1), "max_staleness"),
    (dict(name="fedasync", mixing=0.0), "mixing"),
    (dict(name="fedasync", mixing=1.5), "mixing"),
    (dict(name="fedasync", weighting="samples"), "weighting"),
])
def test_config_errors_name_the_key(cfg: dict, key: str) -> None:
    with pytest.raises(ValueError, match=f"algorithm.server.{key}"):
        build_server_strategy(ServerAlgoConfig(**cfg), 4)


@pytest.mark.parametrize("name", ["fedbuff", "fedasync"])
def test_state_dict_round_trip_mid_buffer(name: str, tmp_path) -> None:
    from safetensors.torch import load_file, save_file

    def feed(s: AsyncServerStrategy, start: int, stop: int) -> None:
        for i in range(start, stop):
            offer(s, upd([0.3 * i + 0.1, -0.2 * i], base=max(0, s.version - i % 4), n=i + 1, cid=i))

    cfg = dict(name=name, buffer_size=3, staleness_exponent=0.5, max_staleness=1, lr=0.7)
    a = make(**cfg, x0=(1.0, -1.0))
    empty = a.state_dict()
    assert empty["staleness_hist"].shape == (0,)
    feed(a, 0, 9)
    path = tmp_path / "server.safetensors"
    save_file(a.state_dict(), str(path))
    b = build_server_strategy(ServerAlgoConfig(**cfg), 4)
    b.load_state_dict(load_file(str(path)))
    b.history = dict(a.history)  # the published versions in-flight tasks trained from travel with a checkpoint
    assert (b.version, b.pending, b.staleness_counts, b.stale_dropped) == \
        (a.version, a.pending, a.staleness_counts, a.stale_dropped)
    assert a.stale_dropped > 0 and len(a.staleness_counts) > 1
    if name == "fedbuff":
        assert a.pending > 0  # checkpointed mid-buffer
    feed(a, 9, 14)
    feed(b, 9, 14)
    a.flush()
    b.flush()
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    hist = sa["staleness_hist"]
    assert hist.dtype == torch.int64 and int(hist.sum()) == 14
    assert all(hist[s] == c for s, c in a.staleness_counts.items())


def test_load_state_dict_rejects_mismatches() -> None:
    with pytest.raises(ValueError, match="staleness_hist"):
        build_server_strategy(ServerAlgoConfig(name="fedbuff"), 4).load_state_dict(_sync_state())
    state = make("fedasync").state_dict()
    with pytest.raises(ValueError, match="buffer"):
        build_server_strategy(ServerAlgoConfig(name="fedbuff"), 4).load_state_dict(state)
    state = make("fedbuff").state_dict()
    with pytest.raises(ValueError, match="unexpected"):
        build_server_strategy(ServerAlgoConfig(name="fedasync"), 4).load_state_dict(state)


def _sync_state() -> dict[str, torch.Tensor]:
    s = build_server_strategy(ServerAlgoConfig(name="fedavg"), 4)
    s.init({"w": torch.zeros(2)})
    return s.state_dict()
