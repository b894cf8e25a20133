"""Truncated SVD of a layer's weight: plain, or whitened by its input statistics (activation-aware).

Plain SVD keeps the directions of W with the most energy, ``min ‖W - W'‖``.
What matters is the layer's output, ``min E‖x·W - x·W'‖²``: with the input
second moment ``C = L·Lᵀ`` (Cholesky) that is ``‖Lᵀ(W - W')‖``, so the SVD
runs on ``Lᵀ·W`` and the result is unwhitened with ``L⁻ᵀ`` (SVD-LLM's
truncation-aware whitening). With a bias to absorb it, C is the centered
covariance and the bias takes the mean's share of the error,
``b' = b + μ·(W - W')``, which is optimal over (W', b') jointly.
A small ridge on C keeps directions calibration never saw from blowing up,
and, with few samples, blends toward the plain SVD. Output columns can be
weighted too (a BatchNorm's scale after the layer): the SVD runs on W·D and
D⁻¹ goes back into B.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["Factorization", "RIDGE"]

#: Ridge added to C, relative to its mean diagonal.
RIDGE = 1e-2


@dataclass
class Factorization:
    """SVD of one layer's weight (G, K, N), per group, in the metric its rank is chosen in.

    ``singular`` (G, R) are the singular values of W (plain) or of Lᵀ·W
    (whitened, their squares are output energy); ``chol`` is L, None when plain;
    ``mean`` is the input mean when the bias absorbs it; ``out_scale`` (G, N)
    weights the output columns.
    """

    weight: np.ndarray
    u: np.ndarray
    singular: np.ndarray
    vt: np.ndarray
    chol: np.ndarray | None = None
    mean: np.ndarray | None = None
    out_scale: np.ndarray | None = None

    @classmethod
    def plain(cls, weight: np.ndarray, out_scale: np.ndarray | None = None) -> Factorization:
        scaled = weight.astype(np.float64) if out_scale is None else weight * out_scale[:, None, :]
        u, s, vt = np.linalg.svd(scaled, full_matrices=False)
        return cls(weight, u, s, vt, out_scale=out_scale)

    @classmethod
    def whitened(cls, weight: np.ndarray, second_moment: np.ndarray, mean: np.ndarray | None = None,
                 out_scale: np.ndarray | None = None) -> Factorization:
        """SVD of Lᵀ·W(·D) where L·Lᵀ is ``second_moment`` (G, K, K) plus the ridge."""
        k = weight.shape[1]
        scale = np.trace(second_moment, axis1=1, axis2=2) / k
        scale = np.where(scale > 0, scale, 1.0)  # a dead input: the ridge alone, i.e. the plain SVD
        c = second_moment + (RIDGE * scale)[:, None, None] * np.eye(k)
        chol = np.linalg.cholesky(c)
        scaled = weight.astype(np.float64) if out_scale is None else weight * out_scale[:, None, :]
        u, s, vt = np.linalg.svd(chol.transpose(0, 2, 1) @ scaled, full_matrices=False)
        return cls(weight, u, s, vt, chol, mean, out_scale)

    def tail(self) -> np.ndarray:
        """Relative energy lost at each rank 0..R (``tail[r]``: share of squared singular values beyond r)."""
        energy = (self.singular**2).sum(axis=0)  # a common rank across groups
        total = energy.sum()
        kept = np.concatenate([[0.0], np.cumsum(energy)])
        return np.clip(1.0 - kept / total, 0.0, 1.0) if total > 0 else np.zeros_like(kept)

    def rank_for_energy(self, energy: float) -> int:
        """The smallest rank keeping ``energy`` of the squared singular values."""
        tail = self.tail()
        return int(np.argmax(tail <= 1.0 - energy + 1e-12))

    def factors(self, rank: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """(A (G,K,r), B (G,r,N), bias shift (G,N) or None) with A·B ≈ W; singular values split evenly."""
        root = np.sqrt(self.singular[:, :rank])
        a = self.u[:, :, :rank] * root[:, None, :]
        b = root[:, :, None] * self.vt[:, :rank, :]
        if self.chol is not None:
            a = np.linalg.solve(self.chol.transpose(0, 2, 1), a)
        if self.out_scale is not None:
            b = b / self.out_scale[:, None, :]
        shift = None
        if self.mean is not None:
            shift = np.einsum("gk,gkn->gn", self.mean, self.weight - a @ b)
        return a, b, shift
