"""SmoothQuant-style migration of activation outliers into the weights, for static int8 transformers.

A LayerNormalization output often has a few channels far larger than the
rest; one per-tensor uint8 scale then rounds the ordinary channels away.
Dividing channel k of the activation by ``s_k`` and multiplying row k of
every weight that reads it by ``s_k`` leaves the float result unchanged
(``(X / s) (s W) = X W``), and with ``s_k = max|X_k|^α / max|W_k|^(1-α)``
(Xiao et al., 2023) the difficulty moves from the activation to the
weights, which are quantized per output channel. The division is folded
into the LayerNormalization's scale and bias, so no op is added.

Only LayerNormalizations over the last axis whose every reader is a
MatMul/Gemm with a constant weight are smoothed; ``max|X_k|`` comes from
the calibration data.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from onnxopt.activations import iter_activations
from onnxopt.data import Dataset
from onnxopt.graph import Names, attribute, consumers, constant_array, replace_input_weight
from onnxopt.progress import Progress
from onnxopt.sessions import SessionFactory

__all__ = ["smooth_layernorms"]


def _reader_weight(node: ir.Node, k: int) -> np.ndarray | None:
    """The [K, N] view of a reader's constant weight, or None when the reader does not qualify."""
    w = constant_array(node.inputs[1]) if len(node.inputs) > 1 else None
    if w is None or w.dtype != np.float32 or w.ndim != 2:
        return None
    if node.op_type == "MatMul":
        return w if w.shape[0] == k else None
    if node.op_type == "Gemm" and not attribute(node, "transA", 0):
        w = w.T if attribute(node, "transB", 0) else w
        return w if w.shape[0] == k else None
    return None


def _candidates(model: ir.Model) -> list[tuple[ir.Node, list[ir.Node], int]]:
    out = []
    for node in model.graph:
        if node.op_type != "LayerNormalization" or node.domain not in ("", "ai.onnx") or int(attribute(node, "axis", -1)) != -1:
            continue
        scale = constant_array(node.inputs[1]) if len(node.inputs) > 1 else None
        y = node.outputs[0]
        if scale is None or scale.ndim != 1 or y.is_graph_output() or not y.name:
            continue
        if len(node.inputs) > 2 and node.inputs[2] is not None and constant_array(node.inputs[2]) is None:
            continue
        readers = consumers(y)
        k = scale.shape[0]
        if readers and all(r.inputs[0] is y and _reader_weight(r, k) is not None for r in readers):
            out.append((node, readers, k))
    return out


def smooth_layernorms(model: ir.Model, dataset: Dataset, sessions: SessionFactory, alpha: float, *,
                      progress: Progress | None = None) -> int:
    """Smooth every qualifying LayerNormalization -> MatMul/Gemm group in place; returns how many."""
    groups = _candidates(model)
    if not groups:
        return 0
    names_ = [ln.outputs[0].name for ln, _, _ in groups]
    amax = {n: np.zeros(k) for n, (_, _, k) in zip(names_, groups)}
    for batch in iter_activations(model, names_, dataset, sessions, progress=progress,
                                  description="quant: SmoothQuant activation maxima"):
        for name in names_:
            y = np.abs(np.asarray(batch[name], np.float64))
            amax[name] = np.maximum(amax[name], y.reshape(-1, y.shape[-1]).max(axis=0))
    names = Names(model)
    for (ln, readers, k), name in zip(groups, names_):
        wmax = np.max([np.abs(_reader_weight(r, k)).max(axis=1) for r in readers], axis=0).astype(np.float64)
        a = amax[name]
        s = np.where((a > 0) & (wmax > 0), a ** alpha / np.maximum(wmax, 1e-12) ** (1 - alpha), 1.0)
        s = np.clip(s, 1e-5, 1e5)
        replace_input_weight(ln, 1, (constant_array(ln.inputs[1]) / s).astype(np.float32), names)
        if len(ln.inputs) > 2 and ln.inputs[2] is not None:
            replace_input_weight(ln, 2, (constant_array(ln.inputs[2]) / s).astype(np.float32), names)
        for r in readers:
            w = constant_array(r.inputs[1])
            trans = r.op_type == "Gemm" and attribute(r, "transB", 0)
            replace_input_weight(r, 1, (w * (s[None, :] if trans else s[:, None])).astype(np.float32), names)
    return len(groups)
