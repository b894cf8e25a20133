"""Float-exact rewrites done before quantization so more of the graph runs in integer kernels.

- HardSigmoid after a Conv/Gemm (squeeze-excite gates in MobileNetV3-style
  nets): ``HardSigmoid(y) = Clip(alpha*y + beta, 0, 1)``, and ``alpha*y + beta``
  folds into the producer's weights and bias. What is left is a Clip(0, 1),
  which ONNX Runtime folds into the quantized output of the integer Conv.
  Without this, each gate costs a dequantize, a float HardSigmoid and a
  quantize.
- Add of a per-channel constant after a Conv/Gemm (exporters that write the
  bias as a separate Add): folded into the producer's bias, so the integer
  Conv adds it instead of a QLinearAdd after it.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from onnxopt.graph import Names, add_initializer, attribute, constant_array, iter_graphs, make_node, only_consumer, replace_input_weight, reroute

__all__ = ["fold_hardsigmoid", "fold_bias_add"]


def _scale_producer(node: ir.Node, alpha: float, beta: float, names: Names) -> bool:
    """Make ``node`` compute alpha*y + beta; False when its weights do not allow it."""
    w = constant_array(node.inputs[1]) if len(node.inputs) > 1 else None
    if w is None or w.dtype != np.float32:
        return False
    if node.op_type == "Conv":
        channels = w.shape[0]
    elif node.op_type == "Gemm" and not attribute(node, "transA", 0) and float(attribute(node, "alpha", 1.0)) == 1.0 \
            and float(attribute(node, "beta", 1.0)) == 1.0:
        channels = w.shape[0] if attribute(node, "transB", 0) else w.shape[1]
    else:
        return False
    has_bias = len(node.inputs) > 2 and node.inputs[2] is not None
    b = constant_array(node.inputs[2]) if has_bias else np.zeros(channels, np.float32)
    if b is None or b.shape != (channels,):
        return False
    replace_input_weight(node, 1, (w * np.float32(alpha)).astype(np.float32), names)
    new_b = (b * np.float32(alpha) + np.float32(beta)).astype(np.float32)
    if has_bias:
        replace_input_weight(node, 2, new_b, names)
    else:
        graph = node.graph
        assert graph is not None
        node.resize_inputs(3)
        node.replace_input_with(2, add_initializer(graph, new_b, names.fresh(f"{node.name or node.op_type}_bias")))
    return True


def fold_hardsigmoid(model: ir.Model) -> int:
    """Fold every HardSigmoid that alone reads a Conv/Gemm output into it, leaving Clip(0, 1); returns the count."""
    names = Names(model)
    count = 0
    for graph in iter_graphs(model):
        for node in [n for n in graph if n.op_type == "HardSigmoid" and n.domain in ("", "ai.onnx")]:
            x = node.inputs[0]
            producer = x.producer() if x is not None else None
            if producer is None or producer.op_type not in ("Conv", "Gemm") or only_consumer(x) is not node:
                continue
            alpha, beta = float(attribute(node, "alpha", 0.2)), float(attribute(node, "beta", 0.5))
            if alpha <= 0 or not _scale_producer(producer, alpha, beta, names):
                continue
            lo = add_initializer(graph, np.array(0.0, np.float32), names.fresh(f"{node.name or 'hardsigmoid'}_min"))
            hi = add_initializer(graph, np.array(1.0, np.float32), names.fresh(f"{node.name or 'hardsigmoid'}_max"))
            clip = make_node("Clip", [x, lo, hi], names=names, name_hint=f"{node.name or 'HardSigmoid'}_clip")
            old = node.outputs[0]
            if old.dtype is not None:
                clip.outputs[0].dtype, clip.outputs[0].shape = old.dtype, old.shape
            graph.insert_after(node, clip)
            reroute(old, clip.outputs[0])
            graph.remove(node, safe=True)
            count += 1
    return count


def _per_channel(array: np.ndarray, channels: int, rank: int, axis: int) -> np.ndarray | None:
    """``array`` as one value per channel when it broadcasts along ``axis`` only (or is a scalar)."""
    if array.size == 1:
        return np.full(channels, array.reshape(-1)[0], np.float32)
    if array.size != channels or array.ndim > rank:
        return None
    shape = (1,) * (rank - array.ndim) + array.shape
    if shape[axis] != channels:
        return None
    return array.reshape(-1).astype(np.float32)


def fold_bias_add(model: ir.Model) -> int:
    """Fold Add(Conv/Gemm output, per-channel constant) into the producer's bias; returns the count."""
    names = Names(model)
    count = 0
    for graph in iter_graphs(model):
        for node in [n for n in graph if n.op_type == "Add" and n.domain in ("", "ai.onnx")]:
            for slot in (1, 0):
                x, c = node.inputs[1 - slot], constant_array(node.inputs[slot])
                producer = x.producer() if x is not None else None
                if c is None or c.dtype != np.float32 or producer is None or only_consumer(x) is not node:
                    continue
                rank = x.shape.rank() if x.shape is not None else None
                if producer.op_type == "Conv" and rank is not None and rank >= 3:
                    w = constant_array(producer.inputs[1])
                    axis = 1
                elif producer.op_type == "Gemm" and rank == 2:
                    w = constant_array(producer.inputs[1])
                    axis = 1
                else:
                    continue
                if w is None or (producer.op_type == "Gemm" and (attribute(producer, "transA", 0) or
                                                                 float(attribute(producer, "beta", 1.0)) != 1.0)):
                    continue
                channels = w.shape[0] if producer.op_type == "Conv" or attribute(producer, "transB", 0) else w.shape[1]
                add = _per_channel(c, channels, rank, axis)
                if add is None or (node.outputs[0].shape is not None and x.shape is not None
                                   and node.outputs[0].shape.rank() != rank):
                    continue
                has_bias = len(producer.inputs) > 2 and producer.inputs[2] is not None
                b = constant_array(producer.inputs[2]) if has_bias else np.zeros(channels, np.float32)
                if b is None or b.shape != (channels,):
                    continue
                if has_bias:
                    replace_input_weight(producer, 2, (b + add).astype(np.float32), names)
                else:
                    producer.resize_inputs(3)
                    producer.replace_input_with(2, add_initializer(graph, add, names.fresh(f"{producer.name or 'conv'}_bias")))
                reroute(node.outputs[0], x)
                graph.remove(node, safe=True)
                count += 1
                break
    return count
