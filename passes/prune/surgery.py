"""Physically remove channels: apply the edits discovery recorded, for the channels chosen to go.

Every edit reads which positions of a tracked tensor survive and rewrites
one thing on one node: a weight sliced along an axis, a depthwise Conv's
``group``, an entry of a Reshape/Resize shape constant, a Split's sizes, a
Slice's bounds. New tensors are always fresh initializers, so the caller's
model is never written to. Value shapes along the channel axis are updated
so later passes and the saved ``value_info`` stay right.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import onnx_ir as ir

from onnxopt.graph import Names, add_initializer, constant_array, opset_version, replace_input_weight

from .groups import ChannelGraph, SetCountAttr, SetShapeEntry, SetSliceBounds, SetSplitSizes, SliceInput

__all__ = ["kept_mask", "apply_surgery", "SliceLog"]

#: (node name, input index) -> {axis: indices kept along that axis of the tensor as it was before surgery}
SliceLog = dict[tuple[str, int], dict[int, np.ndarray]]


def kept_mask(cg: ChannelGraph, keep: np.ndarray, value: ir.Value) -> np.ndarray:
    """Which positions along ``value``'s channel axis survive (``keep`` is indexed by channel root)."""
    return keep[cg.roots(cg.layouts[value].ids)]


def apply_surgery(model: ir.Model, cg: ChannelGraph, keep: np.ndarray) -> SliceLog:
    """Remove every channel whose root is False in ``keep``; return what was kept of each sliced tensor."""
    names = Names(model)
    masks: dict[ir.Value, np.ndarray] = {}

    def mask(value: ir.Value) -> np.ndarray:
        if value not in masks:
            masks[value] = kept_mask(cg, keep, value)
        return masks[value]

    def block_mask(value: ir.Value, blocks: int) -> np.ndarray:
        m = mask(value)
        if blocks == 1:
            return m
        rows = m.reshape(blocks, -1)
        if not (rows == rows[:1]).all():
            raise AssertionError(f"prune: blocks of {value.name} are not pruned alike")
        return rows[0]

    slices: dict[tuple[ir.Node, int], dict[int, tuple[ir.Value, int]]] = defaultdict(dict)
    for edit in cg.edits:
        if isinstance(edit, SliceInput):
            slices[(edit.node, edit.index)].setdefault(edit.axis, (edit.value, edit.blocks))
    log: SliceLog = {}
    for (node, index), axes in slices.items():
        wanted = {axis: m for axis, m in ((axis, block_mask(*vb)) for axis, vb in axes.items()) if not m.all()}
        if not wanted:
            continue
        array = constant_array(node.inputs[index])
        if array is None:
            raise AssertionError(f"prune: {node.name} input {index} is no longer a constant")
        kept: dict[int, np.ndarray] = {}
        for axis, m in sorted(wanted.items(), key=lambda item: item[1].mean()):
            if array.shape[axis] != len(m):
                raise AssertionError(f"prune: {node.name} input {index} axis {axis} has {array.shape[axis]} entries, "
                                     f"the channel layout {len(m)}")
            array = np.compress(m, array, axis=axis)
            kept[axis] = np.nonzero(m)[0]
        replace_input_weight(node, index, array, names)
        log[(node.name or "", index)] = kept
    for edit in cg.edits:
        if isinstance(edit, SetCountAttr):
            node = edit.node
            node.attributes[edit.name] = ir.AttrInt64(edit.name, int(mask(edit.value).sum()))
        elif isinstance(edit, SetShapeEntry):
            m = mask(edit.value)
            if m.all():
                continue
            array = constant_array(edit.node.inputs[edit.index])
            assert array is not None
            new = array.copy()
            new.reshape(-1)[edit.entry] = int(m.sum())
            replace_input_weight(edit.node, edit.index, new, names)
        elif isinstance(edit, SetSplitSizes):
            _rewrite_split(model, edit, [int(mask(o).sum()) for o in edit.outputs], names)
        elif isinstance(edit, SetSliceBounds):
            m = mask(edit.source)
            if m.all():
                continue
            start = int(m[: edit.start].sum())
            end = start + int(m[edit.start : edit.end].sum())
            _rewrite_slice(edit, start, end, names)
    for value, layout in cg.layouts.items():
        m = mask(value)
        if m.all() or value.shape is None or len(value.shape.dims) != layout.rank:
            continue
        dims = list(value.shape.dims)
        if isinstance(dims[layout.axis], int):
            dims[layout.axis] = int(m.sum())
            value.shape = ir.Shape(dims)
    return log


def _rewrite_split(model: ir.Model, edit: SetSplitSizes, sizes: list[int], names: Names) -> None:
    node = edit.node
    if opset_version(model) >= 13:
        if len(node.inputs) > 1 and node.inputs[1] is not None:
            replace_input_weight(node, 1, np.asarray(sizes, dtype=np.int64), names)
        else:
            graph = node.graph
            assert graph is not None
            value = add_initializer(graph, np.asarray(sizes, dtype=np.int64), names.fresh(f"{node.name or 'Split'}_sizes"))
            node.resize_inputs(2)
            node.replace_input_with(1, value)
        node.attributes.pop("num_outputs", None)  # sizes and num_outputs may not both be given
    else:
        node.attributes["split"] = ir.AttrInt64s("split", sizes)


def _rewrite_slice(edit: SetSliceBounds, start: int, end: int, names: Names) -> None:
    node = edit.node
    if len(node.inputs) > 1:
        for index, bound in ((1, start), (2, end)):
            array = constant_array(node.inputs[index])
            assert array is not None
            new = array.copy()
            new.reshape(-1)[edit.entry] = bound
            replace_input_weight(node, index, new, names)
    else:
        for attr, bound in (("starts", start), ("ends", end)):
            values = list(node.attributes[attr].value)
            values[edit.entry] = bound
            node.attributes[attr] = ir.AttrInt64s(attr, [int(v) for v in values])
