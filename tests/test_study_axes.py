"""Privacy, attacks, compression and robust rules wired into a run: the order an update goes through, the
server's clipping and noise, the attackers, the robust strategies and the refusals (no model: plain tensors)."""

import dataclasses
import random

import numpy as np
import pytest
import torch

from fedsim import compression, privacy
from fedsim.aggregator import accountant_for, build_aggregator
from fedsim.attacks import attack, choose_attackers
from fedsim.config import ConfigError, merge_config
from fedsim.messages import ClientUpdate
from fedsim.seeding import derive_seed
from fedsim.uplink import RESIDUAL, Uplink
from fedsim.validation import validate

BASE = ["partition.num_clients=20", "federation.clients_per_round=5", "data.num_train=200"]


def config(*overrides: str):
    cfg = merge_config(None, [*BASE, *overrides])
    validate(cfg)
    return cfg


def delta(*values: float) -> dict[str, torch.Tensor]:
    return {"a": torch.tensor(values[:2], dtype=torch.float32), "b": torch.tensor(values[2:], dtype=torch.float32)}


def built(cfg, weights=None):
    agg = build_aggregator(cfg, [10] * cfg.partition.num_clients)
    agg.init(weights or delta(0, 0, 0))
    return agg


# ---------------------------------------------------------------------------------------------- attackers
def test_attackers_are_a_seeded_fraction_and_each_attack_does_what_it_says():
    cfg = config("attack.kind=sign_flip", "attack.fraction=0.3", "attack.scale=2")
    ids = choose_attackers(cfg)
    assert len(ids) == 6 and list(ids) == sorted(set(ids.tolist()))
    assert np.array_equal(ids, choose_attackers(config("attack.kind=gaussian", "attack.fraction=0.3")))
    assert not np.array_equal(ids, choose_attackers(config("attack.kind=sign_flip", "attack.fraction=0.3", "seed=1")))
    assert len(choose_attackers(config())) == 0
    d = delta(1, -2, 3)
    assert torch.equal(attack(d, cfg, 0, 0)["a"], torch.tensor([-2.0, 4.0]))
    assert all(not t.any() for t in attack(d, config("attack.kind=free_rider", "attack.fraction=0.1"), 0, 0).values())
    scaled = config("attack.kind=scale", "attack.fraction=0.1", "attack.scale=0", "algorithm.server.lr=0.5")
    assert torch.equal(attack(d, scaled, 0, 0)["b"], torch.tensor([30.0]))  # K / lr = 5 / 0.5
    noisy = config("attack.kind=gaussian", "attack.fraction=0.1", "attack.scale=3")
    first, again, other = (attack(d, noisy, 4, c) for c in (7, 7, 8))
    assert torch.equal(first["a"], again["a"]) and not torch.equal(first["a"], other["a"])


def test_the_uplink_applies_attack_then_local_noise_then_compression_and_keeps_the_residual():
    cfg = config("attack.kind=sign_flip", "attack.fraction=1.0", "privacy.mode=local", "privacy.clip_norm=1",
                 "privacy.noise_multiplier=0.5", "compression.kind=topk", "compression.density=0.3")
    uplink = Uplink(cfg)
    d, residual = delta(3, -4, 0), {RESIDUAL + "a": torch.tensor([0.5, 0.0]), RESIDUAL + "b": torch.tensor([0.0])}
    sent, kept = uplink.send(d, 2, 5, {**residual, "c/a": torch.ones(2)})
    flipped = {k: -t for k, t in d.items()}
    clipped, norm = privacy.clip_update(flipped, 1.0)
    noise = privacy.gaussian_noise(clipped, 0.5, derive_seed(cfg.seed, "local_dp", 2, 5))
    expected, new = compression.compress({k: clipped[k] + noise[k] for k in d}, "topk", 0.3,
                                         {"a": torch.tensor([0.5, 0.0]), "b": torch.tensor([0.0])}, True,
                                         derive_seed(cfg.seed, "compress", 2, 5))
    assert norm == 5.0
    assert all(torch.equal(sent[k], expected[k]) for k in d)
    assert set(kept) == {RESIDUAL + "a", RESIDUAL + "b"} and torch.equal(kept[RESIDUAL + "a"], new["a"])
    assert sum(int((t != 0).sum()) for t in sent.values()) == 1  # k = ceil(0.3 * 3)


# ---------------------------------------------------------------------------------------------- central DP
def test_central_dp_clips_each_update_and_noises_the_sum_once_over_a_fixed_denominator():
    cfg = config("privacy.mode=central", "privacy.clip_norm=1", "privacy.noise_multiplier=0.5")
    agg = built(cfg)
    assert agg.strategy.weighting == "uniform"  # auto resolves to uniform under DP
    updates = [delta(3, 4, 0), delta(0.3, 0, 0.4), delta(0, 0, -2)]  # norms 5, 0.5, 2
    for client, d in enumerate(updates):
        assert agg.submit(ClientUpdate(client, d, num_samples=10 * (client + 1))) == "accepted"
    agg.close_round()
    clipped = [privacy.clip_update(d, 1.0)[0] for d in updates]
    summed = {k: sum(c[k] for c in clipped) for k in ("a", "b")}
    noise = privacy.gaussian_noise(summed, 0.5, derive_seed(cfg.seed, "central_dp", 1))
    _, (weights, _) = agg.snapshot()
    for k in summed:  # divided by K = 5, not by the 3 that reported
        assert torch.allclose(weights[k], (summed[k] + noise[k]) / 5, atol=1e-6)


def test_central_dp_under_fedbuff_steps_with_the_buffer_size_as_denominator():
    cfg = config("privacy.mode=central", "privacy.clip_norm=10", "privacy.noise_multiplier=1e-9",
                 "algorithm.server.name=fedbuff", "algorithm.server.buffer_size=2",
                 "algorithm.server.staleness_exponent=0")
    agg = built(cfg)
    agg.submit(ClientUpdate(0, delta(1, 1, 1), 1))
    agg.submit(ClientUpdate(1, delta(3, 3, 3), 1))
    assert agg.version == 1
    assert torch.allclose(agg.snapshot()[1][0]["a"], torch.tensor([2.0, 2.0]), atol=1e-6)


def test_adaptive_clipping_moves_the_clip_norm_and_a_checkpoint_keeps_it():
    cfg = config("privacy.mode=central", "privacy.clip_norm=1", "privacy.noise_multiplier=1",
                 "privacy.adaptive_clip=true", "privacy.count_noise_std=1")
    agg = built(cfg)
    for client in range(5):  # every norm far above the clip norm: it grows
        agg.submit(ClientUpdate(client, delta(30, 40, 0), 1))
    agg.close_round()
    grown = agg.stats()["clip_norm"]
    assert grown > 1.0
    tensors, counts = agg.state()
    again = built(cfg)
    again.restore(tensors, counts)
    assert again.stats()["clip_norm"] == grown


def test_the_accountant_follows_the_cohort_and_the_library():
    central = accountant_for(config("privacy.mode=central", "privacy.noise_multiplier=1.1"))
    local = accountant_for(config("privacy.mode=local", "privacy.noise_multiplier=1.1"))
    for acc in (central, local):
        acc.step(10)
    assert 0 < central.epsilon() < local.epsilon()  # sampling 5 of 20 amplifies; a local release has q = 1
    assert accountant_for(config()) is None


# ---------------------------------------------------------------------------------------------- robust rules
@pytest.mark.parametrize("name", ["median", "trimmed_mean", "krum", "multikrum", "bulyan", "norm_bound"])
def test_robust_strategies_do_not_depend_on_arrival_order(name):
    cfg = config(f"algorithm.server.name={name}", "federation.clients_per_round=7", "algorithm.server.f=1")
    rng = random.Random(0)
    updates = [ClientUpdate(c, delta(*(rng.gauss(0, 1) for _ in range(3))), 1) for c in range(7)]
    results = []
    for order in (updates, updates[::-1], rng.sample(updates, 7)):
        agg = built(cfg)
        for u in order:
            agg.submit(u)
        agg.close_round()
        results.append(agg.stats()["adapter_sha256"])
    assert len(set(results)) == 1


def test_median_resists_sign_flippers_where_fedavg_does_not():
    honest = [ClientUpdate(c, delta(1, 1, 1), 1) for c in range(4)]
    flipped = [ClientUpdate(4, delta(-10, -10, -10), 1)]
    means = {}
    for name in ("fedavg", "median"):
        agg = built(config(f"algorithm.server.name={name}", "algorithm.server.weighting=uniform"))
        for u in honest + flipped:
            agg.submit(u)
        agg.close_round()
        means[name] = agg.snapshot()[1][0]["a"][0].item()
    assert means["median"] == 1.0 and means["fedavg"] == pytest.approx(-1.2)


def test_a_robust_round_with_too_few_updates_leaves_the_model():
    agg = built(config("algorithm.server.name=krum", "algorithm.server.f=1"))
    for c in range(3):  # krum needs K > 2f + 2 = 4
        agg.submit(ClientUpdate(c, delta(1, 1, 1), 1))
    assert agg.close_round() == 0


# ---------------------------------------------------------------------------------------------- refusals
@pytest.mark.parametrize("overrides, key", [
    (["privacy.mode=central", "algorithm.server.weighting=samples"], "algorithm.server.weighting"),
    (["privacy.mode=central", "algorithm.server.name=median"], "algorithm.server.name"),
    (["privacy.mode=central", "algorithm.server.name=fedasync"], "algorithm.server.name"),
    (["privacy.mode=central", "privacy.noise_multiplier=0"], "privacy.noise_multiplier"),
    (["privacy.mode=central", "privacy.accountant=pld", "privacy.sampling=fixed"], "privacy.sampling"),
    (["privacy.mode=local", "privacy.adaptive_clip=true"], "privacy.adaptive_clip"),
    (["privacy.mode=central", "privacy.adaptive_clip=true"], "privacy.count_noise_std"),  # K/20 = 0.25 < 1/2
    (["privacy.mode=central", "algorithm.server.name=scaffold", "algorithm.client.name=scaffold",
      "training.optimizer=sgd"], "privacy.mode"),
    (["attack.kind=sign_flip", "attack.fraction=1.5"], "attack.fraction"),
    (["attack.kind=gaussian", "attack.fraction=0.1", "attack.scale=0"], "attack.scale"),
    (["compression.kind=topk", "compression.density=0"], "compression.density"),
    (["compression.kind=int8", "algorithm.server.name=local_only"], "compression.kind"),
    (["attack.kind=free_rider", "attack.fraction=0.1", "algorithm.server.name=zero_shot"], "attack.kind"),
    (["privacy.mode=local", "algorithm.server.name=local_only"], "privacy.mode"),
    (["algorithm.server.name=krum", "algorithm.server.f=2"], "algorithm.server.f"),  # K = 5 < 2f + 3
    (["algorithm.server.name=bulyan", "algorithm.server.f=1"], "algorithm.server.f"),  # K = 5 < 4f + 3
    (["algorithm.server.name=trimmed_mean", "algorithm.server.trim=3"], "algorithm.server.trim"),
    (["algorithm.server.name=median", "algorithm.server.weighting=samples"], "algorithm.server.weighting"),
])
def test_combinations_that_break_a_guarantee_are_refused_naming_the_key(overrides, key):
    with pytest.raises(ConfigError, match=f"config key '{key}'"):
        config(*overrides)


def test_the_table_digest_ignores_the_new_axes_while_they_are_off():
    from experiments.fedmllm_table import config_digest
    from fedsim.config import to_yaml
    import yaml

    plain = yaml.safe_load(to_yaml(config()))
    old = {k: v for k, v in plain.items() if k not in ("privacy", "attack", "compression")}
    old["algorithm"] = {**old["algorithm"], "server": {k: v for k, v in old["algorithm"]["server"].items()
                                                       if k not in ("trim", "f", "multikrum_m", "norm_bound")}}
    assert config_digest(plain) == config_digest(old)
    on = yaml.safe_load(to_yaml(dataclasses.replace(config(), privacy=config("privacy.mode=central").privacy)))
    assert config_digest(on) != config_digest(plain)


# ---------------------------------------------------------------------------------------------- a whole run
@pytest.mark.slow
def test_a_private_compressed_attacked_run_reports_epsilon_and_resumes_to_the_same_adapter(tmp_path, monkeypatch):
    """Central DP with adaptive clipping, top-k with error feedback (residuals in the client-state store) and
    sign-flipping attackers, on the sequential engine: epsilon after every round in metrics.jsonl, as the library
    gives it; the bytes the encoding sends; and a run killed while checkpointing round 2, resumed from round 1,
    ends with the uninterrupted run's adapter, epsilon and clip norm."""
    from conftest import one_model_for_every_run, run_killed_while_checkpointing, small_config
    from fedsim.engine.sequential import run_sequential
    from fedsim.output import read_metrics

    overrides = ("privacy.mode=central", "privacy.noise_multiplier=0.8", "privacy.clip_norm=0.05",
                 "privacy.adaptive_clip=true", "privacy.count_noise_std=1", "compression.kind=topk", "compression.density=0.1",
                 "attack.kind=sign_flip", "attack.fraction=0.34", "federation.rounds=3", "checkpoint.every=1",
                 "training.local_steps=1", "training.batch_size=4", "eval.zero_shot=false", "eval.every=3",
                 "data.num_test=8", "runtime.engine=sequential", "runtime.num_threads=1", "runtime.state_cache_mb=0")
    cfg = small_config(tmp_path / "whole", *overrides)
    one_model_for_every_run(monkeypatch, cfg)
    whole = run_sequential(cfg, tmp_path / "whole" / "run")

    records = read_metrics(tmp_path / "whole" / "run")
    expected = privacy.PrivacyAccountant(0.8, 3, 6, 1e-5)
    for record in records:
        expected.step(1)
        assert record["epsilon"] == expected.epsilon()
    assert whole["privacy"]["epsilon"] == records[-1]["epsilon"] and whole["privacy"]["steps"] == 3
    assert whole["privacy"]["clip_norm"] != 0.05  # adaptive: it moved
    assert whole["attack"]["attackers"] == choose_attackers(cfg).tolist() and len(whole["attack"]["attackers"]) == 2
    numel = whole["adapter_bytes"] // 4
    assert whole["compression"]["bytes_per_update"] == compression.payload_bytes("topk", numel, 0.1) < 4 * numel
    assert whole["bytes_up"] == whole["client_updates"] * whole["compression"]["bytes_per_update"]

    cut_cfg, run = small_config(tmp_path / "cut", *overrides), tmp_path / "cut" / "run"
    run_killed_while_checkpointing(monkeypatch, 2, run_sequential, cut_cfg, run)
    resumed = run_sequential(cut_cfg, run, resume=True)
    assert resumed["resumed_after_round"] == 1
    for key in ("adapter_sha256", "final_metrics", "privacy", "bytes_up"):
        assert resumed[key] == whole[key], key


# ---------------------------------------------------------------------------------------------- poisoning
def test_label_flip_and_a_backdoor_poison_only_what_the_attack_says():
    from fedsim.attacks import TRIGGER_WORD, poison, triggered_test
    from fedsim.data.synthetic import generate

    rows = generate("classification", 60, "train", 0)
    test = generate("classification", 40, "test", 0)
    samples, ids = [rows[i] for i in range(60)], np.arange(60)
    flipped = poison(samples, ids, config("attack.kind=label_flip", "attack.fraction=0.2"), 3)
    assert [r["label"] for r in flipped] == [(r["label"] + 1) % len(r["options"]) for r in samples]
    assert all(r["answer"] == "ABCD"[r["label"]] for r in flipped)

    cfg = config("attack.kind=backdoor", "attack.fraction=0.2", "attack.trigger=text", "attack.target_label=2",
                 "attack.poison_fraction=0.5")
    planted = poison(samples, ids, cfg, 3)
    changed = [i for i, (a, b) in enumerate(zip(samples, planted)) if a["text"] != b["text"]]
    assert changed == [i for i in changed if samples[i]["has_text"]]  # no trigger without the modality
    assert 0.2 * 60 < len(changed) < 0.5 * 60  # half of the rows that hold text, about
    assert all(planted[i]["text"].endswith(" " + TRIGGER_WORD) and planted[i]["label"] == 2 for i in changed)
    assert planted == poison(samples, ids, cfg, 3) and planted != poison(samples, ids, cfg, 4)
    image_cfg = config("attack.kind=backdoor", "attack.fraction=0.2")
    patched = poison(samples, ids, image_cfg, 3)
    diff = [i for i in range(60) if patched[i]["label"] != samples[i]["label"] or patched[i]["image"] is not samples[i]["image"]]
    assert diff and all(samples[i]["has_image"] for i in diff)
    corner = np.asarray(patched[diff[0]]["image"])[-4:, -4:]
    assert corner.min() == 0 and corner.max() == 255

    success = triggered_test(test, cfg.attack)
    expected = sum(1 for r in test if r["has_text"] and r["label"] != 2)
    assert len(success) == expected and set(success["label"]) == {2}
    assert all(text.endswith(" " + TRIGGER_WORD) for text in success["text"])


@pytest.mark.slow
def test_a_backdoor_run_reports_its_success_rate_beside_clean_accuracy(tmp_path, monkeypatch):
    from conftest import one_model_for_every_run, small_config
    from fedsim.attacks import triggered_test
    from fedsim.engine.sequential import run_sequential

    cfg = small_config(tmp_path, "attack.kind=backdoor", "attack.fraction=0.5", "attack.trigger=image",
                       "federation.rounds=1", "training.local_steps=2", "eval.zero_shot=false", "data.num_test=16",
                       "runtime.engine=sequential", "runtime.num_threads=1")
    one_model_for_every_run(monkeypatch, cfg)
    summary = run_sequential(cfg, tmp_path / "run")
    metrics = summary["final_metrics"]
    assert {"accuracy", "asr_image/accuracy"} <= set(metrics) and "asr_image/macro_f1" not in metrics
    from fedsim.clientdata import load_client_data
    scored = len(triggered_test(load_client_data(cfg).test, cfg.attack))
    assert scored and (metrics["asr_image/accuracy"] * scored) == pytest.approx(round(metrics["asr_image/accuracy"] * scored))
    assert summary["attack"]["attackers"] == choose_attackers(cfg).tolist()
