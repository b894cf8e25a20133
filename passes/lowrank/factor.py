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
takes minutes and most of its vectors are thrown away. Instead, in float32,
each matrix takes whichever of two methods a flop estimate says is cheaper:

- *Gram*: the eigenvectors of the Gram matrix of the smaller side (float32
  product, float64 ``eigh``) give the exact spectrum, and the factors are
  the projection of M on the leading ones (:func:`gram_svd`). Its cost is
  fixed: one product with M, an s×s eigensolver, one projection.
- *Sketch*: a randomized range finder with power iterations (Halko,
  Martinsson & Tropp 2011, alg. 4.4), grown block by block until it holds
  the energy asked (Yu, Gu & Li 2018, randQB_EI: the residual energy
  ``‖M‖² - ‖B‖²`` is exact at every step), so the rank is read off the
  sketch itself and no spectrum is computed (:func:`sketch_to_energy`). Its
  cost grows with the rank; when it would pass the Gram method's, the
  matrix switches to Gram.

A sketch's singular values never exceed the true ones (``B = QᵀM``), so a
rank read off it keeps at least the asked energy and is never below the
optimal one. Factors are computed once and sliced for any smaller rank, so a
search asking for many ranks pays one factorization. With the spectrum known
(Gram, or the eigenvalues computed for an energy curve) a sketch starts at
one power iteration and adds more only while the factors lose over
:data:`TOLERANCE` beyond the optimal truncation. The total energy ``‖W‖²``
is summed exactly, so every energy share reported is exact for the factors
actually written. What the fast path adds over the optimal truncation is
:meth:`Factorization.added_error`: exact when the spectrum is known, else a
bound (the sketch's residual at its full width).

LAPACK's eigensolvers slow down by an order of magnitude when OpenBLAS runs
more threads than there are idle cores (measured: ``eigvalsh`` of a 1536
Gram 0.22 s on one thread, 7.9 s on two threads of a 2-core machine under
load 3), so the pass runs its factorizations inside :func:`blas_threads`,
which caps OpenBLAS at the cores the load average leaves idle (at least one).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
from collections.abc import Iterator

import numpy as np

__all__ = ["Factorization", "RIDGE", "EXACT_MAX_SIDE", "OVERSAMPLE", "POWER_ITERATIONS", "randomized_svd",
           "gram_svd", "sketch_to_energy", "blas_threads"]

#: Ridge added to C, relative to its mean diagonal.
RIDGE = 1e-2
#: Matrices whose smaller side is at most this get the exact (LAPACK, float64) SVD.
EXACT_MAX_SIDE = 128
#: Extra sketch columns beyond the rank asked (at least this, or a tenth of the rank).
OVERSAMPLE = 16
#: Power iterations of the range finder at a rank asked without the spectrum known.
POWER_ITERATIONS = 2
#: Power iterations of each block of the energy sketch (its residual is exact, so a weaker sketch costs columns, not truth).
SKETCH_POWER = 1
#: Most power iterations a sketch is sharpened to when its added error is over TOLERANCE.
MAX_POWER_ITERATIONS = 7
#: Rank of the first sketch the spectrum tries (numerically low-rank weights are read off it whole).
FIRST_SKETCH = 64
#: A sketch whose residual is at most this share of the energy is taken as the whole spectrum (the rest is zero).
LOW_RANK_RESIDUAL = 1e-6
#: Added error (share of the weight's energy) above which a sketch is redone with more power iterations.
TOLERANCE = 1e-3
#: Cost of a dense symmetric eigensolver with vectors, in GEMM flops per s³ (measured: eigh of 1536² took as long
#: as 5.9 products of two 1536² matrices, single-threaded OpenBLAS).
EIGH_FLOPS = 12.0


# -- BLAS threads ------------------------------------------------------------------------------------------------


def _openblas() -> tuple[object, object] | None:
    """(get, set) of the OpenBLAS numpy was built with, found among the loaded libraries; None if absent."""
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if "openblas" in line.lower() and ".so" in line.split()[-1]}
    except OSError:
        return None
    for path in sorted(paths):
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for prefix, suffix in (("scipy_openblas", "64_"), ("scipy_openblas", ""), ("openblas", "64_"), ("openblas", "")):
            get = getattr(lib, f"{prefix}_get_num_threads{suffix}", None)
            put = getattr(lib, f"{prefix}_set_num_threads{suffix}", None)
            if get is not None and put is not None:
                return get, put
    return None


@contextlib.contextmanager
def blas_threads(threads: int | None = None) -> Iterator[int | None]:
    """Cap OpenBLAS's threads inside the block; yields the cap (None when OpenBLAS is not found).

    By default the cap is the cores the 1-minute load average leaves idle, at
    least one: on a shared machine more threads than idle cores make LAPACK's
    eigensolvers many times slower, while on an idle one every core is used.
    """
    found = _openblas()
    if found is None:
        yield None
        return
    get, put = found
    before = int(get())  # type: ignore[operator]
    if threads is None:
        cores = os.cpu_count() or 1
        idle = cores - int(round(os.getloadavg()[0])) if hasattr(os, "getloadavg") else cores
        threads = max(1, min(before, idle))
    put(int(threads))  # type: ignore[operator]
    try:
        yield threads
    finally:
        put(before)  # type: ignore[operator]


# -- the two methods -------------------------------------------------------------------------------------------


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


def _svd_of_projection(q: np.ndarray, b: np.ndarray, columns: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(U, s, Vᵀ) of ``q·b`` (q orthonormal (K,l), b (l,N)), padded with zeros to ``columns``."""
    k, n = q.shape[0], b.shape[1]
    b64 = b.astype(np.float64)
    lam, ub = np.linalg.eigh(b64 @ b64.T) if len(b) else (np.zeros(0), np.zeros((0, 0)))
    lam, ub = lam[::-1], ub[:, ::-1]
    live = lam > 1e-12 * max(float(lam[0]), 1e-300) if len(lam) else lam > 0
    s = np.sqrt(np.where(live, lam, 0.0))
    vt = np.where(live[:, None], ub.T @ b64 / np.where(live, s, 1.0)[:, None], 0.0)
    u = q @ ub.astype(np.float32)
    pad = columns - len(s)
    if pad > 0:
        s = np.concatenate([s, np.zeros(pad)])
        u = np.concatenate([u, np.zeros((k, pad), np.float32)], axis=1)
        vt = np.concatenate([vt, np.zeros((pad, n))], axis=0)
    return u, s, vt.astype(np.float32)


def sketch_flops(k: int, n: int, columns: int, power: int) -> float:
    """GEMM flops of a range finder of ``columns`` on a K×N matrix with ``power`` iterations."""
    return 2.0 * k * n * columns * (2 * power + 2) + 8.0 * (k + n) * columns**2 * (power + 1)


def gram_flops(k: int, n: int, rank: int) -> float:
    """GEMM-equivalent flops of :func:`gram_svd` at ``rank``: the Gram product, the eigensolver, the projection."""
    side = min(k, n)
    return 2.0 * k * n * side + EIGH_FLOPS * side**3 + 2.0 * k * n * rank


def gram_svd(matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(squared singular values descending, their right/left vectors of the smaller side) from the Gram matrix.

    The Gram product runs in float32 (GEMM), the eigensolver in float64
    (same cost single-threaded, and its vectors orthonormal to float64
    precision). The vectors are (s, s) columns of the smaller side: right
    singular vectors when K ≥ N, left ones otherwise.
    """
    m = np.asarray(matrix, dtype=np.float32)
    gram = m.T @ m if m.shape[1] <= m.shape[0] else m @ m.T
    lam, vec = np.linalg.eigh(gram.astype(np.float64))
    del gram
    return np.clip(lam[::-1], 0.0, None), vec[:, ::-1]


def project_on(matrix: np.ndarray, vectors: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(U, s, Vᵀ) of M projected on the leading ``rank`` Gram ``vectors`` of its smaller side, in float32.

    A projection, so ``‖M - U·diag(s)·Vᵀ‖² = ‖M‖² - Σs²`` exactly for the
    factors written, whatever rounding did to the vectors.
    """
    m = np.asarray(matrix, dtype=np.float32)
    basis = np.ascontiguousarray(vectors[:, :rank], dtype=np.float32)
    if m.shape[1] <= m.shape[0]:  # right vectors: M·V = U·S
        us = (m @ basis).astype(np.float64)
        s = np.sqrt(np.einsum("ij,ij->j", us, us))
        u = (us / np.where(s > 0, s, 1.0)).astype(np.float32)
        return u, s, np.ascontiguousarray(basis.T)
    sv = (basis.T @ m).astype(np.float64)  # left vectors: Uᵀ·M = S·Vᵀ
    s = np.sqrt(np.einsum("ij,ij->i", sv, sv))
    return basis, s, (sv / np.where(s > 0, s, 1.0)[:, None]).astype(np.float32)


def sketch_to_energy(matrix: np.ndarray, residual: float, *, max_columns: int, flop_budget: float = float("inf"),
                     power: int = SKETCH_POWER, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """(U, s, Vᵀ) of a sketch of M grown until ‖M‖² - Σs² ≤ ``residual``, or None if that needs more.

    Blocks of columns are added (randQB_EI: each block is orthogonalised
    against the ones before, with ``power`` iterations); the residual is
    exact after each block. None when ``max_columns`` or ``flop_budget`` would
    be passed first: the caller then takes the Gram method.
    """
    m = np.asarray(matrix, dtype=np.float32)
    k, n = m.shape
    side = min(k, n)
    left = float(np.einsum("ij,ij->", m, m, dtype=np.float64))
    rng = np.random.default_rng(seed)
    q = np.zeros((k, 0), np.float32)
    b = np.zeros((0, n), np.float32)
    first = min(side, max(32, side // 16))
    spent, block = 0.0, min(side, max(32, side // 16))
    while left > residual:
        width = q.shape[1]
        block = min(side - width, block)
        if block <= 0 or width + block > max_columns:
            return None
        spent += sketch_flops(k, n, block, power) + 4.0 * (k + n) * width * block * (power + 1)
        if spent > flop_budget:
            return None
        omega = rng.standard_normal((n, block), dtype=np.float32)
        qi = _orthonormal(m @ omega - q @ (b @ omega))  # the residual M - Q·B applied, never formed
        for _ in range(power):
            z = _orthonormal(m.T @ qi - b.T @ (q.T @ qi))
            qi = _orthonormal(m @ z - q @ (b @ z))
        for _ in range(2):  # what rounding left of q's span, out (twice: float32)
            qi = qi - q @ (q.T @ qi)
        qi = _orthonormal(qi)
        if not qi.shape[1]:  # M has no range left outside q: the residual is rounding
            break
        bi = qi.T @ m
        q = np.concatenate([q, qi], axis=1)
        b = np.concatenate([b, bi], axis=0)
        took = float(np.einsum("ij,ij->", bi, bi, dtype=np.float64))
        left -= took
        # next block: what is left to take at this block's energy per column (an underestimate, as a spectrum
        # decays) with a fifth more, between the first block's width and doubling the sketch
        per_column = took / qi.shape[1]
        want = (left - residual) / per_column * 1.2 if per_column > 0 else float("inf")
        block = int(min(max(want, 32), max(32, q.shape[1]), side))
    return _svd_of_projection(q, b, q.shape[1])


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
    return _svd_of_projection(q, q.T @ m, columns)  # M's projection on the range found


class Factorization:
    """SVD of one layer's weight (G, K, N), per group, in the metric its rank is chosen in; computed lazily.

    The matrix decomposed is ``M = [Lᵀ]·W·[D]``: ``chol`` is L (None when
    plain), ``mean`` the input mean when the bias absorbs it, ``out_scale``
    (G, N) the output weights D. Factors are cached up to the largest rank
    asked so far (:meth:`prepare`), the spectrum once computed.
    """

    def __init__(self, weight: np.ndarray, chol: np.ndarray | None = None, mean: np.ndarray | None = None,
                 out_scale: np.ndarray | None = None, *, fast: bool | None = None, sketch: bool | None = None) -> None:
        self.weight, self.chol, self.mean, self.out_scale = weight, chol, mean, out_scale
        side = min(weight.shape[1], weight.shape[2])
        self.fast = side > EXACT_MAX_SIDE if fast is None else fast
        #: on the fast path: True always sketches, False always takes the Gram method, None picks by flops
        self.sketch = sketch
        self._totals: np.ndarray | None = None
        self._spectrum: np.ndarray | None = None  # (G, R) squared singular values, descending
        self._vectors: list[np.ndarray] | None = None  # Gram eigenvectors per group (s, s), until released
        self._u: np.ndarray | None = None  # (G, K, l)
        self._s: np.ndarray | None = None  # (G, l)
        self._vt: np.ndarray | None = None  # (G, l, N)
        self._by = "exact" if not self.fast else "randomized"  # how the cached factors were computed
        self._scaled = False  # U·√s and √s·Vᵀ cached instead of U and Vᵀ (after release)
        self._energy_ranks: dict[float, int] = {}  # a rule asked twice (planning, then reporting) costs one sketch

    @property
    def method(self) -> str:
        """How the factors were computed: exact (LAPACK SVD), gram (eigenvectors of the Gram matrix) or randomized."""
        return self._by

    @classmethod
    def plain(cls, weight: np.ndarray, out_scale: np.ndarray | None = None, *, fast: bool | None = None,
              sketch: bool | None = None) -> Factorization:
        return cls(weight, out_scale=out_scale, fast=fast, sketch=sketch)

    @classmethod
    def whitened(cls, weight: np.ndarray, second_moment: np.ndarray, mean: np.ndarray | None = None,
                 out_scale: np.ndarray | None = None, *, fast: bool | None = None,
                 sketch: bool | None = None) -> Factorization:
        """SVD of Lᵀ·W(·D) where L·Lᵀ is ``second_moment`` (G, K, K) plus the ridge."""
        k = weight.shape[1]
        scale = np.trace(second_moment, axis1=1, axis2=2) / k
        scale = np.where(scale > 0, scale, 1.0)  # a dead input: the ridge alone, i.e. the plain SVD
        c = second_moment + (RIDGE * scale)[:, None, None] * np.eye(k)
        return cls(weight, np.linalg.cholesky(c), mean, out_scale, fast=fast, sketch=sketch)

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
            if self._spectrum is None:  # (the first sketch may have taken the Gram method, which knows it)
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
            if self._energy_sketch(target, limit):
                assert self._s is not None
                hits = np.nonzero(self._tail_of(self._s**2) <= target)[0]
                if len(hits):
                    return int(hits[0])
            elif self.sketch is not True:
                self._gram()  # the sketch gave up: the Gram method gives the spectrum, and the factors by projection
        rank = int(np.argmax(self.tail() <= target))
        if not self.fast or rank == 0 or (limit is not None and rank > limit):
            return rank
        self.prepare(rank)
        assert self._s is not None
        hits = np.nonzero(self._tail_of(self._s**2)[rank:] <= target)[0]
        return rank + int(hits[0]) if len(hits) else rank

    def _energy_sketch(self, target: float, limit: int | None) -> bool:
        """Sketch every group until it holds all but ``target`` of its energy; False (nothing cached) if Gram is cheaper.

        Each group's residual within its share of the target puts the summed
        residual within the target, so the common rank is within the widest
        sketch. Gives up (for :meth:`_gram`) when the sketch would cost more
        than the Gram method or grow past ``limit`` (the largest rank of any
        use) plus oversampling.
        """
        if self.sketch is False:
            return False
        _, k, n = self.weight.shape
        cap = self.rank_limit if limit is None else min(self.rank_limit, limit + max(OVERSAMPLE, limit // 10))
        budget = float("inf") if self.sketch else gram_flops(k, n, min(cap, self.rank_limit))
        parts = []
        for g, total in enumerate(self.totals()):
            part = sketch_to_energy(self._matrix(g), target * total, max_columns=cap, flop_budget=budget, seed=g)
            if part is None:
                return False
            parts.append(part)
        self._store(parts, "randomized")
        return True

    def _store(self, parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]], by: str) -> None:
        """Cache per-group (U, s, Vᵀ), zero-padded to the widest."""
        width = max(1, max(p[1].shape[0] for p in parts))
        k, n = self.weight.shape[1], self.weight.shape[2]
        self._u = np.stack([np.pad(u, ((0, 0), (0, width - u.shape[1]))) for u, _, _ in parts]).astype(np.float32)
        self._s = np.stack([np.pad(sv, (0, width - sv.shape[0])) for _, sv, _ in parts])
        self._vt = np.stack([np.pad(vt, ((0, width - vt.shape[0]), (0, 0))) for _, _, vt in parts]).astype(np.float32)
        assert self._u.shape[1] == k and self._vt.shape[2] == n
        self._by, self._scaled = by, False

    def _gram(self) -> None:
        """The exact spectrum and the Gram eigenvectors of every group (kept until :meth:`release`)."""
        if self._vectors is not None:
            return
        found = [gram_svd(self._matrix(g)) for g in range(self.weight.shape[0])]
        self._spectrum = np.stack([lam for lam, _ in found])
        self._vectors = [vec for _, vec in found]

    def _use_sketch(self, rank: int, power: int) -> bool:
        """True when a range finder at ``rank`` costs fewer flops than the Gram method (or is forced)."""
        if self.sketch is not None:
            return self.sketch
        _, k, n = self.weight.shape
        return sketch_flops(k, n, self._columns(rank), power) < gram_flops(k, n, rank)

    def _columns(self, rank: int) -> int:
        return min(self.rank_limit, rank + max(OVERSAMPLE, rank // 10))

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
            self._scaled = False
            return
        # With the spectrum known, the added error is exact: start with one power iteration and add more only
        # while the factors lose over TOLERANCE beyond the optimal truncation. Without it, take the default.
        power = 1 if self._spectrum is not None else POWER_ITERATIONS
        if self._vectors is None and not self._use_sketch(rank, power):
            self._gram()
        if self._vectors is not None:  # a projection on the Gram vectors: exact, one product per rank asked
            self._store([project_on(self._matrix(g), self._vectors[g], rank) for g in groups], "gram")
            return
        columns = self._columns(rank)
        while True:
            self._store([randomized_svd(self._matrix(g), columns, power, seed=g) for g in groups], "randomized")
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
        self._vectors = None
        if self._s is None:
            return
        if keep <= 0:
            self._u = self._s = self._vt = None
            self._scaled = False
            return
        assert self._u is not None and self._vt is not None
        self._u = np.ascontiguousarray(self._u[:, :, :keep], dtype=np.float32)
        self._vt = np.ascontiguousarray(self._vt[:, :keep, :], dtype=np.float32)
        self._s = self._s[:, :keep]
        if not self._scaled:  # stored as the factors are written, so factors() hands out views, not copies
            root = np.sqrt(self._s).astype(np.float32)
            self._u *= root[:, None, :]
            self._vt *= root[:, :, None]
            self._scaled = True

    def factors(self, rank: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """(A (G,K,r), B (G,r,N), bias shift (G,N) or None) with A·B ≈ W; singular values split evenly."""
        self.prepare(rank)
        assert self._u is not None and self._s is not None and self._vt is not None
        if self._scaled:
            a, b = self._u[:, :, :rank], self._vt[:, :rank, :]
        else:
            root = np.sqrt(self._s[:, :rank]).astype(np.float32)
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
