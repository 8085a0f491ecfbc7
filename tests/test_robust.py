"""Byzantine-robust aggregation rules (fedsim.robust) against values worked out by hand.

Every expected number below was computed by hand (the working is in the comments), never by the code under
test. Matrices are small, so the whole file runs in well under a second.
"""

from __future__ import annotations

import pytest
import torch

from fedsim import robust
from fedsim.robust import bulyan, coordinate_median, krum, krum_scores, norm_bounded_mean, trimmed_mean


def t(rows: list[list[float]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)


def close(actual: torch.Tensor, expected: list[float], atol: float = 1e-6) -> bool:
    return torch.allclose(actual.double(), torch.tensor(expected, dtype=torch.float64), atol=atol, rtol=0)


# K=5, d=3. Columns sorted: [1, 2, 4, 9, 100], [-50, 10, 20, 27, 40], [-10, -3, -2, -1, 7].
X5 = t([[1, 10, -1],
        [2, 20, -2],
        [9, 27, -3],
        [4, 40, -10],
        [100, -50, 7]])

# Krum example, d=3 (the last coordinate is the same everywhere, so it adds nothing to any distance).
# Points in the plane: a=(0,0), b=(1,0), c=(0,2), d=(2,2), e=(10,10), in the row order e, c, a, d, b.
# Squared distances: ab 1, ac 4, ad 8, ae 200, bc 5, bd 5, be 181, cd 4, ce 164, de 128.
# f=1, K=5: K - f - 2 = 2 nearest others. a: 1+4=5, b: 1+5=6, c: 4+4=8, d: 4+5=9, e: 128+164=292.
KRUM5 = t([[10, 10, 3],   # e
           [0, 2, 3],     # c
           [0, 0, 3],     # a
           [2, 2, 3],     # d
           [1, 0, 3]])    # b

# Bulyan example, K=7, f=1: theta = 5 picks, beta = 3 values per coordinate.
BULYAN7 = t([[4, 2], [4, -1], [0, 0], [3, 4], [2, -4], [3, -1], [20, -10]])
# Squared distances:
#   01 9   02 20  03 5   04 40  05 10  06 400
#   12 17  13 26  14 13  15 1   16 337
#   23 25  24 20  25 10  26 500
#   34 65  35 25  36 485
#   45 10  46 360
#   56 370
# Pick 1, pool of 7, 4 neighbours: r0 5+9+10+20=44, r1 1+9+13+17=40, r2 10+17+20+20=67, r3 5+25+25+26=81,
#   r4 10+13+20+40=83, r5 1+10+10+10=31, r6 337+360+370+400=1467 -> r5.
# Pick 2, pool {0,1,2,3,4,6}, 3 neighbours: r0 5+9+20=34, r1 9+13+17=39, r2 17+20+20=57, r3 5+25+26=56,
#   r4 13+20+40=73, r6 337+360+400=1097 -> r0.
# Pick 3, pool {1,2,3,4,6}, 2 neighbours: r1 13+17=30, r2 17+20=37, r3 25+26=51, r4 13+20=33, r6 697 -> r1.
# Pick 4, pool {2,3,4,6}, 1 neighbour: r2 20, r3 25, r4 20, r6 360 -> tie r2/r4 -> lower index r2.
# Pick 5, pool {3,4,6}, 3-1-2 = 0 neighbours held at 1: r3 65, r4 65, r6 360 -> tie -> r3.
# Selected rows 5, 0, 1, 2, 3: (3,-1) (4,2) (4,-1) (0,0) (3,4).
#   Column 0 sorted [0, 3, 3, 4, 4], median 3; runs of 3: [0,3,3] total distance 3, [3,3,4] 1, [3,4,4] 2
#     -> mean of 3, 3, 4 = 10/3.
#   Column 1 sorted [-1, -1, 0, 2, 4], median 0; runs: [-1,-1,0] 2, [-1,0,2] 3, [0,2,4] 6
#     -> mean of -1, -1, 0 = -2/3 (the middle three, a trimmed mean, would give 1/3; the median is 0).


# --- coordinate median and trimmed mean ------------------------------------------------------------------


def test_coordinate_median_by_hand():
    assert torch.equal(coordinate_median(X5), torch.tensor([4.0, 20.0, -2.0]))


def test_coordinate_median_of_even_k_is_the_mean_of_the_two_middle_values():
    # Columns sorted: [1, 2, 3, 8] -> (2+3)/2 = 2.5; [-6, 0, 4, 10] -> (0+4)/2 = 2.
    x = t([[1, 0], [3, 10], [2, 4], [8, -6]])
    assert torch.equal(coordinate_median(x), torch.tensor([2.5, 2.0]))
    assert torch.equal(x.median(dim=0).values, torch.tensor([2.0, 0.0]))  # the lower middle: not what we want


def test_trimmed_mean_by_hand():
    # trim=1: (2+4+9)/3 = 5, (10+20+27)/3 = 19, (-3-2-1)/3 = -2. trim=2 leaves the median.
    assert close(trimmed_mean(X5, 1), [5.0, 19.0, -2.0])
    assert close(trimmed_mean(X5, 2), [4.0, 20.0, -2.0])


def test_trimmed_mean_with_trim_zero_is_the_mean():
    # 116/5 = 23.2, 47/5 = 9.4, -9/5 = -1.8
    assert close(trimmed_mean(X5, 0), [23.2, 9.4, -1.8], atol=1e-5)
    assert torch.allclose(trimmed_mean(X5, 0), X5.mean(dim=0))


# --- Krum and Multi-Krum ---------------------------------------------------------------------------------


def test_krum_scores_by_hand():
    scores = krum_scores(KRUM5, f=1)
    assert scores.dtype == torch.float64
    assert torch.equal(scores, torch.tensor([292.0, 8.0, 5.0, 9.0, 6.0], dtype=torch.float64))


def test_krum_and_multi_krum_by_hand():
    value, chosen = krum(KRUM5, f=1)
    assert chosen == [2] and torch.equal(value, torch.tensor([0.0, 0.0, 3.0]))  # a, exactly that row
    value, chosen = krum(KRUM5, f=1, m=3)
    assert chosen == [2, 4, 1] and close(value, [1 / 3, 2 / 3, 3.0])  # a, b, c
    value, chosen = krum(KRUM5, f=1, m=4)
    assert chosen == [2, 4, 1, 3] and close(value, [0.75, 1.0, 3.0])  # a, b, c, d


def test_krum_breaks_ties_by_row_index():
    # f=0, K=3, one neighbour: scores 1, 1, 81; the tie goes to row 0, whichever value it holds.
    value, chosen = krum(t([[0], [1], [10]]), f=0)
    assert chosen == [0] and value.item() == 0.0
    value, chosen = krum(t([[1], [0], [10]]), f=0)
    assert chosen == [0] and value.item() == 1.0


def test_krum_picks_the_honest_cluster_and_multi_krum_leaves_the_outliers_out():
    gen = torch.Generator().manual_seed(0)
    honest = 0.1 * torch.randn(7, 5, generator=gen)
    outliers = torch.full((2, 5), 10.0)  # colluding: identical, so each has one neighbour at distance 0
    x = torch.cat([honest[:3], outliers[:1], honest[3:], outliers[1:]])  # outliers at rows 3 and 8
    honest_rows = [0, 1, 2, 4, 5, 6, 7]
    _, chosen = krum(x, f=2)
    assert chosen[0] in honest_rows
    value, chosen = krum(x, f=2, m=7)
    assert sorted(chosen) == honest_rows
    assert torch.allclose(value, honest.mean(dim=0), atol=1e-6)
    assert (x.mean(dim=0) - honest.mean(dim=0)).abs().min() > 2  # what the plain mean would have done


def test_identical_rows_have_distance_exactly_zero():
    x = torch.full((5, 4), 0.1).add_(torch.tensor([1e3, -7.0, 0.3, 2.0]))
    assert torch.equal(krum_scores(x, f=1), torch.zeros(5, dtype=torch.float64))
    value, chosen = krum(x, f=1)
    assert chosen == [0] and torch.equal(value, x[0])


def test_distances_survive_a_large_common_offset():
    # 0..3 + 2**23 is exact in float32; tiled to d=384, each squared norm is ~2.7e16, past float64's exact
    # integers (2**53 ~ 9e15): expanding ||a-b||^2 without centring would cancel such norms and be off by
    # several units. base, by hand: 01 5, 02 6, 03 5, 04 10, 12 3, 13 2, 14 5, 23 5, 24 2, 34 11; the 2
    # nearest others: r0 5+5=10, r1 2+3=5, r2 2+3=5, r3 2+5=7, r4 2+5=7; tiled 128 times, 128 times that.
    base = t([[0, 1, 2], [1, 1, 0], [2, 0, 1], [0, 0, 0], [3, 1, 1]])
    expected = 128 * torch.tensor([10.0, 5.0, 5.0, 7.0, 7.0], dtype=torch.float64)
    assert torch.equal(krum_scores(base, f=1), expected / 128)
    assert torch.equal(krum_scores(base.repeat(1, 128) + 2.0**23, f=1), expected)


def test_distances_are_symmetric_never_negative_and_zero_on_the_diagonal():
    gen = torch.Generator().manual_seed(0)
    v = 5 + 3 * torch.randn(6, 1000, generator=gen)
    dist = robust._pairwise_sq_distances(torch.cat([v, v[:3]]))  # duplicates: rounding can go below 0
    assert dist.min() >= 0 and torch.equal(dist, dist.T) and not dist.diagonal().any()


def test_one_huge_row_does_not_blur_the_distances_between_the_others():
    # Centring on a mean would move every honest row by ~1e29 and cancel their distances to noise.
    base = t([[0, 1, 2], [1, 1, 0], [2, 0, 1], [0, 0, 0], [3, 1, 1]])
    x = torch.cat([base, torch.full((1, 3), 1e30)])
    # f=1, K=6: 3 nearest others, all honest (distances as above): r0 5+5+6=16, r1 2+3+5=10, r2 2+3+5=10,
    # r3 2+5+5=12, r4 2+5+10=17; the huge row ~3 * 3e60.
    scores = krum_scores(x, f=1)
    assert torch.equal(scores[:5], torch.tensor([16.0, 10.0, 10.0, 12.0, 17.0], dtype=torch.float64))
    assert scores[5] > 1e60
    assert krum(x, f=1)[1] == [1]  # tie with r2, lower index


# --- Bulyan ----------------------------------------------------------------------------------------------


def test_bulyan_selection_and_nearest_to_median_average_by_hand():
    value, chosen = bulyan(BULYAN7, f=1)
    assert chosen == [5, 0, 1, 2, 3]
    assert close(value, [10 / 3, -2 / 3])


def test_bulyan_averages_the_values_nearest_the_median_not_the_run_with_the_nearest_far_end():
    # One column, sorted [-1, -1, 0, 0.5, 2], median 0, beta 3. Total distances: [-1,-1,0] 2, [-1,0,0.5] 1.5,
    # [0,0.5,2] 2.5 -> (-1 + 0 + 0.5)/3 = -1/6. (Comparing only far ends, 1 / 1 / 2, could keep [-1,-1,0],
    # which leaves out 0.5.) Second column [-5, -4, 0, 1, 2]: 9, 5, 3 -> (0+1+2)/3 = 1, not the middle run's -1.
    column = torch.tensor([[-1.0, -5.0], [-1.0, -4.0], [0.0, 0.0], [0.5, 1.0], [2.0, 2.0]], dtype=torch.float64)
    assert close(robust._mean_nearest_median(column, beta=3), [-1 / 6, 1.0], atol=1e-12)


def test_bulyan_with_f_zero_is_the_plain_mean():
    # theta = K and beta = K: every row, every value.
    value, chosen = bulyan(X5, f=0)
    assert sorted(chosen) == [0, 1, 2, 3, 4]
    assert close(value, [23.2, 9.4, -1.8], atol=1e-5)


# --- norm bounding ---------------------------------------------------------------------------------------


def test_norm_bounded_mean_by_hand():
    # Norms 5, 1, 0, 2 against a bound of 2: only (3,4) is scaled, by 2/5, to (1.2, 1.6); (0,-2) sits exactly
    # on the bound. Mean: ((1.2 + 0.6 + 0 + 0)/4, (1.6 + 0.8 + 0 - 2)/4) = (0.45, 0.1).
    value, clipped = norm_bounded_mean(t([[3, 4], [0.6, 0.8], [0, 0], [0, -2]]), 2.0)
    assert clipped == 1 and close(value, [0.45, 0.1])


def test_norm_bounded_mean_with_a_loose_bound_is_the_mean_and_huge_rows_do_not_overflow():
    value, clipped = norm_bounded_mean(X5, 1e6)
    assert clipped == 0 and torch.allclose(value, X5.mean(dim=0))
    # ||(1.8e38, 2.4e38)|| = 3e38: its square overflows float32, not float64; scaled to (0.6, 0.8).
    value, clipped = norm_bounded_mean(t([[1.8e38, 2.4e38]]), 1.0)
    assert clipped == 1 and close(value, [0.6, 0.8])


# --- every rule ------------------------------------------------------------------------------------------


def all_rules(x: torch.Tensor) -> dict[str, tuple[torch.Tensor, object]]:
    """Each rule's (value, selection or count) on x, K=15 (Bulyan's f=3 needs K >= 15)."""
    return {
        "median": (coordinate_median(x), None),
        "trimmed": (trimmed_mean(x, 3), None),
        "krum": krum(x, f=3),
        "multikrum": krum(x, f=3, m=6),
        "bulyan": bulyan(x, f=3),
        "norm": norm_bounded_mean(x, 2.0),
    }


def test_permuting_the_rows_changes_no_value():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(15, 6, generator=gen)
    perm = torch.randperm(15, generator=gen)
    before, after = all_rules(x), all_rules(x[perm])
    for name in before:
        assert torch.allclose(before[name][0], after[name][0], atol=1e-6), name
    for name in ("median", "trimmed", "bulyan"):  # sorted columns: bit for bit
        assert torch.equal(before[name][0], after[name][0]), name
    for name in ("krum", "multikrum", "bulyan"):  # the same rows, in the same order, under their new index
        assert [int(perm[i]) for i in after[name][1]] == before[name][1], name
    assert before["norm"][1] == after["norm"][1]


def test_blocks_of_columns_give_the_same_results(monkeypatch):
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(15, 11, generator=gen)
    whole = all_rules(x)
    monkeypatch.setattr(robust, "_BLOCK_ELEMENTS", 40)  # 2 columns per block for K=15, the last one alone
    blocked = all_rules(x)
    for name in whole:
        assert torch.allclose(whole[name][0], blocked[name][0], atol=1e-6), name
        assert whole[name][1] == blocked[name][1], name


def test_results_keep_the_dtype_of_the_updates():
    for name, (value, _) in all_rules(torch.randn(15, 3)).items():
        assert value.dtype == torch.float32 and value.shape == (3,), name


def test_sign_flipping_attackers_move_the_mean_but_not_the_robust_rules():
    gen = torch.Generator().manual_seed(3)
    honest = 1.0 + 0.1 * torch.randn(8, 4, generator=gen)
    target = honest.mean(dim=0)
    flipped = (-10.0 * target).expand(2, 4)
    x = torch.cat([honest[:2], flipped[:1], honest[2:6], flipped[1:], honest[6:]])  # attackers at rows 2 and 7

    def off(value: torch.Tensor) -> float:
        return float((value - target).abs().max())

    assert off(x.mean(dim=0)) > 2.0  # 8 at ~1 and 2 at ~-10: the mean is ~-1.2
    assert off(coordinate_median(x)) < 0.25
    assert off(trimmed_mean(x, 2)) < 0.25
    assert off(krum(x, f=2)[0]) < 0.25
    value, chosen = krum(x, f=2, m=8)
    assert sorted(chosen) == [0, 1, 3, 4, 5, 6, 8, 9] and off(value) < 1e-6
    assert off(bulyan(x, f=1)[0]) < 0.25  # K=10 allows f <= 1 for Bulyan; two attackers still fail


# --- preconditions ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("call", "key", "also"), [
    (lambda: trimmed_mean(X5, 3), "algorithm.server.trim", ["K=5"]),
    (lambda: trimmed_mean(X5, -1), "algorithm.server.trim", []),
    (lambda: trimmed_mean(X5, 1.0), "algorithm.server.trim", []),
    (lambda: krum(X5, f=2), "algorithm.server.f", ["K=5", "f=2", "K > 2f + 2"]),
    (lambda: krum(X5, f=-1), "algorithm.server.f", []),
    (lambda: krum_scores(X5, f=2), "algorithm.server.f", ["K=5", "f=2"]),
    (lambda: krum(X5, f=1, m=0), "algorithm.server.multikrum_m", []),
    (lambda: krum(X5, f=1, m=5), "algorithm.server.multikrum_m", ["K=5", "f=1"]),
    (lambda: bulyan(BULYAN7[:6], f=1), "algorithm.server.f", ["K=6", "f=1", "K >= 4f + 3"]),
    (lambda: bulyan(X5, f=True), "algorithm.server.f", []),
    (lambda: norm_bounded_mean(X5, 0.0), "algorithm.server.norm_bound", []),
    (lambda: norm_bounded_mean(X5, -1.0), "algorithm.server.norm_bound", []),
    (lambda: norm_bounded_mean(X5, float("nan")), "algorithm.server.norm_bound", []),
    (lambda: norm_bounded_mean(X5, float("inf")), "algorithm.server.norm_bound", []),
])
def test_preconditions_are_refused_naming_the_key(call, key, also):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")) as err:
        call()
    for text in also:
        assert text in str(err.value)


def test_limits_are_accepted():
    assert close(trimmed_mean(X5, 2), [4.0, 20.0, -2.0])  # K = 5 = 2*trim + 1
    assert krum(KRUM5, f=1, m=4)[1] == [2, 4, 1, 3]  # m = K - f
    assert krum(t([[0], [1], [2]]), f=0, m=3)[1] == [0, 1, 2]  # K = 3 = 2f + 3, m = K; scores all 1
    assert bulyan(BULYAN7, f=1)[1] == [5, 0, 1, 2, 3]  # K = 7 = 4f + 3


def test_malformed_updates_are_refused():
    with pytest.raises(ValueError, match="non-finite"):
        coordinate_median(t([[1, float("nan")], [2, 3]]))
    with pytest.raises(ValueError, match="non-finite"):
        krum(t([[1, 2], [float("inf"), 3], [0, 0]]), f=0)
    with pytest.raises(ValueError, match=r"\[K, d\]"):
        coordinate_median(torch.ones(3))
    with pytest.raises(ValueError, match=r"\[K, d\]"):
        coordinate_median(torch.ones(0, 3))
    with pytest.raises(TypeError):
        coordinate_median(torch.ones(3, 3, dtype=torch.int64))
