"""Client strategies: what an algorithm adds to local training (a loss penalty, a gradient correction,
extra tensors for the server). The training loop itself belongs to the trainer, which calls::

    strategy.begin(ctx)
    for each batch:
        loss = model_loss (+ strategy.penalty(params) unless None); loss.backward()
        strategy.correct_gradients(params); clip; optimizer.step(); optimizer.zero_grad()
    extras, new_state = strategy.finish(params, num_steps, lr)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from fedsim.config import ClientAlgoConfig
from fedsim.messages import NamedTensors

CLIENT_STRATEGIES: dict[str, type[ClientStrategy]] = {}

Params = dict[str, torch.nn.Parameter]


def register(cls: type[ClientStrategy]) -> type[ClientStrategy]:
    """Class decorator: make a client strategy selectable as ``algorithm.client.name: <cls.name>``."""
    if cls.name in CLIENT_STRATEGIES:
        raise ValueError(f"client strategy {cls.name!r} is registered twice")
    CLIENT_STRATEGIES[cls.name] = cls
    return cls


@dataclass
class LocalContext:
    """What a client strategy may know about the local training it is about to join."""

    global_weights: NamedTensors  # the broadcast adapter
    server_extras: NamedTensors  # from ServerStrategy.broadcast_extras()
    client_state: NamedTensors | None  # what finish() returned last time for this client; None the first time
    layer_of: dict[str, int | None]  # decoder layer index of each trainable parameter (None: outside layers)
    num_layers: int  # number of LLM decoder layers L


class ClientStrategy:
    """Base client strategy: adds nothing to local training."""

    name: ClassVar[str] = ""
    stateful: ClassVar[bool] = False  # True: finish() returns per-client state the engine must keep

    def __init__(self, cfg: ClientAlgoConfig) -> None:
        self.cfg = cfg
        self.ctx: LocalContext | None = None

    def begin(self, ctx: LocalContext) -> None:
        """Prepare for one client's local training."""
        self.ctx = ctx

    def penalty(self, params: Params) -> torch.Tensor | None:
        """A differentiable term added to the local loss, or None."""
        return None

    def correct_gradients(self, params: Params) -> None:
        """Modify ``p.grad`` in place after ``backward`` and before clipping."""

    def finish(self, params: Params, num_steps: int, lr: float) -> tuple[NamedTensors, NamedTensors | None]:
        """Return ``(extras for the server, new client state or None)`` after local training."""
        return {}, None

    def _context(self) -> LocalContext:
        if self.ctx is None:
            raise RuntimeError(f"client strategy {self.name!r} used before begin(ctx)")
        return self.ctx


def _upcast(t: torch.Tensor) -> torch.Tensor:
    return t.float() if t.dtype in (torch.bfloat16, torch.float16) else t


def _global_of(ctx: LocalContext, name: str) -> torch.Tensor:
    if name not in ctx.global_weights:
        raise ValueError(f"trainable parameter {name!r} has no counterpart in the global weights")
    return ctx.global_weights[name]


@register
class Plain(ClientStrategy):
    """Plain local training (FedAvg's client)."""

    name = "plain"


@register
class FedProx(ClientStrategy):
    """FedProx: loss += (μ/2) Σ_params ‖θ − θ_global‖²."""

    name = "fedprox"

    def begin(self, ctx: LocalContext) -> None:
        super().begin(ctx)
        self._anchors: NamedTensors | None = None  # global copies on the parameters' device/dtype

    def scale(self) -> float:
        """The factor in front of ½ Σ ‖θ − θ_global‖²."""
        return self.cfg.mu

    def regularized(self, name: str) -> bool:
        """Whether parameter ``name`` is pulled towards the global weights."""
        return True

    def penalty(self, params: Params) -> torch.Tensor | None:
        ctx = self._context()
        if self._anchors is None:
            # Built once per local training, where the parameters live, so each step costs no copy.
            self._anchors = {n: _global_of(ctx, n).detach().to(p.device, p.dtype)
                             for n, p in params.items() if self.regularized(n)}
        if not self._anchors:
            return None
        # Squared norms in at least float32: a bf16 sum of many small squares loses most of its digits.
        sq = sum(_upcast(params[n] - g).pow(2).sum() for n, g in self._anchors.items())
        return 0.5 * self.scale() * sq


def edge_layers(window: float, num_layers: int) -> int:
    """s = round(window · L): the layers at each end that FedMLLM's regularization leaves free."""
    s = int(round(window * num_layers))
    if not 0 <= window < 0.5 or s > num_layers - 1 - s:
        raise ValueError(f"config key 'algorithm.client.window' has invalid value {window}: s = round(window*L) = "
                         f"{s} leaves no regularized layer among L={num_layers} decoder layers; expected "
                         f"window < {((num_layers - 1) // 2 + 0.5) / num_layers:.3f}")
    return s


@register
class FedMLLMReg(FedProx):
    """FedMLLM's adaptive regularization: loss += (μ/2) · w · Σ_{s ≤ l ≤ L−1−s} ‖θ_l − θ_global,l‖².

    Only parameters of the middle decoder layers are pulled to the global model; the first and last
    s layers and parameters outside decoder layers train freely. s = round(``window`` · L), so one
    config serves any depth: the paper's s=4 of L=28 is window=1/7, which keeps s=1 of the tiny preset's 4.
    """

    name = "fedmllm_reg"

    def begin(self, ctx: LocalContext) -> None:
        self.edge = edge_layers(self.cfg.window, ctx.num_layers)
        super().begin(ctx)

    def scale(self) -> float:
        return self.cfg.mu * self.cfg.weight

    def regularized(self, name: str) -> bool:
        ctx = self._context()
        if name not in ctx.layer_of:
            raise ValueError(f"trainable parameter {name!r} is missing from LocalContext.layer_of")
        layer = ctx.layer_of[name]
        return layer is not None and self.edge <= layer <= ctx.num_layers - 1 - self.edge


@register
class Scaffold(ClientStrategy):
    """SCAFFOLD client (Karimireddy et al., option II).

    Gradients are corrected by c − c_i; after K local steps of learning rate lr,
    c_i⁺ = c_i − c + (θ_global − θ) / (K · lr). Sends ``{"control/<name>": c_i⁺ − c_i}`` and keeps
    ``{name: c_i⁺}`` as client state.
    """

    name = "scaffold"
    stateful = True
    PREFIX = "control/"

    def begin(self, ctx: LocalContext) -> None:
        super().begin(ctx)
        state = ctx.client_state or {}
        self._c: NamedTensors = {}
        self._ci: NamedTensors = {}
        for n, g in ctx.global_weights.items():
            zeros = torch.zeros(g.shape, dtype=torch.float32)
            self._c[n] = ctx.server_extras.get(self.PREFIX + n, zeros).detach().to("cpu", torch.float32)
            self._ci[n] = state.get(n, zeros).detach().to("cpu", torch.float32)
        self._corrections: NamedTensors | None = None  # c − c_i on the parameters' device/dtype

    def correct_gradients(self, params: Params) -> None:
        ctx = self._context()
        if self._corrections is None:
            # Built once per local training, on the parameters' device, so each step costs no copy.
            self._corrections = {n: (self._c[n] - self._ci[n]).to(p.device, p.dtype)
                                 for n, p in params.items() if _global_of(ctx, n) is not None}
        for n, p in params.items():
            if p.grad is not None:
                p.grad.add_(self._corrections[n])

    def finish(self, params: Params, num_steps: int, lr: float) -> tuple[NamedTensors, NamedTensors | None]:
        ctx = self._context()
        if num_steps < 0 or lr < 0:
            raise ValueError(f"SCAFFOLD finish needs num_steps >= 0 and lr >= 0, got {num_steps}, {lr}")
        extras, state = {}, {}
        for n, p in params.items():
            theta_global = _global_of(ctx, n).detach().to("cpu", torch.float32)
            if num_steps == 0 or lr == 0:
                # No step taken (or a zero learning rate): the local drift says nothing; keep c_i.
                new_ci = self._ci[n].clone()
            else:
                drift = theta_global - p.detach().to("cpu", torch.float32)
                new_ci = self._ci[n] - self._c[n] + drift / (num_steps * lr)
            extras[self.PREFIX + n] = new_ci - self._ci[n]
            state[n] = new_ci
        return extras, state
