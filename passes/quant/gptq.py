"""GPTQ-style second-order rounding of int4 block-wise weights, from calibration activations (numpy).

Round-to-nearest rounds every weight on its own. GPTQ (Frantar et al.,
2022) quantizes the input rows of a [K, N] weight one at a time and
spreads each row's rounding error over the rows not yet quantized, weighted
by the inverse Hessian of the layer's squared output error, ``H = XᵀX``
(X: the layer's calibration inputs, [samples, K]). The output error
``||X W - X Ŵ||`` is what it lowers, not the weight error.

Implementation: the Cholesky factor of ``H⁻¹`` (with a small damping on
the diagonal), lazy batches of rows (updates within a batch, one matrix
product for the rest), and the block-wise scales (one per ``block_size``
rows and column, as :func:`~onnxopt_passes.quant.scheme.quantize_blockwise`
stores them) chosen from the already-updated weights at each block's first
row. Everything is vectorized over the N columns; the loop runs over K.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import onnx_ir as ir

from onnxopt.activations import iter_activations
from onnxopt.data import Dataset
from onnxopt.progress import Progress
from onnxopt.sessions import SessionFactory

__all__ = ["input_hessians", "gptq_blockwise", "output_error"]


def input_hessians(model: ir.Model, inputs: Mapping[str, int], dataset: Dataset, sessions: SessionFactory, *,
                   progress: Progress | None = None) -> dict[str, np.ndarray]:
    """``XᵀX`` (float64, [K, K]) of each named activation, its last axis K, accumulated one batch at a time."""
    hessians = {name: np.zeros((k, k), np.float64) for name, k in inputs.items()}
    for batch in iter_activations(model, list(inputs), dataset, sessions, progress=progress,
                                  description="quant: input Hessians for GPTQ"):
        for name, h in hessians.items():
            x = np.asarray(batch[name], np.float64).reshape(-1, h.shape[0])
            h += x.T @ x
    return hessians


def gptq_blockwise(weight: np.ndarray, hessian: np.ndarray, block_size: int, *, bits: int = 4, damp: float = 0.01,
                   batch: int = 128) -> tuple[np.ndarray, np.ndarray]:
    """int4 (as int8 values) weight [K, N] and scales [ceil(K / block_size), N], GPTQ-rounded under ``hessian``."""
    k, n = weight.shape
    qmax = 2 ** (bits - 1) - 1
    w = weight.astype(np.float64).T.copy()  # [N, K]: rows are output columns, GPTQ walks K
    h = hessian.astype(np.float64).copy()
    dead = np.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h[np.diag_indices(k)] += damp * float(np.mean(np.diag(h)))
    try:
        hinv = np.linalg.cholesky(np.linalg.inv(h)).T  # upper Cholesky factor of H^-1
    except np.linalg.LinAlgError:
        h[np.diag_indices(k)] += float(np.mean(np.diag(h)))
        hinv = np.linalg.cholesky(np.linalg.inv(h)).T
    blocks = -(-k // block_size)
    scales = np.ones((blocks, n), np.float64)
    q = np.zeros((n, k), np.int8)
    step = max(block_size, (batch // block_size) * block_size)  # batches hold whole blocks
    for i1 in range(0, k, step):
        i2 = min(i1 + step, k)
        w1 = w[:, i1:i2].copy()
        err1 = np.zeros_like(w1)
        h1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if col % block_size == 0:
                absmax = np.abs(w1[:, i:i + block_size]).max(axis=1)
                scales[col // block_size] = np.where(absmax > 0, absmax / qmax, 1.0)
            s = scales[col // block_size]
            qi = np.clip(np.rint(w1[:, i] / s), -qmax - 1, qmax)
            q[:, col] = qi
            e = (w1[:, i] - qi * s) / h1[i, i]
            w1[:, i:] -= np.outer(e, h1[i, i:])
            err1[:, i] = e
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    return q.T.copy(), scales.astype(np.float32)


def output_error(x: np.ndarray, weight: np.ndarray, approx: np.ndarray) -> float:
    """Relative output error ``||x W - x Ŵ|| / ||x W||``."""
    ref = x @ weight
    return float(np.linalg.norm(ref - x @ approx) / max(np.linalg.norm(ref), 1e-30))


