"""Data-free restore of per-channel statistics after pruning (``prune.restore=stats``).

Removing channels takes their share out of every reading layer's output, and
the BatchNorms after (folded or not) still normalise with the dense model's
statistics: outputs shrink, the activations move along their curves, and the
error compounds over a thin net's many blocks. Re-estimating each layer's
output mean and standard deviation on data undoes most of it; this module
estimates them without data.

Per-channel mean and variance are propagated analytically from the inputs
(zero mean, unit variance per channel: nothing else is known) through the
dense model: a Conv/Gemm/MatMul maps mean to ``W·mean + b`` and variance to
``Σ W² var`` (channels taken as independent), a BatchNorm is affine, an
elementwise activation (ReLU, HardSwish, HardSigmoid, Sigmoid, ...) is
integrated under a Gaussian with a few Gauss-Hermite points, a product of two
tensors (a squeeze-excite gate) uses independence, pooling keeps the figures.
The same is done with the removed channels held at zero (pruning equals
masking), and each layer that reads removed channels gets its kept outputs
rescaled and shifted, ``y' = a·y + b``, so that its estimated mean and
standard deviation are the dense model's again; the layers after it then see
the dense statistics until the next reader. ``a`` and ``b`` are folded into
the reader's weight rows and bias. Tensors whose statistics cannot be followed
(an op not listed here) end the propagation along their path: readers there
are left as they are.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np
import onnx_ir as ir

from onnxopt.graph import Names, attribute, constant_array, replace_input_weight

from .groups import ChannelGraph
from .surgery import kept_mask

__all__ = ["restore_statistics", "propagate_statistics", "gaussian_moments"]

Stats = tuple[np.ndarray, np.ndarray]  # per-channel mean, variance (float64)

#: Gauss-Hermite points for E[f(X)], X ~ N(mean, var): exact for polynomials up to degree 2·POINTS - 1
POINTS = 16
_T, _W = np.polynomial.hermite.hermgauss(POINTS)
#: Scale factors are kept within these bounds: a reader that lost nearly all its input energy is not blown up.
SCALE_RANGE = (1.0 / 3.0, 3.0)
ANCHOR_BN = False


def _hard_sigmoid(alpha: float, beta: float) -> Callable[[np.ndarray], np.ndarray]:
    return lambda x: np.clip(alpha * x + beta, 0.0, 1.0)


def _activation(node: ir.Node) -> Callable[[np.ndarray], np.ndarray] | None:
    op = node.op_type
    if op == "Relu":
        return lambda x: np.maximum(x, 0.0)
    if op == "HardSigmoid":
        return _hard_sigmoid(float(attribute(node, "alpha", 0.2)), float(attribute(node, "beta", 0.5)))
    if op == "HardSwish":
        return lambda x: x * np.clip(x / 6.0 + 0.5, 0.0, 1.0)
    if op == "Sigmoid":
        return lambda x: 1.0 / (1.0 + np.exp(-np.clip(x, -60, 60)))
    if op == "Tanh":
        return np.tanh
    if op == "LeakyRelu":
        alpha = float(attribute(node, "alpha", 0.01))
        return lambda x: np.where(x > 0, x, alpha * x)
    if op == "Clip":
        lo = constant_array(node.inputs[1]) if len(node.inputs) > 1 and node.inputs[1] is not None else None
        hi = constant_array(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2] is not None else None
        if (len(node.inputs) > 1 and node.inputs[1] is not None and lo is None) or \
                (len(node.inputs) > 2 and node.inputs[2] is not None and hi is None):
            return None
        low = -np.inf if lo is None else float(lo)
        high = np.inf if hi is None else float(hi)
        return lambda x: np.clip(x, low, high)
    return None


def gaussian_moments(f: Callable[[np.ndarray], np.ndarray], mean: np.ndarray, var: np.ndarray) -> Stats:
    """Mean and variance of f(X) for X ~ N(mean, var) per channel (Gauss-Hermite, vectorised over channels)."""
    x = mean[:, None] + np.sqrt(2.0 * np.maximum(var, 0.0))[:, None] * _T[None, :]
    y = f(x)
    m = (y * _W).sum(axis=1) / np.sqrt(np.pi)
    m2 = (y * y * _W).sum(axis=1) / np.sqrt(np.pi)
    return m, np.maximum(m2 - m * m, 0.0)


def _rank(value: ir.Value) -> int | None:
    return len(value.shape) if value.shape is not None else None


def _per_channel(array: np.ndarray, channels: int, rank: int) -> np.ndarray | None:
    """A constant operand as one number per channel (axis 1), or None when it varies along another axis."""
    a = np.asarray(array, dtype=np.float64)
    if a.size == 1:
        return np.full(channels, float(a.reshape(-1)[0]))
    if a.ndim > rank:
        return None
    shape = (1,) * (rank - a.ndim) + a.shape
    if rank == 2 and shape in ((1, channels),) or rank >= 3 and shape[1] == channels and all(
            d == 1 for i, d in enumerate(shape) if i != 1):
        return a.reshape(-1)
    return None


def _weighted(node: ir.Node, x: Stats) -> tuple[Stats, np.ndarray, np.ndarray] | None:
    """Output statistics of a Conv/Gemm/MatMul with a constant weight; and its [out, in] mean and energy maps."""
    mean, var = x
    w = constant_array(node.inputs[1]) if len(node.inputs) > 1 else None
    if w is None:
        return None
    w = w.astype(np.float64)
    bias = np.zeros(0)
    if node.op_type == "Conv":
        group = int(attribute(node, "group", 1))
        out, per = w.shape[0], w.shape[1]
        if per * group != len(mean) or out % group:
            return None
        taps = w.reshape(group, out // group, per, -1)
        lin, energy = taps.sum(axis=3), (taps ** 2).sum(axis=3)  # [g, out/g, in/g]; border padding ignored
        m = np.einsum("goi,gi->go", lin, mean.reshape(group, per)).reshape(-1)
        v = np.einsum("goi,gi->go", energy, var.reshape(group, per)).reshape(-1)
        b = constant_array(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2] is not None else None
        if b is not None:
            m = m + b.astype(np.float64).reshape(-1)
        return (m, v), lin, energy
    if node.op_type == "Gemm":
        if int(attribute(node, "transA", 0)):
            return None
        rows = w if int(attribute(node, "transB", 0)) else w.T  # [out, in]
        alpha, beta = float(attribute(node, "alpha", 1.0)), float(attribute(node, "beta", 1.0))
        if rows.shape[1] != len(mean):
            return None
        m, v = alpha * rows @ mean, alpha * alpha * (rows ** 2) @ var
        c = constant_array(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2] is not None else None
        if len(node.inputs) > 2 and node.inputs[2] is not None:
            if c is None:
                return None
            bias = _per_channel(c, len(m), 2)
            if bias is None:
                return None
            m = m + beta * bias
        return (m, v), None, None  # type: ignore[return-value]
    if node.op_type == "MatMul" and w.ndim == 2 and w.shape[0] == len(mean):
        return (mean @ w, var @ (w ** 2)), None, None  # type: ignore[return-value]
    return None


def propagate_statistics(model: ir.Model, cg: ChannelGraph | None = None, keep: np.ndarray | None = None,
                         on_reader: Callable[[ir.Node, Stats], Stats] | None = None,
                         inputs: Mapping[str, Stats] | None = None) -> dict[ir.Value, Stats]:
    """Per-channel (axis 1) mean and variance of every tensor that can be followed, from N(0, 1) inputs.

    With ``cg`` and ``keep``, channels that are removed are held at zero wherever they appear (the pruned model);
    ``on_reader(node, stats)`` may replace a weighted node's output statistics (the restore does).
    """
    stats: dict[ir.Value, Stats] = {}
    for value in model.graph.inputs:
        if value.const_value is None and value.shape is not None and len(value.shape) >= 2 \
                and isinstance(value.shape[1], int):
            c = int(value.shape[1])
            stats[value] = (inputs or {}).get(value.name or "", (np.zeros(c), np.ones(c)))

    def masked(value: ir.Value, s: Stats) -> Stats:
        if cg is None or keep is None or value not in cg.layouts:
            return s
        layout = cg.layouts[value]
        if layout.axis != 1 or len(layout.ids) != len(s[0]):
            return s
        m = kept_mask(cg, keep, value)
        return np.where(m, s[0], 0.0), np.where(m, s[1], 0.0)

    for node in model.graph:
        out = _node_stats(node, stats)
        if out is None:
            continue
        if on_reader is not None and node.op_type in ("Conv", "Gemm", "MatMul"):
            out = on_reader(node, out)
        value = node.outputs[0]
        stats[value] = masked(value, out)
    return stats


def _node_stats(node: ir.Node, stats: Mapping[ir.Value, Stats]) -> Stats | None:
    op = node.op_type
    if node.domain not in ("", "ai.onnx") or not node.outputs or node.outputs[0] is None:
        return None
    inputs = [stats.get(v) if v is not None else None for v in node.inputs]
    x = inputs[0] if inputs else None
    if op in ("Conv", "Gemm", "MatMul"):
        if x is None:
            return None
        found = _weighted(node, x)
        return None if found is None else found[0]
    if x is None:
        if op in ("Add", "Mul") and len(inputs) == 2 and inputs[1] is not None:
            x, inputs = inputs[1], [inputs[1], None]
            node_inputs = [node.inputs[1], node.inputs[0]]
        else:
            return None
    else:
        node_inputs = list(node.inputs)
    mean, var = x
    c = len(mean)
    if op in ("Identity", "Dropout", "GlobalAveragePool", "GlobalMaxPool", "AveragePool", "MaxPool", "Cast"):
        return x
    if op == "ReduceMean":
        return x if int(attribute(node, "keepdims", 1)) else None
    if op in ("Flatten", "Reshape", "Squeeze", "Unsqueeze"):
        out = node.outputs[0]
        if out.shape is not None and len(out.shape) >= 2 and out.shape[1] == c:
            return x
        return None
    if op == "BatchNormalization":
        params = [constant_array(v) for v in node.inputs[1:5]]
        if any(p is None for p in params):
            return None
        gamma, beta, rm, rv = (p.astype(np.float64).reshape(-1) for p in params)  # type: ignore[union-attr]
        scale = gamma / np.sqrt(rv + float(attribute(node, "epsilon", 1e-5)))
        if ANCHOR_BN:
            return beta, gamma * gamma
        return scale * (mean - rm) + beta, scale * scale * var
    f = _activation(node)
    if f is not None:
        return gaussian_moments(f, mean, var)
    if op == "Concat":
        if int(attribute(node, "axis", 0)) != 1 or any(s is None for s in inputs):
            return None
        return np.concatenate([s[0] for s in inputs]), np.concatenate([s[1] for s in inputs])  # type: ignore[index]
    if op in ("Add", "Sub", "Mul", "Div") and len(node_inputs) == 2:
        other = inputs[1]
        if other is not None:
            om, ov = other
            if len(om) != c:
                return None
            if op == "Add":
                return mean + om, var + ov
            if op == "Sub":
                return mean - om, var + ov
            if op == "Mul":  # independent factors (a squeeze-excite gate times its features)
                return mean * om, (var + mean ** 2) * (ov + om ** 2) - (mean * om) ** 2
            return None
        k = constant_array(node_inputs[1])
        rank = _rank(node.outputs[0]) or 4
        per = None if k is None else _per_channel(k, c, rank)
        if per is None:
            return None
        if op == "Add":
            return mean + per, var
        if op == "Sub":
            return mean - per if node_inputs[0] is node.inputs[0] else per - mean, var
        if op == "Mul":
            return mean * per, var * per * per
        if node_inputs[0] is node.inputs[0] and np.all(per != 0):
            return mean / per, var / (per * per)
        return None
    return None


def restore_statistics(model: ir.Model, cg: ChannelGraph, keep: np.ndarray, names: Names, *, mode: str = "scale",
                       inputs: Mapping[str, Stats] | None = None) -> tuple[int, list[str]]:
    """Rescale and shift the kept outputs of every layer that reads removed channels to the dense estimates.

    Changes the weights and biases of ``model`` (the dense model, before surgery); returns the number of layers
    changed and the readers left alone (their statistics could not be followed, or they have no bias to shift).
    """
    readers = {id(c.node) for c in cg.consumers if c.value in cg.layouts and not kept_mask(cg, keep, c.value).all()}
    if not readers:
        return 0, []
    dense = propagate_statistics(model, inputs=inputs)
    plans: list[tuple[ir.Node, np.ndarray, np.ndarray]] = []

    def on_reader(node: ir.Node, pruned: Stats) -> Stats:
        if id(node) not in readers:
            return pruned
        x = dense.get(node.inputs[0])
        found = None if x is None else _weighted(node, x)
        if found is None:
            return pruned
        target = found[0]  # the same estimate from the dense inputs: errors of the estimate cancel in the ratio
        (dm, dv), (pm, pv) = target, pruned
        ok = pv > 1e-12 * np.maximum(dv, 1e-30)
        a = np.where(ok, np.sqrt(np.where(ok, dv, 1.0) / np.where(ok, pv, 1.0)), 1.0)
        a = np.clip(a, *SCALE_RANGE)
        if mode == "shift":
            a = np.ones_like(a)
        b = dm - a * pm
        if mode == "scale":
            b = np.zeros_like(b)
        elif mode == "removed":  # scale about the mean; shift only by what the removed channels added
            b = (1.0 - a) * pm + (dm - pm)
            b = dm - pm

        plans.append((node, a, b))
        return a * pm + b, a * a * pv

    propagate_statistics(model, cg, keep, on_reader, inputs)
    done, left = 0, []
    planned = {id(n) for n, _, _ in plans}
    left = sorted({c.node.name or c.node.op_type for c in cg.consumers if id(c.node) in readers and id(c.node) not in planned})
    for node, a, b in plans:
        if _fold(node, a, b, names):
            done += 1
        else:
            left.append(node.name or node.op_type)
    return done, left


def _fold(node: ir.Node, a: np.ndarray, b: np.ndarray, names: Names) -> bool:
    """y' = a·y + b folded into ``node``'s weight rows and bias; False when it has nowhere to hold the shift."""
    w = constant_array(node.inputs[1])
    if w is None or not (np.isfinite(a).all() and np.isfinite(b).all()):
        return False
    dtype = w.dtype
    label = node.name or node.op_type
    if node.op_type == "Conv":
        new_w = w * a.reshape(-1, *([1] * (w.ndim - 1))).astype(dtype)
        bias = constant_array(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2] is not None else None
        new_b = (a * (0.0 if bias is None else bias.astype(np.float64)) + b).astype(dtype)
        if len(node.inputs) < 3 or node.inputs[2] is None:
            node.resize_inputs(3)
        replace_input_weight(node, 1, new_w.astype(dtype), names, hint=f"{label}_weight")
        replace_input_weight(node, 2, new_b, names, hint=f"{label}_bias")
        return True
    if node.op_type == "Gemm":
        trans_b = int(attribute(node, "transB", 0))
        beta = float(attribute(node, "beta", 1.0))
        c = constant_array(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2] is not None else None
        if beta == 0.0 or (len(node.inputs) > 2 and node.inputs[2] is not None and c is None):
            return False
        new_w = w * (a[:, None] if trans_b else a[None, :]).astype(dtype)
        old = np.zeros(len(a)) if c is None else np.broadcast_to(c.astype(np.float64).reshape(-1), a.shape)
        if len(node.inputs) < 3 or node.inputs[2] is None:
            node.resize_inputs(3)
        replace_input_weight(node, 1, new_w.astype(dtype), names, hint=f"{label}_weight")
        replace_input_weight(node, 2, (a * old + b / beta).astype(dtype), names, hint=f"{label}_bias")
        return True
    if node.op_type == "MatMul":
        from .compensate import _following_bias

        found = _following_bias(node)
        bias = constant_array(found[0].inputs[found[1]]) if found is not None else None
        if found is None or bias is None or bias.size != len(a):
            return False
        replace_input_weight(node, 1, (w * a[None, :].astype(dtype)).astype(dtype), names, hint=f"{label}_weight")
        # the bias is added after the MatMul (whose statistics the plan is for): it only takes the shift
        new_b = (bias.astype(np.float64).reshape(-1) + b).astype(bias.dtype).reshape(bias.shape)
        replace_input_weight(found[0], found[1], new_b, names, hint=f"{label}_bias")
        return True
    return False
