"""Calibration: the range of each tensor to quantize, from ONNX Runtime runs over the calibration data.

Streaming: each batch updates a running min/max and, for the histogram
methods, a fixed-size histogram per tensor; the activations themselves are
dropped as soon as they are counted. A histogram whose range a new batch
exceeds grows by doubling its bin width (merging neighbouring bins), so its
bin edges stay aligned and no count is re-binned approximately.

Methods (``method``):

- ``minmax``: the observed min and max;
- ``percentile``: the range that keeps ``percentile`` % of the values
  (the rest split evenly between the two tails);
- ``entropy``: the clipping range whose quantized histogram is closest to the
  observed one in KL divergence (TensorRT's method, on both signs);
- ``mse``: the clipping range with the least expected squared quantization
  error over the observed histogram.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import onnx_ir as ir

from onnxopt.activations import iter_activation_parts
from onnxopt.data import Dataset
from onnxopt.progress import Progress
from onnxopt.sessions import SessionFactory

from onnxopt_passes.quant.exposure import expose_everywhere

__all__ = ["Method", "Histogram", "RangeStats", "collect_ranges", "range_from_histogram"]

Method = Literal["minmax", "percentile", "entropy", "mse"]

#: Candidate clipping ranges the entropy and mse searches try (shares of the observed range).
_SEARCH_STEPS = 128
#: Probability given to empty quantized bins where the observed histogram has mass (entropy method).
_KL_EPSILON = 1e-4


@dataclass
class Histogram:
    """Counts over ``bins`` bins of width ``width`` starting at bin index ``start`` (bin k covers [k*w, (k+1)*w))."""

    bins: int
    width: float = 0.0
    start: int = 0
    counts: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))

    def edges(self) -> np.ndarray:
        return (self.start + np.arange(self.bins + 1)) * self.width

    def _fit(self, lo: float, hi: float) -> None:
        """Widen the bins (doubling, bins merged pairwise) until [lo, hi] fits, then re-anchor."""
        if self.width <= 0:
            span = hi - lo
            self.width = span / (self.bins - 2) if span > 0 else max(abs(hi), 1e-12) * 1e-6
            self.start = int(np.floor(lo / self.width))
            self.counts = np.zeros(self.bins, np.int64)
            return
        end = self.start + self.bins
        lo_i, hi_i = int(np.floor(lo / self.width)), int(np.floor(hi / self.width))
        if lo_i >= self.start and hi_i < end:
            return
        index = np.nonzero(self.counts)[0] + self.start
        weights = self.counts[self.counts > 0]
        lo_i, hi_i = min(lo_i, int(index.min()) if index.size else lo_i), max(hi_i, int(index.max()) if index.size else hi_i)
        width = self.width
        while hi_i - lo_i + 1 > self.bins:
            width *= 2
            index, lo_i, hi_i = np.floor_divide(index, 2), lo_i // 2, hi_i // 2
        start = lo_i
        counts = np.zeros(self.bins, np.int64)
        np.add.at(counts, index - start, weights)
        self.width, self.start, self.counts = width, start, counts

    def add(self, values: np.ndarray) -> None:
        if values.size == 0:
            return
        lo, hi = float(values.min()), float(values.max())
        self._fit(lo, hi)
        idx = np.floor(values.reshape(-1) / self.width).astype(np.int64) - self.start
        self.counts += np.bincount(np.clip(idx, 0, self.bins - 1), minlength=self.bins)


@dataclass
class RangeStats:
    """What calibration keeps of one tensor: running min/max and (histogram methods) a histogram."""

    lo: float = np.inf
    hi: float = -np.inf
    histogram: Histogram | None = None

    def add(self, values: np.ndarray) -> None:
        finite = values[np.isfinite(values)] if not np.isfinite(values).all() else values
        if finite.size == 0:
            return
        self.lo = min(self.lo, float(finite.min()))
        self.hi = max(self.hi, float(finite.max()))
        if self.histogram is not None:
            self.histogram.add(finite)


def _percentile_range(h: Histogram, percentile: float) -> tuple[float, float]:
    total = h.counts.sum()
    cdf = np.cumsum(h.counts)
    tail = total * (1.0 - percentile / 100.0) / 2.0
    edges = h.edges()
    lo_bin = int(np.searchsorted(cdf, tail, side="right"))
    hi_bin = int(np.searchsorted(cdf, total - tail, side="left"))
    return float(edges[lo_bin]), float(edges[min(hi_bin + 1, h.bins)])


def _candidates(h: Histogram, lo: float, hi: float, levels: int) -> Iterable[tuple[float, float]]:
    """Clipping ranges shrinking the observed one toward zero, keeping its sign balance.

    A window narrower than ``levels`` bins is never tried: inside it every bin
    gets its own level, the quantized histogram equals the clipped one and
    KL divergence is ~0 whatever was clipped away (TensorRT's rule too).
    """
    spanned = max((hi - lo) / h.width, 1.0)
    smallest = min(1.0, levels / spanned)
    for step in range(_SEARCH_STEPS, 0, -1):
        share = step / _SEARCH_STEPS
        if share < smallest:
            break
        yield lo * share, hi * share


def _quantized_centers(centers: np.ndarray, lo: float, hi: float, levels: int) -> np.ndarray:
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    scale = (hi - lo) / (levels - 1) if hi > lo else 1.0
    q = np.clip(np.rint((centers - lo) / scale), 0, levels - 1)
    return q * scale + lo


def _mse_loss(h: Histogram, lo: float, hi: float, levels: int) -> float:
    edges = h.edges()
    centers = (edges[:-1] + edges[1:]) / 2
    err = centers - _quantized_centers(centers, lo, hi, levels)
    return float(np.dot(h.counts, err * err))


def _kl_loss(h: Histogram, lo: float, hi: float, levels: int) -> float:
    """KL(P || Q): P = histogram clipped to [lo, hi] (outliers piled on the edge bins), Q = P on ``levels`` levels."""
    edges = h.edges()
    centers = (edges[:-1] + edges[1:]) / 2
    inside = (centers >= lo) & (centers <= hi)
    if not inside.any():
        return np.inf
    first, last = np.argmax(inside), len(inside) - 1 - np.argmax(inside[::-1])
    window = h.counts[first : last + 1].astype(np.float64)
    p = window.copy()
    p[0] += h.counts[:first].sum()
    p[-1] += h.counts[last + 1 :].sum()
    # Q is built from the window *without* the clipped tails (as TensorRT does): that
    # mismatch on the edge bins is what makes clipping cost something.
    # Each quantization level spreads its mass evenly over the non-empty bins it covers.
    lo_c, hi_c = min(lo, 0.0), max(hi, 0.0)
    scale = (hi_c - lo_c) / (levels - 1) if hi_c > lo_c else 1.0
    level = np.clip(np.rint((centers[first : last + 1] - lo_c) / scale), 0, levels - 1).astype(np.int64)
    nonzero = p > 0
    mass = np.bincount(level, weights=window, minlength=levels)
    support = np.bincount(level, weights=nonzero.astype(np.float64), minlength=levels)
    q = np.where(nonzero, mass[level] / np.maximum(support[level], 1), 0.0)
    p_sum, q_sum = p.sum(), q.sum()
    if p_sum == 0 or q_sum == 0:
        return np.inf
    p, q = p / p_sum, q / q_sum
    # Smooth Q where P has mass and Q has none (the clipped tails on the edge bins): a small
    # epsilon taken from the other bins, so clipping costs a finite amount instead of infinity.
    empty = nonzero & (q == 0)
    if empty.any():
        full = q > 0
        q = np.where(empty, _KL_EPSILON, np.where(full, q - _KL_EPSILON * empty.sum() / max(full.sum(), 1), q))
        if (q[nonzero] <= 0).any():
            return np.inf
    return float(np.sum(p[nonzero] * np.log(p[nonzero] / q[nonzero])))


_LOSSES: dict[str, Callable[[Histogram, float, float, int], float]] = {"mse": _mse_loss, "entropy": _kl_loss}


def range_from_histogram(stats: RangeStats, method: Method, *, percentile: float = 99.999, levels: int = 256) -> tuple[float, float]:
    """The calibrated range of one tensor for ``method``."""
    h = stats.histogram
    if method == "minmax" or h is None or h.counts.sum() == 0 or stats.hi <= stats.lo:
        return stats.lo, stats.hi
    if method == "percentile":
        lo, hi = _percentile_range(h, percentile)
        return max(lo, stats.lo), min(hi, stats.hi)
    loss = _LOSSES[method]
    best, best_range = np.inf, (stats.lo, stats.hi)
    for lo, hi in _candidates(h, stats.lo, stats.hi, levels):
        value = loss(h, lo, hi, levels)
        if value < best:
            best, best_range = value, (lo, hi)
    return best_range


def collect_ranges(
    model: ir.Model,
    names: Iterable[str],
    dataset: Dataset,
    sessions: SessionFactory,
    *,
    method: Method,
    percentile: float = 99.999,
    bins: int = 2048,
    levels: int = 256,
    progress: Progress | None = None,
) -> dict[str, tuple[float, float]]:
    """``{tensor name: (lo, hi)}`` calibrated on ``dataset``, one batch at a time.

    Tensors inside If branches are read through extra branch outputs (see
    :mod:`exposure`); tensors the data never reached (an If branch not taken)
    are left out, and the caller skips them.
    """
    wanted = list(dict.fromkeys(names))
    if not wanted:
        return {}
    exposed, outputs = expose_everywhere(model, wanted)
    stats: dict[str, RangeStats] = {n: RangeStats(histogram=Histogram(bins) if method != "minmax" else None) for n in wanted}
    # a large model runs in segments (one session's worth of weights at a time): the parts come in any grouping
    for batch in iter_activation_parts(exposed, outputs.values(), dataset, sessions, progress=progress,
                                       description="quant: calibrating"):
        for name, output in outputs.items():
            values = batch.get(output)
            # ORT returns None for a value inside an If branch this batch did not take
            if values is not None and values.dtype.kind == "f" and values.size:
                stats[name].add(values.astype(np.float32, copy=False))
    ranges = {}
    for name, s in stats.items():
        if s.lo <= s.hi:
            ranges[name] = range_from_histogram(s, method, percentile=percentile, levels=levels)
    return ranges

