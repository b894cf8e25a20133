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

import onnx
import onnx_ir as ir

from onnxopt.activations import SEGMENT_SHARE, held_bytes, model_segments, segment_min_bytes, segment_models
from onnxopt.sessions import SessionFactory

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


#: Ops a boundary may not sit next to: the Q/DQ groups ORT fuses, and the activations it folds into the integer
#: kernel before them (Conv/Gemm -> Relu -> QuantizeLinear becomes one QLinearConv/QGemm).
_FUSED_EDGES = frozenset({"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "Relu", "Clip", "LeakyRelu",
                          "Sigmoid", "HardSigmoid", "HardSwish", "Cast"})


def _may_cross(value: ir.Value) -> bool:
    """True for a value a segment boundary may cut: made and read only by ops outside every fused Q/DQ group edge
    (e.g. a transformer's float residual stream), so each side's fusions are what the whole model's are."""
    producer = value.producer()
    if producer is not None and producer.op_type in _FUSED_EDGES:
        return False
    return not any(user.op_type in _FUSED_EDGES for user, _ in value.uses())


def _optimized_graph(model: ir.Model, sessions: SessionFactory) -> onnx.GraphProto:
    with tempfile.TemporaryDirectory(prefix="onnxopt-quant-") as tmp:
        path = Path(tmp) / "optimized.onnx"
        sessions.create(model, optimized_model_path=path)
        return onnx.load(str(path), load_external_data=False).graph


def ort_kernels(model: ir.Model, sessions: SessionFactory) -> dict[str, Any] | None:
    """Counts from ORT's optimized graph: ``integer`` kernels per source op, ``float`` compute ops left,
    ``int_data_movers`` (MaxPool, Resize, Reshape, ... running on integer tensors), and ``conversions``
    (QuantizeLinear/DequantizeLinear/DynamicQuantizeLinear still executed).

    A model whose session would hold more than SEGMENT_SHARE of :func:`onnxopt.activations.segment_min_bytes`
    (what a segment of a large float model holds; an int8 model of a 1 GiB one is past it) is read a segment of
    that size at a time, one session alive at a time, cut only where no fused group is (:func:`_may_cross`): one
    session over a whole large quantized model, beside the pass's own copy of its weights, was the static int8
    pass's peak (ORT copies the weights while it optimizes and saves the graph). Such a model with no such cut (a
    plain MatMul chain, a Q/DQ pair on every edge) is not checked: None, for the caller to say so. Cutting at the
    8-bit tensor between a Q and its DQ kept the integer-kernel counts but moved ORT's Transpose placement, so the
    counts would no longer be the whole model's.
    """
    budget = SEGMENT_SHARE * segment_min_bytes()
    segments = model_segments(model, budget=budget, crosses=_may_cross)
    if segments is None and sum(held_bytes(model)) > budget and next(iter(model.graph.subgraphs()), None) is None:
        return None
    parts = [model] if segments is None else segment_models(model, segments)
    integer: Counter[str] = Counter()
    floats: Counter[str] = Counter()
    conversions: Counter[str] = Counter()
    movers: Counter[str] = Counter()
    kernels: Counter[str] = Counter()
    for graph in (_optimized_graph(part, sessions) for part in parts):
        int_tensors = _int_tensors(graph)  # nothing integer crosses a boundary (_may_cross)
        for node in graph.node:
            op = node.op_type
            if op in INTEGER_KERNELS:
                integer[INTEGER_KERNELS[op]] += 1
                kernels[op] += 1
            elif op in _FLOAT_COMPUTE:
                floats[_FLOAT_COMPUTE[op]] += 1
            elif op in ("QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"):
                conversions[op] += 1
            elif op in _DATA_MOVERS and node.input and node.input[0] in int_tensors:
                movers[op] += 1
    return {"integer": dict(integer), "kernels": dict(kernels), "float": dict(floats),
            "int_data_movers": dict(movers), "conversions": dict(conversions)}
