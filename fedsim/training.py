"""Local training of one client: the loop, its batches and the learning-rate schedule across rounds."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch

from fedsim.algorithms import ClientStrategy, LocalContext
from fedsim.config import TrainingConfig
from fedsim.data.collator import IGNORE_INDEX
from fedsim.models.multiclient import ClientRows, multi_client_lora


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


@dataclass
class LocalRun:
    """One client's part of a multi-client training: its own LoRA tensors, mini-batches (lists of encoded samples),
    strategy and optimizer, and what it has done so far."""

    params: dict[str, torch.Tensor]
    batches: Iterator[list[dict[str, Any]]]
    strategy: ClientStrategy
    ctx: LocalContext
    optimizer: torch.optim.Optimizer
    generator: torch.Generator  # its LoRA dropout's random stream, seeded as train_locally's would be
    steps: int = 0
    loss_sum: float = 0.0

    @property
    def mean_loss(self) -> float:
        return self.loss_sum / max(self.steps, 1)


def client_losses(logits: torch.Tensor, labels: torch.Tensor, sample_client: torch.Tensor, clients: int) -> torch.Tensor:
    """Each client's next-token loss, averaged over its own answer tokens: what the model's ``.loss`` would
    be for that client's samples alone (transformers' causal-LM loss: float32 logits, labels shifted by one)."""
    targets = torch.nn.functional.pad(labels, (0, 1), value=IGNORE_INDEX)[:, 1:]
    token_loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), targets.flatten(),
                                                   ignore_index=IGNORE_INDEX, reduction="none").view(targets.shape)
    summed = torch.zeros(clients, device=logits.device).index_add(0, sample_client, token_loss.sum(dim=1))
    counted = torch.zeros(clients, device=logits.device).index_add(
        0, sample_client, (targets != IGNORE_INDEX).sum(dim=1).float())
    return summed / counted


def train_together(model: torch.nn.Module, runs: list[LocalRun], collate: Callable[[list[dict]], dict[str, torch.Tensor]],
                   device: torch.device, cfg: TrainingConfig) -> None:
    """Train several clients at once on one resident backbone, each exactly as ``train_locally`` would.

    Each step concatenates one mini-batch per client that still has one; in every LoRA layer a sample goes
    through its own client's weights; the loss is the sum of the clients' own mean losses (plus their
    penalties), so each client's gradients are its own. Clipping, the strategy's correction and the
    optimizer step are per client; a client whose batches have run out takes no further step.
    """
    for run in runs:
        run.strategy.begin(run.ctx)
    while True:
        active = [(run, samples) for run in runs if (samples := next(run.batches, None)) is not None]
        if not active:
            return
        losses = client_losses(*forward_together(model, active, collate, device))
        total = losses.sum()
        for run, _ in active:
            penalty = run.strategy.penalty(run.params)
            if penalty is not None:
                total = total + penalty
        total.backward()
        for i, (run, _) in enumerate(active):
            run.strategy.correct_gradients(run.params)
            if cfg.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(run.params.values(), cfg.max_grad_norm)
            run.optimizer.step()
            run.optimizer.zero_grad(set_to_none=True)
            run.steps += 1
            run.loss_sum += losses[i].item()


def forward_together(model: torch.nn.Module, active: list[tuple[LocalRun, list[dict[str, Any]]]],
                     collate: Callable[[list[dict]], dict[str, torch.Tensor]], device: torch.device
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """One forward pass over each client's mini-batch, concatenated; (logits, labels, each sample's client,
    clients), the arguments of ``client_losses``."""
    batch = {k: v.to(device) for k, v in collate([s for _, samples in active for s in samples]).items()}
    labels = batch.pop("labels")
    lengths = batch["attention_mask"].sum(dim=1).tolist()  # right-padded: each sample's own length
    rows, first = [], 0
    for run, samples in active:
        last = first + len(samples)
        rows.append(ClientRows(run.params, slice(first, last), int(max(lengths[first:last])), run.generator))
        first = last
    with multi_client_lora(model, rows, len(lengths)):
        logits = model(**batch).logits
    sample_client = torch.repeat_interleave(torch.arange(len(active), device=device),
                                            torch.tensor([len(samples) for _, samples in active], device=device))
    return logits, labels, sample_client, len(active)


def saved_bytes(fn: Callable[[], Any]) -> int:
    """Bytes of the distinct storages autograd saves for backward while ``fn`` runs (activations, and any
    weights the graph keeps), kept alive until the count is taken."""
    storages: dict[int, int] = {}
    kept = []

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        kept.append(tensor)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        fn()
    return sum(storages.values())


def extra_client_bytes(model: torch.nn.Module, run: LocalRun, samples: list[dict[str, Any]],
                       collate: Callable[[list[dict]], dict[str, torch.Tensor]], device: torch.device
                       ) -> dict[str, int]:
    """What one more client adds to a multi-client batch, measured on ``samples`` (one of its mini-batches):
    the activations a forward pass saves for backward (two clients' batch minus one client's), and its
    adapter with gradients and optimizer state (after one step, so that the optimizer's state exists)."""
    def forward(clients: int) -> None:
        client_losses(*forward_together(model, [(run, samples)] * clients, collate, device)).sum().backward()

    activations = saved_bytes(lambda: forward(2)) - saved_bytes(lambda: forward(1))
    run.optimizer.step()
    state = [t for per_param in run.optimizer.state.values() for t in per_param.values() if torch.is_tensor(t)]
    tensors = [*run.params.values(), *(p.grad for p in run.params.values() if p.grad is not None), *state]
    return {"activations": activations, "adapter_and_optimizer": sum(t.numel() * t.element_size() for t in tensors)}
