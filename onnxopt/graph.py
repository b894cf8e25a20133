"""The graph toolkit: every graph edit a pass needs, written once on the onnx-ir IR.

Passes edit graphs as objects (values, nodes, initializers) and call
:func:`cleanup` at the end, which removes what dangles and re-sorts: no pass
maintains name maps of its own. Before writing a helper in a pass, look here.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx_ir as ir
from onnx_ir.passes import common as ir_passes

__all__ = [
    "DEFAULT_DOMAINS",
    "training_mode_nodes",
    "Names",
    "iter_graphs",
    "iter_nodes",
    "is_onnx_op",
    "opset_version",
    "constant_array",
    "is_weight",
    "MOVEMENT_OPS",
    "WeightRead",
    "weight_reads",
    "consumers",
    "only_consumer",
    "attribute",
    "static_shape",
    "add_initializer",
    "replace_input_weight",
    "make_node",
    "insert_before",
    "reroute",
    "replace_node",
    "remove_node",
    "name_nodes",
    "values_by_name",
    "subgraph_owner",
    "cleanup",
    "expose_values",
    "graph_input_values",
]

DEFAULT_DOMAINS = ("", "ai.onnx")


def iter_graphs(model: ir.Model | ir.Graph) -> Iterator[ir.Graph]:
    """The main graph, then every subgraph (If/Loop/Scan bodies), recursively."""
    graph = model.graph if isinstance(model, ir.Model) else model
    yield graph
    yield from graph.subgraphs()


def iter_nodes(model: ir.Model | ir.Graph) -> Iterator[ir.Node]:
    """Every node of the model, including those inside subgraphs."""
    graph = model.graph if isinstance(model, ir.Model) else model
    yield from ir.traversal.RecursiveGraphIterator(graph)


def is_onnx_op(node: ir.Node, *op_types: str) -> bool:
    """True for a node of the default ONNX domain whose type is one of ``op_types``."""
    return node.domain in DEFAULT_DOMAINS and node.op_type in op_types


def opset_version(model: ir.Model, domain: str = "") -> int:
    """The model's opset for ``domain`` (the default ONNX domain unless said)."""
    return int(model.opset_imports.get(domain, model.opset_imports.get("ai.onnx", 0)))


def constant_array(value: ir.Value | None) -> np.ndarray | None:
    """The value's constant data as numpy, or None when it is not a constant.

    Initializers that are also graph inputs can be overridden at run time and
    so are not constants.
    """
    if value is None or value.const_value is None or value.is_graph_input():
        return None
    return value.const_value.numpy()


def is_weight(value: ir.Value | None) -> bool:
    """True for an initializer the runtime cannot override (not also a graph input)."""
    return value is not None and value.const_value is not None and not value.is_graph_input()


#: Ops that only move, copy or re-lay values, and which of their inputs carry them (None: every input). A weight
#: read through them (an exporter's gate reordering Slice/Concat/Unsqueeze before an LSTM, a Reshape, a Cast of a
#: float16 weight) is still read value for value: whatever a pass does to each value holds downstream.
MOVEMENT_OPS: dict[str, tuple[int, ...] | None] = {
    "Identity": (0,), "Reshape": (0,), "Flatten": (0,), "Squeeze": (0,), "Unsqueeze": (0,), "Transpose": (0,),
    "Slice": (0,), "Split": (0,), "Concat": None, "Expand": (0,), "Tile": (0,), "Cast": (0,),
}
_FLOAT_CASTS = {int(t) for t in (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16, ir.DataType.DOUBLE)}


@dataclass(frozen=True)
class WeightRead:
    """One op reading a weight, directly or through :data:`MOVEMENT_OPS` (``path``, weight side first).

    ``axes[i]`` is the axis the weight's axis ``i`` has become at ``node``'s input (None where a Reshape or
    Flatten mixed it with others); ``rank`` is that input's rank, None when unknown.
    """

    node: ir.Node
    index: int
    path: tuple[ir.Node, ...]
    axes: tuple[int | None, ...]
    rank: int | None

    def source_axis(self, axis: int | None) -> int | None:
        """The weight's own axis that arrives as ``axis`` of the reader's input (None: none does)."""
        return None if axis is None or axis not in self.axes else self.axes.index(axis)


def _ints(node: ir.Node, name: str | None, index: int) -> list[int] | None:
    """An int list given as attribute ``name`` (older opsets) or as constant input ``index``; None when unknown."""
    found = attribute(node, name) if name else None
    if found is not None:
        return [int(v) for v in found]
    if len(node.inputs) > index and node.inputs[index] is not None:
        array = constant_array(node.inputs[index])
        return None if array is None else [int(v) for v in array.reshape(-1)]
    return None


def _moved(node: ir.Node, axes: tuple[int | None, ...], rank: int | None) -> tuple[tuple[int | None, ...], int | None]:
    """Where each axis is after movement op ``node``, and its output's rank."""
    op = node.op_type
    lost = tuple(None for _ in axes)
    if op in ("Identity", "Slice", "Split", "Concat", "Tile", "Cast"):
        return axes, rank
    if rank is None:
        return lost, None
    if op == "Unsqueeze":
        inserted = _ints(node, "axes", 1)
        if inserted is None:
            return lost, None
        out_rank = rank + len(inserted)
        kept = [i for i in range(out_rank) if i not in {a % out_rank for a in inserted}]
        return tuple(None if a is None else kept[a] for a in axes), out_rank
    if op == "Squeeze":
        removed = _ints(node, "axes", 1)
        if removed is None:  # every size-1 axis: which ones depends on the shape
            return lost, None
        gone = {a % rank for a in removed}
        kept = [i for i in range(rank) if i not in gone]
        return tuple(None if a is None or a in gone else kept.index(a) for a in axes), rank - len(gone)
    if op == "Transpose":
        perm = attribute(node, "perm") or list(range(rank))[::-1]
        return tuple(None if a is None else list(perm).index(a) for a in axes), rank
    if op == "Expand":
        dims = _ints(node, None, 1)
        if dims is None:
            return lost, None
        out_rank = max(rank, len(dims))
        return tuple(None if a is None else a + out_rank - rank for a in axes), out_rank
    if op == "Reshape":
        dims = _ints(node, None, 1)
        return lost, None if dims is None else len(dims)
    if op == "Flatten":
        return lost, 2
    return lost, None


def weight_reads(value: ir.Value) -> list[WeightRead]:
    """Every op that reads ``value``'s values, following :data:`MOVEMENT_OPS` (in any graph: outer-scope readers
    in If/Loop/Scan bodies included). A movement op whose output leaves its graph is itself the reader."""
    rank = len(value.shape) if value.shape is not None else None
    start = tuple(range(rank)) if rank is not None else ()
    reads: list[WeightRead] = []
    stack: list[tuple[ir.Value, tuple[ir.Node, ...], tuple[int | None, ...], int | None]] = [(value, (), start, rank)]
    while stack:
        current, path, axes, current_rank = stack.pop()
        for node, index in current.uses():
            carried = MOVEMENT_OPS.get(node.op_type, ()) if node.domain in DEFAULT_DOMAINS else ()
            moves = (carried is None or index in carried) and len(node.outputs) >= 1 and not any(
                out.is_graph_output() for out in node.outputs)
            if moves and node.op_type == "Cast" and int(attribute(node, "to", 0)) not in _FLOAT_CASTS:
                moves = False  # a cast to integers computes
            if not moves:
                reads.append(WeightRead(node, index, path, axes, current_rank))
                continue
            new_axes, new_rank = _moved(node, axes, current_rank)
            for out in node.outputs:
                stack.append((out, (*path, node), new_axes, new_rank))
    return reads


def consumers(value: ir.Value) -> list[ir.Node]:
    """Distinct nodes that read ``value``, in graph order of first use."""
    seen: dict[int, ir.Node] = {}
    for node, _ in value.uses():
        seen.setdefault(id(node), node)
    return list(seen.values())


def only_consumer(value: ir.Value) -> ir.Node | None:
    """The single node reading ``value``, or None if it has zero or several readers or is a graph output."""
    nodes = consumers(value)
    if len(nodes) != 1 or value.is_graph_output():
        return None
    return nodes[0]


def attribute(node: ir.Node, name: str, default: Any = None) -> Any:
    """An attribute's Python value (int, float, list, tensor as numpy), or ``default``."""
    attr = node.attributes.get(name)
    if attr is None:
        return default
    if attr.type == ir.AttributeType.TENSOR:
        return attr.as_tensor().numpy()
    return attr.value


def training_mode_nodes(model: ir.Model | ir.Graph) -> list[str]:
    """BatchNormalization and Dropout nodes that run in training mode (names), main graph and subgraphs.

    BatchNormalization(training_mode=1) normalises by the batch's own
    statistics and Dropout with a training_mode input that is true (or not a
    constant) draws a random mask: such a model gives different outputs per
    batch or per run, so no pass's result can be compared with it.
    """
    found = []
    for node in iter_nodes(model):
        if is_onnx_op(node, "BatchNormalization") and attribute(node, "training_mode", 0):
            found.append(node.name or node.outputs[0].name or "BatchNormalization")
        elif is_onnx_op(node, "Dropout") and len(node.inputs) > 2 and node.inputs[2] is not None:
            flag = constant_array(node.inputs[2])
            if flag is None or bool(flag.reshape(-1)[0]):
                found.append(node.name or node.outputs[0].name or "Dropout")
    return found


def static_shape(value: ir.Value | None) -> tuple[int, ...] | None:
    """The value's shape when every dimension is a known integer, else None."""
    if value is None or value.shape is None:
        return None
    dims = value.shape.dims
    if not all(isinstance(d, int) for d in dims):
        return None
    return tuple(int(d) for d in dims)


class Names:
    """Hands out value and node names that collide with nothing already in the model."""

    def __init__(self, model: ir.Model | ir.Graph) -> None:
        self._taken: set[str] = set()
        for graph in iter_graphs(model):
            self._taken.update(v.name for v in graph.inputs if v.name)
            self._taken.update(graph.initializers)
            for node in graph:
                if node.name:
                    self._taken.add(node.name)
                self._taken.update(v.name for v in node.outputs if v.name)

    def reserve(self, other: ir.Model | ir.Graph) -> None:
        """Mark every name of another model as taken too (before merging it into this one)."""
        self._taken |= Names(other)._taken

    def fresh(self, hint: str) -> str:
        """A name starting with ``hint`` not used yet; reserves it."""
        name, i = hint, 1
        while name in self._taken:
            name = f"{hint}_{i}"
            i += 1
        self._taken.add(name)
        return name


def add_initializer(graph: ir.Graph, array: np.ndarray | ir.TensorProtocol, name: str) -> ir.Value:
    """Register a new initializer holding ``array`` under ``name`` (which must be fresh)."""
    tensor = array if not isinstance(array, np.ndarray) else ir.tensor(array, name=name)
    tensor.name = name
    value = ir.Value(name=name, shape=ir.Shape(tensor.shape), type=ir.TensorType(tensor.dtype), const_value=tensor)
    graph.register_initializer(value)
    return value


def replace_input_weight(node: ir.Node, index: int, array: np.ndarray, names: Names, hint: str | None = None) -> ir.Value:
    """Give ``node`` a new constant at input ``index``; other readers of the old weight keep theirs.

    The new tensor is a fresh initializer, so the input model's tensors are
    never written to (clones share tensors with their source).
    """
    graph = node.graph
    assert graph is not None, "node must belong to a graph"
    if index >= len(node.inputs):  # an optional input the node does not have yet (a Conv's bias)
        node.resize_inputs(index + 1)
    old = node.inputs[index]
    base = hint or (old.name if old is not None and old.name else f"{node.name or node.op_type}_in{index}")
    # np.ascontiguousarray would turn a scalar into shape [1], which stops ORT fusing Add/Mul
    value = add_initializer(graph, np.require(array, requirements="C"), names.fresh(base))
    node.replace_input_with(index, value)
    return value


def make_node(
    op_type: str,
    inputs: Sequence[ir.Value | None],
    attributes: Mapping[str, Any] | None = None,
    *,
    names: Names,
    num_outputs: int = 1,
    name_hint: str | None = None,
    domain: str = "",
) -> ir.Node:
    """A new node with fresh node and output names (not yet in a graph)."""
    base = names.fresh(name_hint or op_type)
    outputs = [ir.Value(name=names.fresh(f"{base}_out{i}" if num_outputs > 1 else f"{base}_out")) for i in range(num_outputs)]
    attrs = ir.convenience.convert_attributes(dict(attributes or {}))
    return ir.Node(domain, op_type, list(inputs), attrs, outputs=outputs, name=base)


def insert_before(anchor: ir.Node, nodes: Iterable[ir.Node]) -> None:
    """Insert ``nodes`` (in order) into the anchor's graph right before it."""
    graph = anchor.graph
    assert graph is not None
    graph.insert_before(anchor, list(nodes))


def reroute(old: ir.Value, new: ir.Value) -> None:
    """Make every reader of ``old`` read ``new``; a graph output keeps its public name."""
    if old.is_graph_output():
        name = old.name
        old.replace_all_uses_with(new, replace_graph_outputs=True)
        old.name = None
        new.name = name
    else:
        old.replace_all_uses_with(new)


def replace_node(node: ir.Node | Sequence[ir.Node], new_nodes: Sequence[ir.Node], result: ir.Value | None = None) -> None:
    """Put ``new_nodes`` in ``node``'s graph and let ``result`` (default: the last new node's output) take over
    its (single) output, then drop ``node``.

    ``node`` may be a chain (a node and the bias Add after it): the last one's
    output is taken over and all are dropped. The new nodes go where the
    first one was, so the graph stays sorted and nodes keep their positions
    (passes that find layers by position rely on it).
    """
    chain = [node] if isinstance(node, ir.Node) else list(node)
    graph = chain[0].graph
    assert graph is not None
    result = result if result is not None else new_nodes[-1].outputs[0]
    graph.insert_before(chain[0], list(new_nodes))
    old = chain[-1].outputs[0]
    if old.dtype is not None:
        result.dtype, result.shape = old.dtype, old.shape
    reroute(old, result)
    for gone in reversed(chain):
        graph.remove(gone, safe=True)


def name_nodes(model: ir.Model) -> None:
    """Give every node (subgraphs included) a unique name: reports, exclusions and refits find layers by name."""
    names = Names(model)
    seen: set[str] = set()
    for node in iter_nodes(model):
        if not node.name or node.name in seen:
            node.name = names.fresh(node.name or node.op_type)
        seen.add(node.name)


def values_by_name(graph: ir.Graph) -> dict[str, ir.Value]:
    """Named values defined in ``graph`` itself: inputs, initializers and node outputs (not its subgraphs')."""
    index: dict[str, ir.Value] = {v.name: v for v in graph.inputs if v.name}
    index.update(graph.initializers)
    for node in graph:
        for value in node.outputs:
            if value.name:
                index[value.name] = value
    return index


def subgraph_owner(model: ir.Model, graph: ir.Graph) -> tuple[ir.Node, str] | None:
    """The node (If, Loop, Scan...) whose attribute ``graph`` is, with the attribute's name; None for the main graph."""
    for g in iter_graphs(model):
        for node in g:
            for key, attr in node.attributes.items():
                if attr.type == ir.AttributeType.GRAPH and attr.value is graph:
                    return node, key
    return None


def remove_node(node: ir.Node) -> None:
    """Detach and remove a node whose outputs no longer have readers."""
    graph = node.graph
    assert graph is not None
    graph.remove(node, safe=True)


#: Ops whose optional outputs ONNX Runtime requires even when nobody reads them (Attention's present_key and
#: present_value whenever past_key is given): onnx-ir's dead-code pass trims unused optional outputs as ONNX allows,
#: which turns such a node into one ORT refuses at run time.
OUTPUTS_ORT_REQUIRES = frozenset({("", "Attention")})


def cleanup(model: ir.Model) -> None:
    """Remove unused nodes and initializers and sort topologically (main graph and subgraphs)."""
    pinned: list[tuple[ir.Graph, ir.Value]] = []
    for node in iter_nodes(model):  # held as graph outputs while the pass runs, so it keeps them
        if (node.domain if node.domain != "ai.onnx" else "", node.op_type) in OUTPUTS_ORT_REQUIRES and node.graph is not None:
            for out in node.outputs:
                if out.name and not out.uses() and not out.is_graph_output():
                    node.graph.outputs.append(out)
                    pinned.append((node.graph, out))
    ir_passes.RemoveUnusedNodesPass()(model)
    for graph, out in pinned:
        graph.outputs.remove(out)
    # onnx-ir drops unused initializers of the main graph only; subgraphs keep replaced weights otherwise
    for graph in model.graph.subgraphs():
        for value in list(graph.initializers.values()):
            if not value.uses() and value not in graph.outputs and value not in graph.inputs and value.name:
                del graph.initializers[value.name]
    ir_passes.TopologicalSortPass()(model)


def graph_input_values(graph: ir.Graph) -> list[ir.Value]:
    """Graph inputs a user must feed (initializers that double as inputs excluded)."""
    return [v for v in graph.inputs if v.const_value is None]


def expose_values(model: ir.Model, names: Iterable[str]) -> ir.Model:
    """A clone of ``model`` whose graph outputs are the main-graph values called ``names``.

    Used to read intermediate activations (calibration, statistics) with a
    real ONNX Runtime session.
    """
    clone = model.clone()
    wanted = list(dict.fromkeys(names))
    by_name = values_by_name(clone.graph)
    missing = [n for n in wanted if n not in by_name]
    if missing:
        raise KeyError(f"values not found in the main graph: {missing[:5]}")
    clone.graph.outputs.clear()
    clone.graph.outputs.extend(by_name[n] for n in wanted)
    cleanup(clone)
    return clone
