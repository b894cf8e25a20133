"""Dynamic quantization for MatMul-heavy models: int8 weights offline, activations quantized at run time.

Each MatMul/Gemm with a constant weight becomes
``DynamicQuantizeLinear(x) -> MatMulInteger(xq, Wq) -> Cast -> Mul(x_scale * w_scale)`` (+ Add bias),
the pattern ONNX Runtime fuses into ``DynamicQuantizeMatMul`` (one kernel,
per-column weight scales). Activation ranges come from each input at run
time, so no calibration data is needed and outliers never clip.

DynamicQuantizeLinear's activations are uint8, so on x86 CPUs without VNNI
the u8 x s8 kernel adds adjacent weight products in int16 and can saturate:
the weight scales are widened as static int8's are (:mod:`saturation`).

Conv is never quantized dynamically: ConvInteger runs 3-8x slower than the
float Conv on ONNX Runtime's CPU provider (measured), so it stays float.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from onnxopt.graph import Names, add_initializer, attribute, constant_array, make_node, replace_node

from onnxopt_passes.quant.saturation import check_weight, layer_record, pair_safe_scale
from onnxopt_passes.quant.scheme import quantize, weight_params

__all__ = ["DynamicStats", "RewriteStats", "finish_rewrite", "dynamic_target", "quantize_dynamic_node", "CONV_REASON"]

CONV_REASON = "never dynamic for Conv: ConvInteger is 3-8x slower than the float Conv on ONNX Runtime's CPU provider"


@dataclass
class RewriteStats:
    """What a node-by-node weight rewrite (dynamic int8, int4 weight-only) did."""

    nodes: int = 0
    float_weight_bytes: int = 0
    int_weight_bytes: int = 0
    #: layers whose u8 x s8 pairs can saturate int16 on CPUs without VNNI (dynamic int8 only)
    saturation: list[dict[str, object]] = field(default_factory=list)


DynamicStats = RewriteStats


def finish_rewrite(node: ir.Node, new_nodes: list[ir.Node], result: ir.Value, bias: np.ndarray | None, names: Names,
                   stats: RewriteStats, float_bytes: int, int_bytes: int, bias_op: str = "Add") -> None:
    """The shared tail of a MatMul/Gemm rewrite: add the bias after ``result`` (with ``bias_op``), put the new
    nodes in place of ``node``, count it."""
    graph = node.graph
    assert graph is not None
    if bias is not None:
        hint = node.name or node.op_type
        b_value = add_initializer(graph, bias, names.fresh(f"{hint}_bias"))
        add = make_node(bias_op, [result, b_value], names=names, name_hint=f"{hint}_bias_add")
        new_nodes.append(add)
        result = add.outputs[0]
    replace_node(node, new_nodes, result)
    stats.nodes += 1
    stats.float_weight_bytes += float_bytes
    stats.int_weight_bytes += int_bytes


def dynamic_target(node: ir.Node) -> tuple[np.ndarray, np.ndarray | None] | str:
    """The [K, N] weight (and bias) of a MatMul/Gemm that can be quantized dynamically, or why not."""
    if node.inputs[0] is None or node.inputs[0].dtype not in (ir.DataType.FLOAT, None):
        return "input is not float32"
    w = constant_array(node.inputs[1]) if len(node.inputs) > 1 else None
    if w is None or w.dtype != np.float32 or w.ndim != 2:
        return "weight is not a constant float32 matrix"
    if node.op_type == "MatMul":
        return w, None
    if attribute(node, "transA", 0) or float(attribute(node, "alpha", 1.0)) != 1.0:
        return "Gemm with transA or alpha != 1"
    if attribute(node, "transB", 0):
        w = w.T
    bias = None
    if len(node.inputs) > 2 and node.inputs[2] is not None:
        bias = constant_array(node.inputs[2])
        if bias is None or bias.size not in (1, w.shape[1]):
            return "Gemm bias is not a constant vector"
        bias = (bias.reshape(-1) * float(attribute(node, "beta", 1.0))).astype(np.float32)
    return w, bias


def quantize_dynamic_node(node: ir.Node, weight: np.ndarray, bias: np.ndarray | None, per_channel: bool, names: Names,
                          cache: dict[int, ir.Node], stats: DynamicStats, saturation: str = "fix") -> None:
    """Replace ``node`` by the dynamic-quantization pattern (sharing one DynamicQuantizeLinear per input).

    ``saturation`` as quant's option: fix widens the weight scales so that no int16 pair can saturate, report
    only records the layers where one can, off does neither."""
    graph = node.graph
    assert graph is not None
    x = node.inputs[0]
    assert x is not None
    hint = node.name or node.op_type
    dql = cache.get(id(x))
    if dql is None:
        dql = make_node("DynamicQuantizeLinear", [x], names=names, num_outputs=3, name_hint=f"{x.name}_DynamicQuantizeLinear")
        graph.insert_before(node, [dql])  # the first reader of x: its new nodes go right here
        cache[id(x)] = dql
    axis = 1 if per_channel else None
    plain = scale = weight_params(weight, axis)
    rows = [weight.T]  # [K, N]: each output column is one reduction over K
    if saturation == "fix":
        scale = pair_safe_scale(rows, plain)
    # the plain-scale check before w_q exists: one int8 copy of the weight's size at a time
    before = check_weight([quantize(weight, plain, 0, "int8", axis).T]) if saturation != "off" and scale is not plain else None
    w_q = quantize(weight, scale, 0, "int8", axis)
    if saturation != "off":
        after = check_weight([w_q.T])
        before = after if before is None else before
        entry = layer_record(hint, node.op_type, before, after, float(np.max(scale / plain)))
        if entry is not None:
            stats.saturation.append(entry)
    w_value = add_initializer(graph, w_q, names.fresh(f"{hint}_weight_quantized"))
    zp_value = add_initializer(graph, np.zeros(scale.shape, np.int8), names.fresh(f"{hint}_weight_zero_point"))
    s_value = add_initializer(graph, scale, names.fresh(f"{hint}_weight_scale"))
    mmi = make_node("MatMulInteger", [dql.outputs[0], w_value, dql.outputs[2], zp_value], names=names,
                    name_hint=f"{hint}_MatMulInteger")
    cast = make_node("Cast", [mmi.outputs[0]], {"to": ir.DataType.FLOAT}, names=names, name_hint=f"{hint}_Cast")
    scales = make_node("Mul", [dql.outputs[1], s_value], names=names, name_hint=f"{hint}_scales")
    out = make_node("Mul", [cast.outputs[0], scales.outputs[0]], names=names, name_hint=f"{hint}_rescale")
    finish_rewrite(node, [mmi, cast, scales, out], out.outputs[0], bias, names, stats, weight.nbytes, w_q.nbytes)
