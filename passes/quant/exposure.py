"""Read tensors that live inside If branches, so calibration reaches subgraphs too.

ONNX Runtime can only return main-graph values. A tensor inside an If
branch is made an extra output of its branch and of the If node (the other
branch returns an empty tensor of the same type), up through nested Ifs,
until it is a main-graph value. Loop and Scan bodies would need their
tensors stacked per iteration; they are not exposed (the pass skips them
with a reason).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from onnxopt.graph import Names, add_initializer, expose_values, is_onnx_op, iter_graphs, subgraph_owner, values_by_name

__all__ = ["expose_everywhere", "value_index", "if_of"]


#: Named values defined in a graph itself (kept under its old name: :func:`onnxopt.graph.values_by_name`).
value_index = values_by_name


def if_of(model: ir.Model, graph: ir.Graph) -> tuple[ir.Node, str] | None:
    """The If node whose branch ``graph`` is, with the branch attribute name; None for other graphs."""
    found = subgraph_owner(model, graph)
    return found if found is not None and is_onnx_op(found[0], "If") else None


def _bubble(model: ir.Model, value: ir.Value, names: Names) -> ir.Value | None:
    """Lift ``value`` out of nested If branches; the main-graph value carrying it, or None."""
    while value.graph is not model.graph:
        graph = value.graph
        if graph is None:
            return None
        found = if_of(model, graph)
        if found is None:
            return None  # a Loop/Scan body
        node, key = found
        other = node.attributes["else_branch" if key == "then_branch" else "then_branch"].value
        dtype = value.dtype or ir.DataType.FLOAT
        empty = add_initializer(other, np.zeros((0,), dtype=dtype.numpy()), names.fresh(f"{value.name}_absent"))
        graph.outputs.append(value)
        other.outputs.append(empty)
        out = ir.Value(name=names.fresh(f"{value.name}_exposed"), type=ir.TensorType(dtype))
        node.resize_outputs(len(node.outputs) + 1)
        new = node.outputs[-1]
        new.name, new.type = out.name, out.type
        value = new
    return value


def expose_everywhere(model: ir.Model, wanted: list[str]) -> tuple[ir.Model, dict[str, str]]:
    """A clone of ``model`` whose outputs include every value named in ``wanted`` that can be read.

    Returns the clone and ``{wanted name: output name}``; names inside Loop
    or Scan bodies are left out.
    """
    clone = model.clone()
    main = value_index(clone.graph)
    outputs: dict[str, str] = {}
    inner: list[str] = []
    for name in wanted:
        if name in main:
            outputs[name] = name
        else:
            inner.append(name)
    if inner:
        names = Names(clone)
        index: dict[str, ir.Value] = {}
        for graph in iter_graphs(clone):
            if graph is not clone.graph:
                index.update(value_index(graph))
        for name in inner:
            value = index.get(name)
            lifted = _bubble(clone, value, names) if value is not None else None
            if lifted is not None and lifted.name:
                outputs[name] = lifted.name
    return expose_values(clone, list(outputs.values())), outputs
