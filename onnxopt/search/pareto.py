"""Pareto fronts: the points no other point beats on every axis (all axes minimised)."""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["pareto_front", "dominates"]


def dominates(a: Sequence[float], b: Sequence[float]) -> bool:
    """True when ``a`` is no worse than ``b`` on every axis and better on at least one."""
    return all(x <= y for x, y in zip(a, b)) and any(x < y for x, y in zip(a, b))


def pareto_front(points: Sequence[Sequence[float]]) -> list[int]:
    """Indices of the non-dominated points, in input order; duplicates of a front point are all kept.

    Two axes (the search's accuracy-against-latency and accuracy-against-size
    fronts) take a sort and one sweep, O(n log n); more axes fall back to the
    pairwise check, fine for the hundreds of candidates a search evaluates.
    """
    n = len(points)
    if n == 0:
        return []
    dims = len(points[0])
    if dims == 2:
        order = sorted(range(n), key=lambda i: (points[i][0], points[i][1]))
        keep: list[int] = []
        best_y = float("inf")
        last: tuple[float, float] | None = None
        for i in order:
            x, y = points[i][0], points[i][1]
            if y < best_y:
                keep.append(i)
                best_y = y
                last = (x, y)
            elif last is not None and (x, y) == last:  # an exact duplicate of the last front point
                keep.append(i)
        return sorted(keep)
    return [i for i in range(n) if not any(dominates(points[j], points[i]) for j in range(n) if j != i)]
