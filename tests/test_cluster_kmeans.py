"""cluster numerics: 1-D k-means against brute force and numpy references, index packing round trips."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from onnxopt_passes.cluster import kmeans, optimal
from onnxopt_passes.cluster.kmeans import SortedRows, assign, cluster_rows, count_below
from onnxopt_passes.cluster.optimal import optimal_centroids
from onnxopt_passes.cluster.storage import as_rows, from_rows, index_bits, pack_indices, unpack_indices

INITS = ["kmeans++", "linear", "density", "optimal"]


def _sse(rows: np.ndarray, k: int, init: str, seed: int = 0) -> float:
    clustering = cluster_rows(rows, k, init, 300, np.random.default_rng(seed))
    decoded = np.take_along_axis(clustering.centroids, clustering.labels.astype(np.intp), axis=1)
    return float(np.square(rows.astype(np.float64) - decoded).sum())


def _brute_force(x: np.ndarray, k: int) -> float:
    """Least squared error over every split of the sorted values into k runs."""
    xs = np.sort(x.astype(np.float64))
    best = np.inf
    for cuts in itertools.combinations(range(1, xs.size), k - 1):
        runs = np.split(xs, cuts)
        best = min(best, sum(float(np.square(r - r.mean()).sum()) for r in runs))
    return best


def test_optimal_matches_brute_force() -> None:
    rng = np.random.default_rng(0)
    for _ in range(25):
        x = np.round(rng.standard_normal(int(rng.integers(6, 12))), 1)  # rounding makes ties and duplicates
        k = int(rng.integers(2, 5))
        centroids, exact = optimal_centroids(np.sort(x)[None], k)
        assert exact and centroids is not None
        got = float(SortedRows.of(x[None]).sse(centroids)[0])
        assert got == pytest.approx(_brute_force(x, min(k, np.unique(x).size)), abs=1e-9)


def _tensors() -> list[np.ndarray]:
    rng = np.random.default_rng(1)
    return [
        rng.standard_normal(3000).astype(np.float32),
        rng.laplace(size=2000).astype(np.float32),
        np.concatenate([rng.normal(-2, 0.1, 500), rng.normal(3, 1, 1500), [40.0]]).astype(np.float32),
        np.where(rng.random(4000) < 0.6, 0.0, rng.standard_normal(4000)).astype(np.float32),  # pruned: many zeros
    ]


@pytest.mark.parametrize("k", [4, 16, 64])
def test_optimal_never_worse_than_kmeanspp(k: int) -> None:
    for x in _tensors():
        best = _sse(x[None], k, "optimal")
        for seed in range(3):
            assert best <= _sse(x[None], k, "kmeans++", seed) * (1 + 1e-9)


def test_optimal_on_a_sketch_is_never_worse_than_kmeanspp(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(optimal, "EXACT_BUDGET", 2e4)  # forces the sketch path on these sizes
    rng = np.random.default_rng(2)
    rows = rng.standard_normal((6, 800)) * rng.uniform(0.1, 3.0, (6, 1))
    clustering = cluster_rows(rows, 8, "optimal", 300, np.random.default_rng(0))
    assert clustering.method.startswith("optimal (sketch")
    data = SortedRows.of(rows)
    seeded = kmeans.lloyd(data, kmeans.INITS["kmeans++"](data, 8, np.random.default_rng(0)), 300)
    assert (data.sse(clustering.centroids) <= data.sse(seeded) * (1 + 1e-9)).all()


@pytest.mark.parametrize("init", INITS)
def test_fewer_distinct_values_than_k_is_exact(init: str) -> None:
    rng = np.random.default_rng(3)
    x = rng.choice(np.array([-0.7, 0.0, 0.1, 0.1000001, 2.5], np.float32), 999)
    rows = np.stack([x, rng.standard_normal(999).astype(np.float32)])  # one exact row, one not
    for data, k in ((x[None], 16), (x[None], 5), (rows, 8)):
        clustering = cluster_rows(data, k, init, 300, np.random.default_rng(0))
        decoded = np.take_along_axis(clustering.centroids, clustering.labels.astype(np.intp), axis=1)
        np.testing.assert_array_equal(decoded[0].astype(np.float32), x)


@pytest.mark.parametrize("init", INITS)
def test_inits_converge_to_a_lloyd_fixed_point(init: str) -> None:
    x = np.random.default_rng(4).standard_normal((3, 500))
    clustering = cluster_rows(x, 8, init, 1000, np.random.default_rng(0))
    labels = clustering.labels.astype(np.intp)
    for r in range(3):  # every centroid is the mean of its values, every value is with its nearest centroid
        used = np.unique(labels[r])
        means = np.array([x[r][labels[r] == j].mean() for j in used])
        np.testing.assert_allclose(clustering.centroids[r, used], means, rtol=1e-9, atol=1e-12)
        nearest = np.abs(x[r][:, None] - clustering.centroids[r][None, :]).min(axis=1)
        np.testing.assert_allclose(np.abs(x[r] - clustering.centroids[r, labels[r]]), nearest, atol=1e-12)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_row_searches_match_numpy(dtype: type) -> None:
    # float32 rows use exact int64 keys, float64 rows a vectorized binary search: both must equal np.searchsorted
    rng = np.random.default_rng(5)
    rows = rng.standard_normal((5, 300)).astype(dtype)
    rows[:, :40] = rows[:, 40:80]  # duplicates
    rows[0, :10] = -0.0
    data = SortedRows.of(rows)
    bounds = np.sort(np.concatenate([rng.standard_normal((5, 6)), data.values[:, [3, 100, 299]]], axis=1), axis=1)
    expected = np.stack([np.searchsorted(data.values[r], bounds[r], side="left") for r in range(5)])
    np.testing.assert_array_equal(count_below(data.values, bounds, data.keys), expected)
    centroids = np.sort(rng.standard_normal((5, 7)), axis=1)
    centroids[:, 3] = centroids[:, 2]  # a midpoint equal to a centroid
    mids = (centroids[:, 1:] + centroids[:, :-1]) / 2
    expected = np.stack([np.searchsorted(mids[r], rows[r].astype(np.float64), side="right") for r in range(5)])
    np.testing.assert_array_equal(assign(rows, centroids), expected)


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
@pytest.mark.parametrize("count", [1, 7, 64, 1001])
def test_pack_round_trip(bits: int, count: int) -> None:
    labels = np.random.default_rng(count).integers(0, 1 << bits, count).astype(np.uint8)
    packed = pack_indices(labels, bits)
    assert packed.size == -(-count * bits // 8)
    np.testing.assert_array_equal(unpack_indices(packed, bits, count), labels)


def test_index_bits_and_rows_layout() -> None:
    assert [index_bits(k) for k in (2, 3, 4, 5, 16, 17, 256)] == [1, 2, 2, 4, 4, 8, 8]
    w = np.arange(2 * 3 * 4).reshape(2, 3, 4)
    for axis in (None, 0, 1, 2):
        rows = as_rows(w, axis)
        assert rows.shape[0] == (1 if axis is None else w.shape[axis])
        np.testing.assert_array_equal(from_rows(rows, w.shape, axis), w)
    np.testing.assert_array_equal(as_rows(w, 1)[2], w[:, 2, :].ravel())
