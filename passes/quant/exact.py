"""What must stay exact: nodes excluded from quantization automatically, each with its reason.

Two families, each a rule over the graph:

- index and shape arithmetic: values that end up as a shape, an index, a
  count or a position (Reshape's shape, Gather's indices, Slice's bounds,
  Resize's sizes, ...). Rounding them changes *which* elements are read,
  not how precisely. The rule walks back from those input slots through
  whatever computes them and stops at Shape/Size (whose output depends on
  shapes only) and at selection ops (ArgMax, TopK, ...: their choice is
  the model's output, not arithmetic on it);
- DSP front ends: STFT or filterbanks written as Conv/MatMul on a raw
  signal input. Their inputs span a dynamic range 8 bits cannot hold and
  everything after depends on them. The rule walks forward from raw-signal
  inputs and marks every Conv/MatMul/Gemm until the learned network starts
  (a Log, a normalisation or a non-linearity, or past two compute layers:
  transform and filterbank). A MatMul/Gemm reading the input itself, its
  whole last axis at once, is a dense layer on long features (a hidden
  state of 4096), not a transform of framed samples, and is not marked.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import onnx_ir as ir

from onnxopt.graph import consumers, iter_graphs, static_shape

__all__ = ["exact_nodes", "INDEX_SLOTS"]

#: Input slots that are shapes, indices, counts or positions.
INDEX_SLOTS: dict[str, tuple[int, ...]] = {
    "Reshape": (1,), "Expand": (1,), "Tile": (1,), "Slice": (1, 2, 3, 4), "Gather": (1,),
    "GatherElements": (1,), "GatherND": (1,), "ScatterND": (1,), "ScatterElements": (1,),
    "ConstantOfShape": (0,), "Range": (0, 1, 2), "Resize": (1, 2, 3), "Upsample": (1,), "TopK": (1,),
    "OneHot": (0, 1), "Pad": (1, 3), "Squeeze": (1,), "Unsqueeze": (1,), "Split": (1,), "Trilu": (1,),
    "CumSum": (1,), "NonMaxSuppression": (2, 3, 4), "ReduceSum": (1,), "ReduceMean": (1,), "ReduceMax": (1,),
    "ReduceMin": (1,), "ReduceProd": (1,), "RoiAlign": (1, 2), "GridSample": (1,),
}

#: Ops whose output depends on input shapes only, or that select rather than compute: the backward walk stops there.
_WALK_STOPS = frozenset({"Shape", "Size", "ArgMax", "ArgMin", "TopK", "NonZero", "NonMaxSuppression"})

_MODEL_COMPUTE = frozenset({"Conv", "ConvTranspose", "MatMul", "Gemm"})
#: Where a learned network starts after a DSP front end.
_FRONT_END_STOPS = frozenset({"Log", "Relu", "Sigmoid", "Tanh", "Softmax", "LayerNormalization",
                              "BatchNormalization", "InstanceNormalization", "LeakyRelu", "Gelu", "HardSigmoid"})
#: A raw signal: a float input of rank 2-3 whose last dim is free or long (audio samples).
_SIGNAL_MIN_LENGTH = 4000

Rule = Callable[[ir.Model], Iterator[tuple[ir.Node, str]]]


def _index_arithmetic(model: ir.Model) -> Iterator[tuple[ir.Node, str]]:
    for graph in iter_graphs(model):
        for node in graph:
            slots = INDEX_SLOTS.get(node.op_type) if node.domain in ("", "ai.onnx") else None
            if not slots:
                continue
            target = f"{node.op_type} {node.name or ''}".strip()
            stack = [node.inputs[i] for i in slots if i < len(node.inputs) and node.inputs[i] is not None]
            seen: set[int] = set()
            while stack:
                value = stack.pop()
                producer = value.producer()
                if producer is None or id(producer) in seen:
                    continue
                seen.add(id(producer))
                if producer.op_type in _WALK_STOPS:
                    continue
                yield producer, f"computes an index or shape used by {target}"
                stack.extend(v for v in producer.inputs if v is not None)


def _is_signal(value: ir.Value) -> bool:
    if value.dtype != ir.DataType.FLOAT or value.shape is None or len(value.shape) not in (2, 3):
        return False
    last = value.shape.dims[-1]
    return not isinstance(last, int) or last >= _SIGNAL_MIN_LENGTH


#: Compute layers a DSP front end holds on any path: the transform (STFT) and the filterbank after it.
_FRONT_END_DEPTH = 2


def _reads_whole_signal(node: ir.Node, signal: ir.Value) -> bool:
    """True for a MatMul/Gemm contracting the unframed input's whole last axis: a dense layer on features."""
    return node.op_type in ("MatMul", "Gemm") and node.inputs[0] is signal


def _dsp_front_end(model: ir.Model) -> Iterator[tuple[ir.Node, str]]:
    graph = model.graph
    signals = [v for v in graph.inputs if v.const_value is None and _is_signal(v)]
    seen: set[int] = set()
    # (node, compute layers before it on this path): past the filterbank the learned network has started, and a
    # MatMul straight on the input is a dense layer on a long feature vector, not a transform of framed samples
    stack = [(n, 0) for v in signals for n in consumers(v) if not _reads_whole_signal(n, v)]
    while stack:
        node, depth = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        if node.op_type in _FRONT_END_STOPS:
            continue
        if node.op_type in _MODEL_COMPUTE:
            w = node.inputs[1] if len(node.inputs) > 1 else None
            shape = static_shape(w) if w is not None else None
            yield node, "DSP front end on the raw signal input (STFT/filterbank as " + node.op_type + \
                (f", weight {list(shape)}" if shape else "") + "): 8 bits cannot hold its dynamic range"
            depth += 1
            if depth >= _FRONT_END_DEPTH:
                continue
        for out in node.outputs:
            stack.extend((n, depth) for n in consumers(out))


#: The rules, in the order their reasons are reported.
RULES: tuple[Rule, ...] = (_index_arithmetic, _dsp_front_end)


def exact_nodes(model: ir.Model) -> dict[int, tuple[ir.Node, str]]:
    """``{id(node): (node, reason)}`` of every node that must stay float, first reason wins."""
    out: dict[int, tuple[ir.Node, str]] = {}
    for rule in RULES:
        for node, reason in rule(model):
            out.setdefault(id(node), (node, reason))
    return out
