"""Figures about a model: parameters, MACs, op histogram, where weights live, size on disk, latency."""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort

from onnxopt.data import input_specs
from onnxopt.io import infer_shapes, iter_tensor_protos
from onnxopt.graph import attribute, is_onnx_op, iter_graphs, iter_nodes, static_shape

__all__ = [
    "MacsResult",
    "WeightStorage",
    "count_parameters",
    "stored_weight_bytes",
    "count_macs",
    "op_histogram",
    "weight_storage",
    "file_size",
    "median_latency_ms",
    "DEFAULT_FREE_DIM",
]

#: Size given to free (symbolic) non-batch input dims when no shape is given.
DEFAULT_FREE_DIM = 224


#: Index and shape tensors: not weights, whether stored or computed.
_INDEX_TYPES = (ir.DataType.INT64, ir.DataType.INT32)


def count_parameters(model: ir.Model) -> int:
    """Logical parameters: elements of the weights the compute nodes consume, however they are stored.

    A weight decoded in the graph from something smaller (cluster's codebook
    and packed indices, a DequantizeLinear of int8, int4 MatMulNBits blocks)
    counts as the weight it decodes to, so a pass that only changes storage
    leaves this figure alone; :func:`stored_weight_bytes` measures storage.
    A value is a weight when it is computed from initializers alone and used
    by a node that also takes runtime data (or is a graph output); int64/int32
    index and shape tensors are not counted.
    """
    constant: set[ir.Value] = {v for g in iter_graphs(model) for v in g.initializers.values() if v.const_value is not None}
    nodes = list(iter_nodes(model))
    for node in nodes:  # topological order: a node of constants computes constants
        if not _has_subgraph(node) and all(v is None or v in constant for v in node.inputs):
            constant.update(node.outputs)
    weights: dict[ir.Value, int] = {}
    for node in nodes:
        if all(v is None or v in constant for v in node.inputs) and not _has_subgraph(node):
            continue
        for i, value in enumerate(node.inputs):
            if value is None or value not in constant or value in weights or value.dtype in _INDEX_TYPES:
                continue
            if node.domain == "com.microsoft" and node.op_type == "MatMulNBits" and i == 1:
                weights[value] = int(attribute(node, "K", 0)) * int(attribute(node, "N", 0))
            else:
                weights[value] = _elements(value)
    for graph in iter_graphs(model):
        for value in graph.outputs:
            if value in constant and value not in weights and value.dtype not in _INDEX_TYPES:
                weights[value] = _elements(value)
    return sum(weights.values())


def _has_subgraph(node: ir.Node) -> bool:
    return any(a.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS) for a in node.attributes.values())


def _elements(value: ir.Value) -> int:
    """Elements of a constant value: its tensor, its known shape, else the largest initializer it is computed from.

    The fallback fits the decoders whose output has the size of their largest input (DequantizeLinear,
    Cast, a Mul by a scale); every decoder onnxopt writes without one sets the output's shape.
    """
    if value.const_value is not None:
        return int(np.prod(value.const_value.shape.numpy())) if value.const_value.shape.dims else 1
    shape = static_shape(value)
    if shape is not None:
        return int(np.prod(shape, dtype=np.int64))
    largest, seen, stack = 0, set(), [value]
    while stack:
        v = stack.pop()
        if v in seen:
            continue
        seen.add(v)
        if v.const_value is not None:
            if v.dtype not in _INDEX_TYPES:
                largest = max(largest, int(np.prod(v.const_value.shape.numpy())) if v.const_value.shape.dims else 1)
        elif v.producer() is not None:
            stack.extend(x for x in v.producer().inputs if x is not None)
    return largest


def stored_weight_bytes(model: ir.Model) -> int:
    """Bytes the initializers take as stored (packed indices, codebooks, int8 and scales as they are)."""
    return sum(v.const_value.nbytes for g in iter_graphs(model) for v in g.initializers.values() if v.const_value is not None)


def op_histogram(model: ir.Model) -> dict[str, int]:
    """How many nodes of each op type (``domain::Op`` outside the default domain), most frequent first."""
    counts = Counter(n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}::{n.op_type}" for n in iter_nodes(model))
    return dict(counts.most_common())


@dataclass
class WeightStorage:
    """Where a model file keeps its weights (before onnxopt lifts Constants into initializers)."""

    initializers: int = 0
    initializer_bytes: int = 0
    external: int = 0
    external_bytes: int = 0
    constant_nodes: int = 0
    constant_bytes: int = 0
    constant_of_shape_nodes: int = 0
    constant_of_shape_elements: int = 0

    def to_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


def weight_storage(model: ir.Model) -> WeightStorage:
    """Count weights by where they live: initializers (inline/external), Constant nodes, ConstantOfShape."""
    ws = WeightStorage()
    for graph in iter_graphs(model):
        for value in graph.initializers.values():
            tensor = value.const_value
            if tensor is None:
                continue
            if isinstance(tensor, ir.ExternalTensor):
                ws.external += 1
                ws.external_bytes += tensor.nbytes
            else:
                ws.initializers += 1
                ws.initializer_bytes += tensor.nbytes
    for node in iter_nodes(model):
        if is_onnx_op(node, "Constant"):
            attr = node.attributes.get("value")
            if attr is not None and attr.type == ir.AttributeType.TENSOR:
                ws.constant_nodes += 1
                ws.constant_bytes += attr.as_tensor().nbytes
        elif is_onnx_op(node, "ConstantOfShape") and node.inputs and node.inputs[0] is not None:
            shape_value = node.inputs[0]
            shape = shape_value.const_value.numpy() if shape_value.const_value is not None else None
            if shape is None and shape_value.producer() is not None and is_onnx_op(shape_value.producer(), "Constant"):
                shape = attribute(shape_value.producer(), "value")
            if shape is not None:
                ws.constant_of_shape_nodes += 1
                ws.constant_of_shape_elements += int(np.prod(np.asarray(shape).reshape(-1)))
    return ws


def file_size(path: str | os.PathLike[str]) -> int:
    """Bytes on disk of a model file plus the external data files it references."""
    path = Path(path)
    total = path.stat().st_size
    proto = onnx.load_model(str(path), load_external_data=False)
    locations = set()
    for tensor in iter_tensor_protos(proto.graph):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            for entry in tensor.external_data:
                if entry.key == "location":
                    locations.add(entry.value)
    for loc in locations:
        data = path.parent / loc
        if data.is_file():
            total += data.stat().st_size
    return total


@dataclass
class MacsResult:
    """Multiply-accumulates of Conv/ConvTranspose/Gemm/MatMul at the given input shapes."""

    total: int = 0
    by_op: dict[str, int] = field(default_factory=dict)
    #: MACs per layer, keyed like ``unknown`` (node name, else ``op:output``); not in ``to_dict``
    by_node: dict[str, int] = field(default_factory=dict)
    unknown: list[str] = field(default_factory=list)
    input_shapes: dict[str, list[int]] = field(default_factory=dict)
    assumed: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {"total": self.total, "by_op": self.by_op, "unknown_layers": self.unknown,
                "input_shapes": self.input_shapes, "free_dims_assumed": self.assumed}


def _concrete_input_shapes(model: ir.Model, shapes: Mapping[str, tuple[int, ...]] | None) -> tuple[dict[str, tuple[int, ...]], bool]:
    out, assumed = {}, False
    for spec in input_specs(model):
        if shapes and spec.name in shapes:
            out[spec.name] = tuple(shapes[spec.name])
            continue
        if spec.dims is None:
            continue
        dims = []
        for i, d in enumerate(spec.dims):
            if isinstance(d, int) and d > 0:
                dims.append(d)
            elif i == 0:
                dims.append(1)
            else:
                dims.append(DEFAULT_FREE_DIM)
                assumed = True
        out[spec.name] = tuple(dims)
    return out, assumed


def count_macs(model: ir.Model, shapes: Mapping[str, tuple[int, ...]] | None = None) -> MacsResult:
    """MACs of the compute layers for one run at ``shapes`` (free batch dims = 1).

    Shapes come from ONNX shape inference on a clone with concrete inputs;
    layers whose shapes stay unknown are listed, not guessed.
    """
    clone = model.clone()
    concrete, assumed = _concrete_input_shapes(clone, shapes)
    for value in clone.graph.inputs:
        if value.name in concrete:
            value.shape = ir.Shape(concrete[value.name])
    for graph in iter_graphs(clone):
        for node in graph:
            for out in node.outputs:
                out.shape = None
    infer_shapes(clone, data_prop=True)  # on failure, whatever shapes were found stay; the rest are reported unknown
    result = MacsResult(input_shapes={k: list(v) for k, v in concrete.items()}, assumed=assumed)
    for node in iter_nodes(clone):
        if not is_onnx_op(node, "Conv", "ConvTranspose", "Gemm", "MatMul"):
            continue
        macs = _node_macs(node)
        label = node.name or f"{node.op_type}:{node.outputs[0].name}"
        if macs is None:
            result.unknown.append(label)
            continue
        result.total += macs
        result.by_op[node.op_type] = result.by_op.get(node.op_type, 0) + macs
        result.by_node[label] = macs
    return result


def _node_macs(node: ir.Node) -> int | None:
    a = static_shape(node.inputs[0]) if node.inputs else None
    b = static_shape(node.inputs[1]) if len(node.inputs) > 1 else None
    y = static_shape(node.outputs[0])
    op = node.op_type
    if op == "Conv":
        if y is None or b is None:
            return None
        # each output element: Cin/groups * prod(kernel) MACs
        return int(np.prod(y, dtype=np.int64)) * int(np.prod(b[1:], dtype=np.int64))
    if op == "ConvTranspose":
        if a is None or b is None:
            return None
        # each input element scatters into Cout/groups * prod(kernel) outputs
        return int(np.prod(a, dtype=np.int64)) * int(np.prod(b[1:], dtype=np.int64))
    if op == "Gemm":
        if y is None or a is None:
            return None
        k = a[0] if attribute(node, "transA", 0) else a[-1]
        return int(np.prod(y, dtype=np.int64)) * int(k)
    if op == "MatMul":
        if y is None or a is None:
            return None
        return int(np.prod(y, dtype=np.int64)) * int(a[-1])
    return None


def median_latency_ms(
    session: ort.InferenceSession, feed: Mapping[str, np.ndarray], *, warmup: int = 5, runs: int = 30
) -> float:
    """Median wall time of ``session.run`` on one feed, after warm-up runs, in milliseconds.

    One model alone; comparisons between two models go through :func:`onnxopt.timing.compare_latency`.
    """
    from onnxopt.timing import sample_latency_ms

    return float(np.median(sample_latency_ms(session, feed, warmup=warmup, runs=runs)))
