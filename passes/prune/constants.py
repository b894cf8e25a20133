"""Fold layout-only chains over constants (Reshape/Unsqueeze/Cast of a weight) into initializers.

Exporters often write a per-channel constant as ``Unsqueeze(bn_w)`` or
``Reshape(offset, [1, C, 1, 1])`` rather than as a ready initializer. The
pruning pass must slice such constants along the channels it removes, so it
first turns these chains into plain initializers. Only ops that move data
without computing on it are folded, in numpy, so the result is exact.
Reshape targets computed from the input's own shape (``Shape -> Slice ->
Concat`` with constants, as Paddle exports write them) get constant targets.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx_ir as ir

from onnxopt.graph import Names, add_initializer, attribute, constant_array, is_onnx_op, opset_version

__all__ = ["fold_constant_chains", "fold_reshape_targets"]

#: Above this many elements a folded copy is not worth the memory (the chain is left alone).
MAX_ELEMENTS = 1 << 22


def _axes(node: ir.Node, inputs: list[np.ndarray | None], opset: int) -> list[int] | None:
    if len(inputs) > 1 and inputs[1] is not None:
        return [int(a) for a in inputs[1].reshape(-1)]
    axes = attribute(node, "axes")
    return None if axes is None else [int(a) for a in axes]


def _unsqueeze(node: ir.Node, inputs: list[np.ndarray | None], opset: int) -> np.ndarray | None:
    axes = _axes(node, inputs, opset)
    if axes is None or inputs[0] is None:
        return None
    rank = inputs[0].ndim + len(axes)
    return np.expand_dims(inputs[0], tuple(a % rank for a in axes))


def _squeeze(node: ir.Node, inputs: list[np.ndarray | None], opset: int) -> np.ndarray | None:
    x = inputs[0]
    axes = _axes(node, inputs, opset)
    if x is None:
        return None
    return np.squeeze(x) if axes is None else np.squeeze(x, tuple(a % x.ndim for a in axes))


def _reshape(node: ir.Node, inputs: list[np.ndarray | None], opset: int) -> np.ndarray | None:
    x = inputs[0]
    if x is None or len(inputs) < 2 or inputs[1] is None:
        return None
    shape = [int(d) for d in inputs[1].reshape(-1)]
    if not attribute(node, "allowzero", 0):
        shape = [x.shape[i] if d == 0 and i < x.ndim else d for i, d in enumerate(shape)]
    return x.reshape(shape)


def _flatten(node: ir.Node, inputs: list[np.ndarray | None], opset: int) -> np.ndarray | None:
    x = inputs[0]
    if x is None:
        return None
    axis = int(attribute(node, "axis", 1)) % max(x.ndim, 1)
    return x.reshape(int(np.prod(x.shape[:axis], dtype=np.int64)), -1)


def _cast(node: ir.Node, inputs: list[np.ndarray | None], opset: int) -> np.ndarray | None:
    to = attribute(node, "to")
    if inputs[0] is None or to is None:
        return None
    try:
        dtype = ir.DataType(int(to)).numpy()
    except Exception:  # types numpy cannot hold exactly (bfloat16, float8) stay unfolded
        return None
    return inputs[0].astype(dtype)


def _identity(node: ir.Node, inputs: list[np.ndarray | None], opset: int) -> np.ndarray | None:
    return inputs[0]


#: op type -> numpy evaluation of that op on constant inputs (None when it cannot be done exactly)
FOLDABLE: dict[str, Callable[[ir.Node, list[np.ndarray | None], int], np.ndarray | None]] = {
    "Unsqueeze": _unsqueeze,
    "Squeeze": _squeeze,
    "Reshape": _reshape,
    "Flatten": _flatten,
    "Cast": _cast,
    "Identity": _identity,
}


def fold_constant_chains(model: ir.Model) -> int:
    """Replace layout-only ops whose inputs are all constants by initializers; return how many."""
    graph = model.graph
    names = Names(model)
    opset = opset_version(model)
    folded = 0
    for node in list(graph):
        fold = FOLDABLE.get(node.op_type) if is_onnx_op(node, *FOLDABLE) else None
        if fold is None or len(node.outputs) != 1 or node.outputs[0].is_graph_output():
            continue
        if not node.inputs or node.inputs[0] is None:
            continue
        inputs = [constant_array(v) if v is not None else None for v in node.inputs]
        if any(v is not None and a is None for v, a in zip(node.inputs, inputs)):
            continue
        if inputs[0] is not None and inputs[0].size > MAX_ELEMENTS:
            continue
        try:
            result = fold(node, inputs, opset)
        except ValueError:  # a shape numpy refuses: leave the node to the runtime
            result = None
        if result is None:
            continue
        out = node.outputs[0]
        value = add_initializer(graph, np.ascontiguousarray(result), names.fresh(out.name or f"{node.op_type}_folded"))
        out.replace_all_uses_with(value)
        graph.remove(node, safe=True)
        folded += 1
    return folded


# --- Reshape targets assembled at run time from the input's own dims and constants --------------------------

Entry = int | tuple[str, int]  # a constant, or ("dim", i): dim i of the Reshape's data input


def _shape_entries(value: ir.Value | None, data: ir.Value, depth: int = 0) -> list[Entry] | None:
    """The entries of an int64 shape vector as constants or dims of ``data``; None when it is anything else."""
    if value is None or depth > 8:
        return None
    const = constant_array(value)
    if const is not None:
        return [int(v) for v in const.reshape(-1)] if np.issubdtype(const.dtype, np.integer) else None
    node = value.producer()
    if node is None or not is_onnx_op(node, "Concat", "Cast", "Slice", "Shape", "Gather", "Unsqueeze", "Squeeze", "Identity"):
        return None
    op = node.op_type
    if op in ("Cast", "Identity", "Unsqueeze", "Squeeze"):
        # dims survive int casts and reshaping of a 1-element or 1-D vector
        return _shape_entries(node.inputs[0], data, depth + 1)
    if op == "Concat":
        parts = [_shape_entries(v, data, depth + 1) for v in node.inputs]
        return None if any(p is None for p in parts) else [e for p in parts for e in p]  # type: ignore[union-attr]
    if op == "Shape":
        if node.inputs[0] is not data or data.shape is None:
            return None
        rank = len(data.shape)
        start = int(attribute(node, "start", 0))
        end = attribute(node, "end")
        start = start + rank if start < 0 else start
        stop = rank if end is None else (int(end) + rank if int(end) < 0 else min(int(end), rank))
        return [("dim", i) for i in range(start, stop)]
    source = _shape_entries(node.inputs[0], data, depth + 1)
    if source is None:
        return None
    if op == "Gather":
        idx = constant_array(node.inputs[1])
        if idx is None or int(attribute(node, "axis", 0)) != 0:
            return None
        return [source[int(i)] for i in idx.reshape(-1)]
    # Slice of a 1-D vector
    bounds = [constant_array(v) if v is not None else None for v in node.inputs[1:]]
    if len(bounds) < 2 or bounds[0] is None or bounds[1] is None:
        return None
    if len(bounds) > 3 and bounds[3] is not None and int(bounds[3].reshape(-1)[0]) != 1:
        return None
    n = len(source)
    start, end = int(bounds[0].reshape(-1)[0]), int(bounds[1].reshape(-1)[0])
    start = min(max(start + n if start < 0 else start, 0), n)
    end = min(max(end + n if end < 0 else end, 0), n)
    return source[start:end]


def fold_reshape_targets(model: ir.Model) -> int:
    """Give a constant target to Reshapes whose target copies the input's own dims in place (as 0) next to constants.

    ``Reshape(x, Concat(Shape(x)[0:1], [200]))`` becomes ``Reshape(x, [0, 200])``:
    exact (0 copies the dim at the same position), and prune can then follow it.
    """
    names = Names(model)
    done = 0
    for node in list(model.graph):
        if not is_onnx_op(node, "Reshape") or len(node.inputs) < 2 or constant_array(node.inputs[1]) is not None:
            continue
        if attribute(node, "allowzero", 0):
            continue
        entries = _shape_entries(node.inputs[1], node.inputs[0])
        if entries is None:
            continue
        target = []
        for position, entry in enumerate(entries):
            if isinstance(entry, tuple):
                if entry[1] != position:
                    break
                target.append(0)
            else:
                target.append(entry)
        else:
            value = add_initializer(model.graph, np.asarray(target, dtype=np.int64), names.fresh(f"{node.name or 'Reshape'}_shape"))
            node.replace_input_with(1, value)
            done += 1
    return done
