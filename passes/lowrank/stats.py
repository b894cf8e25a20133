"""Input statistics of the layers on calibration data: mean and second moment of the rows of X.

Activation-aware SVD needs, per layer input, E[x] and E[x xᵀ] over the rows
X is made of (tokens for a MatMul, im2col patches for a Conv). Batches are
streamed from ONNX Runtime and folded into running sums; the activations
themselves are never kept.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir
from numpy.lib.stride_tricks import sliding_window_view

from onnxopt.activations import iter_activations
from onnxopt.data import Dataset
from onnxopt.progress import Progress
from onnxopt.sessions import SessionFactory

from onnxopt_passes.lowrank.layers import Layer, RowView

__all__ = ["Moments", "input_rows", "collect_moments", "MAX_ROWS_PER_BATCH"]

#: Rows drawn at random per batch and input when a batch yields more (large conv feature maps).
MAX_ROWS_PER_BATCH = 8192


@dataclass
class Moments:
    """Running sums over rows of X, per group: count, Σx (G, K) and Σx xᵀ (G, K, K)."""

    count: int
    total: np.ndarray
    outer: np.ndarray

    @classmethod
    def empty(cls, groups: int, k: int) -> Moments:
        return cls(0, np.zeros((groups, k)), np.zeros((groups, k, k)))

    def add(self, rows: np.ndarray) -> None:
        """Fold rows (G, P, K) into the sums."""
        x = rows.astype(np.float64, copy=False)
        self.count += x.shape[1]
        self.total += x.sum(axis=1)
        self.outer += x.transpose(0, 2, 1) @ x

    @property
    def mean(self) -> np.ndarray:
        return self.total / max(self.count, 1)

    def second_moment(self, centered: bool) -> np.ndarray:
        """E[x xᵀ], or the covariance E[(x-μ)(x-μ)ᵀ] when ``centered``."""
        m = self.outer / max(self.count, 1)
        if centered:
            mu = self.mean
            m = m - mu[:, :, None] * mu[:, None, :]
        return m


def _same_pads(size: Sequence[int], view: RowView) -> tuple[int, ...]:
    begins, ends = [], []
    for n, k, s, d in zip(size, view.kernel, view.strides, view.dilations):
        total = max((math.ceil(n / s) - 1) * s + (k - 1) * d + 1 - n, 0)
        small, large = total // 2, total - total // 2
        begins.append(small if view.auto_pad == "SAME_UPPER" else large)
        ends.append(large if view.auto_pad == "SAME_UPPER" else small)
    return (*begins, *ends)


def _patches(x: np.ndarray, view: RowView, pick: Callable[[int], np.ndarray | None]) -> np.ndarray:
    """im2col rows (G, P, Cg·prod(kernel)) of a conv input (N, C, *spatial), in the weight's (c, k...) order.

    ``pick(total)`` chooses which of the N·prod(outputs) patches to keep (None: all); only those
    are copied out of the strided window view, so a large feature map is never expanded whole.
    """
    d = len(view.kernel)
    if view.auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        pads = _same_pads(x.shape[2:], view)
    elif view.auto_pad == "VALID":
        pads = (0,) * (2 * d)
    else:
        pads = view.pads
    padded = np.pad(x, [(0, 0), (0, 0), *zip(pads[:d], pads[d:])])
    spans = [dil * (k - 1) + 1 for k, dil in zip(view.kernel, view.dilations)]
    windows = sliding_window_view(padded, spans, axis=tuple(range(2, 2 + d)))
    # windows: (N, C, O'..., span...) -> keep strided outputs and dilated taps (still a view)
    index = (slice(None), slice(None), *(slice(None, None, s) for s in view.strides),
             *(slice(None, None, dil) for dil in view.dilations))
    windows = windows[index]
    n, c, outs = windows.shape[0], windows.shape[1], windows.shape[2:2 + d]
    chosen = pick(n * math.prod(outs))
    if chosen is None:
        order = (0, *range(2, 2 + d), 1, *range(2 + d, 2 + 2 * d))
        patches = windows.transpose(order).reshape(-1, c, *view.kernel)
    else:
        sample, *positions = np.unravel_index(chosen, (n, *outs))
        patches = windows[(sample, slice(None), *positions)]  # advanced indices first: (P, C, kernel...)
    rows = patches.reshape(patches.shape[0], view.group, (c // view.group) * math.prod(view.kernel))
    return rows.transpose(1, 0, 2)


def input_rows(x: np.ndarray, view: RowView, k: int, rng: np.random.Generator | None = None,
               max_rows: int = MAX_ROWS_PER_BATCH) -> np.ndarray:
    """The rows (G, P, K) of X a layer multiplies, from its input tensor; at most ``max_rows`` drawn at random."""

    def pick(total: int) -> np.ndarray | None:
        if total <= max_rows:
            return None
        return np.sort((rng or np.random.default_rng(0)).choice(total, max_rows, replace=False))

    if view.kernel:
        return _patches(x, view, pick)
    rows = x.T if view.transpose else x.reshape(-1, k)
    chosen = pick(rows.shape[0])
    return (rows if chosen is None else rows[chosen])[None]


def collect_moments(
    model: ir.Model,
    layers: Sequence[Layer],
    dataset: Dataset,
    sessions: SessionFactory,
    rng: np.random.Generator,
    *,
    progress: Progress | None = None,
) -> dict[int, Moments]:
    """Moments of each layer's input rows (keyed by ``Layer.index``), one pass over ``dataset``.

    Layers reading the same tensor the same way share one set of sums.
    """
    keys: dict[tuple[str, RowView, int], list[Layer]] = {}
    for layer in layers:
        value = layer.node.inputs[0]
        assert value is not None and value.name and layer.rows is not None
        keys.setdefault((value.name, layer.rows, layer.k), []).append(layer)
    sums = {key: Moments.empty(group[0].groups, key[2]) for key, group in keys.items()}
    for batch in iter_activations(model, [key[0] for key in keys], dataset, sessions, progress=progress,
                                  description="lowrank: input statistics"):
        for key, moments in sums.items():
            moments.add(input_rows(batch[key[0]], key[1], key[2], rng))
    return {layer.index: sums[key] for key, group in keys.items() for layer in group}
