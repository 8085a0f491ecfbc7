"""The server side of a run: the update guard and central DP's clipping in front of a server strategy.

A plain object, testable without Ray; the Ray aggregator actor is a thin shell around it. Updates are taken
one at a time and folded into the strategy's running sum (or buffer), so memory is O(adapter size)
whatever the cohort size (the robust rules, which need the round's updates together, hold O(K x adapter)).
Where clipping and noise sit among the other steps an update goes through: fedsim/uplink.py.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from typing import Any, Sequence

from fedsim import privacy
from fedsim.algorithms import ServerStrategy, build_server_strategy
from fedsim.algorithms.fixedpoint import FixedPointSum, UpdateError
from fedsim.config import ExperimentConfig, PrivacyConfig
from fedsim.guard import UpdateGuard
from fedsim.messages import ClientUpdate, NamedTensors, Published, WireTensors
from fedsim.models.adapter import adapter_sha256
from fedsim.seeding import derive_seed

ACCEPTED, REJECTED, STALE = "accepted", "rejected", "stale"


class CentralNoise:
    """Central DP's server steps: clip every update to S (fixed, or adaptive: Andrew et al. 2021), then add
    N(0, σ²S²) once to each step's exact sum and divide by the fixed denominator K, the expected number of
    updates a step (clients per round; FedBuff's buffer size), so that one client moves the mean by at most S/K
    whichever clients report. The noise of step t is drawn from the run's seed and t alone."""

    def __init__(self, cfg: PrivacyConfig, seed: int, denominator: int, count_std: float) -> None:
        self.seed, self.denominator = seed, denominator
        self.adaptive = (privacy.AdaptiveClip(cfg.clip_norm, cfg.target_quantile, cfg.clip_lr, count_std, seed)
                         if cfg.adaptive_clip else None)
        self.fixed_clip = cfg.clip_norm
        # Adaptive clipping spends part of the budget on the count: the update's noise grows to keep the total.
        self.sigma = (privacy.adaptive_noise_multiplier(cfg.noise_multiplier, count_std) if cfg.adaptive_clip
                      else cfg.noise_multiplier)

    @property
    def clip_norm(self) -> float:
        return self.adaptive.clip_norm if self.adaptive else self.fixed_clip

    def clip(self, update: ClientUpdate) -> tuple[ClientUpdate, float]:
        """The update clipped to the current S, and its norm before clipping."""
        delta, norm = privacy.clip_update(update.delta, self.clip_norm)
        return dataclasses.replace(update, delta=delta), norm

    def noisy_mean(self, total: FixedPointSum, step: int) -> NamedTensors:
        """(Σ clipped updates + N(0, σ²S²)) / K for server step ``step`` (the version it makes)."""
        summed = total.mean(1)
        noise = privacy.gaussian_noise(summed, self.sigma * self.clip_norm,
                                       derive_seed(self.seed, "central_dp", step))
        return {k: (t + noise[k]) / self.denominator for k, t in summed.items()}

    def observe(self, norm: float) -> None:
        if self.adaptive:
            self.adaptive.observe(norm)

    def end_step(self, step: int) -> None:
        if self.adaptive:
            self.adaptive.end_step(step, self.denominator)

    def state(self) -> dict[str, Any]:
        return self.adaptive.state() if self.adaptive else {}

    def load_state(self, state: dict[str, Any]) -> None:
        if self.adaptive:
            self.adaptive.load_state(state)


def noise_denominator(cfg: ExperimentConfig) -> int:
    """Central DP's fixed denominator: the updates one server step expects."""
    server = cfg.algorithm.server
    return server.buffer_size if server.name == "fedbuff" else cfg.clients_per_round()


def count_noise_std(cfg: ExperimentConfig) -> float:
    """Adaptive clipping's noise on the clipped-update count: privacy.count_noise_std, or K/20 (Andrew et al.)."""
    return cfg.privacy.count_noise_std or noise_denominator(cfg) / 20


def accountant_for(cfg: ExperimentConfig) -> privacy.PrivacyAccountant | None:
    """The run's privacy accountant, one step per noised server step. Central: the subsampled Gaussian with
    q = K/N (K: ``noise_denominator``). Local: the Gaussian mechanism of each client's own releases, q = 1, the
    bound for a client that takes part in every step."""
    dp = cfg.privacy
    if dp.mode == "none":
        return None
    population = cfg.partition.num_clients
    sample = noise_denominator(cfg) if dp.mode == "central" else population
    return privacy.PrivacyAccountant(dp.noise_multiplier, sample, population, dp.delta, dp.accountant, dp.sampling)


def build_aggregator(cfg: ExperimentConfig, client_sizes: Sequence[int]) -> Aggregator:
    """The run's server strategy behind its guard, with central DP when ``privacy.mode`` is central (whose
    sensitivity bound needs uniform weighting: ``weighting: auto`` resolves to it)."""
    server = cfg.algorithm.server
    noise = None
    if cfg.privacy.mode == "central":
        server = dataclasses.replace(server, weighting="uniform")
        noise = CentralNoise(cfg.privacy, cfg.seed, noise_denominator(cfg), count_noise_std(cfg))
    strategy = build_server_strategy(server, cfg.partition.num_clients, client_sizes)
    strategy.noise = noise
    return Aggregator(strategy, UpdateGuard(cfg.runtime.max_update_norm))


class Aggregator:
    def __init__(self, strategy: ServerStrategy, guard: UpdateGuard):
        self.strategy = strategy
        self.guard = guard
        self.outcomes: Counter[str] = Counter()

    def init(self, weights: NamedTensors) -> None:
        self.strategy.init(weights)

    @property
    def needs_base(self) -> bool:
        """Whether ``submit`` needs ``base`` (else it may be left out, and a remote one is not fetched)."""
        return self.strategy.needs_base

    @property
    def version(self) -> int:
        return self.strategy.version

    def submit(self, update: ClientUpdate, base: Published | None = None) -> str:
        """Take one update: ``accepted`` (folded in), ``rejected`` (guard, or any fault while folding it in)
        or ``stale`` (async bound). ``base`` is the published version the client trained from
        (asynchronous mode). One bad update never ends a run: it is rejected, with its reason counted."""
        if self.guard.check(update) is not None:
            outcome = REJECTED
        else:
            try:
                outcome = self._fold(update, base)
            except Exception as err:  # whatever one update does wrong, the run goes on
                # Strategies check everything before changing anything, so a rejected update leaves no trace.
                kind = err.kind if isinstance(err, UpdateError) else type(err).__name__
                self.guard.reject(update, kind, str(err))
                outcome = REJECTED
        self.outcomes[outcome] += 1
        return outcome

    def _fold(self, update: ClientUpdate, base: Published | None) -> str:
        noise, version = self.strategy.noise, self.strategy.version
        if noise is not None:
            update, norm = noise.clip(update)
        if self.strategy.asynchronous:
            outcome = ACCEPTED if self.strategy.offer(update, None if base is None else base[0]) else STALE
        else:
            self.strategy.accumulate(update, self.strategy.weight_of(update))
            outcome = ACCEPTED
        if noise is not None and outcome == ACCEPTED:
            noise.observe(norm)
            self._stepped(version)  # FedBuff may have stepped: the clip norm moves on
        return outcome

    def _stepped(self, version: int) -> int:
        """The version now; a server step since ``version`` ends the clip norm's step."""
        if self.strategy.noise is not None and self.strategy.version != version:
            self.strategy.noise.end_step(self.strategy.version)
        return self.strategy.version

    def close_round(self) -> int:
        """Synchronous mode: apply the round's updates; returns the new version."""
        version = self.strategy.version
        self.strategy.finalize()
        return self._stepped(version)

    def flush(self) -> int:
        """Asynchronous mode, end of run: apply a partly filled buffer, if the strategy keeps one."""
        version = self.strategy.version
        self.strategy.flush()
        return self._stepped(version)

    def snapshot(self) -> tuple[int, Published]:
        """(version, (global weights, extras broadcast to clients))."""
        return self.strategy.version, (WireTensors(self.strategy.global_weights),
                                       WireTensors(self.strategy.broadcast_extras()))

    def state(self) -> tuple[NamedTensors, dict[str, Any]]:
        """For a checkpoint (between rounds): the strategy's tensors and the counts, as JSON."""
        noise = self.strategy.noise
        counts = {"outcomes": dict(self.outcomes), "rejected": dict(self.guard.rejected),
                  "clip": noise.state() if noise else {}}
        return WireTensors(self.strategy.state_dict()), counts

    def restore(self, tensors: NamedTensors, counts: dict[str, Any]) -> None:
        """Continue from ``state()``'s output."""
        self.strategy.load_state_dict(tensors)
        self.outcomes = Counter(counts["outcomes"])
        self.guard.rejected = dict(counts["rejected"])
        if self.strategy.noise is not None:
            self.strategy.noise.load_state(counts.get("clip", {}))

    def stats(self) -> dict[str, Any]:
        staleness = dict(sorted(getattr(self.strategy, "staleness_counts", {}).items()))
        total = sum(staleness.values())
        return {
            "accepted_updates": self.outcomes[ACCEPTED],
            "rejected_updates": self.outcomes[REJECTED],
            "rejected_by_reason": dict(self.guard.rejected),
            "stale_updates": self.outcomes[STALE],
            "staleness_histogram": {str(s): n for s, n in staleness.items()},
            "mean_staleness": sum(s * n for s, n in staleness.items()) / total if total else 0.0,
            "adapter_sha256": adapter_sha256(self.strategy.weights),
            "clip_norm": self.strategy.noise.clip_norm if self.strategy.noise else None,
        }
