"""What a client's update goes through between its local training and the server's rule, in one fixed order.

On the client (``Uplink.send``):
  1. attack: an attacker replaces its delta (fedsim/attacks.py; the poisoning attacks act on its training rows
     instead, fedsim.client);
  2. local DP (``privacy.mode: local``): clip to S, add N(0, σ²S²) to every coordinate;
  3. compression (``compression.kind``), with error feedback for the sparse kinds: what was not sent stays in
     the client's state (``residual/<name>``) and is added to its next update.
On the server (fedsim/aggregator.py):
  4. central DP (``privacy.mode: central``): clip each received update to S (the server's own clipping, so an
     attacker cannot skip it);
  5. aggregation: the exact fixed-point sum, or a robust rule over the round's updates;
  6. central DP: Gaussian noise N(0, σ²S²) added once to the sum, divided by a fixed denominator (K);
  7. the server strategy's rule (FedAvg, FedAdam, FedBuff's step, ...).
Noise before compression (2 before 3) keeps compression post-processing of a private release; compression
before server clipping (3 before 4) keeps the sensitivity exactly S whatever the encoding does.
"""

from __future__ import annotations

import numpy as np

from fedsim import compression, privacy
from fedsim.attacks import KINDS, attack, choose_attackers
from fedsim.config import ExperimentConfig
from fedsim.messages import NamedTensors
from fedsim.seeding import derive_seed

RESIDUAL = "residual/"  # client-state keys holding error feedback's residual


def residual_of(state: NamedTensors | None) -> NamedTensors | None:
    if not state:
        return None
    residual = {k[len(RESIDUAL):]: v for k, v in state.items() if k.startswith(RESIDUAL)}
    return residual or None


class Uplink:
    """Steps 1-3 for one run's clients; cheap to build (the attackers are a sorted id array)."""

    def __init__(self, cfg: ExperimentConfig) -> None:
        self.cfg = cfg
        self.attackers = choose_attackers(cfg)
        self.keeps_residual = cfg.compression.kind in compression.SPARSE and cfg.compression.error_feedback

    def is_attacker(self, client: int) -> bool:
        i = np.searchsorted(self.attackers, client)
        return bool(i < len(self.attackers) and self.attackers[i] == client)

    def send(self, delta: NamedTensors, seed_round: int, client: int,
             state: NamedTensors | None) -> tuple[NamedTensors, NamedTensors]:
        """(what the server receives, the client-state entries to keep: error feedback's residual)."""
        if self.cfg.attack.kind in KINDS and self.is_attacker(client):
            delta = attack(delta, self.cfg, seed_round, client)
        dp = self.cfg.privacy
        if dp.mode == "local":
            delta, _ = privacy.clip_update(delta, dp.clip_norm)
            noise = privacy.gaussian_noise(delta, dp.noise_multiplier * dp.clip_norm,
                                           derive_seed(self.cfg.seed, "local_dp", seed_round, client))
            delta = {k: d + noise[k] for k, d in delta.items()}
        kind = self.cfg.compression.kind
        if kind == "none":
            return delta, {}
        sent, residual = compression.compress(
            delta, kind, self.cfg.compression.density, residual_of(state), self.keeps_residual,
            derive_seed(self.cfg.seed, "compress", seed_round, client))
        return sent, {RESIDUAL + k: v for k, v in (residual or {}).items()}
