"""A layer's input as a design matrix: im2col rows of a Conv, rows of a Gemm/MatMul, and its weight as a matrix.

Selection (:mod:`.selection`) and the refit (:mod:`.reconstruct`) both see a
consumer layer as ``Y = X @ W.T + b``; this module builds ``X`` from an
activation batch (sampling at most ``limit`` rows, see :func:`rows_per_batch`) and ``W``.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from numpy.lib.stride_tricks import sliding_window_view

from onnxopt.graph import attribute, constant_array

from .groups import Consumer

__all__ = ["MAX_ROWS", "ROWS_PER_INPUT", "rows_per_batch", "design_rows", "linear_map", "handles", "width", "taps", "output_rows"]

#: Most rows (output positions x samples) drawn per batch and layer for Gram matrices.
MAX_ROWS = 4096
#: Rows wanted in total per design-matrix column: a Gram matrix of d columns is estimated from ~16 d rows.
ROWS_PER_INPUT = 16


def taps(consumer: Consumer) -> int:
    """Kernel taps of a Conv (design columns per input channel) or a ConvTranspose (outputs per output channel)."""
    if consumer.kind not in ("conv", "conv_transpose"):
        return 1
    w = constant_array(consumer.node.inputs[consumer.weight_index])
    assert w is not None
    return int(np.prod(w.shape[2:]))


def width(consumer: Consumer) -> int:
    """Columns of the consumer's design matrix (inputs, times kernel taps for a Conv)."""
    w = constant_array(consumer.node.inputs[consumer.weight_index])
    assert w is not None
    return int(w.shape[consumer.weight_axis]) * (taps(consumer) if consumer.kind == "conv" else 1)


def rows_per_batch(consumer: Consumer, batches: int) -> int:
    """Rows to draw per batch so the whole calibration set gives enough, and no more, for this layer."""
    return int(min(MAX_ROWS, max(256, -(-ROWS_PER_INPUT * (width(consumer) + 1) // max(batches, 1)))))


def _tiling(node: ir.Node, w: np.ndarray) -> bool:
    """A ConvTranspose whose kernel equals its stride (no overlap, no padding): a MatMul per input position."""
    kernel = list(w.shape[2:])
    return (list(attribute(node, "strides", [1] * len(kernel))) == kernel
            and not any(attribute(node, "pads", [0] * 2 * len(kernel)))
            and all(d == 1 for d in attribute(node, "dilations", [1] * len(kernel)))
            and not any(attribute(node, "output_padding", [0]))
            and attribute(node, "output_shape") is None
            and attribute(node, "auto_pad", "NOTSET") in ("NOTSET", b"NOTSET", "VALID", b"VALID"))


def handles(consumer: Consumer) -> bool:
    """True for the consumer forms a design matrix exists for: 2-D Conv (group 1), Gemm, MatMul, tiling ConvTranspose."""
    if consumer.kind in ("conv", "conv_transpose"):
        w = constant_array(consumer.node.inputs[1])
        if w is None or w.ndim != 4 or int(attribute(consumer.node, "group", 1)) != 1:
            return False
        return consumer.kind == "conv" or _tiling(consumer.node, w)
    return consumer.kind in ("gemm", "matmul")


def output_rows(consumer: Consumer, kept: np.ndarray) -> np.ndarray:
    """Rows of :func:`linear_map` belonging to output channels ``kept`` (a ConvTranspose has one per tap)."""
    t = taps(consumer) if consumer.kind == "conv_transpose" else 1
    return (kept[:, None] * t + np.arange(t)[None, :]).reshape(-1)


def _conv_geometry(node: ir.Node, kernel: tuple[int, ...], spatial: tuple[int, ...]) -> tuple[list[int], list[int], list[int]] | None:
    strides = list(attribute(node, "strides", [1] * len(kernel)))
    dilations = list(attribute(node, "dilations", [1] * len(kernel)))
    auto_pad = attribute(node, "auto_pad", "NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        pads_begin, pads_end = [], []
        for size, k, s, d in zip(spatial, kernel, strides, dilations):
            out = -(-size // s)
            total = max((out - 1) * s + d * (k - 1) + 1 - size, 0)
            begin = total // 2 if auto_pad == "SAME_UPPER" else total - total // 2
            pads_begin.append(begin)
            pads_end.append(total - begin)
        pads = pads_begin + pads_end
    elif auto_pad == "VALID":
        pads = [0] * (2 * len(kernel))
    else:
        pads = list(attribute(node, "pads", [0] * (2 * len(kernel))))
    return strides, dilations, pads


def _conv_rows(x: np.ndarray, node: ir.Node, kernel: tuple[int, int], pick: np.ndarray | None,
               rng: np.random.Generator, limit: int) -> tuple[np.ndarray, np.ndarray]:
    """im2col rows of a 2-D Conv's input at sampled output positions (the same positions when ``pick`` is given)."""
    geometry = _conv_geometry(node, kernel, x.shape[2:])
    assert geometry is not None
    (sh, sw), (dh, dw), (pt, pl, pb, pr) = geometry
    xp = np.pad(x, ((0, 0), (0, 0), (pt, pb), (pl, pr)))
    ekh, ekw = dh * (kernel[0] - 1) + 1, dw * (kernel[1] - 1) + 1
    ho, wo = (xp.shape[2] - ekh) // sh + 1, (xp.shape[3] - ekw) // sw + 1
    if pick is None:
        total = x.shape[0] * ho * wo
        pick = rng.choice(total, size=limit, replace=False) if total > limit else np.arange(total)
    b, oh, ow = np.unravel_index(pick, (x.shape[0], ho, wo))
    windows = sliding_window_view(xp, (ekh, ekw), axis=(2, 3))
    patches = windows[b, :, oh * sh, ow * sw][:, :, ::dh, ::dw]
    return patches.reshape(len(pick), -1), pick


def _flat_rows(x: np.ndarray, consumer: Consumer, pick: np.ndarray | None, rng: np.random.Generator,
               limit: int) -> tuple[np.ndarray, np.ndarray]:
    if consumer.kind == "gemm":
        rows = x.T if attribute(consumer.node, "transA", 0) else x
    else:
        rows = x.reshape(-1, x.shape[-1])
    if pick is None:
        total = rows.shape[0]
        pick = rng.choice(total, size=limit, replace=False) if total > limit else np.arange(total)
    return rows[pick], pick


def design_rows(x: np.ndarray, c: Consumer, pick: np.ndarray | None, rng: np.random.Generator,
                limit: int = MAX_ROWS) -> tuple[np.ndarray, np.ndarray]:
    """Rows of the consumer's design matrix for one activation batch, and which rows were drawn.

    Pass the ``pick`` of a first call to draw the same rows from another
    tensor of the same shape (the dense model's activation).
    """
    x = np.asarray(x, dtype=np.float64)
    if c.kind == "conv":
        w = constant_array(c.node.inputs[c.weight_index])
        assert w is not None
        return _conv_rows(x, c.node, (int(w.shape[2]), int(w.shape[3])), pick, rng, limit)
    if c.kind == "conv_transpose":
        x = np.moveaxis(x, 1, -1)  # every input position is one row; each tap is its own set of outputs
    return _flat_rows(x, c, pick, rng, limit)




def linear_map(node: ir.Node, kind: str, weight: np.ndarray) -> np.ndarray:
    """The weight as a matrix [outputs, inputs (x taps)] of the effective linear map (Gemm's alpha folded in)."""
    if kind == "conv":
        return weight.reshape(weight.shape[0], -1).astype(np.float64)
    if kind == "conv_transpose":  # [Cin, Cout, kh, kw] -> [Cout x taps, Cin]
        return weight.reshape(weight.shape[0], -1).T.astype(np.float64)
    if kind == "gemm":
        alpha = float(attribute(node, "alpha", 1.0))
        return alpha * (weight if attribute(node, "transB", 0) else weight.T).astype(np.float64)
    return weight.T.astype(np.float64)
