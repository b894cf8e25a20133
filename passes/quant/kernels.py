"""What ONNX Runtime made of a quantized graph: integer kernels per op type, read from its optimized graph.

A QDQ group only pays when ONNX Runtime fuses it into an integer kernel.
This module builds a session with ``optimized_model_filepath`` set, reads
back the graph ORT will run, and counts the integer kernels per source op,
the float compute ops left, and the Q/DQ conversions still executed.
"""

from __future__ import annotations

import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir

from onnxopt.io import has_external_data, tensor_bytes
from onnxopt.sessions import LARGE_MODEL_BYTES, SessionFactory

__all__ = ["INTEGER_KERNELS", "ort_kernels"]

#: Integer kernel (as ORT names it in its optimized graph) -> the source op it runs.
INTEGER_KERNELS: dict[str, str] = {
    "QLinearConv": "Conv",
    "NhwcQLinearConv": "Conv",
    "QLinearMatMul": "MatMul",
    "MatMulIntegerToFloat": "MatMul",
    "DynamicQuantizeMatMul": "MatMul",
    "MatMulInteger": "MatMul",
    "MatMulNBits": "MatMul",
    "QGemm": "Gemm",
    "QLinearAdd": "Add",
    "QLinearMul": "Mul",
    "QLinearConcat": "Concat",
    "QLinearAveragePool": "AveragePool",
    "QLinearGlobalAveragePool": "GlobalAveragePool",
    "QLinearSigmoid": "Sigmoid",
    "QLinearLeakyRelu": "LeakyRelu",
    "QLinearSoftmax": "Softmax",
    "QLinearWhere": "Where",
}

#: Float compute ops (and ORT's fused float variants) whose count shows what stayed float.
_FLOAT_COMPUTE = {"Conv": "Conv", "FusedConv": "Conv", "MatMul": "MatMul", "FusedMatMul": "MatMul", "Gemm": "Gemm",
                  "FusedGemm": "Gemm", "ConvTranspose": "ConvTranspose"}
#: Ops that move data and run on integer tensors when ORT drops the QDQ around them.
_DATA_MOVERS = {"MaxPool", "Resize", "Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze", "Gather", "Slice",
                "Expand", "Tile", "ReorderInput", "ReorderOutput"}
_INT_OUTPUT_OPS = {"QuantizeLinear", "DynamicQuantizeLinear", *(k for k, v in INTEGER_KERNELS.items()
                                                                if k not in ("MatMulIntegerToFloat", "DynamicQuantizeMatMul",
                                                                             "MatMulNBits", "MatMulInteger", "QGemm"))}


def _int_tensors(graph: onnx.GraphProto) -> set[str]:
    """Names of tensors holding integer-quantized data in ORT's optimized graph."""
    out: set[str] = set()
    for node in graph.node:  # the optimized graph is topologically sorted
        if node.op_type in _INT_OUTPUT_OPS or (node.op_type == "QGemm" and len(node.input) > 7 and node.input[7]):
            out.add(node.output[0])
        elif node.op_type in _DATA_MOVERS and node.input and node.input[0] in out:
            out.update(node.output[:1])
    return out


#: Weights from this many bytes on are zero-filled stand-ins in a large model's kernel check (:func:`_stand_ins`).
STAND_IN_BYTES = 2**16
#: Inputs that hold scales or zero points (ORT's fusions read their values): op -> first such input index.
_SCALE_INPUTS = {"QuantizeLinear": 1, "DequantizeLinear": 1, "MatMulNBits": 2}


def _stand_ins(model: ir.Model) -> ir.Model:
    """A clone of ``model`` whose large weights are zero-filled arrays of the same type and shape.

    Which integer kernels ORT fuses depends on the graph, the types, the shapes and the scales and zero
    points, not on the weights' values (checked against the real weights on the digits models, static, dynamic
    and int4: tests/test_quant_kernel_check.py). ``np.zeros`` of that size is mapped lazily by the OS and reads
    as the shared zero page, so the check's session costs what ORT allocates, not a second model. Scales, zero
    points, small tensors and types numpy cannot hand ORT as they are keep their real values.
    """
    clone = model.clone()  # shares the tensors; only the clone's values are pointed at stand-ins
    for value in clone.graph.initializers.values():
        tensor = value.const_value
        if tensor is None or tensor.nbytes < STAND_IN_BYTES or tensor.dtype.bitwidth < 8 or value.is_graph_input():
            continue
        if any(index >= _SCALE_INPUTS.get(user.op_type, 1 << 30) for user, index in value.uses()):
            continue
        try:
            dtype = np.dtype(tensor.dtype.numpy())
        except (TypeError, ValueError):
            continue
        if dtype.kind not in "biuf" or dtype.type.__module__ != "numpy":
            continue
        value.const_value = ir.Tensor(np.zeros(tensor.shape.numpy(), dtype=dtype), dtype=tensor.dtype, name=tensor.name)
    return clone


def ort_kernels(model: ir.Model, sessions: SessionFactory, *, stand_ins: bool | None = None) -> dict[str, Any]:
    """Counts from ORT's optimized graph: ``integer`` kernels per source op, ``float`` compute ops left,
    ``int_data_movers`` (MaxPool, Resize, Reshape, ... running on integer tensors), and ``conversions``
    (QuantizeLinear/DequantizeLinear/DynamicQuantizeLinear still executed).

    ``stand_ins`` (default: for models of LARGE_MODEL_BYTES of weights or more, or with external data)
    builds the session on zero-filled stand-ins of the weights (:func:`_stand_ins`): the session over the real
    quantized weights, beside the pass's own copy of them, was the static int8 pass's peak on large models.
    """
    if stand_ins is None:
        stand_ins = has_external_data(model) or tensor_bytes(model) >= LARGE_MODEL_BYTES
    with tempfile.TemporaryDirectory(prefix="onnxopt-quant-") as tmp:
        path = Path(tmp) / "optimized.onnx"
        sessions.create(_stand_ins(model) if stand_ins else model, optimized_model_path=path)
        graph = onnx.load(str(path), load_external_data=False).graph
    integer: Counter[str] = Counter()
    floats: Counter[str] = Counter()
    conversions: Counter[str] = Counter()
    movers: Counter[str] = Counter()
    int_tensors = _int_tensors(graph)
    for node in graph.node:
        op = node.op_type
        if op in INTEGER_KERNELS:
            integer[INTEGER_KERNELS[op]] += 1
        elif op in _FLOAT_COMPUTE:
            floats[_FLOAT_COMPUTE[op]] += 1
        elif op in ("QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"):
            conversions[op] += 1
        elif op in _DATA_MOVERS and node.input and node.input[0] in int_tensors:
            movers[op] += 1
    kernels: Counter[str] = Counter(n.op_type for n in graph.node if n.op_type in INTEGER_KERNELS)
    return {"integer": dict(integer), "kernels": dict(kernels), "float": dict(floats),
            "int_data_movers": dict(movers), "conversions": dict(conversions)}
