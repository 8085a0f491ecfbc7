"""Asynchronous server strategies: the server steps as updates arrive, not once per round.

A client trains from global version v (``update.base_version``); offered at server version t, its update
has staleness s = t − v and weight w(s) = (1 + s) ** −a with a = ``staleness_exponent`` (FLSim's polynomial
staleness weight; a = 1 is FedScale's 1/(1+s), a = 0 ignores staleness). With ``max_staleness`` > 0,
updates staler than that are dropped. Drive these strategies with ``offer(update)`` for each arriving
update (with the global weights it was trained from, for the strategies that need them) and ``flush()``
once at the end of a run; ``accumulate`` is for synchronous rounds only.
"""

from __future__ import annotations

import logging
import math
from typing import Sequence

import torch

from fedsim.algorithms.fixedpoint import UpdateError
from fedsim.algorithms.server import ServerStrategy, _check_named, register
from fedsim.config import ServerAlgoConfig
from fedsim.guard import first_non_finite
from fedsim.messages import ClientUpdate, NamedTensors

logger = logging.getLogger(__name__)


class AsyncServerStrategy(ServerStrategy):
    """Base of the asynchronous strategies: staleness, dropping, the staleness histogram, checkpoints.

    Subclasses implement ``apply_update(update, staleness)``. ``staleness_counts`` maps each staleness
    seen to the number of updates offered with it (dropped ones included); ``stale_dropped`` counts drops.
    """

    asynchronous = True
    default_weighting = "uniform"

    def __init__(self, cfg: ServerAlgoConfig, num_clients: int, client_sizes: Sequence[int] | None = None) -> None:
        super().__init__(cfg, num_clients, client_sizes)
        a = cfg.staleness_exponent
        if not (math.isfinite(a) and a >= 0):
            raise ValueError(f"config key 'algorithm.server.staleness_exponent' has invalid value {a!r}: "
                             "expected a finite value >= 0")
        if not cfg.max_staleness >= 0:
            raise ValueError(f"config key 'algorithm.server.max_staleness' has invalid value "
                             f"{cfg.max_staleness!r}: expected an integer >= 0 (0: no bound)")
        self._reset_stats()

    def init(self, global_weights: NamedTensors) -> None:
        super().init(global_weights)
        self._reset_stats()

    def _reset_stats(self) -> None:
        self.staleness_counts: dict[int, int] = {}
        self.stale_dropped = 0

    # ----------------------------------------------------------------- the asynchronous API
    def staleness_weight(self, staleness: int) -> float:
        """w(s) = (1 + s) ** −staleness_exponent."""
        return (1.0 + staleness) ** -self.cfg.staleness_exponent

    def staleness_of(self, update: ClientUpdate) -> int:
        """s = server version − the version the client trained from; ValueError if negative."""
        s = self.version - update.base_version
        if s < 0:
            raise UpdateError("ahead_of_server", f"update from client {update.client_id} was trained from version "
                             f"{update.base_version}, ahead of the server's version {self.version}")
        return s

    def offer(self, update: ClientUpdate, base: NamedTensors | None = None) -> bool:
        """Apply ``update`` per the algorithm and return True, or drop it as too stale and return False.

        ``base`` is the global weights of ``update.base_version``, which the client trained from.
        Invalid updates raise before anything changes (the histogram included).
        """
        self._check_update(update)
        s = self.staleness_of(update)
        limit = self.cfg.max_staleness
        if limit > 0 and s > limit:
            self._record(s)
            self.stale_dropped += 1
            logger.debug("dropped update from client %d: staleness %d > max_staleness %d",
                         update.client_id, s, limit)
            return False
        self.apply_update(update, s, base)
        self._record(s)
        return True

    def apply_update(self, update: ClientUpdate, staleness: int, base: NamedTensors | None) -> None:
        """The algorithm: fold one (already validated, not dropped) update into the model or a buffer."""
        raise NotImplementedError

    def flush(self) -> bool:
        """Apply whatever is buffered; True if the model changed. Call once at the end of a run."""
        return False

    def staleness_summary(self) -> dict[str, float]:
        """Offered and dropped counts, mean and max staleness of all offered updates."""
        offered = sum(self.staleness_counts.values())
        mean = sum(s * c for s, c in self.staleness_counts.items()) / offered if offered else 0.0
        return {"offered": offered, "stale_dropped": self.stale_dropped, "staleness_mean": mean,
                "staleness_max": max(self.staleness_counts, default=0)}

    def _record(self, staleness: int) -> None:
        self.staleness_counts[staleness] = self.staleness_counts.get(staleness, 0) + 1

    # ----------------------------------------------------------------- the synchronous API, refused
    def accumulate(self, update: ClientUpdate, weight: float) -> None:
        raise RuntimeError(f"server strategy {self.name!r} is asynchronous: pass each update to "
                           "offer(update), which weighs it by staleness, and call flush() at the end of a run")

    def finalize(self) -> NamedTensors:
        """A copy of the global weights; refuses while updates are buffered (those need ``flush``)."""
        if self.pending:
            raise RuntimeError(f"finalize() called on asynchronous {self.name!r} with {self.pending} "
                               "buffered updates; call flush() to apply a partial buffer at the end of a run")
        return self.global_weights

    # ----------------------------------------------------------------- checkpoints
    def state_dict(self) -> NamedTensors:
        """Weights, slots and version as for synchronous strategies, plus ``staleness_hist`` (int64,
        index = staleness), ``stale_dropped`` and any buffer; may be taken at any time."""
        self._require_init()
        state = self._base_state()
        hist = torch.zeros(max(self.staleness_counts, default=-1) + 1, dtype=torch.int64)
        for s, c in self.staleness_counts.items():
            hist[s] = c
        state["staleness_hist"] = hist
        state["stale_dropped"] = torch.tensor(self.stale_dropped, dtype=torch.int64)
        return state

    def _load_extra_state(self, state: NamedTensors) -> set[str]:
        for key in ("staleness_hist", "stale_dropped"):
            if key not in state:
                raise ValueError(f"server state for {self.name!r} lacks {key!r}")
        hist = state["staleness_hist"].tolist()
        self.staleness_counts = {s: int(c) for s, c in enumerate(hist) if c}
        self.stale_dropped = int(state["stale_dropped"])
        return {"staleness_hist", "stale_dropped"}


@register
class FedBuff(AsyncServerStrategy):
    """FedBuff (Nguyen et al., AISTATS 2022): buffer K = ``buffer_size`` updates, then take one step

        x ← x + η · (1 / Σ_i n_i) · Σ_i n_i w(s_i) Δ_i,     w(s) = (1 + s) ** −a

    over the buffered updates i, where n_i = 1 under uniform weighting (the default), which is the paper's
    x ← x + η (1/K) Σ_i w(s_i) Δ_i, or n_i = the client's sample count under ``weighting: samples``.
    s_i is measured when update i is offered; version += 1 per step; η defaults to 1. The buffer is an
    exact fixed-point sum, so a step does not depend on the order of the updates within its buffer.
    ``flush()`` applies a partial buffer of n < K updates with the same formula (a mean over those n).
    """

    name = "fedbuff"

    def __init__(self, cfg: ServerAlgoConfig, num_clients: int, client_sizes: Sequence[int] | None = None) -> None:
        super().__init__(cfg, num_clients, client_sizes)
        if not cfg.buffer_size >= 1:
            raise ValueError(f"config key 'algorithm.server.buffer_size' has invalid value "
                             f"{cfg.buffer_size!r}: expected an integer >= 1")

    def apply_update(self, update: ClientUpdate, staleness: int, base: NamedTensors | None) -> None:
        n = self.weight_of(update)
        if n <= 0:
            raise ValueError(f"update from client {update.client_id} has {update.num_samples} samples; "
                             "under algorithm.server.weighting=samples every update needs at least one")
        self._add_exact(update, n * self.staleness_weight(staleness), n)
        if self._count >= self.cfg.buffer_size:
            self._step()

    def flush(self) -> bool:
        if not self._count:
            return False
        self._step()
        return True

    def _step(self) -> None:
        for k, d in self._mean().items():
            self.weights[k].add_(d, alpha=self.lr)
        self._reset_round()
        self.version += 1

    def state_dict(self) -> NamedTensors:
        """Adds the buffer: ``buffer/<name>`` (int64 fixed-point sums), ``buffer_count``, ``buffer_total``."""
        state = super().state_dict()
        for k, w in self.weights.items():
            state[f"buffer/{k}"] = self._sum[k].clone() if k in self._sum else torch.zeros_like(w, dtype=torch.int64)
        # Σ n_i of integers (1 or sample counts), hence exact as an int64.
        state["buffer_count"] = torch.tensor(self._count, dtype=torch.int64)
        state["buffer_total"] = torch.tensor(int(self._total), dtype=torch.int64)
        return state

    def _load_extra_state(self, state: NamedTensors) -> set[str]:
        keys = super()._load_extra_state(state)
        buffer_keys = {f"buffer/{k}" for k in self.weights} | {"buffer_count", "buffer_total"}
        missing = sorted(buffer_keys - set(state))
        if missing:
            raise ValueError(f"server state for {self.name!r} lacks {missing[0]!r}")
        self._reset_round()
        self._count = int(state["buffer_count"])
        self._total += int(state["buffer_total"])
        if self._count:
            for k, w in self.weights.items():
                t = state[f"buffer/{k}"]
                if t.shape != w.shape or t.dtype != torch.int64:
                    raise ValueError(f"server state 'buffer/{k}' is {t.dtype} {tuple(t.shape)}, "
                                     f"expected torch.int64 {tuple(w.shape)}")
            self._sum.restore({k: state[f"buffer/{k}"] for k in self.weights})
        return keys | buffer_keys


@register
class FedAsync(AsyncServerStrategy):
    """FedAsync (Xie et al., 2019): every update is applied on arrival, version += 1 per applied update,
    with α_s = α · w(s), α = ``mixing``, w(s) = (1 + s) ** −a and η the server lr (default 1).

    ``fedasync_rule: mix`` (default) is the paper's  x ← (1 − α_s) x + α_s x_client  with
    x_client = x_base + η Δ, where x_base is the global version the client trained from (η = 1 gives the
    paper exactly). ``fedasync_rule: delta`` is FLSim's  x ← x + η α_s Δ: it equals the paper's rule minus
    the term α_s (x_base − x), which is zero for a fresh update, and needs no old global version.
    """

    name = "fedasync"

    def __init__(self, cfg: ServerAlgoConfig, num_clients: int, client_sizes: Sequence[int] | None = None) -> None:
        super().__init__(cfg, num_clients, client_sizes)
        if not 0 < cfg.mixing <= 1:
            raise ValueError(f"config key 'algorithm.server.mixing' has invalid value {cfg.mixing!r}: "
                             "expected a value in (0, 1]")
        if cfg.fedasync_rule not in ("mix", "delta"):
            raise ValueError(f"config key 'algorithm.server.fedasync_rule' has invalid value "
                             f"{cfg.fedasync_rule!r}: expected mix or delta")
        if self.weighting != "uniform":
            raise ValueError(f"config key 'algorithm.server.weighting' has invalid value {cfg.weighting!r} "
                             "for fedasync: it applies one update at a time, so there is nothing to weight "
                             "by samples; expected auto or uniform")

    @property
    def needs_base(self) -> bool:
        return self.cfg.fedasync_rule == "mix"

    def mixing_weight(self, staleness: int) -> float:
        """α_s = mixing · w(s)."""
        return self.cfg.mixing * self.staleness_weight(staleness)

    def apply_update(self, update: ClientUpdate, staleness: int, base: NamedTensors | None) -> None:
        what = f"update from client {update.client_id}"
        deltas = _finite_f32(update.delta, f"{what}: delta")
        alpha = self.mixing_weight(staleness)
        if self.cfg.fedasync_rule == "delta":
            for k, d in deltas.items():
                self.weights[k].add_(d, alpha=self.lr * alpha)
        else:
            if base is None:
                raise UpdateError("missing_base", f"{what}: fedasync_rule=mix needs the global weights of "
                                                  f"version {update.base_version}, which it was trained from")
            _check_named(base, self.weights, f"{what}: base weights")
            bases = _finite_f32(base, f"{what}: base weights")
            for k, d in deltas.items():  # all checks passed: nothing below can fail half-way
                client = bases[k].add_(d, alpha=self.lr)
                self.weights[k].mul_(1 - alpha).add_(client, alpha=alpha)
        self.version += 1


def _finite_f32(tensors: NamedTensors, what: str) -> NamedTensors:
    """Float32 CPU copies, or UpdateError (non_finite) naming the first tensor with NaN or Inf."""
    out = {k: t.detach().to("cpu", torch.float32, copy=True) for k, t in tensors.items()}
    name = first_non_finite(out)
    if name is not None:
        raise UpdateError("non_finite", f"{what} {name!r} has non-finite values (NaN or Inf); it cannot be applied")
    return out
