"""FedMLLM modality-heterogeneity scenarios (REFERENCE.md section 1) as seeded transforms of a training split.

A scenario decides, for every training row, whether it keeps its image and its text: a boolean array of
shape ``(rows, 2)``. ``apply_scenario`` then sets dropped modalities to None and updates has_image/has_text.
Scenarios only remove: a row that already lacks a modality stays without it, and rows that belong to no
shard are left unchanged. Scenarios live in ``SCENARIOS``, keyed by the name ``data.scenario`` takes.
"""

from __future__ import annotations

import inspect
from typing import Callable, Sequence

import datasets
import numpy as np

from fedsim.seeding import rng_for

# (num_rows, shards, seed, **params) -> keep mask, bool (num_rows, 2): column 0 image, column 1 text
ScenarioFn = Callable[..., np.ndarray]

# Second seed coordinate per scenario, so that their draws never share a stream.
_MISSING, _CROSS, _HYBRID = 0, 1, 2


def _aligned(num_rows: int, shards: Sequence[np.ndarray], seed: int) -> np.ndarray:
    """Both modalities everywhere; the label skew comes from the partition itself."""
    return np.ones((num_rows, 2), dtype=bool)


def _missing(num_rows: int, shards: Sequence[np.ndarray], seed: int, beta: float,
             allow_both: bool = True) -> np.ndarray:
    """Each row independently loses its image w.p. beta and its text w.p. beta (both: beta^2).

    With ``allow_both=False`` a row drawn to lose both keeps one of them, image or text by a fair coin;
    each modality is then lost w.p. beta - beta^2 / 2. The coin is drawn either way, so the two settings
    differ only on the rows that would lose both.
    """
    _check_unit("beta", beta)
    if not isinstance(allow_both, (bool, np.bool_)):
        raise ValueError(f"data.scenario='missing': parameter allow_both must be true or false, got {allow_both!r}")
    u = rng_for(seed, "scenario", _MISSING).random((num_rows, 3))  # per row, independent of the shards
    keep = u[:, :2] >= beta
    if not allow_both:
        neither = ~keep.any(axis=1)
        keep[neither, 0] = u[neither, 2] < 0.5
        keep[neither, 1] = ~keep[neither, 0]
    return keep


def _cross(num_rows: int, shards: Sequence[np.ndarray], seed: int, image_only: int) -> np.ndarray:
    """Exactly ``image_only`` clients (chosen by seed) hold images only, the others text only."""
    if isinstance(image_only, (bool, np.bool_)) or not isinstance(image_only, (int, np.integer)) \
            or not 0 <= image_only <= len(shards):
        raise ValueError(f"data.scenario='cross': parameter image_only must be an integer in "
                         f"[0, {len(shards)}] (the number of clients), got {image_only!r}")
    chosen = rng_for(seed, "scenario", _CROSS).choice(len(shards), size=int(image_only), replace=False)
    keep = np.ones((num_rows, 2), dtype=bool)
    for client, idx in enumerate(shards):
        image = client in chosen
        keep[idx] = (image, not image)
    return keep


def _hybrid(num_rows: int, shards: Sequence[np.ndarray], seed: int, p: float) -> np.ndarray:
    """Each client keeps each modality w.p. p, drawn once per client; a client drawn to keep neither
    keeps one at random (fair coin), so a modality is kept w.p. p + (1 - p)^2 / 2."""
    _check_unit("p", p)
    keep = np.ones((num_rows, 2), dtype=bool)
    for client, idx in enumerate(shards):
        rng = rng_for(seed, "scenario", _HYBRID, client)  # per client: independent of the other clients
        pattern = rng.random(2) < p
        coin = rng.random() < 0.5
        if not pattern.any():
            pattern = np.array([coin, not coin])
        keep[idx] = pattern
    return keep


SCENARIOS: dict[str, ScenarioFn] = {"aligned": _aligned, "missing": _missing, "cross": _cross, "hybrid": _hybrid}


def apply_scenario(train: datasets.Dataset, shards: Sequence[np.ndarray], name: str, params: dict,
                   seed: int) -> datasets.Dataset:
    """A copy of ``train`` (same rows, same order, same features) with the modalities ``name`` drops set
    to None and has_image / has_text updated; deterministic in ``seed``."""
    fn = _lookup(name)
    _check_params(name, fn, params)
    num_rows = len(train)
    covered = _covered(shards, num_rows)
    keep = fn(num_rows, [np.asarray(s, dtype=np.int64) for s in shards], seed, **params)
    keep[~covered] = True
    raw = train.cast_column("image", datasets.Image(decode=False))  # no decoding/re-encoding of images
    out = raw.map(_drop, with_indices=True, batched=True, fn_kwargs={"keep": keep}, features=raw.features,
                  desc=f"scenario {name}")
    return out.cast_column("image", train.features["image"])


def check_scenario(name: str, params: dict) -> None:
    """Fail early on an unknown scenario or wrong parameter names (values are checked when applied)."""
    _check_params(name, _lookup(name), params)


def modality_mix(train: datasets.Dataset, shards: Sequence[np.ndarray]) -> np.ndarray:
    """Per-client counts, columns (both, image only, text only), plus (neither) when any row has neither."""
    has_image = np.asarray(train.with_format("numpy")["has_image"], dtype=bool)
    has_text = np.asarray(train.with_format("numpy")["has_text"], dtype=bool)
    kinds = [has_image & has_text, has_image & ~has_text, ~has_image & has_text, ~has_image & ~has_text]
    mix = np.array([[int(k[np.asarray(idx, dtype=np.int64)].sum()) for k in kinds] for idx in shards],
                   dtype=np.int64).reshape(len(shards), 4)
    return mix if mix[:, 3].any() else mix[:, :3]


def _drop(batch: dict, indices: list[int], keep: np.ndarray) -> dict:
    rows = keep[np.asarray(indices, dtype=np.int64)]
    batch["image"] = [im if k else None for im, k in zip(batch["image"], rows[:, 0])]
    batch["text"] = [tx if k else None for tx, k in zip(batch["text"], rows[:, 1])]
    batch["has_image"] = [bool(h and k) for h, k in zip(batch["has_image"], rows[:, 0])]
    batch["has_text"] = [bool(h and k) for h, k in zip(batch["has_text"], rows[:, 1])]
    return batch


def _lookup(name: str) -> ScenarioFn:
    if name not in SCENARIOS:
        raise ValueError(f"data.scenario {name!r} is unknown: expected one of {', '.join(sorted(SCENARIOS))}")
    return SCENARIOS[name]


def _check_params(name: str, fn: ScenarioFn, params: dict) -> None:
    signature = inspect.signature(fn)
    accepted = list(signature.parameters)[3:]
    unknown = sorted(set(params) - set(accepted))
    required = [k for k in accepted if signature.parameters[k].default is inspect.Parameter.empty]
    missing = [k for k in required if k not in params]
    if unknown or missing:
        raise ValueError(f"data.scenario={name!r} takes parameters {accepted or 'none'} (required: "
                         f"{required or 'none'}); got unknown {unknown or 'none'}, missing {missing or 'none'}")


def _check_unit(param: str, value: float) -> None:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.number)) or not 0 <= value <= 1:
        raise ValueError(f"data.scenario parameter {param} must be a probability in [0, 1], got {value!r}")


def _covered(shards: Sequence[np.ndarray], num_rows: int) -> np.ndarray:
    """Rows that belong to a shard; shards must be disjoint and index into the split."""
    joined = np.concatenate([np.asarray(s, dtype=np.int64).ravel() for s in shards]) if len(shards) \
        else np.zeros(0, dtype=np.int64)
    if joined.size and (joined.min() < 0 or joined.max() >= num_rows):
        raise ValueError(f"shards index rows outside [0, {num_rows}): range [{joined.min()}, {joined.max()}]")
    counts = np.bincount(joined, minlength=num_rows)
    if (counts > 1).any():
        raise ValueError(f"shards must be disjoint: {int((counts > 1).sum())} row(s) belong to several clients")
    return counts > 0
