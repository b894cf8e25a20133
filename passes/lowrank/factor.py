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

Small matrices take LAPACK's exact SVD. Large ones (smaller side above
:data:`EXACT_MAX_SIDE`) never do: a full float64 SVD of a 25088×4096 weight
takes minutes and most of its vectors are thrown away. Instead, in float32:

- the *spectrum* (every squared singular value, for energy curves) comes
  from the eigenvalues of the Gram matrix of the smaller side, and
- the *factors* come from a randomized range finder with power iterations
  (Halko, Martinsson & Tropp 2011, alg. 4.4) at the rank asked plus
  :data:`OVERSAMPLE`, computed once and sliced for any smaller rank, so a
  search asking for many ranks pays one sketch. With the spectrum known it
  starts at one power iteration and adds more only while the factors lose
  over :data:`TOLERANCE` beyond the optimal truncation.

The energy rule first tries a small sketch: its singular values never exceed
the true ones, so a rank it finds keeps at least the asked energy; only when
it does not reach the energy is the spectrum computed. The total energy
``‖W‖²`` is summed exactly, so every energy share reported is exact for the
factors actually written. What the fast path adds over the optimal truncation
is :meth:`Factorization.added_error`: exact when the spectrum is known, else
a bound (the sketch's own residual).
"""

from __future__ import annotations

import numpy as np

__all__ = ["Factorization", "RIDGE", "EXACT_MAX_SIDE", "OVERSAMPLE", "POWER_ITERATIONS", "randomized_svd"]

#: Ridge added to C, relative to its mean diagonal.
RIDGE = 1e-2
#: Matrices whose smaller side is at most this get the exact (LAPACK, float64) SVD.
EXACT_MAX_SIDE = 128
#: Extra sketch columns beyond the rank asked (at least this, or a tenth of the rank).
OVERSAMPLE = 16
#: Power iterations of the range finder: each sharpens a flat spectrum's sketch.
POWER_ITERATIONS = 2
#: Most power iterations a sketch is sharpened to when its added error is over TOLERANCE.
MAX_POWER_ITERATIONS = 7
#: Rank of the first sketch the energy rule tries before computing the spectrum.
FIRST_SKETCH = 64
#: A sketch whose residual is at most this share of the energy is taken as the whole spectrum (the rest is zero).
LOW_RANK_RESIDUAL = 1e-6
#: Added error (share of the weight's energy) above which a sketch is redone with more power iterations.
TOLERANCE = 1e-3


def _orthonormal(y: np.ndarray) -> np.ndarray:
    """An orthonormal basis of the columns of tall ``y`` (m, l), in its dtype, by the l×l Gram's eigenvectors.

    Twice (the second pass restores orthonormality the first loses to
    rounding), and GEMM-bound: LAPACK's Householder QR of a tall float32
    matrix is an order of magnitude slower. Directions ``y`` barely holds
    (below 1e-6 of its largest, in the Gram's eigenvalues after the first
    pass) are dropped: a range finder only needs the dominant span.
    """
    for floor in (1e-12, 1e-6):
        if not y.shape[1]:  # a zero matrix: no range at all
            return y
        gram = (y.T @ y).astype(np.float64)
        lam, vec = np.linalg.eigh(gram)
        keep = lam > floor * max(float(lam[-1]), 1e-300)
        y = y @ (vec[:, keep] / np.sqrt(lam[keep])).astype(y.dtype)
    return y


def randomized_svd(matrix: np.ndarray, columns: int, power: int = POWER_ITERATIONS,
                   seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(U (K,l), s (l,), Vᵀ (l,N)) of ``matrix`` restricted to a random range of ``columns`` = l, in float32.

    U and V are orthonormal, and ``‖M - U·diag(s)·Vᵀ‖² = ‖M‖² - Σs²``
    exactly for any leading slice (the factors are a projection of M), so the
    energy a truncation keeps is read off ``s``. A matrix of rank below l
    gets zero singular values (and zero vectors) for the rest.
    """
    m = np.asarray(matrix, dtype=np.float32)
    k, n = m.shape
    columns = max(1, min(columns, k, n))
    rng = np.random.default_rng(seed)
    q = _orthonormal(m @ rng.standard_normal((n, columns), dtype=np.float32))
    for _ in range(power):  # re-orthonormalised each half step: float32 would lose the small directions otherwise
        q = _orthonormal(m @ _orthonormal(m.T @ q))
    b = (q.T @ m).astype(np.float64)  # (l', N): M's projection on the range found
    lam, ub = np.linalg.eigh(b @ b.T) if len(b) else (np.zeros(0), np.zeros((0, 0)))
    lam, ub = lam[::-1], ub[:, ::-1]
    live = lam > 1e-12 * max(float(lam[0]), 1e-300) if len(lam) else lam > 0
    s = np.sqrt(np.where(live, lam, 0.0))
    vt = np.where(live[:, None], ub.T @ b / np.where(live, s, 1.0)[:, None], 0.0)
    u = q @ ub.astype(np.float32)
    pad = columns - len(s)
    if pad > 0:
        s = np.concatenate([s, np.zeros(pad)])
        u = np.concatenate([u, np.zeros((k, pad), np.float32)], axis=1)
        vt = np.concatenate([vt, np.zeros((pad, n))], axis=0)
    return u, s, vt.astype(np.float32)


class Factorization:
    """SVD of one layer's weight (G, K, N), per group, in the metric its rank is chosen in; computed lazily.

    The matrix decomposed is ``M = [Lᵀ]·W·[D]``: ``chol`` is L (None when
    plain), ``mean`` the input mean when the bias absorbs it, ``out_scale``
    (G, N) the output weights D. Factors are cached up to the largest rank
    asked so far (:meth:`prepare`), the spectrum once computed.
    """

    def __init__(self, weight: np.ndarray, chol: np.ndarray | None = None, mean: np.ndarray | None = None,
                 out_scale: np.ndarray | None = None, *, fast: bool | None = None) -> None:
        self.weight, self.chol, self.mean, self.out_scale = weight, chol, mean, out_scale
        side = min(weight.shape[1], weight.shape[2])
        self.fast = side > EXACT_MAX_SIDE if fast is None else fast
        self._totals: np.ndarray | None = None
        self._spectrum: np.ndarray | None = None  # (G, R) squared singular values, descending
        self._u: np.ndarray | None = None  # (G, K, l)
        self._s: np.ndarray | None = None  # (G, l)
        self._vt: np.ndarray | None = None  # (G, l, N)
        self._energy_ranks: dict[float, int] = {}  # a rule asked twice (planning, then reporting) costs one sketch

    @classmethod
    def plain(cls, weight: np.ndarray, out_scale: np.ndarray | None = None, *, fast: bool | None = None) -> Factorization:
        return cls(weight, out_scale=out_scale, fast=fast)

    @classmethod
    def whitened(cls, weight: np.ndarray, second_moment: np.ndarray, mean: np.ndarray | None = None,
                 out_scale: np.ndarray | None = None, *, fast: bool | None = None) -> Factorization:
        """SVD of Lᵀ·W(·D) where L·Lᵀ is ``second_moment`` (G, K, K) plus the ridge."""
        k = weight.shape[1]
        scale = np.trace(second_moment, axis1=1, axis2=2) / k
        scale = np.where(scale > 0, scale, 1.0)  # a dead input: the ridge alone, i.e. the plain SVD
        c = second_moment + (RIDGE * scale)[:, None, None] * np.eye(k)
        return cls(weight, np.linalg.cholesky(c), mean, out_scale, fast=fast)

    # -- the matrix and its energy ---------------------------------------------------------------------------

    @property
    def rank_limit(self) -> int:
        return min(self.weight.shape[1], self.weight.shape[2])

    def _matrix(self, group: int) -> np.ndarray:
        """M for one group: float32 on the fast path (a view of W when plain), float64 on the exact one."""
        dtype = np.float32 if self.fast else np.float64
        m = self.weight[group]
        if self.chol is not None:
            m = self.chol[group].T.astype(dtype) @ m.astype(dtype)
        if self.out_scale is not None:
            m = m * self.out_scale[group][None, :].astype(dtype)
        return np.asarray(m, dtype=dtype)

    def totals(self) -> np.ndarray:
        """‖M_g‖² per group, summed exactly in float64."""
        if self._totals is None:
            self._totals = np.array([float(np.einsum("ij,ij->", m, m, dtype=np.float64))
                                     for m in map(self._matrix, range(self.weight.shape[0]))])
        return self._totals

    def spectrum(self) -> np.ndarray:
        """(G, R) squared singular values of M, descending (Gram eigenvalues on the fast path)."""
        if self._spectrum is None:
            if not self.fast:
                self.prepare(self.rank_limit)
            elif self._numerically_low_rank():
                assert self._s is not None
                squares = self._s**2
                self._spectrum = np.pad(squares, ((0, 0), (0, self.rank_limit - squares.shape[1])))
            else:
                rows = []
                for g in range(self.weight.shape[0]):
                    m = self._matrix(g)
                    gram = m.T @ m if m.shape[1] <= m.shape[0] else m @ m.T
                    rows.append(np.clip(np.linalg.eigvalsh(gram).astype(np.float64)[::-1], 0.0, None))
                self._spectrum = np.stack(rows)
        assert self._spectrum is not None
        return self._spectrum

    def _numerically_low_rank(self) -> bool:
        """True when a first sketch holds all of M's energy (to 1e-6): its singular values are then the spectrum."""
        if self.prepared_rank == 0:
            self.prepare(min(FIRST_SKETCH, self.rank_limit))
        assert self._s is not None
        total = float(self.totals().sum())
        return total <= 0 or 1.0 - float((self._s**2).sum()) / total <= LOW_RANK_RESIDUAL

    def tail(self) -> np.ndarray:
        """Relative energy lost at each rank 0..R (``tail[r]``: share of squared singular values beyond r)."""
        return self._tail_of(self.spectrum())

    def _tail_of(self, squares: np.ndarray) -> np.ndarray:
        energy = squares.sum(axis=0)  # a common rank across groups
        total = float(self.totals().sum())
        kept = np.concatenate([[0.0], np.cumsum(energy)])
        return np.clip(1.0 - kept / total, 0.0, 1.0) if total > 0 else np.zeros_like(kept)

    def rank_for_energy(self, energy: float, limit: int | None = None) -> int:
        """The smallest rank whose factors keep ``energy`` of the squared singular values (0 for a zero matrix).

        On the fast path a first sketch is tried: its singular values are lower
        bounds, so a rank it finds keeps at least ``energy``; otherwise the
        spectrum gives the optimal rank, and when that rank is within ``limit``
        (the largest rank of any use) its factors are computed and the rank
        raised, within their oversampled columns, until the factors themselves
        keep ``energy``.
        """
        if energy not in self._energy_ranks:
            self._energy_ranks[energy] = self._rank_for_energy(energy, limit)
        return self._energy_ranks[energy]

    def _rank_for_energy(self, energy: float, limit: int | None) -> int:
        target = 1.0 - energy + 1e-12
        if self.fast and self._spectrum is None:
            first = min(FIRST_SKETCH, self.rank_limit)
            self.prepare(first)
            assert self._s is not None
            hits = np.nonzero(self._tail_of(self._s**2) <= target)[0]
            if len(hits) and (hits[0] <= first or first == self.rank_limit):
                return int(hits[0])
        rank = int(np.argmax(self.tail() <= target))
        if not self.fast or rank == 0 or (limit is not None and rank > limit):
            return rank
        self.prepare(rank)
        assert self._s is not None
        hits = np.nonzero(self._tail_of(self._s**2)[rank:] <= target)[0]
        return rank + int(hits[0]) if len(hits) else rank

    # -- factors ----------------------------------------------------------------------------------------------

    @property
    def prepared_rank(self) -> int:
        """The largest rank whose factors are cached (0 when none)."""
        return 0 if self._s is None else int(self._s.shape[1])

    def prepare(self, rank: int) -> None:
        """Compute (once) the factors for every rank up to ``rank``; later calls at or below it are free."""
        rank = max(1, min(rank, self.rank_limit))
        if rank <= self.prepared_rank:
            return
        groups = range(self.weight.shape[0])
        if not self.fast:
            u, s, vt = np.linalg.svd(np.stack([self._matrix(g) for g in groups]), full_matrices=False)
            self._u, self._s, self._vt = u, s, vt
            self._spectrum = s**2
            return
        columns = min(self.rank_limit, rank + max(OVERSAMPLE, rank // 10))
        # With the spectrum known, the added error is exact: start with one power iteration and add more only
        # while the factors lose over TOLERANCE beyond the optimal truncation. Without it, take the default.
        power = 1 if self._spectrum is not None else POWER_ITERATIONS
        while True:
            parts = [randomized_svd(self._matrix(g), columns, power, seed=g) for g in groups]
            self._u = np.stack([p[0] for p in parts])
            self._s = np.stack([p[1] for p in parts])
            self._vt = np.stack([p[2] for p in parts])
            if self._spectrum is None or power >= MAX_POWER_ITERATIONS or self.added_error(rank)[0] <= TOLERANCE:
                return
            power = min(MAX_POWER_ITERATIONS, 2 * power + 1)  # a flat spectrum: sharpen the sketch

    def added_error(self, rank: int) -> tuple[float, bool]:
        """(energy share the factors at ``rank`` lose beyond the optimal truncation, exact?) — (0, True) when exact.

        Exact against the spectrum when it is known; otherwise a bound: the
        sketch's residual at its full width, which the optimal tail beyond
        ``rank`` can only exceed by less than what was added.
        """
        if not self.fast:
            return 0.0, True
        self.prepare(rank)
        assert self._s is not None
        total = float(self.totals().sum())
        if total <= 0:
            return 0.0, True
        kept = float((self._s[:, :rank] ** 2).sum())
        if self._spectrum is not None:
            best = float(self._spectrum[:, :rank].sum())
            return max(0.0, (best - kept) / total), True
        return max(0.0, 1.0 - float((self._s**2).sum()) / total), False

    def energy_kept(self, rank: int) -> float:
        """Share of ‖M‖² the factors at ``rank`` keep (exact for the factors written)."""
        self.prepare(rank)
        assert self._s is not None
        total = float(self.totals().sum())
        return float((self._s[:, :rank] ** 2).sum()) / total if total > 0 else 1.0

    def release(self, keep: int) -> None:
        """Drop cached factor columns beyond ``keep`` and store the rest in float32 (the factors' written type)."""
        if self._s is None:
            return
        if keep <= 0:
            self._u = self._s = self._vt = None
            return
        assert self._u is not None and self._vt is not None
        self._u = np.ascontiguousarray(self._u[:, :, :keep], dtype=np.float32)
        self._vt = np.ascontiguousarray(self._vt[:, :keep, :], dtype=np.float32)
        self._s = self._s[:, :keep]

    def factors(self, rank: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """(A (G,K,r), B (G,r,N), bias shift (G,N) or None) with A·B ≈ W; singular values split evenly."""
        self.prepare(rank)
        assert self._u is not None and self._s is not None and self._vt is not None
        root = np.sqrt(self._s[:, :rank])
        a = self._u[:, :, :rank] * root[:, None, :]
        b = root[:, :, None] * self._vt[:, :rank, :]
        if self.chol is not None:
            a = np.linalg.solve(self.chol.transpose(0, 2, 1), a)
        if self.out_scale is not None:
            b = b / self.out_scale[:, None, :]
        shift = None
        if self.mean is not None:
            shift = np.einsum("gk,gkn->gn", self.mean, self.weight - a @ b)
        return a, b, shift
