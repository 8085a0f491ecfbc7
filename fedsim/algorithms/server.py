"""Server strategies: how the server turns client deltas into the next global adapter.

Every strategy keeps a running weighted sum of the deltas of the current round (memory does not grow
with the number of updates), and on ``finalize`` applies its rule to the weighted mean delta Δ.
The running sum is exact fixed-point integer arithmetic (``fixedpoint.py``), so the mean does not depend on the
order in which updates arrive; the server rules themselves are float32 on CPU.
"""

from __future__ import annotations

import math
from fractions import Fraction
from typing import ClassVar, Sequence

import numpy as np
import torch

from fedsim.algorithms.fixedpoint import FixedPointSum, UpdateError
from fedsim.config import ServerAlgoConfig
from fedsim.messages import ClientUpdate, FlatLayout, NamedTensors

SERVER_STRATEGIES: dict[str, type[ServerStrategy]] = {}

WEIGHTINGS = ("samples", "uniform")


def register(cls: type[ServerStrategy]) -> type[ServerStrategy]:
    """Class decorator: make a server strategy selectable as ``algorithm.server.name: <cls.name>``."""
    if cls.name in SERVER_STRATEGIES:
        raise ValueError(f"server strategy {cls.name!r} is registered twice")
    SERVER_STRATEGIES[cls.name] = cls
    return cls


def _f32(t: torch.Tensor) -> torch.Tensor:
    """A float32 CPU copy that shares no storage with ``t``."""
    return t.detach().to("cpu", torch.float32, copy=True)


class ServerStrategy:
    """Running weighted mean of client deltas plus a server rule applied by ``finalize``.

    Subclasses implement ``apply(mean_delta)``, which updates ``self.weights`` (and their optimizer
    slots in ``self.slots``) in place, and optionally ``init_slots()``.
    """

    name: ClassVar[str] = ""
    default_lr: ClassVar[float] = 1.0
    default_weighting: ClassVar[str] = "samples"
    personalized: ClassVar[bool] = False  # the engine keeps each client's own adapter
    trains: ClassVar[bool] = True  # False: clients are never trained (zero-shot evaluation)
    asynchronous: ClassVar[bool] = False  # True: driven update by update with ``offer`` (see asynchronous.py)

    def __init__(self, cfg: ServerAlgoConfig, num_clients: int, client_sizes: Sequence[int] | None = None) -> None:
        self.cfg = cfg
        self.num_clients = num_clients
        # samples per client, an array: a million clients cost 8 MB, not a list of Python ints
        self.client_sizes = np.asarray(client_sizes, dtype=np.int64) if client_sizes is not None else None
        self.lr = cfg.lr if cfg.lr is not None else self.default_lr
        self.weighting = self.default_weighting if cfg.weighting == "auto" else cfg.weighting
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"config key 'algorithm.server.weighting' has invalid value "
                             f"{cfg.weighting!r}: expected auto, samples or uniform")
        if num_clients < 1:
            raise ValueError(f"num_clients must be >= 1, got {num_clients}")
        self.version = 0
        self.weights: NamedTensors = {}
        self.layout = FlatLayout(self.weights)  # where each global tensor sits in the running sums
        self.slots: dict[str, NamedTensors] = {}  # optimizer state, e.g. {"m": {...}, "v": {...}}
        self._sum = FixedPointSum()
        self.noise = None  # central DP (fedsim.aggregator.CentralNoise): noise on the sum, a fixed denominator
        self._reset_round()

    # ----------------------------------------------------------------- lifecycle
    def init(self, global_weights: NamedTensors) -> None:
        """Start from ``global_weights`` (copied) with fresh optimizer state and version 0."""
        if not global_weights:
            raise ValueError("init() needs at least one global tensor")
        self.weights = {k: _f32(v) for k, v in global_weights.items()}
        self.layout = FlatLayout(self.weights)
        self.slots = self.init_slots()
        self.version = 0
        self._reset_round()

    @classmethod
    def min_cohort(cls, cfg: ServerAlgoConfig) -> tuple[int, str]:
        """(the fewest updates a round needs to change the model, the rule's requirement as text)."""
        return 1, "at least one update"

    def init_slots(self) -> dict[str, NamedTensors]:
        """Fresh optimizer state for ``self.weights``; none by default."""
        return {}

    @property
    def global_weights(self) -> NamedTensors:
        """A copy of the current global weights."""
        return {k: v.clone() for k, v in self.weights.items()}

    def broadcast_extras(self) -> NamedTensors:
        """Tensors sent to clients together with the global weights."""
        return {}

    @property
    def needs_base(self) -> bool:
        """Whether ``offer`` needs the global weights an update was trained from (only FedAsync's mix rule)."""
        return False

    # ----------------------------------------------------------------- aggregation
    def weight_of(self, update: ClientUpdate) -> float:
        """Aggregation weight: the client's sample count, or 1 under uniform weighting."""
        return float(update.num_samples) if self.weighting == "samples" else 1.0

    def accumulate(self, update: ClientUpdate, weight: float) -> None:
        """Add ``weight * update.delta`` to the round's running sum (exactly: the order does not matter)."""
        self._check_update(update)
        self._add_exact(update, weight, weight)

    def _add_exact(self, update: ClientUpdate, weight: float, total_weight: float) -> None:
        """Add ``weight * delta`` to the fixed-point sum and ``total_weight`` to the exact total.

        All checks run before anything changes, so a rejected update leaves no trace.
        """
        for w in (weight, total_weight):
            if not (w >= 0 and math.isfinite(w)):
                raise UpdateError("invalid_weight", f"update from client {update.client_id}: weight must be finite and >= 0, "
                                 f"got {w}")
        self._sum.prepare(update.delta, weight, f"update from client {update.client_id}: delta")
        self._sum.commit()
        self._total += Fraction(total_weight)  # floats convert to fractions exactly
        self._count += 1

    @property
    def pending(self) -> int:
        """Number of updates accumulated since the last ``finalize``."""
        return self._count

    def finalize(self) -> NamedTensors:
        """Apply the server rule to the weighted mean delta; return (a copy of) the new global weights.

        With nothing accumulated the weights, optimizer state and version are left unchanged.
        """
        if self._count == 0:
            return self.global_weights
        self.apply(self._mean())
        self._reset_round()
        self.version += 1
        return self.global_weights

    def flush(self) -> bool:
        """Apply whatever is pending (here: ``finalize`` if updates are pending); True if anything was.

        Asynchronous strategies apply a partial buffer; every strategy can be flushed at the end of a run.
        """
        if not self._count:
            return False
        self.finalize()
        return True

    def _mean(self) -> NamedTensors:
        """The weighted mean delta ``(sum / 2**FIXED_POINT_BITS) / total`` as float32 tensors; under central DP
        the noised sum over a fixed denominator instead (``self.noise``)."""
        if self.noise is not None:
            return self.noise.noisy_mean(self._sum, self.version + 1)
        if self._total <= 0:
            raise ValueError(f"{self._count} updates accumulated with total weight {float(self._total)}; "
                             "cannot take their weighted mean (all clients had 0 samples?)")
        return self._sum.mean(self._total)

    def apply(self, mean_delta: NamedTensors) -> None:
        """The server rule: update ``self.weights`` in place from the mean delta Δ."""
        raise NotImplementedError

    # ----------------------------------------------------------------- checkpoints
    def state_dict(self) -> NamedTensors:
        """Global weights (``global/<name>``), optimizer slots (``<slot>/<name>``) and ``version``."""
        self._require_init()
        if self._count:
            raise RuntimeError(f"state_dict() called with {self._count} pending updates; "
                               "call finalize() first (checkpoints are taken between rounds)")
        return self._base_state()

    def _base_state(self) -> NamedTensors:
        state = {f"global/{k}": v.clone() for k, v in self.weights.items()}
        for slot, tensors in self.slots.items():
            state.update({f"{slot}/{k}": v.clone() for k, v in tensors.items()})
        state["version"] = torch.tensor(self.version, dtype=torch.int64)
        return state

    def load_state_dict(self, state: NamedTensors) -> None:
        """Restore what ``state_dict`` returned (works on a fresh, un-initialised strategy)."""
        if "version" not in state:
            raise ValueError("server state has no 'version' entry")
        weights = {k[len("global/"):]: v for k, v in state.items() if k.startswith("global/")}
        self.init(weights)
        expected = {"version"} | {f"global/{k}" for k in weights}
        for slot, tensors in self.slots.items():
            for k, v in tensors.items():
                key = f"{slot}/{k}"
                if key not in state:
                    raise ValueError(f"server state for {self.name!r} lacks {key!r}")
                if state[key].shape != v.shape:
                    raise ValueError(f"server state {key!r} has shape {tuple(state[key].shape)}, "
                                     f"expected {tuple(v.shape)}")
                v.copy_(state[key])
                expected.add(key)
        expected |= self._load_extra_state(state)
        unknown = sorted(set(state) - expected)
        if unknown:
            raise ValueError(f"server state for {self.name!r} has unexpected entries: {unknown[:5]}")
        self.version = int(state["version"])

    def _load_extra_state(self, state: NamedTensors) -> set[str]:
        """Restore entries beyond weights, slots and version; return the keys consumed (none here)."""
        return set()

    # ----------------------------------------------------------------- helpers
    def _reset_round(self) -> None:
        self._sum.reset(self.layout)
        self._total = Fraction(0)
        self._count = 0

    def _require_init(self) -> None:
        if not self.weights:
            raise RuntimeError(f"server strategy {self.name!r} used before init(global_weights)")

    def _check_update(self, update: ClientUpdate) -> None:
        """Raise ValueError unless the delta has exactly the global tensors' names and shapes."""
        self._require_init()
        _check_named(update.delta, self.weights, f"update from client {update.client_id}: delta")


def _check_named(tensors: NamedTensors, like: NamedTensors, what: str, prefix: str = "") -> None:
    missing = [k for k in like if prefix + k not in tensors]
    if missing:
        raise UpdateError("mismatch", f"{what} lacks tensor {prefix + missing[0]!r} "
                         f"({len(missing)} of {len(like)} missing)")
    for key, t in tensors.items():
        name = key[len(prefix):] if key.startswith(prefix) else None
        if name not in like:
            raise UpdateError("mismatch", f"{what} has tensor {key!r}, which is not a trainable global tensor")
        if t.shape != like[name].shape:
            raise UpdateError("mismatch", f"{what} tensor {key!r} has shape {tuple(t.shape)}, "
                             f"expected {tuple(like[name].shape)}")


@register
class FedAvg(ServerStrategy):
    """FedAvg: x ← x + η Δ, with Δ the sample-weighted mean delta."""

    name = "fedavg"

    def apply(self, mean_delta: NamedTensors) -> None:
        for k, d in mean_delta.items():
            self.weights[k].add_(d, alpha=self.lr)


MOMENTUM_FORMS = ("heavy_ball", "ema")
MOMENT_INITS = ("zero", "first_delta")
SECOND_MOMENT_OF = ("delta", "momentum")


def _check_choice(cfg: ServerAlgoConfig, key: str, allowed: tuple[str, ...]) -> None:
    if getattr(cfg, key) not in allowed:
        raise ValueError(f"config key 'algorithm.server.{key}' has invalid value {getattr(cfg, key)!r}: "
                         f"expected one of {', '.join(allowed)}")


class MomentumServer(ServerStrategy):
    """A server strategy with a first moment m of the mean delta; ``moment_init`` sets its first step."""

    def __init__(self, cfg: ServerAlgoConfig, num_clients: int, client_sizes: Sequence[int] | None = None) -> None:
        super().__init__(cfg, num_clients, client_sizes)
        _check_choice(cfg, "moment_init", MOMENT_INITS)

    def first_moment(self, m: torch.Tensor, d: torch.Tensor, decay: float, gain: float) -> torch.Tensor:
        """``m ← decay·m + gain·Δ`` in place; ``m ← Δ`` instead at the first server step under first_delta."""
        if self.cfg.moment_init == "first_delta" and self.version == 0:
            return m.copy_(d)
        return m.mul_(decay).add_(d, alpha=gain)


@register
class FedAvgM(MomentumServer):
    """FedAvg with server momentum, in one of two forms (``momentum_form``), v0 = 0:

    - ``heavy_ball`` (default; Hsu et al. 2019):  v ← β1 v + Δ;  x ← x + η v.
    - ``ema`` (the FedMLLM / OpenFedLLM code):  v ← β1 v + (1−β1) Δ;  x ← x + η v. With
      ``moment_init: first_delta`` v = Δ at the first step, as that code does (it also has no server
      lr: η = 1, the default here).

    Δ is sample-weighted by default, as in both. The slot is named ``v`` in both forms.
    """

    name = "fedavgm"

    def __init__(self, cfg: ServerAlgoConfig, num_clients: int, client_sizes: Sequence[int] | None = None) -> None:
        super().__init__(cfg, num_clients, client_sizes)
        _check_choice(cfg, "momentum_form", MOMENTUM_FORMS)

    def init_slots(self) -> dict[str, NamedTensors]:
        return {"v": {k: torch.zeros_like(w) for k, w in self.weights.items()}}

    def apply(self, mean_delta: NamedTensors) -> None:
        b1 = self.cfg.beta1
        gain = 1.0 if self.cfg.momentum_form == "heavy_ball" else 1 - b1
        for k, d in mean_delta.items():
            v = self.first_moment(self.slots["v"][k], d, b1, gain)
            self.weights[k].add_(v, alpha=self.lr)


class AdaptiveServer(MomentumServer):
    """Reddi et al.'s adaptive server optimizers, without bias correction:

        m ← β1 m + (1−β1) Δ;   v ← second_moment(v, s²);   x ← x + η m / (√v + τ)

    with s = Δ (``second_moment_of: delta``, Reddi et al., the default) or s = m (``momentum``, as the
    FedMLLM / OpenFedLLM code does for FedYogi and FedAdam), m0 = 0 (``moment_init: zero``) or m = Δ at the
    first server step (``first_delta``, that code's FedYogi/FedAdam), v0 = τ² (as in that code), default
    η = 1e-3, and client deltas averaged with equal weights. That code's FedAdagrad has no momentum
    (m = Δ every round): here that is ``beta1: 0``, with which both ``moment_init`` and ``second_moment_of``
    change nothing.
    """

    default_lr = 1e-3
    default_weighting = "uniform"

    def __init__(self, cfg: ServerAlgoConfig, num_clients: int, client_sizes: Sequence[int] | None = None) -> None:
        super().__init__(cfg, num_clients, client_sizes)
        _check_choice(cfg, "second_moment_of", SECOND_MOMENT_OF)
        if not (math.isfinite(cfg.tau) and cfg.tau > 0):
            raise ValueError(f"config key 'algorithm.server.tau' has invalid value {cfg.tau!r} for {self.name}: "
                             "expected a finite value > 0 (the step is m / (sqrt(v) + tau))")

    def init_slots(self) -> dict[str, NamedTensors]:
        tau2 = self.cfg.tau ** 2
        return {"m": {k: torch.zeros_like(w) for k, w in self.weights.items()},
                "v": {k: torch.full_like(w, tau2) for k, w in self.weights.items()}}

    def second_moment(self, v: torch.Tensor, s2: torch.Tensor) -> torch.Tensor:
        """Return the new second moment from the old ``v`` and ``s2`` (Δ² or m², see ``second_moment_of``)."""
        raise NotImplementedError

    def apply(self, mean_delta: NamedTensors) -> None:
        b1, tau = self.cfg.beta1, self.cfg.tau
        for k, d in mean_delta.items():
            m = self.first_moment(self.slots["m"][k], d, b1, 1 - b1)
            s = m if self.cfg.second_moment_of == "momentum" else d
            v = self.slots["v"][k] = self.second_moment(self.slots["v"][k], s * s)
            # A tau that underflows float32 would leave 0/0 where m = v = 0: the floor keeps such steps at 0.
            denominator = (v.sqrt() + tau).clamp_min(torch.finfo(torch.float32).tiny)
            self.weights[k].add_(self.lr * m / denominator)


@register
class FedAdagrad(AdaptiveServer):
    """FedAdagrad: v ← v + s² (s = Δ, or m; the FedMLLM code's form is ``beta1: 0``, so m = s = Δ)."""

    name = "fedadagrad"

    def second_moment(self, v: torch.Tensor, s2: torch.Tensor) -> torch.Tensor:
        return v + s2


@register
class FedYogi(AdaptiveServer):
    """FedYogi: v ← v − (1−β2) s² sign(v − s²)  (grows when s² > v, shrinks when s² < v; s = Δ, or m)."""

    name = "fedyogi"

    def second_moment(self, v: torch.Tensor, s2: torch.Tensor) -> torch.Tensor:
        return v - (1 - self.cfg.beta2) * s2 * torch.sign(v - s2)


@register
class FedAdam(AdaptiveServer):
    """FedAdam: v ← β2 v + (1−β2) s²  (s = Δ, or m)."""

    name = "fedadam"

    def second_moment(self, v: torch.Tensor, s2: torch.Tensor) -> torch.Tensor:
        return self.cfg.beta2 * v + (1 - self.cfg.beta2) * s2


@register
class Scaffold(ServerStrategy):
    """SCAFFOLD (Karimireddy et al.):  x ← x + η Δ;   c ← c + Σ_{i∈S} w_i Δc_i / Σ_{j=1..N} w_j.

    Δ and the control update use the same weights w: uniform by default, as in the paper (Δ the plain
    mean over S, c ← c + (1/N) Σ_{i∈S} Δc_i), or the sample counts n_i under ``weighting: samples``, where
    the denominator runs over all N clients' samples (``client_sizes``). Either way c stays the w-weighted
    mean over all N clients of their c_i, as long as a client's c_i is stored exactly when its update is
    accepted. Δc_i arrive in ``update.extras["control/<name>"]`` and are summed exactly, like the deltas;
    clients receive c as ``{"control/<name>": c}``.
    """

    name = "scaffold"
    default_weighting = "uniform"
    PREFIX = "control/"

    def __init__(self, cfg: ServerAlgoConfig, num_clients: int, client_sizes: Sequence[int] | None = None) -> None:
        self._control_sum = FixedPointSum()  # before super().__init__, whose _reset_round empties it
        super().__init__(cfg, num_clients, client_sizes)
        if self.weighting == "samples":
            if self.client_sizes is None or len(self.client_sizes) != num_clients:
                raise ValueError("SCAFFOLD with algorithm.server.weighting=samples needs the sample count of "
                                 f"every one of the {num_clients} clients (client_sizes)")
            self.population_weight = int(self.client_sizes.sum())
        else:
            self.population_weight = num_clients

    def init_slots(self) -> dict[str, NamedTensors]:
        return {"control": {k: torch.zeros_like(w) for k, w in self.weights.items()}}

    def broadcast_extras(self) -> NamedTensors:
        return {self.PREFIX + k: c.clone() for k, c in self.slots.get("control", {}).items()}

    def accumulate(self, update: ClientUpdate, weight: float) -> None:
        controls = {k: v for k, v in update.extras.items() if k.startswith(self.PREFIX)}
        self._require_init()
        what = f"update from client {update.client_id}: extras"
        _check_named(controls, self.weights, what, prefix=self.PREFIX)
        self._control_sum.prepare({k: controls[self.PREFIX + k] for k in self.weights}, weight, what, self.PREFIX)
        super().accumulate(update, weight)  # checks everything before changing anything
        self._control_sum.commit()

    def apply(self, mean_delta: NamedTensors) -> None:
        control_step = self._control_sum.mean(self.population_weight)
        for k, d in mean_delta.items():
            self.weights[k].add_(d, alpha=self.lr)
            self.slots["control"][k].add_(control_step[k])

    def _reset_round(self) -> None:
        super()._reset_round()
        self._control_sum.reset(self.layout)


@register
class LocalOnly(ServerStrategy):
    """Local training only: no aggregation, the global adapter never changes.

    The engine keeps each client's own adapter (``personalized``); updates are only validated and counted.
    """

    name = "local_only"
    personalized = True

    def accumulate(self, update: ClientUpdate, weight: float) -> None:
        self._check_update(update)
        self._count += 1

    def finalize(self) -> NamedTensors:
        if self._count:
            self._reset_round()
            self.version += 1
        return self.global_weights


@register
class ZeroShot(LocalOnly):
    """Zero-shot evaluation: clients are never trained; otherwise like ``local_only``."""

    name = "zero_shot"
    trains = False
