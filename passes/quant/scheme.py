"""Quantization numerics: scales, zero points and quantized arrays, all vectorized numpy.

The conventions are ONNX's: ``q = saturate(round_half_even(x / scale) + zero_point)``
and ``x ~= (q - zero_point) * scale``. Weights are symmetric (zero point 0)
so the integer kernels skip the zero-point correction on the weight side;
activations are asymmetric uint8 by default, or symmetric int8.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import ml_dtypes
import numpy as np

__all__ = [
    "ActivationType",
    "QParams",
    "QRANGES",
    "activation_params",
    "weight_params",
    "quantize",
    "dequantize",
    "quantize_bias",
    "quantize_blockwise",
    "BLOCK_ELEMENTS",
    "row_blocks",
]

ActivationType = Literal["uint8", "int8"]

#: Representable integer range of each storage type.
QRANGES: dict[str, tuple[int, int]] = {
    "uint8": (0, 255),
    "int8": (-128, 127),
    "int4": (-8, 7),
    "int32": (-(2**31), 2**31 - 1),
}

_NUMPY = {"uint8": np.uint8, "int8": np.int8, "int32": np.int32, "int4": ml_dtypes.int4}

# A tensor that is constant zero still needs a positive scale; any value works, 1 keeps it readable.
_EMPTY_RANGE_SCALE = 1.0

#: Elements of a weight the numerics here (and in :mod:`saturation`) work on at a time (4 MB of float32). Whole-array
#: expressions made several temporaries of the weight's size, up to twice it in float64 (``rint(w / s) + zero`` is
#: float64, and so are the pair sums): on a 2.4 GB chain of 100 MB weights that was 0.25x the model on top of the int8
#: weights written so far. By blocks the results are the same, bit for bit (maxima, and elementwise rounding).
BLOCK_ELEMENTS = 1 << 20


def row_blocks(shape: tuple[int, ...], *, elements: int | None = None) -> list[slice]:
    """Slices of the leading axis of an array of ``shape``, about ``elements`` (:data:`BLOCK_ELEMENTS`) each:
    contiguous blocks of a C-ordered weight (a weight mapped from its file is)."""
    rows = shape[0] if shape else 1
    step = max(1, (elements or BLOCK_ELEMENTS) // max(1, math.prod(shape[1:])))
    return [slice(i, min(i + step, rows)) for i in range(0, rows, step)]


@dataclass(frozen=True)
class QParams:
    """Scale and zero point of one quantized tensor (scalars; weights use arrays elsewhere)."""

    scale: float
    zero_point: int
    dtype: str

    def scale_array(self) -> np.ndarray:
        return np.asarray(self.scale, dtype=np.float32)

    def zero_point_array(self) -> np.ndarray:
        return np.asarray(self.zero_point, dtype=_NUMPY[self.dtype])

    @property
    def lowest(self) -> float:
        """The smallest value the quantized tensor can hold."""
        return (QRANGES[self.dtype][0] - self.zero_point) * self.scale

    @property
    def highest(self) -> float:
        """The largest value the quantized tensor can hold."""
        return (QRANGES[self.dtype][1] - self.zero_point) * self.scale


def activation_params(lo: float, hi: float, dtype: ActivationType, *, non_negative: bool = False) -> QParams:
    """Parameters covering ``[lo, hi]`` (widened to include 0, so 0 is exact: padding and Relu need it).

    uint8 is asymmetric; int8 is symmetric, except for tensors known to be
    non-negative (after a Relu): those use zero point -128 so ONNX Runtime
    can still drop the Relu into the integer kernel before them.
    """
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    if non_negative:
        lo = 0.0
    qmin, qmax = QRANGES[dtype]
    if dtype == "int8" and not non_negative:
        bound = max(-lo, hi)
        scale = np.float32(bound / qmax) if bound > 0 else np.float32(_EMPTY_RANGE_SCALE)
        return QParams(float(scale), 0, dtype)
    if hi - lo <= 0:
        return QParams(_EMPTY_RANGE_SCALE, qmin if lo == 0 else 0, dtype)
    scale = np.float32((hi - lo) / (qmax - qmin))
    zero_point = int(np.clip(np.round(qmin - lo / float(scale)), qmin, qmax))
    return QParams(float(scale), zero_point, dtype)


def weight_params(weight: np.ndarray, axis: int | None, bits: int = 8) -> np.ndarray:
    """Symmetric scales of ``weight``: one per slice along ``axis`` (per channel), or one for all."""
    qmax = 2 ** (bits - 1) - 1
    if weight.ndim == 0 or weight.size <= BLOCK_ELEMENTS:
        absmax = _absmax(weight, axis)
    else:  # the maxima of blocks of rows: no temporary of the weight's size
        parts = [_absmax(weight[rows], axis) for rows in row_blocks(weight.shape)]
        if axis is not None and axis % weight.ndim == 0:
            absmax = np.concatenate(parts)
        else:
            absmax = parts[0]
            for part in parts[1:]:
                absmax = np.maximum(absmax, part)
    scale = (absmax / qmax).astype(np.float32)
    return np.where(scale > 0, scale, np.float32(_EMPTY_RANGE_SCALE)).astype(np.float32)


def _absmax(weight: np.ndarray, axis: int | None) -> np.ndarray:
    w = np.abs(weight.astype(np.float32, copy=False))
    if axis is None:
        return np.asarray(w.max() if w.size else 0.0, dtype=np.float32)
    reduce = tuple(i for i in range(w.ndim) if i != axis % w.ndim)
    return w.max(axis=reduce) if w.size else np.zeros(w.shape[axis], np.float32)


def _broadcast(scale: np.ndarray, ndim: int, axis: int | None) -> np.ndarray:
    if axis is None or scale.ndim == 0:
        return scale
    shape = [1] * ndim
    shape[axis % ndim] = scale.shape[0]
    return scale.reshape(shape)


def quantize(x: np.ndarray, scale: np.ndarray | float, zero_point: np.ndarray | int, dtype: str,
             axis: int | None = None) -> np.ndarray:
    """ONNX QuantizeLinear in numpy (round half to even, saturate)."""
    qmin, qmax = QRANGES[dtype]
    s = _broadcast(np.asarray(scale, dtype=np.float32), x.ndim, axis)
    z = _broadcast(np.asarray(zero_point, dtype=np.int64), x.ndim, axis)
    if x.ndim == 0 or x.size <= BLOCK_ELEMENTS or not (_by_rows(s, x) and _by_rows(z, x)):
        return _quantize(x, s, z, qmin, qmax, _NUMPY[dtype])
    out = np.empty(x.shape, _NUMPY[dtype])
    for rows in row_blocks(x.shape):  # float64 temporaries of a block, not of the whole weight
        out[rows] = _quantize(x[rows], _rows_of(s, x, rows), _rows_of(z, x, rows), qmin, qmax, _NUMPY[dtype])
    return out


def _quantize(x: np.ndarray, s: np.ndarray, z: np.ndarray, qmin: int, qmax: int, dtype: type) -> np.ndarray:
    q = np.rint(x.astype(np.float32, copy=False) / s) + z
    return np.clip(q, qmin, qmax).astype(dtype)


def _by_rows(param: np.ndarray, x: np.ndarray) -> bool:
    """``param`` broadcasts against ``x`` block by block of its leading axis."""
    return param.ndim < x.ndim or (param.ndim == x.ndim and param.shape[0] in (1, x.shape[0]))


def _rows_of(param: np.ndarray, x: np.ndarray, rows: slice) -> np.ndarray:
    return param[rows] if param.ndim == x.ndim and param.shape[0] == x.shape[0] and x.shape[0] > 1 else param


def dequantize(q: np.ndarray, scale: np.ndarray | float, zero_point: np.ndarray | int, axis: int | None = None) -> np.ndarray:
    """ONNX DequantizeLinear in numpy."""
    s = _broadcast(np.asarray(scale, dtype=np.float32), q.ndim, axis)
    z = _broadcast(np.asarray(zero_point, dtype=np.int64), q.ndim, axis)
    return ((q.astype(np.int64) - z) * s).astype(np.float32)


def quantize_bias(bias: np.ndarray, input_scale: float, weight_scale: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """int32 bias with scale = input scale x weight scale, as the integer kernels add it.

    Returns the int32 bias, its scale and the weight scale, which is raised on
    the rare channel whose bias would not fit in int32 (a tiny weight scale
    next to a large bias); the caller re-quantizes that weight with it.
    """
    limit = float(QRANGES["int32"][1])
    needed = (np.abs(bias.astype(np.float64)) / (float(input_scale) * limit)).astype(np.float32) * np.float32(1.0001)
    if np.ndim(weight_scale) == 0:  # per-tensor weights keep one scale
        w_scale = np.maximum(np.asarray(weight_scale, np.float32), needed.max(initial=0.0)).astype(np.float32)
    else:
        w_scale = np.maximum(weight_scale.astype(np.float32), needed).astype(np.float32)
    scale = (np.float32(input_scale) * w_scale).astype(np.float32)
    q = np.clip(np.rint(bias.astype(np.float64) / scale.astype(np.float64)), -limit, limit).astype(np.int32)
    return q, scale, w_scale


def quantize_blockwise(weight: np.ndarray, block_size: int, bits: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric block-wise quantization of a [K, N] weight along K (ONNX DequantizeLinear-21 blocking).

    Returns the int4 weight [K, N] and the scales [ceil(K / block_size), N].
    """
    k, n = weight.shape
    blocks = -(-k // block_size)
    padded = np.zeros((blocks * block_size, n), dtype=np.float32)
    padded[:k] = weight
    absmax = np.abs(padded.reshape(blocks, block_size, n)).max(axis=1)
    qmax = 2 ** (bits - 1) - 1
    scale = np.where(absmax > 0, absmax / qmax, np.float32(_EMPTY_RANGE_SCALE)).astype(np.float32)
    full = np.repeat(scale, block_size, axis=0)[:k]
    q = np.clip(np.rint(weight.astype(np.float32) / full), -qmax - 1, qmax).astype(ml_dtypes.int4 if bits == 4 else np.int8)
    return q, scale
