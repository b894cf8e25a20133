"""Empirical bias correction: fold each quantized layer's mean output error, per channel, into its bias.

Rounding int8 weights shifts a layer's output mean a little in each
channel: ``(Ŵ - W) · E[x]``, the rounding errors of a channel's weights
times the mean of its inputs, and the shifts add up through the network.
For every quantized Conv/Gemm, ``E[x]`` per input channel is measured on
the calibration data, the shift computed from the weight it really got
(its DequantizeLinear), and subtracted from the float bias before the model
is quantized again. Only each layer's own weight error is corrected, so
the layers can be corrected all at once without counting an upstream
layer's error twice.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx_ir as ir

from onnxopt.activations import iter_activations
from onnxopt.data import Dataset
from onnxopt.graph import Names, constant_array, replace_input_weight
from onnxopt.progress import Progress
from onnxopt.sessions import SessionFactory

__all__ = ["channel_means", "bias_corrections", "apply_corrections"]


def channel_means(model: ir.Model, names: Sequence[str], dataset: Dataset, sessions: SessionFactory, *,
                  progress: Progress | None = None) -> dict[str, np.ndarray]:
    """Mean of each named tensor per channel (axis 1), over the whole dataset, streamed batch by batch."""
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}
    for batch in iter_activations(model, names, dataset, sessions, progress=progress,
                                  description="quant: bias correction"):
        for name in names:
            y = np.asarray(batch[name], np.float64)
            if y.ndim < 2:
                continue
            axes = tuple(i for i in range(y.ndim) if i != 1)
            sums[name] = sums.get(name, 0) + y.sum(axis=axes)
            counts[name] = counts.get(name, 0) + y.size // y.shape[1]
    return {n: sums[n] / counts[n] for n in sums}


def _dequantized_weight(node: ir.Node) -> np.ndarray | None:
    """The float weight the quantized ``node`` really uses: its weight input's DequantizeLinear, evaluated."""
    dq = node.inputs[1].producer() if len(node.inputs) > 1 and node.inputs[1] is not None else None
    if dq is None or dq.op_type != "DequantizeLinear":
        return None
    q, scale = constant_array(dq.inputs[0]), constant_array(dq.inputs[1])
    zero = constant_array(dq.inputs[2]) if len(dq.inputs) > 2 and dq.inputs[2] is not None else None
    if q is None or scale is None:
        return None
    axis = int(dq.attributes["axis"].value) if "axis" in dq.attributes else 1
    shape = [1] * q.ndim
    if scale.ndim == 1:
        shape[axis % q.ndim] = scale.shape[0]
    z = np.zeros(1) if zero is None else zero.astype(np.float64).reshape(shape if zero.ndim == 1 else ())
    return ((q.astype(np.float64) - z) * scale.astype(np.float64).reshape(shape if scale.ndim == 1 else ()))


def _shift(node: ir.Node, delta: np.ndarray, x_mean: np.ndarray) -> np.ndarray | None:
    """Per output channel, ``delta`` (quantized - float weight) applied to the mean input."""
    if node.op_type == "Conv":
        groups = int(node.attributes["group"].value) if "group" in node.attributes else 1
        cout, cin_g = delta.shape[0], delta.shape[1]
        if x_mean.shape != (cin_g * groups,):
            return None
        per_in = delta.reshape(cout, cin_g, -1).sum(axis=2)  # [Cout, Cin/g]: padding edges ignored
        x_g = x_mean.reshape(groups, cin_g)[np.arange(cout) // (cout // groups)]  # each output's input group
        return (per_in * x_g).sum(axis=1)
    trans_b = "transB" in node.attributes and int(node.attributes["transB"].value)
    w = delta.T if trans_b else delta  # [K, N]
    if x_mean.shape != (w.shape[0],):
        return None
    return x_mean @ w


def bias_corrections(prepared: ir.Model, quantized: ir.Model, layers: Sequence[ir.Node], dataset: Dataset,
                     sessions: SessionFactory, *, progress: Progress | None = None) -> dict[str, np.ndarray]:
    """Node name -> per-channel mean output shift that each layer's own weight rounding causes,
    ``(Ŵ - W) · E[x]`` with ``E[x]`` the layer's mean input per channel on ``dataset`` (float model)."""
    by_name = {n.name: n for n in quantized.graph if n.name}
    inputs = {node.name or "": node.inputs[0].name for node in layers if node.inputs[0] is not None and node.inputs[0].name}
    means = channel_means(prepared, sorted(set(inputs.values())), dataset, sessions, progress=progress)
    out: dict[str, np.ndarray] = {}
    for node in layers:
        q_node, x_name = by_name.get(node.name), inputs.get(node.name or "")
        w = constant_array(node.inputs[1])
        w_hat = _dequantized_weight(q_node) if q_node is not None else None
        if w is None or w_hat is None or w_hat.shape != w.shape or x_name not in means:
            continue
        shift = _shift(node, w_hat - w.astype(np.float64), means[x_name])
        if shift is not None:
            out[node.name or ""] = shift
    return out


def apply_corrections(prepared: ir.Model, layers: Sequence[ir.Node], corrections: dict[str, np.ndarray]) -> int:
    """Subtract each correction from its layer's bias (a fresh initializer; one is added where there was none)."""
    names = Names(prepared)
    count = 0
    for node in layers:
        shift = corrections.get(node.name or "")
        if shift is None or not np.all(np.isfinite(shift)):
            continue
        has_bias = len(node.inputs) > 2 and node.inputs[2] is not None
        bias = constant_array(node.inputs[2]) if has_bias else np.zeros(shift.shape, np.float32)
        if bias is None or bias.shape != shift.shape:
            continue
        new = (bias.astype(np.float64) - shift).astype(np.float32)
        replace_input_weight(node, 2, new, names, hint=None if has_bias else f"{node.name or node.op_type}_bias")
        count += 1
    return count
