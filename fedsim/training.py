"""Local training of one client: the loop, its batches and the learning-rate schedule across rounds."""

from __future__ import annotations

import math
from typing import Iterable, Iterator

import numpy as np
import torch

from fedsim.algorithms import ClientStrategy, LocalContext
from fedsim.config import TrainingConfig


def round_lr(cfg: TrainingConfig, round_idx: int, rounds: int) -> float:
    """The local learning rate of round ``round_idx`` (1-based): constant, or cosine-decayed across rounds
    (round 1 at ``lr``, the last at ``min_lr``).

    With ``warmup_fraction`` f > 0, the FedMLLM code's ``cosine_warm_learning_rate``: with r = round_idx - 1
    and W = f * rounds warm-up rounds (not rounded), lr * (r + 1) / W while r < W, then ``lr`` (constant) or
    min_lr + (lr - min_lr) * (1 + cos(pi * (r - W) / (rounds - W))) / 2 (cosine). As in that code, a
    warm-up shorter than one round puts round 1 above ``lr`` (1% of 50 rounds: W = 0.5, round 1 at 2 lr).
    """
    if cfg.warmup_fraction > 0:
        warmup, r = cfg.warmup_fraction * rounds, round_idx - 1
        if r < warmup:
            return cfg.lr * (r + 1) / warmup
        if cfg.lr_schedule == "constant":
            return cfg.lr
        return cfg.min_lr + (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * (r - warmup) / (rounds - warmup))) / 2
    if cfg.lr_schedule == "constant" or rounds <= 1:
        return cfg.lr
    progress = (round_idx - 1) / (rounds - 1)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * progress))


def batch_indices(indices: np.ndarray, cfg: TrainingConfig, rng: np.random.Generator) -> Iterator[np.ndarray]:
    """Shuffled mini-batches of a client's shard: ``local_epochs`` passes, or exactly ``local_steps`` batches."""
    if len(indices) == 0:
        raise ValueError("a client with no samples cannot train; check partition.min_samples")
    if cfg.local_steps > 0:
        produced = 0
        while produced < cfg.local_steps:
            order = rng.permutation(indices)
            for start in range(0, len(order), cfg.batch_size):
                yield order[start:start + cfg.batch_size]
                produced += 1
                if produced == cfg.local_steps:
                    return
    else:
        for _ in range(cfg.local_epochs):
            order = rng.permutation(indices)
            for start in range(0, len(order), cfg.batch_size):
                yield order[start:start + cfg.batch_size]


def samples_per_task(shard_size: int, cfg: TrainingConfig) -> int:
    """Samples one local training goes through: known before training, it is the modeled compute cost."""
    if cfg.local_steps > 0:
        full, rest = divmod(shard_size, cfg.batch_size)
        batch_sizes = [cfg.batch_size] * full + ([rest] if rest else [])
        return sum(batch_sizes[i % len(batch_sizes)] for i in range(cfg.local_steps))
    return shard_size * cfg.local_epochs


def local_optimizer(params: dict[str, torch.nn.Parameter], cfg: TrainingConfig, lr: float) -> torch.optim.Optimizer:
    """``training.optimizer``: AdamW (the default), or SGD with ``training.momentum`` (what SCAFFOLD assumes)."""
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params.values(), lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params.values(), lr=lr, betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay)
    raise ValueError(f"config key 'training.optimizer' has invalid value {cfg.optimizer!r}: expected adamw or sgd")


def train_locally(
    model: torch.nn.Module,
    params: dict[str, torch.nn.Parameter],
    batches: Iterable[dict[str, torch.Tensor]],
    strategy: ClientStrategy,
    ctx: LocalContext,
    cfg: TrainingConfig,
    lr: float,
) -> tuple[int, float]:
    """Run the local optimizer over ``batches``; the client strategy may add a penalty and correct gradients.

    Returns (optimizer steps, mean training loss without the penalty).
    """
    optimizer = local_optimizer(params, cfg, lr)
    strategy.begin(ctx)
    steps, loss_sum = 0, 0.0
    for batch in batches:
        loss = model(**batch).loss
        penalty = strategy.penalty(params)
        (loss if penalty is None else loss + penalty).backward()
        strategy.correct_gradients(params)
        if cfg.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params.values(), cfg.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        steps += 1
        loss_sum += loss.item()
    return steps, loss_sum / max(steps, 1)
