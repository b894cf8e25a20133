"""lowrank's randomized SVD: within its reported error of the exact SVD, and the pass on it against ORT."""

from __future__ import annotations

import numpy as np
import pytest

from onnxopt import PassContext
from onnxopt_passes.lowrank import LowrankConfig, LowrankPass
from onnxopt_passes.lowrank import factor as factor_module
from onnxopt_passes.lowrank.factor import Factorization

from tests.helpers import run_model, to_ir
from tests.test_lowrank import _gemm

RNG = np.random.default_rng(7)


def _decaying(k: int, n: int, decay: float) -> np.ndarray:
    """A k×n float32 matrix with singular values decay**i (random singular vectors)."""
    u, _ = np.linalg.qr(RNG.standard_normal((k, min(k, n))))
    v, _ = np.linalg.qr(RNG.standard_normal((n, min(k, n))))
    s = decay ** np.arange(min(k, n))
    return ((u * s) @ v.T).astype(np.float32)


def _residual(w: np.ndarray, f: Factorization, rank: int) -> float:
    a, b, _ = f.factors(rank)
    return float(((w.astype(np.float64) - a[0] @ b[0]) ** 2).sum() / (w.astype(np.float64) ** 2).sum())


@pytest.mark.parametrize("sketch", [True, False, None], ids=["sketch", "gram", "by-flops"])
@pytest.mark.parametrize("shape,decay", [((300, 200), 0.97), ((150, 260), 0.99), ((200, 200), 0.9)])
@pytest.mark.parametrize("energy", [0.5, 0.9, 0.99])
def test_fast_svd_within_its_reported_error(shape, decay: float, energy: float, sketch: bool | None) -> None:
    w = _decaying(*shape, decay) + 1e-3 * RNG.standard_normal(shape).astype(np.float32)
    exact = np.linalg.svd(w.astype(np.float64), compute_uv=False) ** 2
    exact_tail = 1.0 - np.concatenate([[0.0], np.cumsum(exact)]) / exact.sum()
    exact_rank = int(np.argmax(exact_tail <= 1.0 - energy + 1e-12))

    fast = Factorization.plain(w[None], fast=True, sketch=sketch)
    rank = fast.rank_for_energy(energy)
    if sketch is not None:
        assert fast.method == ("randomized" if sketch else "gram")
    if fast.method == "gram":  # the exact spectrum: the optimal rank, nothing added beyond rounding
        assert rank == exact_rank and fast.added_error(rank)[0] < 1e-6
    # the sketch's singular values are lower bounds: a rank it picks is never below the exact one, and keeps the energy
    assert rank >= exact_rank
    assert fast.energy_kept(rank) >= energy - 1e-6
    residual = _residual(w, fast, rank)
    np.testing.assert_allclose(residual, 1.0 - fast.energy_kept(rank), atol=1e-5)  # energy read off s is the truth
    added, is_exact = fast.added_error(rank)
    assert residual <= exact_tail[rank] + added + 1e-5  # within the reported error of the optimal truncation
    # and with the spectrum known the added error is exact, the spectrum matches the exact SVD's
    np.testing.assert_allclose(fast.spectrum()[0], exact, atol=1e-5 * exact.sum())
    added, is_exact = fast.added_error(rank)
    # one power iteration per block: a sketch's rank keeps the energy asked and loses under 1% more than optimal,
    # under 3% on the flattest spectrum (0.99 decay: its leading 150 values within a factor 4.5)
    assert is_exact and added < (3e-2 if decay >= 0.99 else 1e-2)
    np.testing.assert_allclose(residual - exact_tail[rank], added, atol=2e-5)
    np.testing.assert_allclose(fast.tail(), exact_tail, atol=2e-5)


def test_fast_whitened_matches_exact_whitened() -> None:
    k, n = 120, 90
    w = _decaying(k, n, 0.95)
    x = RNG.standard_normal((500, k)) * np.linspace(0.1, 3.0, k)
    second = (x.T @ x / len(x))[None]
    exact = Factorization.whitened(w[None], second, fast=False)
    fast = Factorization.whitened(w[None], second, fast=True)
    rank = exact.rank_for_energy(0.95)
    np.testing.assert_allclose(fast.tail(), exact.tail(), atol=1e-4)
    a, b, _ = exact.factors(rank)
    fa, fb, _ = fast.factors(rank)
    added, _ = fast.added_error(rank)
    # output error on the calibration inputs: the fast one within its added share of the output energy
    out = x @ w.astype(np.float64)
    err_exact = ((x @ (a[0] @ b[0]) - out) ** 2).sum()
    err_fast = ((x @ (fa[0] @ fb[0]) - out) ** 2).sum()
    assert err_fast <= err_exact + (added + 1e-4) * (out**2).sum() * 1.05


def test_factors_are_cached_across_ranks() -> None:
    w = _decaying(260, 240, 0.95)
    fast = Factorization.plain(w[None], fast=True)
    fast.prepare(60)
    first = fast._u
    for rank in (60, 40, 10, 1):
        fast.factors(rank)
    assert fast._u is first  # no recomputation for smaller ranks
    fast.factors(120)
    assert fast.prepared_rank >= 120


def test_zero_matrix_keeps_rank_one_and_no_energy() -> None:
    f = Factorization.plain(np.zeros((1, 300, 200), np.float32), fast=True)
    assert f.rank_for_energy(0.9) == 0
    a, b, _ = f.factors(1)
    assert not np.any(a @ b)


def test_pass_on_the_fast_path_matches_ort(monkeypatch) -> None:
    monkeypatch.setattr(factor_module, "EXACT_MAX_SIDE", 16)  # force the randomized path on a test-size layer
    w = _decaying(96, 80, 0.9)
    proto, _, _ = _gemm(96, 80, weight=w)
    model = to_ir(proto)
    result = LowrankPass().apply(model, LowrankConfig(energy=0.99), PassContext())
    (row,) = result.report.items
    assert row["svd"] == "randomized" and "svd_added_error" in row
    rank = row["rank"]
    x = RNG.standard_normal((4096, 96)).astype(np.float32)
    got, ref = run_model(result.model, {"x": x})[0], run_model(proto, {"x": x})[0]
    # unit Gaussian inputs: the mean squared output error per row is ‖W - W'‖², which is the optimal truncation's
    # tail plus at most the reported added error (a bound, or exact), up to the sampling of 4096 rows
    s2 = np.linalg.svd(w.astype(np.float64), compute_uv=False) ** 2
    added = float(str(row["svd_added_error"]).removeprefix("<= "))
    allowed = (s2[rank:].sum() + added * s2.sum()) * 1.15
    error = float(((got.astype(np.float64) - ref) ** 2).sum(axis=1).mean())
    assert error <= allowed
    assert error >= s2[rank:].sum() * 0.85  # and no better than optimal: the figures are the model's own
    assert row["energy_kept"] >= 0.99 - 1e-6


def test_low_rank_matrix_spectrum_from_the_sketch_matches_exact() -> None:
    w = (RNG.standard_normal((400, 5)) @ RNG.standard_normal((5, 300))).astype(np.float32)
    fast = Factorization.plain(w[None], fast=True)
    exact = np.linalg.svd(w.astype(np.float64), compute_uv=False) ** 2
    np.testing.assert_allclose(fast.spectrum()[0], exact, atol=1e-5 * exact.sum())
    assert not fast.spectrum()[0, fast.prepared_rank:].any()  # taken from the sketch (Gram eigenvalues carry rounding noise)
    assert fast.rank_for_energy(0.999999) == 5


def test_released_factors_are_handed_out_without_copies() -> None:
    w = _decaying(300, 200, 0.9)
    f = Factorization.plain(w[None], fast=True, sketch=True)
    rank = f.rank_for_energy(0.99)
    before = f.factors(rank)
    f.release(rank)
    a, b, _ = f.factors(rank)
    assert np.shares_memory(a, f._u) and np.shares_memory(b, f._vt)  # the model's initializers are the cache
    np.testing.assert_allclose(a @ b, before[0] @ before[1], atol=1e-5)  # the same product, √s folded in
    assert f.energy_kept(rank) >= 0.99 - 1e-6


def test_gram_method_factors_match_exact_svd() -> None:
    for shape in ((260, 180), (180, 260)):  # right vectors (tall) and left vectors (wide)
        w = _decaying(*shape, 0.95)
        gram = Factorization.plain(w[None], fast=True, sketch=False)
        exact = Factorization.plain(w[None], fast=False)
        rank = gram.rank_for_energy(0.95)
        assert gram.method == "gram" and rank == exact.rank_for_energy(0.95)
        a, b, _ = gram.factors(rank)
        ea, eb, _ = exact.factors(rank)
        np.testing.assert_allclose(a[0] @ b[0], ea[0] @ eb[0], atol=1e-4)
        np.testing.assert_allclose(gram.tail(), exact.tail(), atol=1e-6)


def test_blas_threads_caps_and_restores() -> None:
    found = factor_module._openblas()
    if found is None:
        pytest.skip("numpy is not linked against OpenBLAS here")
    get, _ = found
    before = get()
    with factor_module.blas_threads(1) as threads:
        assert threads == 1 and get() == 1
    assert get() == before


def test_sketch_past_the_largest_useful_rank_hands_over_to_gram() -> None:
    w = _decaying(200, 160, 0.995)  # flat: 0.99 of the energy needs most of the rank
    exact = np.linalg.svd(w.astype(np.float64), compute_uv=False) ** 2
    exact_rank = int(np.argmax(1.0 - np.cumsum(exact) / exact.sum() <= 0.01 + 1e-12)) + 1
    f = Factorization.plain(w[None], fast=True)
    rank = f.rank_for_energy(0.99, limit=20)  # no rank above 20 would be used
    assert rank == exact_rank > 20  # the optimal rank, from the exact spectrum, reported as not paying
    assert f.prepared_rank == 0  # and no factors computed for it
