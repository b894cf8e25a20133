"""The one bridge between the IR (onnx-ir) and onnx-graphsurgeon.

onnx-graphsurgeon stays for what it does best: ORT-backed constant folding
and joining graphs. The bridge round-trips through protobuf, so what crosses
it must stay under 2 GB; callers check :func:`bridgeable` first.

Weights that no constant fold can read (every node using them also reads a
run-time value, like the weight of ``MatMul(x, W)``) do not cross: they go
over as graph inputs, which graphsurgeon leaves alone, and :func:`from_gs`
puts the IR's own tensors back. A model's big weights are almost all of that
kind, so a model of any size crosses as a few megabytes, and its weights are
never read (for external data: never leave the disk).
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnx_ir as ir

from onnxopt.graph import is_weight
from onnxopt.io import PROTOBUF_LIMIT, WEIGHT_OUT_BYTES, restore_weights, serialize_model, weights_as_inputs

__all__ = ["bridgeable", "to_gs", "from_gs", "unfoldable_weights"]

# graphsurgeon's warnings (missing colour module, failed partial folds) are not the user's business
gs.logger.G_LOGGER.severity = gs.logger.G_LOGGER.ERROR

#: Ops whose output is known from shapes alone, which graphsurgeon folds even on run-time inputs.
_SHAPE_OPS = ("Shape", "Size")


def unfoldable_weights(model: ir.Model) -> list[ir.Value]:
    """Main-graph weights of at least WEIGHT_OUT_BYTES that no constant fold can read.

    A node is foldable when all its inputs are constants or outputs of
    foldable nodes (Shape and Size count as foldable: graphsurgeon folds them
    from static shapes). A weight whose every reader is a main-graph node
    that is not foldable can never take part in a fold. Hiding more than
    that would only fold less, never fold wrong: a hidden weight is a graph
    input to graphsurgeon, which it does not fold through.
    """
    graph = model.graph
    constant: set[int] = {id(v) for v in graph.initializers.values() if is_weight(v)}
    changed = True
    while changed:  # to a fixed point, so node order does not matter
        changed = False
        for node in graph:
            if not node.outputs or id(node.outputs[0]) in constant:
                continue
            inputs = [v for v in node.inputs if v is not None]
            if (node.op_type in _SHAPE_OPS and node.domain in ("", "ai.onnx")) or all(id(v) in constant for v in inputs):
                constant.update(id(v) for v in node.outputs)
                changed = True
    hidden = []
    for value in graph.initializers.values():
        tensor = value.const_value
        if tensor is None or tensor.nbytes < WEIGHT_OUT_BYTES or not is_weight(value) or value.is_graph_output():
            continue
        readers = [node for node, _ in value.uses()]
        if readers and all(node.graph is graph and any(v is not None and id(v) not in constant for v in node.inputs)
                           for node in readers):
            hidden.append(value)
    return hidden


def bridgeable(model: ir.Model) -> bool:
    """True when what crosses the bridge (weights a fold could read, and the graph) is under the protobuf limit."""
    hidden = {id(v) for v in unfoldable_weights(model)}
    crossing = sum(v.const_value.nbytes for g in (model.graph, *model.graph.subgraphs())
                   for v in g.initializers.values() if v.const_value is not None and id(v) not in hidden)
    return crossing < PROTOBUF_LIMIT


def to_gs(model: ir.Model) -> gs.Graph:
    """An onnx-graphsurgeon graph of ``model``; weights no fold can read go over as graph inputs, unread."""
    proto = onnx.ModelProto()
    proto.ParseFromString(serialize_model(weights_as_inputs(model, [str(v.name) for v in unfoldable_weights(model)])))
    return gs.import_onnx(proto)


def from_gs(graph: gs.Graph, like: ir.Model) -> ir.Model:
    """Back to the IR, keeping ``like``'s opsets, IR version and metadata, and its weights kept out by :func:`to_gs`."""
    proto = gs.export_onnx(graph, do_type_check=False)
    proto.ir_version = like.ir_version
    del proto.opset_import[:]
    for domain, version in like.opset_imports.items():
        proto.opset_import.add(domain=domain, version=version)
    proto.producer_name = like.producer_name or ""
    proto.producer_version = like.producer_version or ""
    model = ir.serde.deserialize_model(proto)
    for key, value in like.metadata_props.items():
        model.metadata_props[key] = value
    restore_weights(model, like)
    _reshare_outer_weights(model, like)
    _merge_identical_subgraph_weights(model)
    return model


def _reshare_outer_weights(model: ir.Model, like: ir.Model) -> int:
    """Put back main-graph weights that subgraphs read from the outer scope; returns how many copies were dropped.

    graphsurgeon exports a constant read inside If/Loop/Scan bodies as an
    initializer of every body that reads it: a weight two branches shared
    would be stored (and compressed) twice. The weight goes back to the main
    graph, holding ``like``'s tensor, and each body's identical copy is dropped.
    """
    shared = [v for v in like.graph.initializers.values()
              if v.const_value is not None and any(node.graph is not like.graph for node, _ in v.uses())]
    dropped = 0
    for original in shared:
        name = str(original.name)
        copies = [(g, g.initializers[name]) for g in model.graph.subgraphs() if name in g.initializers]
        copies = [(g, v) for g, v in copies if v.const_value is not None and v.dtype == original.dtype
                  and np.array_equal(v.const_value.numpy(), original.const_value.numpy())]  # type: ignore[union-attr]
        if not copies:
            continue
        outer = model.graph.initializers.get(name)
        if outer is None:
            outer = ir.Value(name=name, shape=original.shape, type=original.type, const_value=original.const_value)
            model.graph.register_initializer(outer)
        for graph, copy in copies:
            copy.replace_all_uses_with(outer)
            del graph.initializers[name]
            dropped += 1
    return dropped


#: Constants at least this large that are bit-identical in several bodies are stored once (smaller ones are shapes
#: and indices, not worth an outer-scope read).
MERGE_MIN_BYTES = 1024


def _merge_identical_subgraph_weights(model: ir.Model) -> int:
    """Store bit-identical constants of several If/Loop/Scan bodies once, in their nearest common enclosing graph;
    returns how many copies were dropped.

    Folding a weight that two bodies read through the same ops (an exporter's
    gate-reordering Slice/Concat before an LSTM in both branches of an If)
    gives each body its own folded copy: exact, but the file grows by the
    weight, and a pass after it would compress it twice. The bodies read one
    copy from the outer scope instead, which ONNX allows and leaves every value
    as it was.
    """
    parent: dict[int, ir.Graph | None] = {id(model.graph): None}
    graphs = [model.graph]
    for graph in graphs:
        for node in graph:
            for attr in node.attributes.values():
                subs = ([attr.value] if attr.type == ir.AttributeType.GRAPH
                        else list(attr.value) if attr.type == ir.AttributeType.GRAPHS else [])
                for sub in subs:
                    parent[id(sub)] = graph
                    graphs.append(sub)

    def chain(graph: ir.Graph) -> list[ir.Graph]:
        found: list[ir.Graph] = []
        current: ir.Graph | None = graph
        while current is not None:
            found.append(current)
            current = parent.get(id(current))
        return found

    groups: dict[tuple[object, ...], list[tuple[ir.Graph, ir.Value]]] = {}
    for graph in graphs[1:]:
        for value in graph.initializers.values():
            tensor = value.const_value
            if tensor is None or value.is_graph_input() or value.is_graph_output() or tensor.nbytes < MERGE_MIN_BYTES:
                continue
            array = tensor.numpy()
            key = (array.dtype.str, array.shape, hash(array.tobytes()))
            groups.setdefault(key, []).append((graph, value))
    dropped = 0
    for copies in groups.values():
        first = copies[0][1].const_value.numpy()  # type: ignore[union-attr]
        copies = [(g, v) for g, v in copies if np.array_equal(v.const_value.numpy(), first)]  # type: ignore[union-attr]
        if len({id(g) for g, _ in copies}) < 2:
            continue
        common = chain(copies[0][0])
        for graph, _ in copies[1:]:
            ancestors = {id(g) for g in chain(graph)}
            common = [g for g in common if id(g) in ancestors]
        home = common[0]
        keep_graph, keep = copies[0]
        name = str(keep.name)
        del keep_graph.initializers[name]
        shared = ir.Value(name=name, shape=keep.shape, type=keep.type, const_value=keep.const_value)
        home.register_initializer(shared)
        keep.replace_all_uses_with(shared)
        for graph, copy in copies[1:]:
            copy.replace_all_uses_with(shared)
            del graph.initializers[str(copy.name)]
            dropped += 1
    return dropped
