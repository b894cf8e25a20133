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

from onnxopt.graph import Names, add_initializer, make_node

from onnxopt_passes.quant.dynamic import RewriteStats, finish_rewrite
from onnxopt_passes.quant.scheme import quantize_blockwise

__all__ = ["WeightOnlyStats", "quantize_int4_node"]


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
