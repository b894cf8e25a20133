"""Exact 1-D k-means by dynamic programming (the ``optimal`` initialisation).

On sorted values an optimal k-clustering is k contiguous runs, so
``D[j][i]``, the least error of the first i values in j clusters, is
``min over t of D[j-1][t] + cost(t, i)``, with ``cost`` the squared error of
one run read from prefix sums. The best split ``t`` never moves left as
``i`` grows (the run cost is Monge), so each layer is solved by divide and
conquer over ``i``: O(m log m) candidate evaluations per layer instead of
O(m²) (Grønlund et al., "Fast exact k-means, k-medians and Bregman divergence
clustering in 1D", 2017). The recursion runs level by level, every segment of
a level and every row (problem) at once, as flat numpy arrays.

The DP runs on the distinct values weighted by their counts. Where even that
is too much work (more than :data:`EXACT_BUDGET` candidate evaluations, e.g. a
tensor of millions of distinct weights at large k), it runs on an equal-count
quantile sketch of each row instead, and the caller refines with Lloyd.
"""

from __future__ import annotations

import numpy as np

__all__ = ["EXACT_BUDGET", "SKETCH_MIN_POINTS_PER_CLUSTER", "optimal_centroids", "solve_weighted"]

#: Most candidate evaluations, (k-1)·points·log2(points), spent on one tensor (a fraction of a second on one
#: core): exact up to about 20 000 distinct weights at k = 16, or 1 500 at k = 256.
EXACT_BUDGET = 4e6
#: A sketch needs at least this many points per cluster to be worth solving; below, ``optimal`` is unaffordable.
SKETCH_MIN_POINTS_PER_CLUSTER = 4


def _work(k: int, points: int, longest: int) -> float:
    return (k - 1) * points * (np.log2(max(longest, 2)) + 1)


def solve_weighted(values: np.ndarray, weights: np.ndarray, lengths: np.ndarray, k: int) -> np.ndarray:
    """Optimal centroids [P, k] of P problems given as sorted weighted points, concatenated (each longer than k)."""
    problems = len(lengths)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    owner = np.repeat(np.arange(problems), lengths)
    mass = np.bincount(owner, weights, problems)
    mean = np.bincount(owner, weights * values, problems) / mass
    x = values - mean[owner]  # centred per problem: prefix sums of squares lose less to cancellation
    head = starts + np.arange(problems)  # where each problem's prefix arrays (length m+1) begin

    def prefix(a: np.ndarray) -> np.ndarray:
        cum = np.cumsum(np.insert(a, starts, 0.0))
        return cum - np.repeat(cum[head], lengths + 1)

    pw, p1, p2 = prefix(weights.astype(np.float64)), prefix(weights * x), prefix(weights * x * x)

    def cost(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        s = p1[b] - p1[a]
        return np.maximum(p2[b] - p2[a] - s * s / (pw[b] - pw[a]), 0.0)

    size = pw.size
    local = np.arange(size) - np.repeat(head, lengths + 1)
    best = np.full(size, np.inf)
    at = np.flatnonzero(local >= 1)
    best[at] = cost(np.repeat(head, lengths + 1)[at], at)
    splits: list[np.ndarray] = []
    for j in range(2, k + 1):
        layer = np.full(size, np.inf)
        split = np.zeros(size, np.int64)
        prob = np.arange(problems)
        ihi = lengths.astype(np.int64) - (k - j)
        ilo = np.full(problems, j, np.int64) if j < k else ihi.copy()  # the last layer needs i = m only
        tlo = np.full(problems, j - 1, np.int64)
        thi = ihi - 1
        while prob.size:
            mid = (ilo + ihi) >> 1
            span = np.minimum(thi, mid - 1) - tlo + 1
            seg = np.repeat(np.arange(prob.size), span)
            first = np.cumsum(span) - span
            t = tlo[seg] + (np.arange(seg.size) - first[seg])
            base = head[prob][seg]
            value = best[base + t] + cost(base + t, base + mid[seg])
            low = np.minimum.reduceat(value, first)
            hit = np.flatnonzero(value <= low[seg])
            leftmost = np.ones(hit.size, bool)
            leftmost[1:] = seg[hit[1:]] != seg[hit[:-1]]
            arg = t[hit[leftmost]]
            where = head[prob] + mid
            layer[where] = low
            split[where] = arg
            left, right = ilo <= mid - 1, mid + 1 <= ihi
            prob = np.concatenate([prob[left], prob[right]])
            ilo, ihi = np.concatenate([ilo[left], mid[right] + 1]), np.concatenate([mid[left] - 1, ihi[right]])
            tlo, thi = np.concatenate([tlo[left], arg[right]]), np.concatenate([arg[left], thi[right]])
        best = layer
        splits.append(split)
    bounds = np.empty((problems, k + 1), np.int64)
    bounds[:, k] = lengths
    bounds[:, 0] = 0
    for j in range(k, 1, -1):
        bounds[:, j - 1] = splits[j - 2][head + bounds[:, j]]
    ends = head[:, None] + bounds
    total = np.diff(p1[ends], axis=1)
    count = np.diff(pw[ends], axis=1)
    return total / count + mean[:, None]


def _distinct_weighted(sorted_values: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each row's distinct values, their counts, and how many per row (rows concatenated)."""
    rows, n = sorted_values.shape
    starts = np.ones((rows, n), bool)
    starts[:, 1:] = sorted_values[:, 1:] != sorted_values[:, :-1]
    flat = np.flatnonzero(starts.ravel())
    counts = np.diff(np.append(flat, rows * n))
    return sorted_values.ravel()[flat], counts.astype(np.float64), starts.sum(axis=1)


def _sketch(sorted_values: np.ndarray, points: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each row cut into ``points`` runs of (nearly) equal count: their means, weighted by their sizes."""
    rows, n = sorted_values.shape
    cuts = np.linspace(0, n, points + 1).astype(np.int64)
    sizes = np.diff(cuts).astype(np.float64)
    means = np.add.reduceat(sorted_values, cuts[:-1], axis=1) / sizes
    return means.ravel(), np.tile(sizes, rows), np.full(rows, points)


def _sketch_points(k: int, rows: int, n: int) -> int:
    points = n
    for _ in range(3):  # the log factor depends on the answer: a few fixed-point steps settle it
        points = int(EXACT_BUDGET / ((k - 1) * rows * (np.log2(max(points, 2)) + 1)))
    return min(n, points)


def optimal_centroids(sorted_values: np.ndarray, k: int) -> tuple[np.ndarray | None, bool]:
    """Sorted centroids [R, k] of each row of ``sorted_values`` [R, n]; True when they are exactly optimal.

    Rows with at most k distinct values get those values (padded with the row's maximum).
    Over the budget the centroids solve a sketch (False); None when even a
    sketch of a few points per cluster is over it (many rows at a large k).
    """
    rows, n = sorted_values.shape
    values, weights, lengths = _distinct_weighted(sorted_values)
    exact = _work(k, int(lengths.sum()), int(lengths.max())) <= EXACT_BUDGET
    if not exact:
        points = _sketch_points(k, rows, n)
        if points < SKETCH_MIN_POINTS_PER_CLUSTER * k:
            return None, False
        values, weights, lengths = _sketch(sorted_values, points)
    owner = np.repeat(np.arange(rows), lengths)
    centroids = np.repeat(sorted_values[:, -1:], k, axis=1).astype(np.float64)
    small = lengths <= k
    if small.any():
        slot = np.arange(values.size) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        mine = small[owner]
        centroids[owner[mine], slot[mine]] = values[mine]
    big = ~small
    if big.any():
        mine = big[owner]
        centroids[big] = solve_weighted(values[mine], weights[mine], lengths[big], k)
    return np.sort(centroids, axis=1), exact
