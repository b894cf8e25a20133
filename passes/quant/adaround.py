"""AdaRound-style rounding of int8 Conv/MatMul/Gemm weights, learned from calibration activations (numpy).

Nearest rounding rounds each weight on its own. AdaRound (Nagel et al.,
2020) learns, per weight, whether to round down or up so that the layer's
*output* on calibration data changes least. Each weight gets a soft
variable ``h(V) = clip(sigmoid(V)·(ζ-γ) + γ, 0, 1)`` (the rectified sigmoid,
ζ = 1.1, γ = -0.1). Adam minimizes the output reconstruction error plus
``λ·Σ(1 - |2h - 1|^β)``, with β annealed from 20 to 2 after a warm-up,
which drives every h to 0 or 1.

The output error of one layer is a quadratic form of the weight error
``D = Ŵ - W`` under the input's second moment ``H = XᵀX / n`` (X: the
layer's inputs as [samples, K] rows; a Conv's im2col patches):
``tr(D H Dᵀ)``. So the calibration data is read once, into H, and every
iteration is one [N, K] × [K, K] product: no per-sample work and no Python
loop over weights. A grouped Conv has one H per group.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from onnxopt.activations import iter_activations
from onnxopt.data import Dataset
from onnxopt.graph import attribute
from onnxopt.progress import Progress
from onnxopt.sessions import SessionFactory

__all__ = ["AdaRounder", "LayerInput", "layer_inputs", "conv_patches", "adaround_rows", "weight_rows", "from_rows", "MAX_K"]

ZETA, GAMMA = 1.1, -0.1
#: Layers whose reduction (Cin/groups · kh · kw, or K) is over this are rounded to nearest: H is K × K float64.
MAX_K = 4096


@dataclass(frozen=True)
class LayerInput:
    """A layer's input second moment: ``[groups, K, K]`` (one per Conv group; 1 for MatMul/Gemm)."""

    moment: np.ndarray
    samples: int


def conv_patches(x: np.ndarray, node: ir.Node, kernel: tuple[int, ...], groups: int) -> np.ndarray:
    """im2col of a 2-D Conv input [B, C, H, W]: ``[groups, B·H'·W', C/groups·kh·kw]``, K in (c, kh, kw) order."""
    kh, kw = kernel
    strides = attribute(node, "strides", [1, 1])
    dil = attribute(node, "dilations", [1, 1])
    pads = attribute(node, "pads", [0, 0, 0, 0])
    if attribute(node, "auto_pad", "NOTSET") not in ("NOTSET", b"NOTSET"):
        raise ValueError("auto_pad")
    x = np.pad(x, ((0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])))
    span = ((kh - 1) * dil[0] + 1, (kw - 1) * dil[1] + 1)
    win = np.lib.stride_tricks.sliding_window_view(x, span, axis=(2, 3))[:, :, ::strides[0], ::strides[1], ::dil[0], ::dil[1]]
    b, c, oh, ow = win.shape[:4]
    cols = win.reshape(b, groups, c // groups, oh, ow, kh * kw).transpose(1, 0, 3, 4, 2, 5)
    return cols.reshape(groups, b * oh * ow, (c // groups) * kh * kw)


def _accepts(node: ir.Node, weight: np.ndarray) -> bool:
    if node.op_type == "Conv":
        return (weight.ndim == 4 and weight.shape[1] * weight.shape[2] * weight.shape[3] <= MAX_K
                and attribute(node, "auto_pad", "NOTSET") in ("NOTSET", b"NOTSET"))
    return weight.ndim == 2 and (weight.shape[1] if node.op_type == "Gemm" and attribute(node, "transB", 0)
                                 else weight.shape[0]) <= MAX_K


def layer_inputs(model: ir.Model, layers: Iterable[tuple[ir.Node, np.ndarray]], dataset: Dataset,
                 sessions: SessionFactory, *, progress: Progress | None = None) -> dict[str, LayerInput]:
    """The input second moment of each layer (by node name), from one pass of ``dataset`` through the float model."""
    chosen = [(n, w) for n, w in layers if n.name and n.inputs[0] is not None and n.inputs[0].name and _accepts(n, w)]
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}
    names = sorted({str(n.inputs[0].name) for n, _ in chosen})
    for batch in iter_activations(model, names, dataset, sessions, progress=progress,
                                  description="quant: layer inputs for AdaRound"):
        for node, weight in chosen:
            x = np.asarray(batch[str(node.inputs[0].name)], np.float32)
            name = str(node.name)
            # one sample at a time for a Conv: its patches are K times the input, bounded memory whatever the batch
            parts = ([x[i:i + 1] for i in range(x.shape[0])] if node.op_type == "Conv"
                     else [x.reshape(-1, x.shape[-1])])
            for part in parts:
                if node.op_type == "Conv":
                    cols = conv_patches(part, node, tuple(weight.shape[2:]), int(attribute(node, "group", 1)))
                else:
                    cols = part[None]
                cols = cols.astype(np.float64)
                sums[name] = sums.get(name, 0) + np.einsum("gsk,gsl->gkl", cols, cols)
                counts[name] = counts.get(name, 0) + cols.shape[1]
    return {n: LayerInput(sums[n] / max(counts[n], 1), counts[n]) for n in sums}


def weight_rows(node: ir.Node, weight: np.ndarray) -> np.ndarray:
    """The weight as [N outputs, K] rows (a Conv's K in (c, kh, kw) order), the layout :func:`adaround_rows` takes."""
    if node.op_type == "Conv":
        return weight.reshape(weight.shape[0], -1)
    if node.op_type == "Gemm" and attribute(node, "transB", 0):
        return weight
    return weight.T


def from_rows(node: ir.Node, rows: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Inverse of :func:`weight_rows`."""
    if node.op_type == "Conv":
        return rows.reshape(shape)
    if node.op_type == "Gemm" and attribute(node, "transB", 0):
        return rows
    return rows.T


def adaround_rows(w: np.ndarray, scale: np.ndarray, moment: np.ndarray, *, iterations: int = 400, lam: float = 0.01,
                  lr: float = 0.01, warmup: float = 0.2, qmin: int = -128, qmax: int = 127) -> np.ndarray:
    """Integer levels [N, K] of ``w`` [N, K] with per-row ``scale`` [N] that minimize ``tr(D H Dᵀ)`` (D the weight
    error; ``moment`` [groups, K, K], rows split evenly over the groups) with each weight rounded down or up."""
    n, k = w.shape
    groups = moment.shape[0]
    s = scale.astype(np.float64).reshape(n, 1)
    x = w.astype(np.float64) / s
    base = np.floor(x)
    frac = np.clip(x - base, 1e-4, 1 - 1e-4)
    v = -np.log((ZETA - GAMMA) / (frac - GAMMA) - 1)  # h(v) = frac: start from the float weight
    # normalize the loss so one learning rate and one λ fit every layer: the error relative to nearest rounding's
    nearest = np.clip(np.rint(x), qmin, qmax)
    per_group = n // groups

    def grad_error(levels: np.ndarray) -> tuple[np.ndarray, float]:
        d = ((levels - x) * s).reshape(groups, per_group, k)
        dh = np.einsum("gnk,gkl->gnl", d, moment)
        return dh.reshape(n, k), float(np.einsum("gnk,gnk->", d, dh))

    _, norm = grad_error(nearest)
    norm = max(norm, 1e-30)
    m1 = np.zeros_like(v)
    m2 = np.zeros_like(v)
    start = int(warmup * iterations)
    for it in range(iterations):
        sig = 1 / (1 + np.exp(-v))
        h_raw = sig * (ZETA - GAMMA) + GAMMA
        h = np.clip(h_raw, 0, 1)
        levels = base + h
        inside = (levels >= qmin) & (levels <= qmax)
        g_levels, _ = grad_error(np.clip(levels, qmin, qmax))
        grad_h = 2 * g_levels * s / norm * inside
        if it >= start:
            beta = 20 + (2 - 20) * (it - start) / max(iterations - start - 1, 1)
            t = 2 * h - 1
            grad_h += lam * (-beta * np.abs(t) ** (beta - 1) * np.sign(t) * 2)
        grad_v = grad_h * ((h_raw > 0) & (h_raw < 1)) * sig * (1 - sig) * (ZETA - GAMMA)
        m1 = 0.9 * m1 + 0.1 * grad_v
        m2 = 0.999 * m2 + 0.001 * grad_v * grad_v
        v -= lr * (m1 / (1 - 0.9 ** (it + 1))) / (np.sqrt(m2 / (1 - 0.999 ** (it + 1))) + 1e-8)
    h_raw = 1 / (1 + np.exp(-v)) * (ZETA - GAMMA) + GAMMA
    rounded = np.clip(base + (h_raw >= 0.5), qmin, qmax)
    # never worse than nearest on the calibration moment (a run that did not converge falls back)
    if grad_error(rounded)[1] > norm:
        return nearest
    return rounded


class AdaRounder:
    """Rounds the weights :func:`insert_qdq` writes, layer by layer, as learned; each layer once (the fallback and
    the speed guard rebuild the model several times with the same scales)."""

    def __init__(self, inputs: Mapping[str, LayerInput], iterations: int, progress: Progress | None, total: int) -> None:
        self.inputs = inputs
        self.iterations = iterations
        self._cache: dict[tuple[str, bytes], np.ndarray] = {}
        self._task = progress.task("quant: AdaRound", total=total) if progress is not None else None
        self._total = total
        self.changed = 0  # weights rounded the other way than nearest
        self.layers = 0

    def __call__(self, node: ir.Node, weight: np.ndarray, scale: np.ndarray, axis: int | None) -> np.ndarray | None:
        """int8 levels of ``weight`` (its own shape) under ``scale`` (per channel along ``axis``, or one), or None
        when this layer's inputs were not collected."""
        found = self.inputs.get(node.name or "")
        if found is None:
            return None
        key = (str(node.name), np.asarray(scale, np.float32).tobytes())
        if key not in self._cache:
            rows = weight_rows(node, weight)
            per_row = np.broadcast_to(np.asarray(scale, np.float64).reshape(-1), (rows.shape[0],))
            levels = adaround_rows(rows, per_row, found.moment, iterations=self.iterations)
            self.changed += int(np.count_nonzero(levels != np.clip(np.rint(rows / per_row[:, None]), -128, 127)))
            self.layers += 1
            self._cache[key] = from_rows(node, levels, weight.shape).astype(np.int8)
            if self._task is not None:
                self._task.advance()
                if self.layers >= self._total:
                    self.close()
        return self._cache[key]

    def close(self) -> None:
        """Remove the progress bar (all layers done, or the pass is)."""
        if self._task is not None:
            self._task.close()
            self._task = None
