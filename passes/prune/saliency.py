"""How much each channel matters: weight magnitude, activation size, or its share of the next layer's output.

Scores are per channel root (see :mod:`.groups`), higher means keep. Every
source is normalized by its own mean before summing, so a group tied across
several layers (a residual chain) weighs each layer equally whatever its scale.

The data-free magnitude score (``l1``/``l2``) does not rank by the producing
filter's norm where BatchNorm makes that norm meaningless (see
:func:`magnitude_scores`): on a MobileNetV3-style net with BN folded into its
convs, the folded filter norm was anti-correlated with the damage a channel's
removal does, and a true 5% cut by it (0.49 top-1 agreement) was worse than a
random choice of the same channels (0.60-0.67).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from onnxopt.activations import iter_activations
from onnxopt.data import Dataset
from onnxopt.graph import attribute, constant_array, is_onnx_op, only_consumer
from onnxopt.progress import Progress
from onnxopt.sessions import SessionFactory

from .groups import ChannelGraph, Consumer, Group

__all__ = ["ActivationStats", "is_gate", "magnitude_scores", "probe_values", "activation_stats", "activation_scores", "energy_scores", "ranking"]


def _add_normalized(scores: np.ndarray, roots: np.ndarray, values: np.ndarray) -> None:
    """Add per-position ``values`` to ``scores`` by root: mean over a root's positions, normalized by the source's mean."""
    uniq, inverse = np.unique(roots, return_inverse=True)
    per_root = np.bincount(inverse, weights=values) / np.bincount(inverse)
    mean = per_root.mean()
    if mean > 0:
        scores[uniq] += per_root / mean


def _bn_scale(value: ir.Value) -> np.ndarray | None:
    """|gamma| * sqrt(var / (var + eps)) of a BatchNormalization reading ``value`` alone: the channel's output scale.

    BatchNorm divides the filter's response by its own spread, so the layer is
    invariant to the filter's norm and the channel leaves it with spread
    |gamma| (network slimming's criterion); the filter norm times the BN gain
    the l1 score once used is |gamma| * ||W|| / sigma(Wx), which is largest
    for filters the data excites least.
    """
    bn = only_consumer(value)
    if bn is None or not is_onnx_op(bn, "BatchNormalization") or len(bn.inputs) < 5:
        return None
    scale, var = constant_array(bn.inputs[1]), constant_array(bn.inputs[4])
    if scale is None or var is None:
        return None
    var = np.maximum(var.astype(np.float64), 0.0)
    return np.abs(scale.astype(np.float64)) * np.sqrt(var / (var + float(attribute(bn, "epsilon", 1e-5))))


#: Ops a squeeze-excite gate's logits may pass through (with constant operands) between its layer and the Mul.
_GATE_PATH = ("Add", "Sub", "Mul", "Div", "Clip", "Relu", "HardSigmoid", "Sigmoid")


def is_gate(value: ir.Value) -> bool:
    """``value`` only scales another tensor: it reaches a ``Mul`` with a computed operand through a (Hard)Sigmoid.

    A squeeze-excite block's expand layer is tied to the channels it gates,
    but its filters set how much the gate varies, not how much the channel
    carries: a gate whose filter is small is a constant factor, not a silent channel.
    """
    squashed = False
    while True:
        uses = list(value.uses())
        if len(uses) != 1 or uses[0][0].outputs[0] is None:
            return False
        node = uses[0][0]
        others = [v for v in node.inputs if v is not None and v is not value]
        if squashed and is_onnx_op(node, "Mul") and any(constant_array(v) is None for v in others):
            return True
        if not is_onnx_op(node, *_GATE_PATH) or any(constant_array(v) is None for v in others):
            return False
        squashed = squashed or is_onnx_op(node, "HardSigmoid", "Sigmoid")
        value = node.outputs[0]


#: Elements per chunk when reducing a big weight (a 100M-element Gemm is not copied whole to float64).
CHUNK = 1 << 20


def slice_norms(w: np.ndarray, axis: int, order: int) -> np.ndarray:
    """L1 or squared-L2 norm of every slice of ``w`` along ``axis``, in float64, a chunk of slices at a time."""
    n = w.shape[axis]
    per_slice = max(w.size // max(n, 1), 1)
    step = max(1, CHUNK // per_slice)
    out = np.empty(n)
    for start in range(0, n, step):
        part = np.take(w, np.arange(start, min(start + step, n)), axis=axis)
        part = np.moveaxis(part, axis, 0).reshape(part.shape[axis], -1).astype(np.float64)
        out[start : start + len(part)] = np.abs(part).sum(axis=1) if order == 1 else (part * part).sum(axis=1)
    return out


def magnitude_scores(cg: ChannelGraph, order: int) -> np.ndarray:
    """Data-free channel importance from the weights: the channel's output scale, else what its readers make of it.

    - A layer followed by a BatchNorm: the BN's output scale (:func:`_bn_scale`),
      0 for an all-zero filter (its output is a constant, whatever BN's statistics say).
    - A Conv without one: the readers' weight energy on the channel,
      ``||W_r[:, c]||^2`` over each reader's mean (ThiNet's criterion with equal
      input energy: readers are trained against the channel's real scale). Such a
      Conv is, in a net trained with BatchNorm, one with its BN folded in (torch's
      eval-mode export folds every Conv+BN pair), and a folded filter is the BN
      gain times the filter, with the same flaw. An all-zero filter scores 0.
    - A Gemm/MatMul without one (Linear layers rarely had a BatchNorm to fold):
      the filter's L1 (``order=1``) or L2 norm, as are channels no layer reads
      with a weight. Weights alone cannot tell a folded Conv from a plain one, nor
      a plain Gemm from a folded one; on the digits MLP the readers' energy lost
      13 pt more than the filter norm at 50%, on the BN-folded MobileNetV3-style
      net the filter norm was the worse of the two (0.49 against 0.93 agreement at 5%).
    - Squeeze-excite gate layers (:func:`is_gate`) are left out: they weigh
      nothing in the score of the channels they gate.
    """
    scores = np.zeros(cg.num_ids)
    filters = np.zeros(cg.num_ids)  # the old filter-norm score: the fallback where nothing else judges
    largest = np.zeros(cg.num_ids)  # largest filter norm per root over its non-gate layers: 0 means a constant
    by_readers = np.zeros(cg.num_ids, dtype=bool)
    judged = np.zeros(cg.num_ids, dtype=bool)
    for producer in cg.producers:
        w = constant_array(producer.node.inputs[producer.weight_index])
        assert w is not None
        norms = slice_norms(w, producer.weight_axis, order)
        if order == 2:
            norms = np.sqrt(norms)
        roots = cg.roots(producer.ids)
        _add_normalized(filters, roots, norms)
        if is_gate(producer.value):
            continue
        np.maximum.at(largest, roots, norms)
        scale = _bn_scale(producer.value)
        if scale is not None and len(scale) == len(norms):
            _add_normalized(scores, roots, np.where(norms > 0, scale, 0.0))
            judged[roots] = True
        elif is_onnx_op(producer.node, "Conv", "ConvTranspose"):
            by_readers[roots] = True
        else:  # a Gemm/MatMul without BatchNorm: its filter norm is its output's scale (measured: digits MLP)
            _add_normalized(scores, roots, norms)
            judged[roots] = True
    readers = np.zeros(cg.num_ids)
    read = np.zeros(cg.num_ids, dtype=bool)
    for consumer in cg.consumers:
        roots = cg.roots(cg.layouts[consumer.value].ids)
        _add_normalized(readers, roots, _input_column_energy(consumer))
        read[roots] = True
    use = by_readers & read
    scores[use] += np.where(largest[use] > 0, readers[use], 0.0)
    judged |= use
    scores[~judged] = filters[~judged]
    return scores


@dataclass
class ActivationStats:
    """Per position along the channel axis of a tensor: mean |x| and mean x^2 over calibration data."""

    mean_abs: np.ndarray
    mean_sq: np.ndarray


def activation_stats(model: ir.Model, cg: ChannelGraph, values: Iterable[ir.Value], dataset: Dataset,
                     sessions: SessionFactory, progress: Progress | None = None) -> dict[ir.Value, ActivationStats]:
    """Stream calibration batches and reduce each tensor to per-channel statistics (never keeps activations)."""
    wanted = {v.name: v for v in values if v.name}
    sums: dict[str, list[np.ndarray | float]] = {}
    for batch in iter_activations(model, list(wanted), dataset, sessions, progress=progress,
                                  description="prune: activation statistics"):
        for name, array in batch.items():
            layout = cg.layouts[wanted[name]]
            x = np.moveaxis(np.asarray(array, dtype=np.float64), layout.axis, 0).reshape(len(layout.ids), -1)
            acc = sums.setdefault(name, [np.zeros(len(layout.ids)), np.zeros(len(layout.ids)), 0.0])
            acc[0] = acc[0] + np.abs(x).sum(axis=1)  # type: ignore[operator]
            acc[1] = acc[1] + (x * x).sum(axis=1)  # type: ignore[operator]
            acc[2] = float(acc[2]) + x.shape[1]  # type: ignore[arg-type]
    return {wanted[name]: ActivationStats(a / max(n, 1), b / max(n, 1))  # type: ignore[operator]
            for name, (a, b, n) in sums.items()}


def probe_values(cg: ChannelGraph) -> list[ir.Value]:
    """Where to measure channels: the tensors the next layers read, else (no reader sums over them) the layer outputs."""
    values: dict[ir.Value, None] = {c.value: None for c in cg.consumers}
    read = set()
    for value in values:
        read.update(np.unique(cg.roots(cg.layouts[value].ids)).tolist())
    for p in cg.producers:
        if not read.intersection(np.unique(cg.roots(p.ids)).tolist()):
            values.setdefault(p.value, None)
    return list(values)


def activation_scores(cg: ChannelGraph, stats: dict[ir.Value, ActivationStats]) -> np.ndarray:
    """Mean |activation| of each channel where the next layers read it."""
    scores = np.zeros(cg.num_ids)
    for value, st in stats.items():
        _add_normalized(scores, cg.roots(cg.layouts[value].ids), st.mean_abs)
    return scores


def _input_column_energy(consumer: Consumer) -> np.ndarray:
    """Sum of squared weights each input position of a consumer multiplies (over outputs and kernel taps)."""
    w = constant_array(consumer.node.inputs[consumer.weight_index])
    assert w is not None
    return slice_norms(w, consumer.weight_axis, 2)


def energy_scores(cg: ChannelGraph, stats: dict[ir.Value, ActivationStats]) -> np.ndarray:
    """Each channel's share of its consumers' output energy, E[x^2] * ||W[:, c]||^2 (ThiNet's greedy criterion, diagonal)."""
    scores = np.zeros(cg.num_ids)
    for consumer in cg.consumers:
        st = stats.get(consumer.value)
        if st is None:
            continue
        energy = st.mean_sq * _input_column_energy(consumer)
        total = energy.sum()
        if total > 0:
            np.add.at(scores, cg.roots(cg.layouts[consumer.value].ids), energy / total)
    # channels no layer sums over (read only by fixed layers) fall back on their size
    for producer in cg.producers:
        st = stats.get(producer.value)
        roots = cg.roots(producer.ids)
        if st is not None and not scores[roots].any():
            _add_normalized(scores, roots, st.mean_sq)
    return scores


def ranking(groups: Sequence[Group], scores: np.ndarray) -> dict[str, np.ndarray]:
    """Per group key: its prunable roots, least important first (ties keep graph order)."""
    out = {}
    for g in groups:
        order = np.argsort(scores[g.roots], kind="stable")
        out[g.key] = g.roots[order]
    return out
