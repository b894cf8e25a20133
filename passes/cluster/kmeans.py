"""1-D k-means on the rows of a matrix: the four initialisations, Lloyd's iterations, the final assignment.

Every row is clustered on its own (one row: per-tensor; one row per output
channel: per-channel), all rows at once. In one dimension k-means works on
the sorted values: a clustering is k contiguous runs, the boundaries between
centroids are their midpoints, and one Lloyd step is a search of k-1
midpoints in the sorted row plus differences of prefix sums: O(k log n) per
row and iteration, whatever the row's length, so iterations are cheap and
only the initial sort and the final assignment touch every weight.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np

from onnxopt_passes.cluster.optimal import optimal_centroids

__all__ = ["Init", "INITS", "SortedRows", "Clustering", "cluster_rows", "grid_rows", "GRID_CLIPS", "assign", "count_below", "row_keys", "lloyd"]

Init = Literal["kmeans++", "linear", "density", "optimal", "grid"]

#: kmeans++ seeding costs k passes over its points: it runs on evenly spaced order statistics of each row
#: (a quantile sketch of at least k points per row) so that rows × points × k stays near this; Lloyd's iterations
#: refine on the full rows anyway.
SEED_WORK = 1 << 24


@dataclass(frozen=True)
class SortedRows:
    """Rows sorted ascending (float64) with prefix sums of values and squares, one leading zero column.

    ``keys`` are the rows' exact search keys when there are several rows (see :func:`row_keys`).
    """

    values: np.ndarray
    sums: np.ndarray
    squares: np.ndarray
    keys: np.ndarray | None

    @classmethod
    def of(cls, rows: np.ndarray) -> SortedRows:
        values = np.sort(rows, axis=1).astype(np.float64, copy=False)
        zero = np.zeros((values.shape[0], 1))
        return cls(values, np.concatenate([zero, np.cumsum(values, axis=1)], axis=1),
                   np.concatenate([zero, np.cumsum(values * values, axis=1)], axis=1),
                   row_keys(values) if values.shape[0] > 1 else None)

    @property
    def shape(self) -> tuple[int, int]:
        return self.values.shape  # type: ignore[return-value]

    def distinct(self) -> np.ndarray:
        """Number of distinct values per row."""
        return 1 + np.count_nonzero(self.values[:, 1:] != self.values[:, :-1], axis=1)

    def edges(self, centroids: np.ndarray, rows: np.ndarray | None = None) -> np.ndarray:
        """[len(rows), k+1] positions where each centroid's run of sorted values starts (nearest-centroid assignment).

        ``centroids`` are those of ``rows`` (row indices; all rows when None).
        """
        rows = np.arange(self.shape[0]) if rows is None else rows
        n = self.shape[1]
        inner = count_below(self.values, (centroids[:, 1:] + centroids[:, :-1]) * 0.5, self.keys, rows)
        return np.concatenate([np.zeros((rows.size, 1), np.int64), inner, np.full((rows.size, 1), n, np.int64)], axis=1)

    def at(self, table: np.ndarray, rows: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """``table[rows[i], positions[i, j]]`` for a [R, ...] table (values or a prefix sum), without copying rows."""
        return table.ravel()[rows[:, None] * table.shape[1] + positions]

    def sse(self, centroids: np.ndarray) -> np.ndarray:
        """Per-row sum of squared errors when every value goes to its nearest centroid."""
        rows = np.arange(self.shape[0])
        edges = self.edges(centroids)
        count = np.diff(edges, axis=1)
        s1 = np.diff(self.at(self.sums, rows, edges), axis=1)
        s2 = np.diff(self.at(self.squares, rows, edges), axis=1)
        return np.maximum((s2 - 2.0 * centroids * s1 + centroids * centroids * count).sum(axis=1), 0.0)


@dataclass(frozen=True)
class Clustering:
    """Sorted centroids [R, k] (float64), labels [R, n] (uint8) into them, and how they were found."""

    centroids: np.ndarray
    labels: np.ndarray
    method: str


def _ordered_bits(values: np.ndarray) -> np.ndarray:
    """float32 values as int64 in [0, 2^32) that sort as the floats do (-0.0 taken as +0.0)."""
    bits = (values.astype(np.float32) + np.float32(0.0)).view(np.int32).astype(np.int64)
    return np.where(bits < 0, bits ^ 0x7FFFFFFF, bits) + (1 << 31)


def _ceil_float32(values: np.ndarray) -> np.ndarray:
    """The smallest float32 >= each float64 value: for float32 data, ``x < b`` exactly when ``x < ceil(b)``."""
    rounded = values.astype(np.float32)
    return np.where(rounded.astype(np.float64) < values, np.nextafter(rounded, np.float32(np.inf)), rounded)


def row_keys(values: np.ndarray) -> np.ndarray | None:
    """Exact int64 search keys ``row << 32 | order(value)`` of float32 data [R, n], or None for wider data.

    Sorted rows give one globally sorted key array, so a single
    ``np.searchsorted`` answers a search in every row at once.
    """
    if not np.array_equal(values.astype(np.float32).astype(np.float64), values):
        return None
    return (np.arange(values.shape[0], dtype=np.int64)[:, None] << 32) | _ordered_bits(values)


def count_below(sorted_rows: np.ndarray, bounds: np.ndarray, keys: np.ndarray | None = None,
                rows: np.ndarray | None = None) -> np.ndarray:
    """For each of ``rows`` (all when None) and bound j, how many values of that sorted row are below ``bounds[i, j]``.

    ``np.searchsorted`` for a single row; for several, one search over the
    rows' ``keys`` (float32 data), else a binary search run on all
    (row, bound) pairs at once (log2 n vectorized steps over R·k pairs).
    """
    count, n = sorted_rows.shape
    rows = np.arange(count) if rows is None else rows
    if count == 1:
        return np.searchsorted(sorted_rows[0], bounds, side="left").astype(np.int64)
    row = rows.astype(np.int64)[:, None]
    if keys is not None:
        wanted = (row << 32) | _ordered_bits(_ceil_float32(bounds))
        return np.searchsorted(keys.ravel(), wanted.ravel(), side="left").reshape(bounds.shape) - row * n
    flat = sorted_rows.ravel()
    lo = np.zeros(bounds.shape, np.int64)
    hi = np.full(bounds.shape, n, np.int64)
    for _ in range(int(n).bit_length()):
        mid = (lo + hi) >> 1
        below = (flat[row * n + np.minimum(mid, n - 1)] < bounds) & (lo < hi)
        lo = np.where(below, mid + 1, lo)
        hi = np.where(below, hi, mid)
    return lo


def assign(rows: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Index of the nearest centroid for every value of ``rows`` [R, n] (centroids [R, k] sorted), as uint8.

    A value goes past every midpoint at or below it; ties between two
    centroids go to the upper one, as in :meth:`SortedRows.edges`.
    """
    count, k = centroids.shape
    if k == 1:
        return np.zeros(rows.shape, np.uint8)
    bounds = (centroids[:, 1:] + centroids[:, :-1]) * 0.5
    if count == 1:
        return np.searchsorted(bounds[0], rows[0], side="right").astype(np.uint8)[None, :]
    row = np.arange(count, dtype=np.int64)[:, None]
    keys = row_keys(rows.astype(np.float64, copy=False))
    if keys is not None:
        sorted_bounds = ((row << 32) | _ordered_bits(_ceil_float32(bounds))).ravel()
        return (np.searchsorted(sorted_bounds, keys, side="right") - row * (k - 1)).astype(np.uint8)
    flat = bounds.ravel()
    lo = np.zeros(rows.shape, np.int64)
    hi = np.full(rows.shape, k - 1, np.int64)
    for _ in range(int(k - 1).bit_length()):
        mid = (lo + hi) >> 1
        past = (flat[row * (k - 1) + np.minimum(mid, k - 2)] <= rows) & (lo < hi)
        lo = np.where(past, mid + 1, lo)
        hi = np.where(past, hi, mid)
    return lo.astype(np.uint8)


# -- initialisations: (sorted rows, k, rng) -> [R, k] centroids -------------------------------------------------


def _linear(data: SortedRows, k: int, rng: np.random.Generator) -> np.ndarray:
    """Evenly spaced between each row's minimum and maximum (keeps the rare large weights representable)."""
    lo, hi = data.values[:, :1], data.values[:, -1:]
    return lo + (hi - lo) * (np.arange(k) / max(k - 1, 1))


def _density(data: SortedRows, k: int, rng: np.random.Generator) -> np.ndarray:
    """Evenly spaced along each row's cumulative distribution: the (j + 1/2)/k quantiles."""
    n = data.shape[1]
    return data.values[:, ((np.arange(k) + 0.5) / k * n).astype(np.int64)]


def _kmeanspp(data: SortedRows, k: int, rng: np.random.Generator) -> np.ndarray:
    """Arthur and Vassilvitskii's D² seeding, on all rows at once (over a quantile sketch of long rows)."""
    rows, n = data.shape
    size = min(n, max(SEED_WORK // (rows * k), k))
    points = data.values if size == n else data.values[:, np.linspace(0, n - 1, size).astype(np.int64)]
    m = points.shape[1]
    at = np.arange(rows)
    centers = np.empty((rows, k))
    centers[:, 0] = points[at, rng.integers(0, m, rows)]
    d2 = (points - centers[:, :1]) ** 2
    for j in range(1, k):
        cum = np.cumsum(d2, axis=1)
        draw = rng.random(rows) * cum[:, -1]
        pick = np.minimum(np.count_nonzero(cum <= draw[:, None], axis=1), m - 1)
        # a row whose points are all centres already repeats one: Lloyd re-seeds it, or leaves it empty when exact
        centers[:, j] = np.where(cum[:, -1] > 0, points[at, pick], centers[:, 0])
        np.minimum(d2, (points - centers[:, j : j + 1]) ** 2, out=d2)
    return np.sort(centers, axis=1)


INITS: dict[str, Callable[[SortedRows, int, np.random.Generator], np.ndarray]] = {
    "kmeans++": _kmeanspp,
    "linear": _linear,
    "density": _density,
}


def _reseed_empty(data: SortedRows, rows: np.ndarray, centroids: np.ndarray, edges: np.ndarray,
                  count: np.ndarray) -> np.ndarray:
    """Move empty centroids onto the worst-served values (the far ends of the widest runs); which rows moved one.

    A row with fewer distinct values than k keeps its empty centroids: every run there has zero error.
    """
    empty = count == 0
    if not empty.any():
        return np.zeros(rows.size, bool)
    n = data.shape[1]
    first = data.at(data.values, rows, np.minimum(edges[:, :-1], n - 1))
    last = data.at(data.values, rows, np.maximum(edges[:, 1:] - 1, 0))
    target = np.where(np.abs(first - centroids) >= np.abs(last - centroids), first, last)
    error = np.where(empty, -1.0, np.abs(target - centroids))
    worst = np.argsort(-error, axis=1, kind="stable")
    r, j = np.nonzero(empty)
    source = worst[r, (np.cumsum(empty, axis=1) - 1)[r, j]]
    movable = error[r, source] > 0
    centroids[r[movable], j[movable]] = target[r[movable], source[movable]]
    moved = np.zeros(rows.size, bool)
    moved[r[movable]] = True
    return moved


def lloyd(data: SortedRows, centroids: np.ndarray, iterations: int) -> np.ndarray:
    """Lloyd's iterations from ``centroids`` [R, k] until no value changes cluster (or ``iterations`` run).

    Rows whose assignment stopped changing drop out, so late iterations only touch the slow rows.
    """
    centroids = np.sort(centroids, axis=1)
    last = np.full((centroids.shape[0], centroids.shape[1] + 1), -1, np.int64)
    active = np.arange(centroids.shape[0])
    for _ in range(iterations):
        edges = data.edges(centroids[active], active)
        moving = (edges != last[active]).any(axis=1)
        active, edges = active[moving], edges[moving]
        if not active.size:
            break
        count = np.diff(edges, axis=1)
        total = np.diff(data.at(data.sums, active, edges), axis=1)
        means = np.where(count > 0, total / np.maximum(count, 1), centroids[active])
        reseeded = _reseed_empty(data, active, means, edges, count)
        last[active] = np.where(reseeded[:, None], -1, edges)
        centroids[active] = np.sort(means, axis=1)
    return centroids


def _distinct_values(data: SortedRows, k: int) -> np.ndarray:
    """Each row's distinct values as its centroids, padded with the row's maximum to ``k`` columns (exact)."""
    values = data.values
    starts = np.concatenate([np.ones((values.shape[0], 1), bool), values[:, 1:] != values[:, :-1]], axis=1)
    slot = np.cumsum(starts, axis=1) - 1
    centroids = np.repeat(values[:, -1:], k, axis=1)
    r, i = np.nonzero(starts)
    centroids[r, slot[r, i]] = values[r, i]
    return centroids


#: Steps tried per row by :func:`grid_rows`, as shares of the step that just reaches the row's largest |w|:
#: clipping the few largest weights buys a finer grid for all the others (at k = 16 the squared error of a
#: Gaussian row is about a third lower at the best share than at 1).
GRID_CLIPS = np.linspace(0.45, 1.0, 23)


def grid_rows(rows: np.ndarray, k: int) -> Clustering:
    """Each row on a uniform symmetric grid of ``k`` levels, ``step * (-k/2 .. k/2 - 1)``: the values a symmetric
    int4 (k = 16) weight takes, so quantization after clustering stores them exactly in 4 bits.

    The step is, per row, the one of :data:`GRID_CLIPS` × ``max|row| / (k/2 - 1)`` with the least squared error
    (the lowest level -k/2 also counts: a row whose largest magnitude is negative may sit one level lower). No
    Lloyd iterations: they would move the levels off the grid."""
    half = k // 2
    data = rows.astype(np.float64, copy=False)
    top = np.maximum(data.max(axis=1), -data.min(axis=1) * (half - 1) / half)  # |w| the step must reach at level half-1
    top = np.where(top > 0, top, 1.0)
    best_error = np.full(rows.shape[0], np.inf)
    step = top / max(half - 1, 1)
    for clip in GRID_CLIPS:  # a handful of candidates, each one vectorized over all rows
        candidate = top * clip / max(half - 1, 1)
        levels = np.clip(np.rint(data / candidate[:, None]), -half, half - 1)
        error = np.square(levels * candidate[:, None] - data).sum(axis=1)
        better = error < best_error
        best_error = np.where(better, error, best_error)
        step = np.where(better, candidate, step)
    labels = np.clip(np.rint(data / step[:, None]), -half, half - 1) + half
    centroids = step[:, None] * (np.arange(k, dtype=np.float64) - half)[None, :]
    return Clustering(centroids, labels.astype(np.uint8), "grid")


def cluster_rows(rows: np.ndarray, k: int, init: Init, iterations: int, rng: np.random.Generator) -> Clustering:
    """Cluster each row of ``rows`` [R, n] into at most ``k`` values; rows with <= k distinct values stay exact.

    ``optimal`` solves each row exactly by dynamic programming when that is
    affordable (see :mod:`.optimal`); otherwise it solves a quantile sketch,
    refines with Lloyd, and keeps, per row, whichever of that and kmeans++
    has the smaller error (kmeans++ alone when even the sketch is over
    budget): it is never worse than kmeans++. ``method`` says which ran.
    """
    if init == "grid":
        return grid_rows(rows, k)
    data = SortedRows.of(rows)
    distinct = int(data.distinct().max())
    if distinct <= k:
        centroids = _distinct_values(data, distinct)
        return Clustering(centroids, assign(rows, centroids), "distinct values")
    if init == "optimal":
        centroids, exact = optimal_centroids(data.values, k)
        if centroids is None:
            centroids, method = lloyd(data, _kmeanspp(data, k, rng), iterations), "kmeans++ (optimal unaffordable here)"
        elif exact:
            method = "optimal (exact)"
        else:
            refined = lloyd(data, centroids, iterations)
            seeded = lloyd(data, _kmeanspp(data, k, rng), iterations)
            better = data.sse(refined) <= data.sse(seeded)
            centroids = np.where(better[:, None], refined, seeded)
            method = "optimal (sketch + Lloyd)" if better.all() else "optimal (sketch + Lloyd, kmeans++ where better)"
    else:
        centroids = lloyd(data, INITS[init](data, k, rng), iterations)
        method = init
    return Clustering(centroids, assign(rows, centroids), method)
