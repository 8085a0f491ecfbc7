"""Byzantine-robust aggregation rules: pure functions on a [K, d] matrix of flattened client updates.

The rules are the published ones: coordinate-wise median and trimmed mean (Yin et
al., ICML 2018), Krum and Multi-Krum (Blanchard et al., NeurIPS 2017), Bulyan (El Mhamdi et al., ICML 2018)
and norm bounding (Sun et al. 2019). Server strategies wrap them; nothing here keeps state.

Conventions shared by every rule:

* ``updates`` is a 2-D floating tensor [K, d], one flattened update per row, every value finite. The update
  guard rejects non-finite updates before they reach a strategy; here they are refused rather than sorted
  or measured into a meaningless result.
* The caller sorts the rows into a canonical order (client id) before calling. The coordinate-wise rules
  (median, trimmed mean, Bulyan's second stage) sort each column, so they depend only on the multiset of
  rows, bit for bit. The Krum family breaks exact ties in score by row index (the lower index wins): the
  canonical order is what makes those results a function of the set of updates. Exact ties are not rare
  when a Krum score sums a single distance (``K - f - 2 == 1``): the two ends of the closest pair tie.
* Per-client sample weights are ignored, as in the papers: every client counts once. A sample count is the
  client's own claim, and weighting by it would let one client buy the influence these rules exist to bound.
* Memory: besides the input, O(K^2) for the distance matrix and O(K x block) for one block of columns
  (``_BLOCK_ELEMENTS`` values). No [K, K, d] difference tensor and no float64 copy of the whole input.
* Arithmetic is float64 (distances, norms, sums); results come back in the dtype and device of ``updates``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import torch

TRIM_KEY = "algorithm.server.trim"
F_KEY = "algorithm.server.f"
MULTIKRUM_M_KEY = "algorithm.server.multikrum_m"
NORM_BOUND_KEY = "algorithm.server.norm_bound"

# Column-wise work runs on blocks of about this many values (32 MiB in float64), whatever d is.
_BLOCK_ELEMENTS = 1 << 22


# ---------------------------------------------------------------------------------------------------------
# Rules


def coordinate_median(updates: torch.Tensor) -> torch.Tensor:
    """Per coordinate, the median of the K values (Yin et al. 2018); uniform weights.

    For even K it is the mean of the two middle values, the usual definition and the one symmetric in the
    data. ``torch.median`` returns the lower of the two, which would bias every coordinate downwards.
    """
    _check_updates(updates)
    return _per_column(updates, lambda block: _median_of_sorted(block.sort(dim=0).values))


def trimmed_mean(updates: torch.Tensor, trim: int) -> torch.Tensor:
    """Per coordinate, the mean after removing the ``trim`` largest and ``trim`` smallest values (Yin et al.
    2018); uniform weights. ``trim=0`` is the plain mean. Requires K > 2 * trim, so a value is left."""
    k = _check_updates(updates)
    _check_int(TRIM_KEY, trim, minimum=0)
    if k <= 2 * trim:
        raise ValueError(_invalid(TRIM_KEY, trim, f"2 * trim < K, the number of updates (K={k})"))
    return _per_column(updates, lambda block: block.sort(dim=0).values[trim : k - trim].mean(dim=0))


def krum_scores(updates: torch.Tensor, f: int) -> torch.Tensor:
    """[K] float64: the Krum score of each row (Blanchard et al. 2017), the sum of its squared L2 distances to
    its K - f - 2 nearest other rows. Requires K > 2f + 2, the paper's condition (it also leaves at least
    one neighbour to count)."""
    k = _check_updates(updates)
    _check_krum_f(k, f)
    return _scores(_pairwise_sq_distances(updates), k - f - 2)


def krum(updates: torch.Tensor, f: int, m: int = 1) -> tuple[torch.Tensor, list[int]]:
    """(the mean of the m lowest-scoring rows, their indices in selection order); uniform weights.

    m = 1 is Krum (the returned row is exactly one update), m > 1 Multi-Krum, which scores once and averages
    the m best. Ties in score go to the lower row index: the caller's canonical row order decides them.
    Requires K > 2f + 2 and 1 <= m <= K - f (more would have to include a possibly Byzantine row).
    """
    k = _check_updates(updates)
    _check_krum_f(k, f)
    _check_int(MULTIKRUM_M_KEY, m, minimum=1)
    if m > k - f:
        raise ValueError(_invalid(MULTIKRUM_M_KEY, m, f"1 <= m <= K - f (K={k}, f={f})"))
    chosen = _ranking(_scores(_pairwise_sq_distances(updates), k - f - 2))[:m]
    return _mean_of_rows(updates, chosen), chosen


def bulyan(updates: torch.Tensor, f: int) -> tuple[torch.Tensor, list[int]]:
    """(the Bulyan aggregate, the indices of the theta selected rows in selection order); uniform weights.

    El Mhamdi et al. 2018: select theta = K - 2f rows by repeated Krum, each pick removed from the pool and
    the scores recomputed on the remaining pool with K' - f - 2 neighbours for a pool of K'; then, per
    coordinate, average the beta = theta - 2f selected values closest to the selected set's median.
    Requires K >= 4f + 3 (beta >= 3).

    Late in the selection the pool is small: where K' - f - 2 would fall below 1 (only for f <= 1, on the
    last picks) the neighbour count is held at 1, so the score still measures closeness to the others. With
    one neighbour the two ends of the pool's closest pair tie and the lower row index wins, so for f = 1 or
    2 the selected set can depend on the caller's canonical row order (with f = 0 every row is selected).
    """
    k = _check_updates(updates)
    _check_int(F_KEY, f, minimum=0)
    if k < 4 * f + 3:
        raise ValueError(_invalid(F_KEY, f, f"K >= 4f + 3 for Bulyan (K={k}, f={f}); "
                                            f"{_largest_f_text((k - 3) // 4)}"))
    theta, beta = k - 2 * f, k - 4 * f
    chosen = _bulyan_select(_pairwise_sq_distances(updates), f, theta)
    rows = torch.tensor(chosen, device=updates.device)
    aggregate = _per_column(updates, lambda block: _mean_nearest_median(block[rows].sort(dim=0).values, beta))
    return aggregate, chosen


def norm_bounded_mean(updates: torch.Tensor, bound: float) -> tuple[torch.Tensor, int]:
    """(the mean of the rows, each first scaled down to L2 norm at most ``bound``; how many were scaled).

    Sun et al. 2019: bounding every update's norm caps how far one client (a scaled model-replacement update,
    for instance) can move the average. A row exactly at the bound is not counted as clipped. Uniform
    weights; the mean divides by K. Requires 0 < bound < inf.
    """
    _check_updates(updates)
    if isinstance(bound, bool) or not isinstance(bound, (int, float)) or not 0 < bound < math.inf:
        raise ValueError(_invalid(NORM_BOUND_KEY, bound, "a finite number > 0"))
    norms = _row_norms(updates)
    clipped = norms > bound
    scale = torch.where(clipped, bound / norms, torch.ones_like(norms))
    return _weighted_sum(updates, scale / updates.shape[0]), int(clipped.sum())


# ---------------------------------------------------------------------------------------------------------
# Distances and Krum selection


def _pairwise_sq_distances(updates: torch.Tensor) -> torch.Tensor:
    """[K, K] float64 squared L2 distances, as ||a||^2 + ||b||^2 - 2 a.b accumulated over blocks of columns.

    Why not the differences a - b of every pair: that is a [K, K, d] tensor. Why not ``torch.cdist``: it
    computes in the input dtype (float32 here) and, for more than 25 rows, by this same Gram expansion, where
    the cancellation between two large squared norms eats the small distances Krum compares. Here each block
    is converted to float64 and first centred on its per-column (lower) median. Distances do not change
    under a translation; centring keeps the honest rows' norms at the scale of their spread, so little
    cancels between them. The median, unlike the mean, cannot be dragged away by one huge Byzantine row, it
    is one of the values (integer data stays exact) and it does not depend on the row order. The small
    negative values rounding can still leave are clamped to 0, the matrix made exactly symmetric and its
    diagonal exactly 0.
    """
    k = updates.shape[0]
    gram = torch.zeros(k, k, dtype=torch.float64, device=updates.device)
    for _, block in _column_blocks(updates):
        centred = block - block.median(dim=0, keepdim=True).values  # any centre works: the lower median
        gram += centred @ centred.T
    sq_norms = gram.diagonal()
    dist = (sq_norms[:, None] + sq_norms[None, :] - 2 * gram).clamp_min_(0)
    dist = (dist + dist.T) / 2
    return dist.fill_diagonal_(0)


def _scores(dist: torch.Tensor, neighbours: int) -> torch.Tensor:
    """Krum score of each row of a [P, P] distance matrix: the sum of its ``neighbours`` smallest distances
    to the other rows. A row is excluded by position, not value, so a duplicate of it counts (at 0)."""
    others = dist.clone().fill_diagonal_(math.inf)
    return others.sort(dim=1).values[:, :neighbours].sum(dim=1)  # summed smallest first: fixed order


def _ranking(scores: torch.Tensor) -> list[int]:
    """Row indices from the lowest score up; a stable sort, so exact ties go to the lower index."""
    return torch.sort(scores, stable=True).indices.tolist()


def _bulyan_select(dist: torch.Tensor, f: int, theta: int) -> list[int]:
    """Bulyan's first stage: ``theta`` picks by Krum, each on the pool the earlier picks left."""
    pool, chosen = list(range(dist.shape[0])), []
    while len(chosen) < theta:
        index = torch.tensor(pool, device=dist.device)
        neighbours = min(max(len(pool) - f - 2, 1), len(pool) - 1)
        best = _ranking(_scores(dist[index][:, index], neighbours))[0]
        chosen.append(pool.pop(best))
    return chosen


# ---------------------------------------------------------------------------------------------------------
# Column-wise helpers (each takes a float64 block; none may write into it, it can be a view of the input)


def _median_of_sorted(column_sorted: torch.Tensor) -> torch.Tensor:
    """Median of each column of a block sorted along dim 0; the mean of the two middle values for even K."""
    k = column_sorted.shape[0]
    mid = k // 2
    if k % 2:
        return column_sorted[mid]
    return (column_sorted[mid - 1] + column_sorted[mid]) / 2


def _mean_nearest_median(column_sorted: torch.Tensor, beta: int) -> torch.Tensor:
    """Per column of a block sorted along dim 0, the mean of the ``beta`` values nearest the column's median.

    On a line, the beta values nearest a point are a run of beta consecutive sorted values, and the runs
    that are such a set are exactly those with the smallest total distance to it, so the run is found by
    comparing the theta - beta + 1 candidate runs. (Comparing only the farther end of each run is not
    enough: it can keep a run that leaves out a nearer value.) Runs with equal totals, a tie in value, go
    to the lower run: a rule on the values, so the result does not depend on the order of the rows.
    """
    median = _median_of_sorted(column_sorted)
    best_cost = torch.full_like(median, math.inf)
    best_mean = torch.zeros_like(median)
    for start in range(column_sorted.shape[0] - beta + 1):
        run = column_sorted[start : start + beta]
        cost = (run - median).abs().sum(dim=0)
        better = cost < best_cost
        best_mean = torch.where(better, run.mean(dim=0), best_mean)
        best_cost = torch.where(better, cost, best_cost)
    return best_mean


def _column_blocks(updates: torch.Tensor) -> Iterator[tuple[slice, torch.Tensor]]:
    """(columns, those columns of ``updates`` in float64), block by block, so that a float64 working copy
    never exceeds ``_BLOCK_ELEMENTS`` values whatever d is."""
    for columns in _column_slices(*updates.shape):
        yield columns, updates[:, columns].to(torch.float64)


def _column_slices(k: int, d: int) -> Iterator[slice]:
    """Consecutive column ranges of about ``_BLOCK_ELEMENTS`` values each (at least one column)."""
    width = max(1, _BLOCK_ELEMENTS // k)
    for start in range(0, d, width):
        yield slice(start, min(start + width, d))


def _per_column(updates: torch.Tensor, rule: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """[d] in the dtype of ``updates``: ``rule`` applied to each float64 block of columns."""
    out = updates.new_empty(updates.shape[1])
    for columns, block in _column_blocks(updates):
        out[columns] = rule(block)
    return out


def _weighted_sum(updates: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """sum_i weights[i] * updates[i] (float64 weights), without a scaled copy of ``updates``."""
    return _per_column(updates, lambda block: weights @ block)


def _mean_of_rows(updates: torch.Tensor, rows: list[int]) -> torch.Tensor:
    weights = torch.zeros(updates.shape[0], dtype=torch.float64, device=updates.device)
    weights[rows] = 1.0 / len(rows)
    return _weighted_sum(updates, weights)


def _row_norms(updates: torch.Tensor) -> torch.Tensor:
    """[K] float64 L2 norms (float64 so that a large float32 update does not overflow when squared)."""
    sq = torch.zeros(updates.shape[0], dtype=torch.float64, device=updates.device)
    for _, block in _column_blocks(updates):
        sq += block.square().sum(dim=1)
    return sq.sqrt()


# ---------------------------------------------------------------------------------------------------------
# Preconditions


def _check_updates(updates: torch.Tensor) -> int:
    """K, after checking that ``updates`` is a finite floating [K, d] tensor with K >= 1."""
    if not isinstance(updates, torch.Tensor) or not updates.is_floating_point():
        raise TypeError(f"updates must be a floating-point torch.Tensor, got {type(updates).__name__}"
                        + (f" of dtype {updates.dtype}" if isinstance(updates, torch.Tensor) else ""))
    if updates.dim() != 2 or updates.shape[0] == 0:
        raise ValueError(f"updates must be a [K, d] matrix with K >= 1 rows, got shape {tuple(updates.shape)}")
    for columns in _column_slices(*updates.shape):
        if not torch.isfinite(updates[:, columns]).all():
            raise ValueError("updates hold a non-finite value (NaN or inf); the update guard should have "
                             "rejected that update")
    return updates.shape[0]


def _check_int(key: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(_invalid(key, value, f"an integer >= {minimum}"))


def _check_krum_f(k: int, f: int) -> None:
    _check_int(F_KEY, f, minimum=0)
    if k <= 2 * f + 2:
        raise ValueError(_invalid(F_KEY, f, f"K > 2f + 2 for Krum (K={k}, f={f}); "
                                            f"{_largest_f_text((k - 3) // 2)}"))


def _largest_f_text(largest: int) -> str:
    return f"the largest f these K updates allow is {largest}" if largest >= 0 else "too few updates for any f"


def _invalid(key: str, value: object, expected: str) -> str:
    """The wording of fedsim.config's checks: the key, the bad value, what is allowed."""
    return f"config key '{key}' has invalid value {value!r}: expected {expected}"
