"""How many channels each group keeps: one ratio everywhere, or per-group ratios from a sensitivity scan.

Both can aim at a global target in parameters or MACs (searched with the
exact :class:`.cost.CostModel`). Protections apply to every plan: a minimum
number of channels, kept counts rounded up to a multiple of ``round_to`` so
integer and SIMD kernels stay efficient, and fixed channels always kept.
"""

from __future__ import annotations

import hashlib
import math
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from onnxopt.data import Dataset
from onnxopt.metrics import relative_error
from onnxopt.progress import Progress
from onnxopt.sessions import SessionFactory, run_batches

from .cost import CostModel
from .groups import ChannelGraph, Group

__all__ = ["Limits", "kept_count", "build_keep", "uniform_plan", "plan_for_target", "scan_sensitivity",
           "sensitivity_plan", "SCAN_RATIOS", "scan_key", "cached_scan"]

#: Ratios each group is pruned at, alone, by the sensitivity scan; the largest is also the most a group loses.
SCAN_RATIOS = (0.25, 0.5, 0.75, 0.9)
#: Calibration samples (or feeds) the scan runs on: a relative output error settles well before the whole set.
SCAN_SAMPLES = 64


#: Widest SIMD block worth keeping (MLAS's NCHWc block on AVX-512); ``round_to=0`` aligns to at most this.
MAX_ALIGN = 16


@dataclass(frozen=True)
class Limits:
    """Protections every plan respects; ``round_to=0`` keeps each layer's own alignment (see :func:`alignment`)."""

    min_channels: int = 1
    round_to: int = 0


def alignment(channels: int) -> int:
    """The alignment a dense layer had: the largest power of two dividing ``channels``, at most
    :data:`MAX_ALIGN` and at most a quarter of the layer (so a small layer can still be pruned in steps)."""
    if channels <= 0:
        return 1
    quarter = 1 << max(0, (channels // 4).bit_length() - 1)
    return max(1, min(MAX_ALIGN, channels & -channels, quarter))


def kept_count(group: Group, removed_share: float, limits: Limits, size: int | None = None) -> int:
    """Channels (roots) ``group`` keeps when ``removed_share`` of ``size`` (default: its own size) should go.

    Protections apply after: rounded to the nearest multiple of ``round_to``
    producer channels (at least one multiple), at least ``min_channels``,
    never fewer than its fixed channels, never more than it has.
    """
    n = group.size
    keep = (1.0 - removed_share) * (size if size is not None else n)
    align = limits.round_to if limits.round_to > 0 else alignment(n * group.width)
    unit = max(1, align // math.gcd(align, group.width))
    keep_int = max(unit, int(math.floor(keep / unit + 0.5)) * unit)
    keep_int = max(keep_int, -(-limits.min_channels // group.width), len(group.fixed), 1)
    return min(keep_int, n)


def build_keep(cg: ChannelGraph, groups: Sequence[Group], order: Mapping[str, np.ndarray], counts: Mapping[str, int]) -> np.ndarray:
    """The keep table (indexed by channel root) for ``counts`` kept per group, dropping the least important first."""
    keep = np.ones(cg.num_ids, dtype=bool)
    for g in groups:
        remove = g.size - counts.get(g.key, g.size)
        if remove > 0:
            keep[order[g.key][:remove]] = False
    return keep


def uniform_plan(groups: Sequence[Group], ratio: float | Mapping[str, float], limits: Limits,
                 sizes: Mapping[str, int] | None = None) -> dict[str, int]:
    """Kept channels per group when every group loses ``ratio`` (or its own entry of a mapping) of its channels.

    ``sizes`` gives the channel counts the ratio refers to (the dense model's,
    in later rounds of an iterative schedule); by default the current ones.
    """
    return {g.key: kept_count(g, ratio if isinstance(ratio, float) else ratio.get(g.key, 0.0), limits,
                              (sizes or {}).get(g.key))
            for g in groups if g.prunable}


Target = tuple[str, float]  # ("params" | "macs", share of the dense model's figure to keep)


def _meets(cost: CostModel, keep: np.ndarray, target: Target, dense: Mapping[str, int]) -> tuple[bool, float]:
    params, macs = cost.evaluate(keep)
    figure = params if target[0] == "params" else macs
    share = figure / max(dense[target[0]], 1)
    return share <= target[1] + 1e-9, share


def plan_for_target(cg: ChannelGraph, groups: Sequence[Group], order: Mapping[str, np.ndarray], cost: CostModel,
                    target: Target, dense: Mapping[str, int], limits: Limits,
                    ratio_for: Callable[[float], Mapping[str, float]] | None = None) -> tuple[dict[str, int], float]:
    """The smallest step along a family of plans that meets ``target``; returns the plan and the share it reaches.

    The family is one ratio for every group unless ``ratio_for`` maps a knob
    in [0, 1] to per-group ratios (sensitivity thresholds).
    """
    def plan(knob: float) -> dict[str, int]:
        return uniform_plan(groups, ratio_for(knob) if ratio_for else knob, limits)

    lo, hi = 0.0, 1.0
    best = plan(hi)
    ok, share = _meets(cost, build_keep(cg, groups, order, best), target, dense)
    if not ok:
        return best, share  # even the most pruning allowed misses the target: the caller reports it
    for _ in range(40):
        mid = (lo + hi) / 2
        candidate = plan(mid)
        ok, s = _meets(cost, build_keep(cg, groups, order, candidate), target, dense)
        if ok:
            hi, best, share = mid, candidate, s
        else:
            lo = mid
        if hi - lo < 1e-4:
            break
    return best, share


def _first_outputs(model: ir.Model, dataset: Dataset, sessions: SessionFactory) -> list[np.ndarray]:
    session = sessions.create(model)
    name = session.get_outputs()[0].name
    return [np.asarray(out[name], dtype=np.float64) for out in run_batches(session, dataset.batches(), [name])]


def scan_sensitivity(model: ir.Model, groups: Sequence[Group], order: Mapping[str, np.ndarray], limits: Limits,
                     dataset: Dataset, sessions: SessionFactory, prune_copy: Callable[[ir.Model, Mapping[str, int]], ir.Model],
                     progress: Progress | None = None) -> dict[str, list[tuple[float, float]]]:
    """Prune each group alone at :data:`SCAN_RATIOS` and measure the output's relative squared error on ``dataset``.

    ``prune_copy(model, counts)`` returns a pruned copy; the model itself is untouched.
    """
    dataset = dataset.take(SCAN_SAMPLES)
    reference = _first_outputs(model, dataset, sessions)
    prunable = [g for g in groups if g.prunable]
    task = progress.task("prune: sensitivity scan", total=len(prunable) * len(SCAN_RATIOS)) if progress else None
    curves: dict[str, list[tuple[float, float]]] = {}
    for g in prunable:
        curve: list[tuple[float, float]] = []
        done: dict[int, float] = {}
        for ratio in SCAN_RATIOS:
            kept = kept_count(g, ratio, limits)
            if kept not in done:
                done[kept] = 0.0 if kept >= g.size else relative_error(
                    reference, _first_outputs(prune_copy(model, {g.key: kept}), dataset, sessions), squared=True)
            curve.append((1.0 - kept / g.size, done[kept]))
            if task:
                task.advance()
        curves[g.key] = curve
    if task:
        task.close()
    return curves


Curves = dict[str, list[tuple[float, float]]]
#: Scans kept per process (a few floats per group each), newest last.
SCAN_CACHE_ENTRIES = 8
_SCANS: OrderedDict[str, Curves] = OrderedDict()


def scan_key(model: ir.Model, order: Mapping[str, np.ndarray], dataset: Dataset, settings: str) -> str | None:
    """What a scan depends on, hashed: the model's bytes, the channel order, the scan's samples and ``settings``
    (every pass setting but the strength). None when the model is too large to hash cheaply (no caching).

    A budget ladder (and a search's ladder) plans one model at many strengths: with this key the scan, the
    costly part (one run of the data per group and ratio), is done once.
    """
    from onnxopt.io import PROTOBUF_LIMIT, has_external_data, serialize_model, tensor_bytes

    if has_external_data(model) or tensor_bytes(model) >= PROTOBUF_LIMIT:
        return None
    digest = hashlib.sha256(serialize_model(model))
    for key in sorted(order):
        digest.update(key.encode() + b"\0" + np.ascontiguousarray(order[key]).tobytes())
    sample = dataset.take(SCAN_SAMPLES)
    for feed in [sample.arrays] if sample.arrays else sample.feeds:
        for name in sorted(feed):
            value = feed[name]
            if not isinstance(value, np.ndarray):
                return None  # sequence / optional feeds: not worth hashing
            digest.update(f"{name}{value.shape}{value.dtype}".encode() + np.ascontiguousarray(value).tobytes())
    digest.update(settings.encode())
    return digest.hexdigest()


def cached_scan(key: str | None, scan: Callable[[], Curves]) -> tuple[Curves, bool]:
    """The curves stored under ``key``, else ``scan()`` (stored); and whether they were reused."""
    if key is not None and key in _SCANS:
        _SCANS.move_to_end(key)
        return _SCANS[key], True
    curves = scan()
    if key is not None:
        _SCANS[key] = curves
        while len(_SCANS) > SCAN_CACHE_ENTRIES:
            _SCANS.popitem(last=False)
    return curves, False


def sensitivity_plan(groups: Sequence[Group], curves: Mapping[str, list[tuple[float, float]]]) -> Callable[[float], dict[str, float]]:
    """Map a knob in [0, 1] to per-group ratios: each group pruned as far as its error stays under a threshold.

    Thresholds run over every measured error (log-spaced between them), so the
    knob sweeps from "prune only what costs nothing" to "prune everything as far as scanned".
    """
    errors = sorted({e for curve in curves.values() for _, e in curve})
    positive = [e for e in errors if e > 0]
    lo = math.log(min(positive)) - 1 if positive else 0.0
    hi = math.log(max(positive)) + 1e-6 if positive else 0.0

    def ratios(knob: float) -> dict[str, float]:
        threshold = 0.0 if knob <= 0 else math.exp(lo + (hi - lo) * knob)
        out = {}
        for g in groups:
            curve = curves.get(g.key)
            if not curve:
                continue
            xs = [0.0] + [r for r, _ in curve]
            ys = np.maximum.accumulate([0.0] + [e for _, e in curve])
            grid = np.linspace(0.0, xs[-1], 41)
            allowed = grid[np.interp(grid, xs, ys) <= threshold]
            out[g.key] = float(allowed.max()) if len(allowed) else 0.0
        return out

    return ratios
