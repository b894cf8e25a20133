"""Output-aware placement: no graph output, and no part of one, is squeezed through a shared 8-bit scale.

A quantized tensor has 256 levels over its calibrated range. When that
tensor is (or reaches unchanged) a graph output, every consumer of the
model reads those levels; when a Concat joins parts of very different
ranges into one output (a detector's boxes in pixels next to its class
scores in [0, 1]), one shared scale wipes out the small part entirely.

So the nodes whose quantized output would reach a graph output through
ops that only move or join data (Reshape, Transpose, Concat, ...), or
through a score head's Sigmoid/Softmax or a shift/scale by a constant
(whose output is an 8-bit input's 256 levels, mapped), stay float. Each part then keeps whatever scale its own producer had (a box
Conv and a score Conv are quantized separately, their outputs dequantized
before the join): outputs are float, and split by row group.
MatMul/Gemm anchors are not affected: their integer kernels give float
output directly.
"""

from __future__ import annotations

import onnx_ir as ir

from onnxopt.graph import consumers, is_weight

from onnxopt_passes.quant.handlers import ABSORBED_ACTIVATIONS, RULES, PlaceContext, place

__all__ = ["output_bound_values", "output_exclusions"]

#: Ops whose output is their input's values moved or joined (what reaches the output is what came in).
_TRANSPARENT = {op for op, rule in RULES.items() if rule.role == "passthrough"} | {"Concat", "Identity"}
#: Elementwise maps whose output keeps the resolution of their input (score heads end in them).
_SQUASHING = {"Sigmoid", "Softmax", "LogSoftmax", "Tanh"}
_AFFINE = {"Add", "Sub", "Mul", "Div"}


def output_bound_values(graph: ir.Graph) -> dict[int, str]:
    """id of every value that is a graph output or reaches one through data-moving ops -> the output's name."""
    bound: dict[int, str] = {}
    stack = [(v, v.name or "") for v in graph.outputs]
    while stack:
        value, out = stack.pop()
        if id(value) in bound:
            continue
        bound[id(value)] = out
        producer = value.producer()
        if producer is None or producer.domain not in ("", "ai.onnx"):
            continue
        if producer.op_type in _TRANSPARENT:
            slots = range(len(producer.inputs)) if producer.op_type == "Concat" else (0,)
        elif producer.op_type in _SQUASHING or (producer.op_type in _AFFINE and len(producer.inputs) == 2 and
                                                 sum(is_weight(v) for v in producer.inputs) == 1):
            # a score head's Sigmoid/Softmax, or a shift/scale by a constant: the output is still a direct
            # function of its input, so an 8-bit input would be an 8-bit output
            slots = tuple(i for i, v in enumerate(producer.inputs) if v is not None and not is_weight(v))
        elif producer.op_type in ABSORBED_ACTIVATIONS:
            slots = (0,)  # a Relu/Clip folded into the kernel before it: that kernel's output is the output
        else:
            continue
        for slot in slots:
            v = producer.inputs[slot] if slot < len(producer.inputs) else None
            if v is not None and not is_weight(v):
                stack.append((v, out))
    return bound


def output_exclusions(model: ir.Model, pc: PlaceContext) -> dict[str, str]:
    """node name -> reason, for the quantizable nodes of the main graph whose quantized output would reach a
    graph output (MatMul/Gemm excepted: they can emit float)."""
    bound = output_bound_values(model.graph)
    out: dict[str, str] = {}
    for node in model.graph:
        placed = place(node, pc)
        if isinstance(placed, str) or not node.outputs:
            continue
        rule, _ = placed
        if rule.role == "anchor" and rule.output == "optional":
            continue
        value = node.outputs[0]
        readers = consumers(value)
        if id(value) not in bound and len(readers) == 1 and readers[0].op_type in ABSORBED_ACTIVATIONS:
            value = readers[0].outputs[0]
        if id(value) in bound:
            out[node.name or ""] = (f"its output reaches the graph output '{bound[id(value)]}': kept float so the output "
                                    "is not squeezed through one 8-bit scale (quant.keep_outputs_float)")
    out.pop("", None)
    return out
