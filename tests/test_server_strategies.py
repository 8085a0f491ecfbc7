"""Server strategies against hand-computed numbers on 2-element tensors."""

from __future__ import annotations

import random
import weakref

import pytest
import torch

from fedsim.algorithms import SERVER_STRATEGIES, ServerStrategy, build_server_strategy
from fedsim.algorithms.fixedpoint import FIXED_POINT_BITS, UpdateError
from fedsim.config import ServerAlgoConfig
from fedsim.messages import ClientUpdate


def make(name: str, num_clients: int = 4, x0=(0.0, 0.0), **cfg) -> ServerStrategy:
    s = build_server_strategy(ServerAlgoConfig(name=name, **cfg), num_clients)
    s.init({"w": torch.tensor(x0)})
    return s


def upd(delta, n: int = 1, cid: int = 0, **extras) -> ClientUpdate:
    return ClientUpdate(client_id=cid, delta={"w": torch.tensor(delta)}, num_samples=n,
                        extras={k.replace("__", "/"): torch.tensor(v) for k, v in extras.items()})


def round_(s: ServerStrategy, *updates: ClientUpdate) -> torch.Tensor:
    for u in updates:
        s.accumulate(u, s.weight_of(u))
    return s.finalize()["w"]


def close(t: torch.Tensor, expected) -> bool:
    return torch.allclose(t, torch.tensor(expected, dtype=torch.float32), rtol=1e-6, atol=1e-7)


SYNCHRONOUS = sorted(name for name, cls in SERVER_STRATEGIES.items() if not cls.asynchronous)


def test_registry_names_match_config() -> None:
    assert set(SERVER_STRATEGIES) == {"fedavg", "fedavgm", "fedadagrad", "fedyogi", "fedadam",
                                      "scaffold", "local_only", "zero_shot", "fedbuff", "fedasync",
                                      "median", "trimmed_mean", "krum", "multikrum", "bulyan", "norm_bound"}
    assert {n for n, c in SERVER_STRATEGIES.items() if c.asynchronous} == {"fedbuff", "fedasync"}
    with pytest.raises(ValueError, match="algorithm.server.name"):
        build_server_strategy(ServerAlgoConfig(name="fedsgd"), 4)


def test_defaults_lr_and_weighting() -> None:
    assert make("fedavg").lr == 1.0 and make("fedavg").weighting == "samples"
    assert make("fedavgm").lr == 1.0 and make("fedavgm").weighting == "samples"
    assert make("scaffold").weighting == "uniform"  # the paper's plain means, for x and for c
    for name in ("fedadagrad", "fedyogi", "fedadam"):
        assert make(name).lr == 1e-3 and make(name).weighting == "uniform"
    assert make("fedadam", lr=0.5, weighting="samples").lr == 0.5
    assert make("fedadam", weighting="samples").weighting == "samples"
    with pytest.raises(ValueError, match="algorithm.server.weighting"):
        make("fedavg", weighting="by_size")


def test_fedavg_sample_weighted() -> None:
    s = make("fedavg", x0=(1.0, 2.0))
    # Δ = (1·[1, 0] + 3·[0, 3]) / 4 = [0.25, 2.25];  x = [1, 2] + Δ = [1.25, 4.25]
    x = round_(s, upd([1.0, 0.0], n=1), upd([0.0, 3.0], n=3))
    assert close(x, [1.25, 4.25])
    assert s.version == 1


def test_fedavg_uniform_weighting_and_server_lr() -> None:
    s = make("fedavg", x0=(1.0, 2.0), lr=0.5, weighting="uniform")
    # Δ = ([1, 0] + [0, 3]) / 2 = [0.5, 1.5];  x = [1, 2] + 0.5·Δ = [1.25, 2.75]
    assert close(round_(s, upd([1.0, 0.0], n=1), upd([0.0, 3.0], n=3)), [1.25, 2.75])


def test_fedavgm_two_rounds() -> None:
    s = make("fedavgm", x0=(1.0, 2.0))  # β1 = 0.9, η = 1
    # round 1: Δ = [1, -2];  v = [1, -2];  x = [2, 0]
    assert close(round_(s, upd([1.0, -2.0])), [2.0, 0.0])
    # round 2: Δ = [0.5, 1];  v = 0.9·[1, -2] + [0.5, 1] = [1.4, -0.8];  x = [3.4, -0.8]
    assert close(round_(s, upd([0.5, 1.0])), [3.4, -0.8])


# Adaptive optimizers: τ = 1 (v0 = τ² = 1), β1 = 0.5, β2 = 0.75, η = 1, x0 = [0, 0], uniform weighting.
# round 1: Δ = [2, 0.5] (Δ² = [4, 0.25]);  m1 = 0.5·Δ = [1, 0.25]
# round 2: client deltas [0, -1] (n=1) and [1, -1] (n=9), uniform mean Δ = [0.5, -1] (Δ² = [0.25, 1])
#          (the sample-weighted mean would be [0.9, -1]);  m2 = 0.5·[1, 0.25] + 0.5·[0.5, -1] = [0.75, -0.375]
ADAPTIVE = dict(lr=1.0, tau=1.0, beta1=0.5, beta2=0.75)


def adaptive_rounds(name: str) -> tuple[torch.Tensor, torch.Tensor]:
    s = make(name, **ADAPTIVE)
    x1 = round_(s, upd([2.0, 0.5]))
    x2 = round_(s, upd([0.0, -1.0], n=1), upd([1.0, -1.0], n=9))
    return x1, x2


def test_fedadagrad_two_rounds() -> None:
    x1, x2 = adaptive_rounds("fedadagrad")
    # v1 = 1 + [4, 0.25] = [5, 1.25];  x1 = [1/(√5+1), 0.25/(√1.25+1)] = [0.309017, 0.118034]
    assert close(x1, [0.3090169944, 0.1180339887])
    # v2 = [5.25, 2.25];  x2 = x1 + [0.75/(√5.25+1), -0.375/(1.5+1)] = x1 + [0.227874, -0.15]
    assert close(x2, [0.5368913204, -0.0319660113])


def test_fedyogi_two_rounds_sign_both_ways() -> None:
    x1, x2 = adaptive_rounds("fedyogi")
    # v1[0]: Δ² = 4 > v = 1, sign(v-Δ²) = -1, v grows:   1 + 0.25·4      = 2
    # v1[1]: Δ² = 0.25 < v = 1, sign = +1, v shrinks:    1 - 0.25·0.25   = 0.9375
    # x1 = [1/(√2+1), 0.25/(√0.9375+1)] = [0.414214, 0.127017]
    assert close(x1, [0.4142135624, 0.1270166538])
    # v2[0]: Δ² = 0.25 < 2, shrinks:  2 - 0.25·0.25 = 1.9375
    # v2[1]: Δ² = 1 > 0.9375, grows:  0.9375 + 0.25·1 = 1.1875
    # x2 = x1 + [0.75/(√1.9375+1), -0.375/(√1.1875+1)] = x1 + [0.313553, -0.179449]
    assert close(x2, [0.7277664349, -0.0524328180])
    s = make("fedyogi", **ADAPTIVE)
    round_(s, upd([2.0, 0.5]))
    round_(s, upd([0.5, -1.0]))
    assert close(s.state_dict()["v/w"], [1.9375, 1.1875])


def test_fedadam_two_rounds() -> None:
    x1, x2 = adaptive_rounds("fedadam")
    # v1 = 0.75·1 + 0.25·[4, 0.25] = [1.75, 0.8125];  x1 = [1/(√1.75+1), 0.25/(√0.8125+1)]
    assert close(x1, [0.4305008740, 0.1314829082])
    # v2 = 0.75·[1.75, 0.8125] + 0.25·[0.25, 1] = [1.375, 0.859375]
    # x2 = x1 + [0.75/(√1.375+1), -0.375/(√0.859375+1)]
    assert close(x2, [0.7757087540, -0.0631175961])


def test_adaptive_initial_moments() -> None:
    state = make("fedadam", tau=0.5).state_dict()
    assert close(state["m/w"], [0.0, 0.0]) and close(state["v/w"], [0.25, 0.25])  # v0 = τ²


# The FedMLLM / OpenFedLLM code's forms (federated_learning/fed_global.py there), on the rounds above.


def test_fedavgm_ema_form_with_first_delta_as_the_fedmllm_code() -> None:
    s = make("fedavgm", x0=(1.0, 2.0), momentum_form="ema", moment_init="first_delta")  # β1 = 0.9, η = 1
    # round 1: Δ = [1, -2];  v = Δ (first step);  x = [2, 0]
    assert close(round_(s, upd([1.0, -2.0])), [2.0, 0.0])
    # round 2: Δ = [0.5, 1];  v = 0.9·[1, -2] + 0.1·[0.5, 1] = [0.95, -1.7];  x = [2.95, -1.7]
    assert close(round_(s, upd([0.5, 1.0])), [2.95, -1.7])


def test_fedavgm_ema_form_from_zero() -> None:
    s = make("fedavgm", x0=(1.0, 2.0), momentum_form="ema")
    # round 1: v = 0.1·[1, -2];  x = [1.1, 1.8];  round 2: v = 0.9·[0.1, -0.2] + 0.1·[0.5, 1] = [0.14, -0.08]
    assert close(round_(s, upd([1.0, -2.0])), [1.1, 1.8])
    assert close(round_(s, upd([0.5, 1.0])), [1.24, 1.72])


def test_fedadagrad_with_beta1_zero_is_the_fedmllm_code_form() -> None:
    s = make("fedadagrad", **dict(ADAPTIVE, beta1=0.0))
    # m = Δ every round.  round 1: v = 1 + [4, 0.25];  x1 = [2/(√5+1), 0.5/(√1.25+1)]
    x1 = round_(s, upd([2.0, 0.5]))
    assert close(x1, [0.6180339887, 0.2360679775])
    # round 2: Δ = [0.5, -1];  v = [5.25, 2.25];  x2 = x1 + [0.5/(√5.25+1), -1/(1.5+1)]
    x2 = round_(s, upd([0.0, -1.0], n=1), upd([1.0, -1.0], n=9))
    assert close(x2, [0.6180339887 + 0.5 / (5.25 ** 0.5 + 1), 0.2360679775 - 0.4])
    # moment_init and second_moment_of change nothing when m = Δ
    t = make("fedadagrad", **dict(ADAPTIVE, beta1=0.0), moment_init="first_delta", second_moment_of="momentum")
    assert close(round_(t, upd([2.0, 0.5])), x1.tolist())


def test_adaptive_first_delta_initialisation() -> None:
    s = make("fedadam", **ADAPTIVE, moment_init="first_delta")
    # round 1: m = Δ = [2, 0.5] (not 0.5·Δ);  v = 0.75 + 0.25·[4, 0.25] = [1.75, 0.8125]
    x1 = round_(s, upd([2.0, 0.5]))
    assert close(x1, [2 / (1.75 ** 0.5 + 1), 0.5 / (0.8125 ** 0.5 + 1)])
    # round 2: m = 0.5·[2, 0.5] + 0.5·[0.5, -1] = [1.25, -0.25];  v = 0.75·v + 0.25·Δ² = [1.375, 0.859375]
    x2 = round_(s, upd([0.0, -1.0], n=1), upd([1.0, -1.0], n=9))
    assert close(x2 - x1, [1.25 / (1.375 ** 0.5 + 1), -0.25 / (0.859375 ** 0.5 + 1)])
    assert close(s.state_dict()["m/w"], [1.25, -0.25])


def test_fedyogi_as_the_fedmllm_code_runs_it() -> None:
    """m = Δ in the first round, then β1 m + (1−β1) Δ;  v ← v − (1−β2) m² sign(v − m²)."""
    s = make("fedyogi", **ADAPTIVE, moment_init="first_delta", second_moment_of="momentum")
    # round 1: m = [2, 0.5], m² = [4, 0.25];  v = [1 + 0.25·4, 1 − 0.25·0.25] = [2, 0.9375]
    x1 = round_(s, upd([2.0, 0.5]))
    assert close(x1, [2 / (2 ** 0.5 + 1), 0.5 / (0.9375 ** 0.5 + 1)])
    # round 2: m = [1.25, -0.25], m² = [1.5625, 0.0625];  v = [2 − 0.25·1.5625, 0.9375 − 0.25·0.0625]
    x2 = round_(s, upd([0.0, -1.0], n=1), upd([1.0, -1.0], n=9))
    assert close(s.state_dict()["v/w"], [1.609375, 0.921875])
    assert close(x2 - x1, [1.25 / (1.609375 ** 0.5 + 1), -0.25 / (0.921875 ** 0.5 + 1)])


def test_fedadam_second_moment_of_the_momentum() -> None:
    s = make("fedadam", **ADAPTIVE, second_moment_of="momentum")
    # round 1: m = 0.5·Δ = [1, 0.25];  v = 0.75 + 0.25·m² = [1, 0.765625];  x1 = [1/(1+1), 0.25/(0.875+1)]
    assert close(round_(s, upd([2.0, 0.5])), [0.5, 0.25 / 1.875])
    assert close(s.state_dict()["v/w"], [1.0, 0.765625])


def test_first_delta_applies_once_and_not_again_after_a_resume() -> None:
    a = make("fedyogi", **ADAPTIVE, moment_init="first_delta", second_moment_of="momentum")
    round_(a, upd([2.0, 0.5]))
    b = build_server_strategy(a.cfg, 4)
    b.load_state_dict(a.state_dict())  # resumed after the first step: the second is a momentum step
    assert torch.equal(round_(a, upd([0.5, -1.0])), round_(b, upd([0.5, -1.0])))
    assert close(b.state_dict()["m/w"], [1.25, -0.25])


@pytest.mark.parametrize("key, value, name", [("momentum_form", "nesterov", "fedavgm"),
                                               ("moment_init", "ones", "fedadam"),
                                               ("moment_init", "ones", "fedavgm"),
                                               ("second_moment_of", "grad", "fedyogi")])
def test_momentum_options_are_checked(key: str, value: str, name: str) -> None:
    with pytest.raises(ValueError, match=f"algorithm.server.{key}"):
        make(name, **{key: value})
    from fedsim.config import ConfigError, check_values, merge_config

    with pytest.raises(ConfigError, match=f"config key 'algorithm.server.{key}' has invalid value '{value}'"):
        check_values(merge_config(None, [f"algorithm.server.name={name}", f"algorithm.server.{key}={value}"]))


def test_scaffold_server_control_update() -> None:
    s = make("scaffold", num_clients=4)  # η = 1, N = 4, uniform weights (the paper)
    assert close(s.broadcast_extras()["control/w"], [0.0, 0.0])
    # x: Δ = ([1, 2] + [3, 0]) / 2 = [2, 1]
    # c: (1/N) Σ Δc = ([4, 0] + [0, 8]) / 4 = [1, 2]
    x = round_(s, upd([1.0, 2.0], n=1, control__w=[4.0, 0.0]),
               upd([3.0, 0.0], n=3, cid=1, control__w=[0.0, 8.0]))
    assert close(x, [2.0, 1.0])
    assert close(s.broadcast_extras()["control/w"], [1.0, 2.0])
    # round 2: one client, Δc = [-4, 4];  c = [1, 2] + (1/4)·[-4, 4] = [0, 3];  x unchanged (Δ = 0)
    x = round_(s, upd([0.0, 0.0], n=5, control__w=[-4.0, 4.0]))
    assert close(x, [2.0, 1.0])
    assert close(s.broadcast_extras()["control/w"], [0.0, 3.0])
    # broadcast is a copy
    s.broadcast_extras()["control/w"].fill_(9.0)
    assert close(s.broadcast_extras()["control/w"], [0.0, 3.0])


def test_scaffold_sample_weighting_weighs_the_control_update_like_the_model_update() -> None:
    # Clients hold 1, 3, 2, 2 samples (8 in all); c stays the sample-weighted mean of all c_i.
    s = build_server_strategy(ServerAlgoConfig(name="scaffold", weighting="samples"), 4, client_sizes=[1, 3, 2, 2])
    s.init({"w": torch.tensor([0.0, 0.0])})
    # x: Δ = (1·[1, 2] + 3·[3, 0]) / 4 = [2.5, 0.5];  c: (1·[4, 0] + 3·[0, 8]) / 8 = [0.5, 3]
    x = round_(s, upd([1.0, 2.0], n=1, control__w=[4.0, 0.0]),
               upd([3.0, 0.0], n=3, cid=1, control__w=[0.0, 8.0]))
    assert close(x, [2.5, 0.5])
    assert close(s.broadcast_extras()["control/w"], [0.5, 3.0])
    with pytest.raises(ValueError, match="client_sizes"):
        build_server_strategy(ServerAlgoConfig(name="scaffold", weighting="samples"), 4)


@pytest.mark.parametrize("name", ["fedadagrad", "fedyogi", "fedadam"])
@pytest.mark.parametrize("tau", [0.0, -1e-3, float("nan")])
def test_adaptive_servers_refuse_a_tau_that_is_not_positive(name: str, tau: float) -> None:
    with pytest.raises(ValueError, match="algorithm.server.tau"):
        make(name, tau=tau)


@pytest.mark.parametrize("name", ["fedadagrad", "fedyogi", "fedadam"])
@pytest.mark.parametrize("tau", [1e-3, 1e-300])  # 1e-300 underflows float32: v0 = τ² = 0 and τ itself 0
def test_adaptive_servers_never_produce_nan_from_a_zero_mean_delta(name: str, tau: float) -> None:
    s = make(name, tau=tau, x0=(1.0, 2.0))
    for _ in range(3):  # the second element never moves: its m and v stay at their initial values
        x = round_(s, upd([0.5, 0.0]), upd([-0.25, 0.0], cid=1))
        assert torch.isfinite(x).all() and x[1] == 2.0
    assert all(torch.isfinite(t).all() for t in s.state_dict().values())


def test_scaffold_requires_control_deltas() -> None:
    s = make("scaffold")
    with pytest.raises(ValueError, match="control/w"):
        s.accumulate(upd([1.0, 1.0]), 1.0)
    with pytest.raises(ValueError, match="control/w"):
        s.accumulate(upd([1.0, 1.0], control__w=[1.0, 2.0, 3.0]), 1.0)
    assert s.pending == 0


@pytest.mark.parametrize("name", ["local_only", "zero_shot"])
def test_local_only_and_zero_shot_keep_global(name: str) -> None:
    s = make(name, x0=(1.0, 2.0))
    assert s.personalized
    assert s.trains == (name == "local_only")
    x = round_(s, upd([5.0, 5.0], n=3), upd([1.0, 1.0]))
    assert close(x, [1.0, 2.0]) and s.version == 1
    with pytest.raises(ValueError, match="'w'"):
        s.accumulate(upd([1.0, 1.0, 1.0]), 1.0)
    assert not make("fedavg").personalized and make("fedavg").trains


@pytest.mark.parametrize("name", sorted(SERVER_STRATEGIES))
def test_finalize_without_updates_changes_nothing(name: str) -> None:
    s = make(name, x0=(1.0, 2.0))
    before = s.state_dict()
    assert close(s.finalize()["w"], [1.0, 2.0])
    assert s.version == 0
    after = s.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_name_and_shape_mismatch_errors() -> None:
    s = build_server_strategy(ServerAlgoConfig(name="fedavg"), 4)
    s.init({"a": torch.zeros(2), "b": torch.zeros(2, 3)})
    good = {"a": torch.ones(2), "b": torch.ones(2, 3)}
    with pytest.raises(ValueError, match="'b'.*missing"):
        s.accumulate(ClientUpdate(0, {"a": torch.ones(2)}, 1), 1.0)
    with pytest.raises(ValueError, match="'c'"):
        s.accumulate(ClientUpdate(0, {**good, "c": torch.ones(1)}, 1), 1.0)
    with pytest.raises(ValueError, match=r"'b'.*\(3, 2\).*\(2, 3\)"):
        s.accumulate(ClientUpdate(0, {**good, "b": torch.ones(3, 2)}, 1), 1.0)
    assert s.pending == 0  # a rejected update leaves no trace
    s.accumulate(ClientUpdate(0, good, 1), 1.0)
    assert torch.equal(s.finalize()["b"], torch.ones(2, 3))


def test_used_before_init() -> None:
    s = build_server_strategy(ServerAlgoConfig(name="fedavg"), 4)
    with pytest.raises(RuntimeError, match="init"):
        s.accumulate(upd([1.0, 1.0]), 1.0)


def test_running_sum_holds_one_tensor_per_name() -> None:
    s = make("fedavg", weighting="uniform")
    first = upd([0.0, 0.0])
    s.accumulate(first, 1.0)
    ref = weakref.ref(first.delta["w"])
    del first
    assert ref() is None  # the strategy kept no reference to the update's tensors
    buffer_ptr = s._sum["w"].data_ptr()
    for i in range(1, 1000):
        s.accumulate(upd([float(i), -float(i)]), 1.0)
    assert list(s._sum) == ["w"] and s._sum["w"].data_ptr() == buffer_ptr  # summed in place
    assert s.pending == 1000
    # mean of 0..999 = 499.5
    assert close(s.finalize()["w"], [499.5, -499.5])
    assert s.pending == 0 and not s._sum


def test_zero_total_weight_is_an_error() -> None:
    s = make("fedavg")
    s.accumulate(upd([1.0, 1.0], n=0), s.weight_of(upd([1.0, 1.0], n=0)))
    with pytest.raises(ValueError, match="total weight"):
        s.finalize()


def test_results_are_copies() -> None:
    x0 = {"w": torch.tensor([1.0, 2.0])}
    s = build_server_strategy(ServerAlgoConfig(name="fedavg"), 4)
    s.init(x0)
    x0["w"].fill_(7.0)
    out = s.finalize()
    out["w"].fill_(8.0)
    s.global_weights["w"].fill_(9.0)
    d = upd([1.0, 1.0])
    s.accumulate(d, 1.0)
    d.delta["w"].fill_(100.0)  # mutating an accepted update must not change the round
    assert close(s.finalize()["w"], [2.0, 3.0])


def test_float32_cpu_from_other_dtypes() -> None:
    s = build_server_strategy(ServerAlgoConfig(name="fedavg"), 4)
    s.init({"w": torch.tensor([1.0, 2.0], dtype=torch.bfloat16)})
    s.accumulate(ClientUpdate(0, {"w": torch.tensor([0.5, 0.25], dtype=torch.float64)}, 1), 1.0)
    out = s.finalize()["w"]
    assert out.dtype == torch.float32 and close(out, [1.5, 2.25])


# Rounds of two updates: the robust rules that need more leave the model as it was (test_study_axes.py).
TWO_UPDATE_ROUNDS = [n for n in SYNCHRONOUS if SERVER_STRATEGIES[n].min_cohort(ServerAlgoConfig())[0] <= 2]


@pytest.mark.parametrize("name", TWO_UPDATE_ROUNDS)
def test_state_dict_round_trip(name: str, tmp_path) -> None:
    from safetensors.torch import load_file, save_file

    def rounds(s: ServerStrategy, k: int) -> None:
        for r in range(k):
            u1 = upd([0.3 * r + 0.1, -0.2], n=2, control__w=[0.5, r * 1.0])
            u2 = upd([-0.7, 0.4 * r], n=5, cid=1, control__w=[-1.0, 0.25])
            round_(s, u1, u2)

    cfg = dict(tau=0.1, beta1=0.8, beta2=0.9, lr=0.5)
    a = make(name, x0=(1.0, -1.0), **cfg)
    rounds(a, 2)
    path = tmp_path / "server.safetensors"
    save_file(a.state_dict(), str(path))
    b = build_server_strategy(ServerAlgoConfig(name=name, **cfg), 4)
    b.load_state_dict(load_file(str(path)))
    assert b.version == a.version == 2
    rounds(a, 2)
    rounds(b, 2)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert sa["version"].dim() == 0 and int(sa["version"]) == 4


def test_load_state_dict_rejects_wrong_algorithm() -> None:
    state = make("fedavg").state_dict()
    with pytest.raises(ValueError, match="m/w"):
        build_server_strategy(ServerAlgoConfig(name="fedadam"), 4).load_state_dict(state)
    state = make("fedadam").state_dict()
    with pytest.raises(ValueError, match="unexpected"):
        build_server_strategy(ServerAlgoConfig(name="fedavg"), 4).load_state_dict(state)


def test_state_dict_refuses_pending_updates() -> None:
    s = make("fedavg")
    s.accumulate(upd([1.0, 1.0]), 1.0)
    with pytest.raises(RuntimeError, match="finalize"):
        s.state_dict()


# ----------------------------------------------------------------------------- exact, order-independent sums
SHAPES = {"a": (7, 5), "b": (13,), "c": (3, 4, 2)}


def random_updates(seed: int, count: int = 50) -> list[ClientUpdate]:
    g = torch.Generator().manual_seed(seed)
    updates = []
    for i in range(count):
        scale = 10.0 ** float(torch.randint(-4, 1, (1,), generator=g))  # deltas from 1e-4 to 1 in size
        delta = {k: torch.randn(shape, generator=g) * scale for k, shape in SHAPES.items()}
        extras = {f"control/{k}": torch.randn(shape, generator=g) for k, shape in SHAPES.items()}
        n = int(torch.randint(1, 500, (1,), generator=g))
        updates.append(ClientUpdate(client_id=i, delta=delta, num_samples=n, extras=extras))
    return updates


def run_in_order(name: str, updates: list[ClientUpdate], order: list[int]) -> dict[str, torch.Tensor]:
    s = build_server_strategy(ServerAlgoConfig(name=name, weighting="samples"), 100, client_sizes=[1] * 100)
    s.init({k: torch.zeros(shape) for k, shape in SHAPES.items()})
    weights = random.Random(7).sample(range(1, 10_000), len(updates))  # one random float weight per update
    for i in order:
        s.accumulate(updates[i], weights[i] / 37.0)
    out = s.finalize()
    out.update(s.broadcast_extras())
    return out


@pytest.mark.parametrize("name", ["fedavg", "scaffold", "fedadam"])
def test_accumulation_is_bitwise_order_independent(name: str) -> None:
    updates = random_updates(seed=0)
    rng = random.Random(1)
    orders = [list(range(len(updates)))] + [rng.sample(range(len(updates)), len(updates)) for _ in range(5)]
    results = [run_in_order(name, updates, order) for order in orders]
    for other in results[1:]:
        assert other.keys() == results[0].keys()
        assert all(torch.equal(other[k], results[0][k]) for k in other)


def test_exact_mean_matches_float64_and_float32_sums_would_not_be_order_independent() -> None:
    updates = random_updates(seed=2)
    weights = random.Random(7).sample(range(1, 10_000), len(updates))
    weights = [w / 37.0 for w in weights]
    result = run_in_order("fedavg", updates, list(range(len(updates))))
    total = sum(weights)
    for k in SHAPES:
        ref = sum(w * u.delta[k].double() for w, u in zip(weights, updates)) / total
        # fixed-point rounding: at most 2**-(bits+1) per term, hence per element of the mean
        assert (result[k].double() - ref).abs().max() <= 2.0 ** -FIXED_POINT_BITS + ref.abs().max() * 2.0 ** -23
    # the test above has teeth: a float32 running sum does depend on the order
    naive = []
    for order in (range(len(updates)), reversed(range(len(updates)))):
        acc = torch.zeros(SHAPES["a"])
        for i in order:
            acc.add_(updates[i].delta["a"], alpha=weights[i])
        naive.append(acc)
    assert not torch.equal(naive[0], naive[1])


def test_overflow_is_an_error_naming_the_tensor_and_leaves_no_trace() -> None:
    s = make("fedavg")
    with pytest.raises(UpdateError, match=r"'w'.*uniform weighting") as err:
        s.accumulate(upd([1e10, 0.0]), 1.0)  # a single term beyond 2**30
    assert err.value.kind == "overflow" and s.pending == 0
    s.accumulate(upd([6e8, 1.0]), 1.0)
    with pytest.raises(UpdateError, match=r"running weighted sum.*'w'|'w'.*running weighted sum"):
        s.accumulate(upd([6e8, 1.0]), 1.0)  # 1.2e9 > 2**30 ≈ 1.07e9
    assert s.pending == 1
    s.accumulate(upd([-6e8, 3.0]), 1.0)
    assert close(s.finalize()["w"], [0.0, 2.0])


def test_scaffold_control_overflow_leaves_no_trace() -> None:
    s = make("scaffold")
    s.accumulate(upd([1.0, 1.0], control__w=[6e8, 0.0]), 1.0)
    with pytest.raises(UpdateError, match="control/w"):
        s.accumulate(upd([1.0, 1.0], control__w=[6e8, 0.0]), 1.0)
    assert s.pending == 1 and int(s._sum["w"][0]) == 2 ** FIXED_POINT_BITS


def test_non_finite_and_invalid_weights_are_rejected() -> None:
    s = make("fedavg")
    with pytest.raises(ValueError, match="'w'.*non-finite"):
        s.accumulate(upd([float("nan"), 0.0]), 1.0)
    with pytest.raises(ValueError, match="weight"):
        s.accumulate(upd([1.0, 0.0]), float("inf"))
    with pytest.raises(ValueError, match="weight"):
        s.accumulate(upd([1.0, 0.0]), -1.0)
    assert s.pending == 0


def test_running_sum_is_int64_fixed_point() -> None:
    s = make("fedavg")
    s.accumulate(upd([0.5, -0.25]), 3.0)
    assert s._sum["w"].dtype == torch.int64
    assert s._sum["w"].tolist() == [int(1.5 * 2 ** FIXED_POINT_BITS), int(-0.75 * 2 ** FIXED_POINT_BITS)]


def test_flush_finalizes_pending_updates_of_synchronous_strategies() -> None:
    s = make("fedavg", x0=(1.0, 2.0))
    assert not s.flush() and s.version == 0
    s.accumulate(upd([1.0, 1.0]), 1.0)
    assert s.flush() and s.version == 1 and s.pending == 0
    assert close(s.global_weights["w"], [2.0, 3.0])
