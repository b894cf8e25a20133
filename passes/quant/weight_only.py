"""int4 weight-only quantization: MatMul/Gemm weights block-wise, activations left float.

Weights [K, N] are quantized symmetrically in blocks of ``block_size`` rows
along K (one scale per block and column) and stored as int4 behind an
opset-21 ``DequantizeLinear(axis=0, block_size=B)``. ONNX Runtime fuses
that DequantizeLinear -> MatMul into ``MatMulNBits`` (block sizes of 16
or more, powers of two). A Gemm is rewritten as MatMul (+ Add of its bias)
with its weight transposed offline, so it gets the same kernel; its bias is
added with Sum, which ORT leaves alone (see below).
"""

from __future__ import annotations

from dataclasses import dataclass

import ml_dtypes
import numpy as np
import onnx_ir as ir

from onnxopt.graph import Names, add_initializer, make_node, replace_node

from onnxopt_passes.quant.scheme import quantize_blockwise

__all__ = ["WeightOnlyStats", "quantize_int4_node"]


@dataclass
class WeightOnlyStats:
    nodes: int = 0
    float_weight_bytes: int = 0
    int_weight_bytes: int = 0


def quantize_int4_node(node: ir.Node, weight: np.ndarray, bias: np.ndarray | None, block_size: int, names: Names,
                       stats: WeightOnlyStats, rounded: tuple[np.ndarray, np.ndarray] | None = None) -> None:
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
    new_nodes = [dq, matmul]
    result = matmul.outputs[0]
    if bias is not None:
        b_value = add_initializer(graph, bias, names.fresh(f"{hint}_bias"))
        # Sum, not Add: ORT's MatMulAddFusion would turn MatMul+Add into a float Gemm before its
        # DequantizeLinear->MatMul -> MatMulNBits fusion sees the pair (measured on ORT 1.32)
        add = make_node("Sum", [result, b_value], names=names, name_hint=f"{hint}_bias_add")
        new_nodes.append(add)
        result = add.outputs[0]
    replace_node(node, new_nodes, result)
    stats.nodes += 1
    stats.float_weight_bytes += weight.nbytes
    stats.int_weight_bytes += (q.size + 1) // 2 + scale.nbytes
