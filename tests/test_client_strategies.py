"""Client strategies against hand-computed penalties, gradients and control variates."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from fedsim.algorithms import CLIENT_STRATEGIES, LocalContext, build_client_strategy, build_server_strategy
from fedsim.algorithms.client import edge_layers
from fedsim.config import ClientAlgoConfig, ServerAlgoConfig, TrainingConfig
from fedsim.messages import ClientUpdate
from fedsim.training import train_locally


def ctx_for(global_weights, layer_of=None, num_layers=0, extras=None, state=None) -> LocalContext:
    return LocalContext(global_weights=global_weights, server_extras=extras or {}, client_state=state,
                        layer_of={n: None for n in global_weights} if layer_of is None else layer_of, num_layers=num_layers)


def params_of(values: dict) -> dict[str, torch.nn.Parameter]:
    return {n: torch.nn.Parameter(torch.tensor(v)) for n, v in values.items()}


def close(t: torch.Tensor, expected) -> bool:
    return torch.allclose(t, torch.tensor(expected, dtype=t.dtype), rtol=1e-6, atol=1e-7)


def test_registry_names_match_config() -> None:
    assert set(CLIENT_STRATEGIES) == {"plain", "fedprox", "fedmllm_reg", "scaffold"}
    with pytest.raises(ValueError, match="algorithm.client.name"):
        build_client_strategy(ClientAlgoConfig(name="ditto"))
    assert CLIENT_STRATEGIES["scaffold"].stateful and not CLIENT_STRATEGIES["fedprox"].stateful


def test_plain_adds_nothing() -> None:
    s = build_client_strategy(ClientAlgoConfig(name="plain"))
    params = params_of({"a": [1.0, 2.0]})
    s.begin(ctx_for({"a": torch.zeros(2)}))
    assert s.penalty(params) is None
    params["a"].grad = torch.ones(2)
    s.correct_gradients(params)
    assert close(params["a"].grad, [1.0, 1.0])
    assert s.finish(params, 3, 0.1) == ({}, None)


def test_fedprox_penalty_and_gradient() -> None:
    s = build_client_strategy(ClientAlgoConfig(name="fedprox", mu=0.5))
    g = {"a": torch.tensor([0.0, 0.0]), "b": torch.tensor([1.0])}
    params = params_of({"a": [1.0, 2.0], "b": [3.0]})
    s.begin(ctx_for(g))
    # (μ/2) Σ ‖θ − θg‖² = 0.25 · (1 + 4 + 4) = 2.25
    p = s.penalty(params)
    assert close(p, 2.25)
    p.backward()
    # ∇ = μ (θ − θg) = 0.5·[1, 2] and 0.5·[2]
    assert close(params["a"].grad, [0.5, 1.0]) and close(params["b"].grad, [1.0])
    assert g["a"].grad is None and not g["a"].requires_grad  # the anchor is a constant


def test_fedprox_anchor_follows_parameter_dtype_and_is_reset_per_client() -> None:
    s = build_client_strategy(ClientAlgoConfig(name="fedprox", mu=2.0))
    params = {"a": torch.nn.Parameter(torch.tensor([1.0, 1.0], dtype=torch.float64))}
    s.begin(ctx_for({"a": torch.tensor([0.0, 0.0])}))
    assert close(s.penalty(params), 2.0)  # (2/2)·(1 + 1)
    s.begin(ctx_for({"a": torch.tensor([1.0, 3.0])}))  # next client, new global
    assert close(s.penalty(params), 4.0)  # (2/2)·(0 + 4)


def test_fedprox_rejects_unknown_parameter() -> None:
    s = build_client_strategy(ClientAlgoConfig(name="fedprox"))
    s.begin(ctx_for({"a": torch.zeros(2)}))
    with pytest.raises(ValueError, match="'z'"):
        s.penalty(params_of({"a": [0.0, 0.0], "z": [1.0]}))


def window_setup():
    # L = 6 decoder layers, one parameter per layer plus one outside any layer; θ − θg = 2 everywhere.
    names = [f"layers.{i}.lora_A" for i in range(6)] + ["embed"]
    layer_of = {n: i for i, n in enumerate(names[:6])} | {"embed": None}
    g = {n: torch.zeros(2) for n in names}
    params = params_of({n: [2.0, 2.0] for n in names})
    return names, layer_of, g, params


def test_fedmllm_reg_window_l6_s1() -> None:
    names, layer_of, g, params = window_setup()
    s = build_client_strategy(ClientAlgoConfig(name="fedmllm_reg", mu=0.5, weight=0.5, window=1 / 6))
    s.begin(ctx_for(g, layer_of, num_layers=6))
    # regularized: layers 1..4 (s ≤ l ≤ L−1−s = 4), each ‖θ − θg‖² = 4 + 4 = 8 → Σ = 32
    # penalty = (μ/2)·w·Σ = 0.25·0.5·32 = 4
    p = s.penalty(params)
    assert close(p, 4.0)
    p.backward()
    for n in names:
        grad = params[n].grad
        if layer_of[n] in (1, 2, 3, 4):
            assert close(grad, [0.5, 0.5])  # μ·w·(θ − θg) = 0.25·2
        else:  # layers 0 and 5 and the embedding are free
            assert grad is None or torch.all(grad == 0)


def test_fedmllm_reg_empty_window_raises() -> None:
    _, layer_of, g, _ = window_setup()
    s = build_client_strategy(ClientAlgoConfig(name="fedmllm_reg", window=0.45))
    with pytest.raises(ValueError, match=r"algorithm\.client\.window.*0\.45.*= 3.*L=6"):
        s.begin(ctx_for(g, layer_of, num_layers=6))  # s = round(2.7) = 3 > L−1−s = 2
    s = build_client_strategy(ClientAlgoConfig(name="fedmllm_reg", window=2 / 6, mu=1.0, weight=1.0))
    s.begin(ctx_for(g, layer_of, num_layers=6))  # layers 2..3
    assert close(s.penalty(window_setup()[3]), 8.0)  # 0.5·(8 + 8)


@pytest.mark.parametrize("window,num_layers,edge", [(1 / 7, 28, 4), (1 / 7, 4, 1), (1 / 7, 2, 0), (0.25, 32, 8),
                                                   (0.0, 5, 0)])
def test_fedmllm_window_is_a_fraction_of_any_depth(window, num_layers, edge) -> None:
    assert edge_layers(window, num_layers) == edge


def test_fedmllm_reg_without_regularized_parameters_returns_none() -> None:
    s = build_client_strategy(ClientAlgoConfig(name="fedmllm_reg", window=1 / 6))
    s.begin(ctx_for({"embed": torch.zeros(2)}, {"embed": None}, num_layers=6))
    assert s.penalty(params_of({"embed": [1.0, 1.0]})) is None


def test_fedmllm_reg_needs_layer_of_every_parameter() -> None:
    s = build_client_strategy(ClientAlgoConfig(name="fedmllm_reg", window=1 / 6))
    s.begin(ctx_for({"a": torch.zeros(2)}, {}, num_layers=6))
    with pytest.raises(ValueError, match="'a'.*layer_of"):
        s.penalty(params_of({"a": [1.0, 1.0]}))


def test_scaffold_client_correction_and_control_update() -> None:
    s = build_client_strategy(ClientAlgoConfig(name="scaffold"))
    g = {"w": torch.tensor([1.0, 1.0])}
    s.begin(ctx_for(g, extras={"control/w": torch.tensor([0.5, -0.5])},  # c
                    state={"w": torch.tensor([0.25, 0.25])}))  # c_i
    params = params_of({"w": [1.0, 1.0]})
    params["w"].grad = torch.tensor([1.0, 1.0])
    s.correct_gradients(params)
    # grad + c − c_i = [1 + 0.5 − 0.25, 1 − 0.5 − 0.25] = [1.25, 0.25]
    assert close(params["w"].grad, [1.25, 0.25])
    with torch.no_grad():
        params["w"].copy_(torch.tensor([0.5, 2.0]))  # θ after K = 2 steps of lr 0.25
    extras, state = s.finish(params, num_steps=2, lr=0.25)
    # (θg − θ)/(K·lr) = [0.5, −1]/0.5 = [1, −2]
    # c_i⁺ = c_i − c + [1, −2] = [0.25 − 0.5 + 1, 0.25 + 0.5 − 2] = [0.75, −1.25];  Δc = c_i⁺ − c_i = [0.5, −1.5]
    assert set(extras) == {"control/w"} and set(state) == {"w"}
    assert close(state["w"], [0.75, -1.25])
    assert close(extras["control/w"], [0.5, -1.5])


def test_scaffold_client_first_round_starts_from_zero() -> None:
    s = build_client_strategy(ClientAlgoConfig(name="scaffold"))
    s.begin(ctx_for({"w": torch.tensor([0.0, 0.0])}))  # no server control, no client state
    params = params_of({"w": [0.0, 0.0]})
    params["w"].grad = torch.tensor([3.0, -3.0])
    s.correct_gradients(params)
    assert close(params["w"].grad, [3.0, -3.0])
    with torch.no_grad():
        params["w"].copy_(torch.tensor([-0.3, 0.6]))
    extras, state = s.finish(params, num_steps=3, lr=0.1)
    # c_i⁺ = 0 − 0 + [0.3, −0.6]/0.3 = [1, −2]
    assert close(state["w"], [1.0, -2.0]) and close(extras["control/w"], [1.0, -2.0])
    # no step taken: c_i is kept
    s.begin(ctx_for({"w": torch.zeros(2)}, state=state))
    extras, state2 = s.finish(params_of({"w": [0.0, 0.0]}), num_steps=0, lr=0.1)
    assert close(state2["w"], [1.0, -2.0]) and close(extras["control/w"], [0.0, 0.0])


class Quadratic(torch.nn.Module):
    """A client's loss ½ a ‖w − t‖², with its own curvature a and optimum t (given by the batch)."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(2))

    def forward(self, target: torch.Tensor, curvature: float) -> SimpleNamespace:
        return SimpleNamespace(loss=0.5 * curvature * (self.w - target).pow(2).sum())


# Two clients of different curvature: the optimum of their sum is Σ a_i t_i / Σ a_i = [0.2, -0.8].
CLIENTS = [(1.0, torch.tensor([1.0, 0.0])), (4.0, torch.tensor([0.0, -1.0]))]
OPTIMUM = torch.tensor([0.2, -0.8])


def federate(algorithm: str, rounds: int, steps: int = 5, lr: float = 0.1):
    """``rounds`` of full participation, each client running fedsim's local training loop
    (``train_locally`` with ``training.optimizer=sgd``) for ``steps`` steps."""
    model = Quadratic()
    params = {"w": model.w}
    server = build_server_strategy(ServerAlgoConfig(name="scaffold" if algorithm == "scaffold" else "fedavg"),
                                   len(CLIENTS))
    server.init({"w": torch.zeros(2)})
    strategy = build_client_strategy(ClientAlgoConfig(name=algorithm))
    training = TrainingConfig(optimizer="sgd", max_grad_norm=0.0)
    states: dict[int, dict] = {}
    for _ in range(rounds):
        start, extras = server.global_weights, server.broadcast_extras()
        for cid, (curvature, target) in enumerate(CLIENTS):
            with torch.no_grad():
                model.w.copy_(start["w"])
            batches = [{"target": target, "curvature": curvature}] * steps
            done, _ = train_locally(model, params, batches, strategy, ctx_for(start, extras=extras,
                                                                             state=states.get(cid)), training, lr)
            control, state = strategy.finish(params, done, lr)
            if state is not None:
                states[cid] = state
            update = ClientUpdate(cid, {"w": model.w.detach() - start["w"]}, num_samples=1, extras=control)
            server.accumulate(update, server.weight_of(update))
        server.finalize()
    return server, states


def test_scaffold_removes_client_drift_that_fedavg_keeps() -> None:
    # Several local SGD steps on clients of different curvature: FedAvg settles off the optimum (client
    # drift), SCAFFOLD's control variates correct it.
    fedavg, _ = federate("plain", rounds=30)
    assert (fedavg.global_weights["w"] - OPTIMUM).abs().max() > 0.05
    scaffold, states = federate("scaffold", rounds=30)
    assert torch.allclose(scaffold.global_weights["w"], OPTIMUM, atol=1e-4)
    # Each c_i converges to its client's gradient at the optimum, a_i (w* − t_i), and c to their mean, 0.
    for cid, (curvature, target) in enumerate(CLIENTS):
        assert torch.allclose(states[cid]["w"], curvature * (OPTIMUM - target), atol=1e-3)
    assert scaffold.broadcast_extras()["control/w"].abs().max() < 1e-3
    # ... and on the way there c is not zero: after one round it is the mean of the clients' drifts.
    first, first_states = federate("scaffold", rounds=1)
    c = first.broadcast_extras()["control/w"]
    assert c.abs().min() > 0.01 and torch.allclose(c, (first_states[0]["w"] + first_states[1]["w"]) / 2)


def test_used_before_begin() -> None:
    s = build_client_strategy(ClientAlgoConfig(name="fedprox"))
    with pytest.raises(RuntimeError, match="begin"):
        s.penalty(params_of({"a": [1.0]}))
