import numpy as np
import pytest

from fedsim.config import PartitionConfig
from fedsim.partition import SCHEMES, label_histogram, partition


def _labels(n: int, num_classes: int = 10, seed: int = 123) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, num_classes, size=n)


def _check_valid(parts: list[np.ndarray], n: int, num_clients: int) -> None:
    assert len(parts) == num_clients
    for p in parts:
        assert p.dtype == np.int64
        assert np.all(np.diff(p) > 0)  # sorted, no duplicates within a client
    joined = np.concatenate(parts)
    # Disjoint and complete: every index 0..n-1 appears exactly once.
    assert len(joined) == n
    np.testing.assert_array_equal(np.sort(joined), np.arange(n))


def _mean_label_distance(labels: np.ndarray, parts: list[np.ndarray], num_classes: int) -> float:
    """Mean total-variation distance between each client's label distribution and the global one."""
    hist = label_histogram(labels, parts, num_classes).astype(float)
    local = hist / hist.sum(axis=1, keepdims=True)
    glob = np.bincount(labels, minlength=num_classes) / len(labels)
    return float(np.mean(0.5 * np.abs(local - glob).sum(axis=1)))


@pytest.mark.parametrize("scheme", sorted(SCHEMES))
def test_disjoint_and_complete(scheme):
    labels = _labels(1003)
    cfg = PartitionConfig(scheme=scheme, num_clients=7, alpha=0.5, min_samples=3)
    parts = partition(labels, cfg, seed=0)
    _check_valid(parts, len(labels), 7)
    assert min(len(p) for p in parts) >= 3


def test_iid_sizes_differ_by_at_most_one():
    parts = partition(_labels(103), PartitionConfig(scheme="iid", num_clients=10), seed=1)
    sizes = [len(p) for p in parts]
    # 103 = 10 * 10 + 3: three clients get 11, seven get 10.
    assert sorted(sizes) == [10] * 7 + [11] * 3


def test_accepts_python_list():
    parts = partition([0, 1, 0, 1, 2], PartitionConfig(scheme="iid", num_clients=2), seed=0)
    _check_valid(parts, 5, 2)


@pytest.mark.parametrize("scheme", sorted(SCHEMES))
def test_deterministic_by_seed(scheme):
    labels = _labels(500)
    cfg = PartitionConfig(scheme=scheme, num_clients=8, alpha=0.5)
    np.random.seed(1)
    a = partition(labels, cfg, seed=42)
    np.random.seed(2)  # global RNG state must not matter
    b = partition(labels, cfg, seed=42)
    c = partition(labels, cfg, seed=43)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))


def test_dirichlet_min_samples_with_extreme_skew():
    labels = _labels(1000)
    for min_samples in (0, 1, 5):
        cfg = PartitionConfig(scheme="dirichlet", num_clients=100, alpha=0.01, min_samples=min_samples)
        parts = partition(labels, cfg, seed=0)
        _check_valid(parts, 1000, 100)
        assert min(len(p) for p in parts) >= max(1, min_samples)


def test_dirichlet_exact_fit():
    # n == num_clients * min_samples leaves no slack: everyone ends with exactly min_samples.
    cfg = PartitionConfig(scheme="dirichlet", num_clients=10, alpha=0.05, min_samples=4)
    parts = partition(_labels(40, num_classes=3), cfg, seed=3)
    assert [len(p) for p in parts] == [4] * 10


def test_dirichlet_smaller_alpha_more_label_skew():
    labels = _labels(5000)
    skew = {}
    for alpha in (0.1, 100.0):
        cfg = PartitionConfig(scheme="dirichlet", num_clients=10, alpha=alpha)
        skew[alpha] = _mean_label_distance(labels, partition(labels, cfg, seed=0), 10)
    assert skew[0.1] > 0.3  # strongly non-IID
    assert skew[100.0] < 0.1  # close to IID
    assert skew[0.1] > skew[100.0]


def test_quantity_sizes_sum_and_skew():
    labels = _labels(5000)
    cv = {}
    for alpha in (0.1, 100.0):
        cfg = PartitionConfig(scheme="quantity", num_clients=20, alpha=alpha, min_samples=10)
        parts = partition(labels, cfg, seed=0)
        sizes = np.array([len(p) for p in parts])
        assert sizes.sum() == 5000
        assert sizes.min() >= 10
        cv[alpha] = sizes.std() / sizes.mean()
    assert cv[0.1] > 1.0 > 0.2 > cv[100.0]


def test_quantity_keeps_labels_roughly_iid():
    labels = _labels(5000)
    cfg = PartitionConfig(scheme="quantity", num_clients=5, alpha=100.0)
    assert _mean_label_distance(labels, partition(labels, cfg, seed=0), 10) < 0.05


def test_too_few_samples_error():
    cfg = PartitionConfig(scheme="dirichlet", num_clients=10, min_samples=5)
    with pytest.raises(ValueError) as err:
        partition(_labels(49), cfg, seed=0)
    msg = str(err.value)
    assert "partition.num_clients=10" in msg
    assert "49 samples" in msg
    assert "min_samples=5" in msg


def test_too_few_samples_uses_at_least_one():
    # min_samples=0 still needs one sample per client.
    with pytest.raises(ValueError, match="3 samples"):
        partition([0, 1, 0], PartitionConfig(scheme="iid", num_clients=4, min_samples=0), seed=0)


def test_unknown_scheme_error():
    with pytest.raises(ValueError) as err:
        partition(_labels(100), PartitionConfig(scheme="pathological"), seed=0)
    msg = str(err.value)
    assert "partition.scheme" in msg and "pathological" in msg
    for name in ("iid", "dirichlet", "quantity"):
        assert name in msg


def test_label_histogram():
    labels = [0, 1, 1, 2, 0, 2]
    parts = [np.array([0, 1]), np.array([2, 3, 4]), np.array([5])]
    # client 0: labels 0,1; client 1: labels 1,2,0; client 2: label 2
    expected = np.array([[1, 1, 0, 0], [1, 1, 1, 0], [0, 0, 1, 0]])
    np.testing.assert_array_equal(label_histogram(labels, parts, num_classes=4), expected)
    with pytest.raises(ValueError):
        label_histogram(labels, parts, num_classes=2)
