"""Split a labelled training set across federated clients.

``partition(labels, cfg, seed)`` returns one sorted int64 index array per client: disjoint, covering every
sample exactly once, and a pure function of ``(labels, cfg, seed)``. Schemes live in ``SCHEMES``, keyed by
the name ``partition.scheme`` takes in a YAML file.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from fedsim.config import PartitionConfig

SchemeFn = Callable[[np.ndarray, PartitionConfig, np.random.Generator], list[np.ndarray]]


def _iid(labels: np.ndarray, cfg: PartitionConfig, rng: np.random.Generator) -> list[np.ndarray]:
    """Shuffle, then cut into ``num_clients`` parts whose sizes differ by at most one."""
    return list(np.array_split(rng.permutation(len(labels)), cfg.num_clients))


def _dirichlet(labels: np.ndarray, cfg: PartitionConfig, rng: np.random.Generator) -> list[np.ndarray]:
    """Label skew: each class is split over clients with proportions ~ Dir(alpha * 1_N)."""
    n_clients = cfg.num_clients
    _check_alpha(cfg)
    buckets: list[list[int]] = [[] for _ in range(n_clients)]
    for cls in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == cls))
        props = _dirichlet_draw(rng, cfg.alpha, n_clients)
        cuts = np.floor(np.cumsum(props)[:-1] * len(idx)).astype(np.int64)
        for client, chunk in enumerate(np.split(idx, cuts)):
            buckets[client].extend(chunk.tolist())
    _repair_min_size(buckets, _min_size(cfg))
    return [np.asarray(b, dtype=np.int64) for b in buckets]


def _quantity(labels: np.ndarray, cfg: PartitionConfig, rng: np.random.Generator) -> list[np.ndarray]:
    """Quantity skew with IID labels: client sizes ∝ Dir(alpha * 1_N), each at least the minimum."""
    _check_alpha(cfg)
    n_clients, need = cfg.num_clients, _min_size(cfg)
    props = _dirichlet_draw(rng, cfg.alpha, n_clients)
    sizes = need + _apportion(len(labels) - n_clients * need, props)
    return list(np.split(rng.permutation(len(labels)), np.cumsum(sizes)[:-1]))


SCHEMES: dict[str, SchemeFn] = {"iid": _iid, "dirichlet": _dirichlet, "quantity": _quantity}


def partition(labels: Sequence[int] | np.ndarray, cfg: PartitionConfig, seed: int) -> list[np.ndarray]:
    """One sorted int64 index array per client; disjoint, complete, and deterministic in ``seed``."""
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels must be a 1-D sequence of class ids, got shape {labels.shape}")
    if cfg.scheme not in SCHEMES:
        raise ValueError(f"partition.scheme {cfg.scheme!r} is unknown: expected one of "
                         f"{', '.join(sorted(SCHEMES))}")
    if cfg.num_clients < 1:
        raise ValueError(f"partition.num_clients must be >= 1, got {cfg.num_clients}")
    need = _min_size(cfg)
    if len(labels) < cfg.num_clients * need:
        raise ValueError(
            f"cannot give partition.num_clients={cfg.num_clients} clients at least {need} sample(s) each "
            f"(partition.min_samples={cfg.min_samples}) from {len(labels)} samples: need at least "
            f"{cfg.num_clients * need}; lower partition.num_clients or partition.min_samples"
        )
    parts = SCHEMES[cfg.scheme](labels, cfg, np.random.default_rng(seed))
    return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]


def label_histogram(labels: Sequence[int] | np.ndarray, parts: Sequence[np.ndarray],
                    num_classes: int) -> np.ndarray:
    """Per-client class counts, shape ``(num_clients, num_classes)``."""
    labels = np.asarray(labels, dtype=np.int64)
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes}), got range "
                         f"[{labels.min()}, {labels.max()}]")
    hist = np.zeros((len(parts), num_classes), dtype=np.int64)
    for client, idx in enumerate(parts):
        hist[client] = np.bincount(labels[np.asarray(idx, dtype=np.int64)], minlength=num_classes)
    return hist


def _min_size(cfg: PartitionConfig) -> int:
    return max(1, cfg.min_samples)


def _check_alpha(cfg: PartitionConfig) -> None:
    if not cfg.alpha > 0:
        raise ValueError(f"partition.alpha must be > 0 for scheme {cfg.scheme!r}, got {cfg.alpha}")


def _dirichlet_draw(rng: np.random.Generator, alpha: float, n: int) -> np.ndarray:
    props = rng.dirichlet(np.full(n, alpha))
    # Very small alpha can underflow every gamma draw; fall back to a one-hot on a random client.
    if not np.all(np.isfinite(props)) or props.sum() <= 0:
        props = np.zeros(n)
        props[rng.integers(n)] = 1.0
    return props


def _apportion(total: int, props: np.ndarray) -> np.ndarray:
    """Integer counts summing to ``total``, proportional to ``props`` (largest-remainder rounding)."""
    raw = props / props.sum() * total
    counts = np.floor(raw).astype(np.int64)
    short = total - int(counts.sum())
    # Stable sort so ties go to the lower client id.
    counts[np.argsort(-(raw - counts), kind="stable")[:short]] += 1
    return counts


def _repair_min_size(buckets: list[list[int]], need: int) -> None:
    """Top every client up to ``need`` samples by taking one at a time from the currently largest client.

    Deterministic: deficient clients are served in id order, the donor is the largest client (lowest id on
    ties) and gives its most recently added sample. Feasible because the caller checked ``n >= N * need``,
    so while anyone is short the largest client holds more than ``need``.
    """
    sizes = np.array([len(b) for b in buckets], dtype=np.int64)
    for client in np.flatnonzero(sizes < need):
        while sizes[client] < need:
            donor = int(np.argmax(sizes))
            buckets[client].append(buckets[donor].pop())
            sizes[donor] -= 1
            sizes[client] += 1
