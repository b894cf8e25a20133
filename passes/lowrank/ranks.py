"""Rank rules: per layer by energy or ratio, or model-wide to a MACs target.

A rank is only used when it pays: ``r·(K+N) ≤ margin·K·N`` (a strided
spatial split counts its first conv at full width). The MACs target is met
greedily by fidelity lost per MAC saved, in its exact form: one price per
MAC for the whole model, each layer taking the rank that minimises
``loss(r) + price·MACs(r)``, the price raised until the model fits. That
walks the lower convex hull of every layer's loss/MACs curve at once, so a
layer whose first step (full → first rank that pays) saves little is not
blocked behind it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from onnxopt_passes.lowrank.factor import Factorization
from onnxopt_passes.lowrank.layers import Layer

__all__ = ["rank_for_energy", "rank_for_ratio", "rank_not_paying", "allocate_macs"]


def rank_not_paying(layer: Layer, rank: int, margin: float) -> str | None:
    """Why ``rank`` does not pay for ``layer`` under ``margin``, or None when it does."""
    if rank <= layer.max_rank(margin):
        return None
    need = layer.first_scale * layer.k + layer.n
    if layer.max_rank(margin) == 0:
        return (f"no rank pays: even rank 1 costs {need:g} per row against {margin:g}·K·N = "
                f"{margin * layer.k * layer.n:g} (K={layer.k}, N={layer.n})")
    return (f"rank {rank} of {layer.full_rank} does not pay: r·(K+N) = {rank * need:g} > margin·K·N = "
            f"{margin * layer.k * layer.n:g}; ranks up to {layer.max_rank(margin)} would")


def rank_for_energy(factorization: Factorization, energy: float, limit: int | None = None) -> int:
    """The smallest rank keeping ``energy`` of the (whitened) squared singular values, at least 1.

    ``limit``: the largest rank of any use (no factors are computed to refine a rank beyond it).
    """
    return max(1, factorization.rank_for_energy(energy, limit))


def rank_for_ratio(layer: Layer, ratio: float) -> int:
    """``ratio`` of the layer's full rank min(K, N), rounded, at least 1."""
    return max(1, min(layer.full_rank, int(math.floor(ratio * layer.full_rank + 0.5))))


def allocate_macs(layers: Sequence[Layer], losses: Sequence[np.ndarray], margin: float, budget: float) -> list[int]:
    """Ranks (0 = left alone) whose layers' MACs fit ``budget``, losing the least summed loss.

    ``losses[i][r]`` is layer i's loss at rank r (0 at full rank). When even
    rank 1 everywhere does not fit, that most compressed choice is returned.
    """
    options = []
    scale = max(sum(layer.macs for layer in layers), 1.0)
    for layer, loss in zip(layers, losses):
        ranks = np.arange(1, layer.max_rank(margin) + 1)
        macs = np.concatenate([[layer.macs], layer.factored_macs(ranks)]) / scale
        options.append((ranks, macs, np.concatenate([[0.0], loss[ranks]])))

    def choose(price: float) -> tuple[list[int], float]:
        picks = [int(np.argmin(loss + price * macs)) for _, macs, loss in options]
        return picks, sum(float(macs[p]) for p, (_, macs, _) in zip(picks, options))

    def ranks_of(picks: list[int]) -> list[int]:
        return [int(ranks[p - 1]) if p else 0 for p, (ranks, _, _) in zip(picks, options)]

    budget /= scale
    smallest = [1 if len(ranks) else 0 for ranks, _, _ in options]
    if sum(float(macs[p]) for p, (_, macs, _) in zip(smallest, options)) > budget:
        return ranks_of(smallest)
    low, high = -30.0, 30.0  # log10 of the price; losses and MACs are both O(1) here
    for _ in range(100):
        mid = (low + high) / 2
        if choose(10.0**mid)[1] <= budget:
            high = mid
        else:
            low = mid
    return ranks_of(choose(10.0**high)[0])
