"""Weight-only quantization: int4 MatMul/Gemm weights block-wise, and int8 recurrent and embedding weights.

Weights [K, N] are quantized symmetrically in blocks of ``block_size`` rows
along K (one scale per block and column) and stored as int4 behind an
opset-21 ``DequantizeLinear(axis=0, block_size=B)``. ONNX Runtime fuses
that DequantizeLinear -> MatMul into ``MatMulNBits`` (block sizes of 16
or more, powers of two). A Gemm is rewritten as MatMul (+ Add of its bias)
with its weight transposed offline, so it gets the same kernel; its bias is
added with Sum, which ORT leaves alone (see below).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import ml_dtypes
import numpy as np
import onnx_ir as ir

from onnxopt.graph import Names, add_initializer, attribute, make_node, replace_node

from onnxopt_passes.quant.dynamic import RewriteStats, finish_rewrite
from onnxopt_passes.quant.scheme import quantize, quantize_blockwise, weight_params

__all__ = ["WeightOnlyStats", "quantize_int4_node", "INT8_WEIGHT_SLOTS", "Int8WeightTarget", "int8_weight_targets",
           "quantize_int8_weight", "store_int8_decoded"]


WeightOnlyStats = RewriteStats


def quantize_int4_node(node: ir.Node, weight: np.ndarray, bias: np.ndarray | None, block_size: int, names: Names,
                       stats: RewriteStats, rounded: tuple[np.ndarray, np.ndarray] | None = None) -> None:
    """Replace ``node`` (MatMul, or Gemm given as its [K, N] weight and bias) by DQ(int4) -> MatMul (+ Add).

    ``rounded``: the int4 values and block scales already chosen (GPTQ); else round to nearest.
    """
    graph = node.graph
    assert graph is not None and node.inputs[0] is not None
    hint = node.name or node.op_type
    q, scale = rounded if rounded is not None else quantize_blockwise(weight, block_size, bits=4)
    q = q.astype(ml_dtypes.int4, copy=False)
    q_value = add_initializer(graph, ir.Tensor(q, dtype=ir.DataType.INT4), names.fresh(f"{hint}_weight_int4"))
    s_value = add_initializer(graph, scale, names.fresh(f"{hint}_weight_scale"))
    dq = make_node("DequantizeLinear", [q_value, s_value], {"axis": 0, "block_size": block_size}, names=names,
                   name_hint=f"{hint}_weight_DequantizeLinear")
    matmul = make_node("MatMul", [node.inputs[0], dq.outputs[0]], names=names, name_hint=f"{hint}_MatMul")
    # the bias is added with Sum, not Add: ORT's MatMulAddFusion would turn MatMul+Add into a float Gemm before
    # its DequantizeLinear->MatMul -> MatMulNBits fusion sees the pair (measured on ORT 1.32)
    finish_rewrite(node, [dq, matmul], matmul.outputs[0], bias, names, stats, weight.nbytes,
                   (q.size + 1) // 2 + scale.nbytes, bias_op="Sum")


#: Weights stored int8 behind one DequantizeLinear (weight-only, computed in float): per op, the weight inputs
#: and the per-channel axis. No integer kernel takes them on the CPU provider (DynamicQuantizeLSTM is a contrib op
#: with its own weight layout; a Gather computes nothing), yet they are most of the bytes of recurrent and
#: embedding-heavy models. Recurrent W [dirs, gates·hidden, in] and R [dirs, gates·hidden, hidden] get one scale
#: per gate row (axis 1, shared across directions); an embedding table one per gathered row. Biases stay float.
INT8_WEIGHT_SLOTS: dict[str, tuple[tuple[int, ...], int]] = {
    "LSTM": ((1, 2), 1), "GRU": ((1, 2), 1), "RNN": ((1, 2), 1), "Gather": ((0,), 0),
}
#: Smaller tables (index lists, per-class constants) are not worth a DequantizeLinear.
INT8_WEIGHT_MIN_SIZE = 1024


@dataclass
class Int8WeightTarget:
    """An initializer every reader of which reads it as a weight-only slot, in the graph that owns it."""

    graph: ir.Graph
    value: ir.Value
    axis: int | None
    readers: list[ir.Node]


def int8_weight_targets(model: ir.Model, excluded: Mapping[str, str]) -> tuple[list[Int8WeightTarget], list[tuple[str, str]]]:
    """Weights of LSTM/GRU/RNN and Gather tables (any graph, outer-scope readers included, read directly or through
    ops that only move values, such as an exporter's gate-reordering Slice/Concat), and (label, why) skips."""
    from onnxopt.graph import is_weight, iter_graphs, weight_reads

    targets: list[Int8WeightTarget] = []
    skipped: list[tuple[str, str]] = []
    for graph in iter_graphs(model):
        for value in list(graph.initializers.values()):
            if not is_weight(value) or value.const_value is None:
                continue
            reads = weight_reads(value)
            slots = [read for read in reads
                     if read.node.domain in ("", "ai.onnx") and read.node.op_type in INT8_WEIGHT_SLOTS
                     and read.index in INT8_WEIGHT_SLOTS[read.node.op_type][0]]
            if not slots:
                continue
            label = f"{slots[0].node.op_type} weight {value.name}"
            if value.const_value.size < INT8_WEIGHT_MIN_SIZE or value.dtype is None or not value.dtype.is_floating_point():
                continue  # index tables, small constants
            if value.dtype != ir.DataType.FLOAT:
                skipped.append((label, f"{value.dtype.name.lower()} weight: weight-only int8 takes float32 weights"))
                continue
            others = sorted({read.node.op_type for read in reads if read not in slots})
            if others:
                skipped.append((label, f"also read by {', '.join(others)}: stored once, it would stop being a constant for them"))
                continue
            reasons = [excluded[read.node.name] for read in slots if read.node.name in excluded]
            if reasons:
                skipped.append((label, f"a reader is kept float: {reasons[0]}"))
                continue
            if value.is_graph_output():
                skipped.append((label, "also a graph output"))
                continue
            axes = set()
            for read in slots:
                axis: int | None = INT8_WEIGHT_SLOTS[read.node.op_type][1]
                if read.rank is None or read.rank < 2:
                    axis = None
                elif read.node.op_type == "Gather":
                    axis = int(attribute(read.node, "axis", 0)) % read.rank
                axes.add(read.source_axis(axis))
            targets.append(Int8WeightTarget(graph, value, axes.pop() if len(axes) == 1 else None,
                                            list({id(read.node): read.node for read in slots}.values())))
    return targets, skipped


def quantize_int8_weight(target: Int8WeightTarget, per_channel: bool, names: Names, stats: WeightOnlyStats) -> None:
    """Store the weight int8 (symmetric) behind one DequantizeLinear in its own graph; every reader reads its output."""
    from onnxopt.graph import reroute

    graph, value = target.graph, target.value
    assert value.const_value is not None
    weight = value.const_value.numpy()
    axis = target.axis if per_channel else None
    scale = weight_params(weight, axis)
    q = quantize(weight, scale, 0, "int8", axis)
    name = str(value.name)
    q_value = add_initializer(graph, q, names.fresh(f"{name}_int8"))
    s_value = add_initializer(graph, scale, names.fresh(f"{name}_scale"))
    z_value = add_initializer(graph, np.zeros(scale.shape, np.int8), names.fresh(f"{name}_zero_point"))
    dq = make_node("DequantizeLinear", [q_value, s_value, z_value], {"axis": axis} if axis is not None else None,
                   names=names, name_hint=f"{name}_DequantizeLinear")
    graph.insert_before(graph.node(0), [dq])
    out = dq.outputs[0]
    out.dtype, out.shape = value.dtype, value.shape
    reroute(value, out)  # readers in subgraphs (outer-scope weights of If/Loop/Scan bodies) included
    del graph.initializers[name]
    out.name = name  # readers still read the weight's name
    stats.nodes += 1
    stats.float_weight_bytes += weight.nbytes
    stats.int_weight_bytes += q.nbytes + scale.nbytes


def store_int8_decoded(model: ir.Model, node_names: frozenset[str], pc: Any, names: Names,
                       stats: WeightOnlyStats, *, int4_grid: bool = False) -> list[ir.Node]:
    """Store the constant weight of each named Conv/MatMul/Gemm int8 (symmetric, per output channel when
    ``pc.per_channel``), decoded back to float by ``Mul(Cast(q), scale)``; returns the nodes changed.
    ``int4_grid`` (opset 21): a weight already on a 4-bit grid per channel (``cluster.init=grid``) is stored as
    its int4 levels and grid steps instead, exactly (ORT folds a Cast from int4 the same way).

    Why Cast and Mul, not DequantizeLinear: ONNX Runtime's constant folding leaves every DequantizeLinear alone
    (its QDQ fusions need them), so a DQ before a float Conv runs at every inference and blocks the NCHWc Conv
    fusions (measured 4.2x the fp32 latency on the MobileNetV3-style test net); Cast and Mul of initializers fold
    when the session loads, so the node computes in float at fp32's speed while the file keeps the int8 size.
    """
    from onnxopt_passes.quant.grid import grid_levels
    from onnxopt_passes.quant.handlers import place

    changed = []
    for node in [n for n in model.graph if n.name in node_names and n.op_type in ("Conv", "MatMul", "Gemm")]:
        placed = place(node, pc)
        if isinstance(placed, str) or placed[1].weight is None:
            continue
        value = node.inputs[placed[1].weight]
        if (value is None or value.const_value is None or not value.is_initializer() or value.dtype != ir.DataType.FLOAT
                or value.is_graph_output() or len(list(value.uses())) != 1 or value.const_value.size < 16):
            continue  # shared, computed or tiny weights stay as they are
        weight = value.const_value.numpy()
        axis = placed[1].weight_axis if pc.per_channel else None
        step = grid_levels(weight, axis) if int4_grid else None
        scale = step if step is not None else weight_params(weight, axis)
        q = quantize(weight, scale, 0, "int8", axis)
        if axis is not None:  # broadcast shape for the Mul: the scale along the channel axis
            scale = scale.reshape([-1 if i == axis % weight.ndim else 1 for i in range(weight.ndim)])
        hint = str(value.name)
        if step is not None:
            q_value = add_initializer(model.graph, ir.Tensor(q.astype(ml_dtypes.int4), dtype=ir.DataType.INT4),
                                      names.fresh(f"{hint}_int4"))
        else:
            q_value = add_initializer(model.graph, q, names.fresh(f"{hint}_int8"))
        s_value = add_initializer(model.graph, scale, names.fresh(f"{hint}_scale"))
        cast = make_node("Cast", [q_value], {"to": ir.DataType.FLOAT}, names=names, name_hint=f"{hint}_decode_cast")
        mul = make_node("Mul", [cast.outputs[0], s_value], names=names, name_hint=f"{hint}_decode")
        model.graph.insert_before(node, [cast, mul])
        mul.outputs[0].dtype, mul.outputs[0].shape = value.dtype, value.shape
        node.replace_input_with(placed[1].weight, mul.outputs[0])
        stats.nodes += 1
        stats.float_weight_bytes += weight.nbytes
        stats.int_weight_bytes += ((q.size + 1) // 2 if step is not None else q.nbytes) + scale.nbytes
        changed.append(node)
    return changed
