"""Weights already on a 4-bit grid (``cluster.init=grid``) stay 4-bit through static quantization.

A weight clustered to a uniform symmetric grid per channel holds
``step_c * level`` with integer levels in -8..7. Quantizing it with
``scale = step_c`` is exact, and the levels fit in int4: the weight is
stored as an int4 initializer, widened by a ``Cast`` to int8 in the graph.
ONNX Runtime folds that Cast at session start, so its QDQ fusion still
sees a constant int8 weight and runs QLinearConv/QGemm (measured on ORT
1.32: a DequantizeLinear of an int4 weight directly is *not* fused).
"""

from __future__ import annotations

import numpy as np

__all__ = ["grid_levels"]

#: Relative distance to the nearest integer level tolerated (float32 rounding of ``step * level``).
_TOLERANCE = 1e-4
#: Elements of the first channel looked at before the full check, and the most distinct values a grid channel may
#: show among them (16 levels, with room for float32 rounding of ``step * level`` computed different ways).
_PROBE = 65536
_MOST_VALUES = 256


def grid_levels(weight: np.ndarray, axis: int | None) -> np.ndarray | None:
    """The per-channel (along ``axis``; one for all if None) step that puts ``weight`` exactly on integer
    levels in -8..7, or None when some channel is not on such a grid."""
    first = np.moveaxis(weight, axis, 0)[0] if axis is not None and weight.ndim else weight
    if np.unique(np.ravel(first)[:_PROBE]).size > _MOST_VALUES:
        return None  # one channel holding many distinct values is on no 16-level grid: the usual answer, in a glance
    w = weight.astype(np.float64)
    rows = (np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1) if axis is not None else w.reshape(1, -1))
    absmax = np.abs(rows).max(axis=1)
    step = np.zeros(rows.shape[0])
    found = absmax == 0
    step[found] = 1.0
    for top in range(1, 9):  # the level of the largest |w|: 1..8 (8 only for -8)
        candidate = np.where(absmax > 0, absmax / top, 1.0)
        levels = rows / candidate[:, None]
        near = np.rint(levels)
        ok = (np.abs(levels - near) <= _TOLERANCE).all(axis=1) & (near >= -8).all(axis=1) & (near <= 7).all(axis=1)
        new = ok & ~found
        step[new] = candidate[new]
        found |= ok
        if found.all():
            break
    if not found.all():
        return None
    return step.astype(np.float32) if axis is not None else np.asarray(step[0], np.float32)
