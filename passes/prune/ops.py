"""How each ONNX op maps the channels of its inputs to its outputs: the propagation table of :mod:`.groups`.

One handler per kind of op, looked up in :data:`PROPAGATION` by op type. A
handler reads the layouts of the node's inputs, sets the layouts of its
outputs, ties or fixes ids, and records the edits surgery will make to the
node (weights to slice, attributes and shape constants to rewrite). An op
missing from the table fixes every channel that reaches it, so unknown ops
are safe by construction.

Invariant every handler keeps: an output whose shape depends on a tracked
channel axis gets a layout (so its readers are visited too), or the
channels are fixed and the output does not change.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx_ir as ir

from onnxopt.graph import attribute, constant_array, opset_version

from .groups import (
    ChannelGraph,
    Layout,
    SetCountAttr,
    SetShapeEntry,
    SetSliceBounds,
    SetSplitSizes,
    SliceInput,
    dims_of,
)

__all__ = ["PROPAGATION", "discover"]

Handler = Callable[[ir.Node, ChannelGraph], None]


def _label(node: ir.Node) -> str:
    return f"{node.op_type} {node.name}" if node.name else node.op_type


def _rank(cg: ChannelGraph, value: ir.Value | None) -> int | None:
    layout = cg.layout(value)
    if layout is not None:
        return layout.rank
    const = constant_array(value)
    if const is not None:
        return const.ndim
    dims = dims_of(value)
    return None if dims is None else len(dims)


def _ints(node: ir.Node, attr: str, index: int | None) -> list[int] | None:
    """Ints from a constant input (newer opsets) or an attribute (older ones); None if absent or computed."""
    if index is not None and len(node.inputs) > index and node.inputs[index] is not None:
        array = constant_array(node.inputs[index])
        return None if array is None else [int(v) for v in array.reshape(-1)]
    value = attribute(node, attr)
    return None if value is None else [int(v) for v in value]


def _input_is_dynamic(node: ir.Node, index: int) -> bool:
    return len(node.inputs) > index and node.inputs[index] is not None and constant_array(node.inputs[index]) is None


def _unknown(node: ir.Node, cg: ChannelGraph) -> None:
    cg.fix_inputs(node, f"{_label(node)}: prune does not know how this op maps channels")


# --- layers that make and read channels ---------------------------------------------------------


def _conv(node: ir.Node, cg: ChannelGraph) -> None:
    x, y = node.inputs[0], node.outputs[0]
    w = constant_array(node.inputs[1]) if len(node.inputs) > 1 else None
    if w is None or w.ndim < 3 or _input_is_dynamic(node, 2):
        cg.fix_inputs(node, f"{_label(node)}: weights or bias computed at run time")
        return
    group = int(attribute(node, "group", 1))
    xl = cg.layout(x)
    rank = w.ndim
    c_in = len(xl.ids) if xl is not None else (dims_of(x) or [None, None])[1]
    if xl is not None and xl.axis != 1:
        cg.fix(xl.ids, f"{_label(node)} reads a tensor whose tracked axis is not its channel axis")
        xl = None
    has_bias = len(node.inputs) > 2 and node.inputs[2] is not None
    if group == 1:
        if xl is not None:
            if len(xl.ids) != w.shape[1]:
                cg.fix(xl.ids, f"{_label(node)}: weight has {w.shape[1]} input channels, tensor has {len(xl.ids)}")
            else:
                cg.add_consumer(node, 0, 1, 1, "conv")
        cg.add_producer(node, 1, 0, y, w.shape[0], 1, rank)
        if has_bias:
            cg.edits.append(SliceInput(node, 2, 0, y))
        return
    depthwise = w.shape[1] == 1 and c_in is not None and group == c_in and w.shape[0] % group == 0
    if not depthwise:
        _grouped_conv(node, cg, w, group, xl, has_bias)
        return
    if xl is None:
        return  # output untracked: its channels cannot change
    multiplier = w.shape[0] // group
    cg.set_layout(y, Layout(1, rank, np.repeat(xl.ids, multiplier)))
    cg.edits.append(SliceInput(node, 1, 0, y))
    cg.edits.append(SetCountAttr(node, "group", x))
    if has_bias:
        cg.edits.append(SliceInput(node, 2, 0, y))


def _grouped_conv(node: ir.Node, cg: ChannelGraph, w: np.ndarray, group: int, xl: Layout | None, has_bias: bool) -> None:
    """A Conv with ``group`` > 1: every group must keep as many channels as the others.

    Output channel k of every group gets the same id (removed together), and
    input channel t of every group is tied the same way, so the weight keeps
    its ``group`` and shrinks evenly.
    """
    y = node.outputs[0]
    if w.shape[0] % group:
        if xl is not None:
            cg.fix(xl.ids, f"{_label(node)}: output channels not divisible by group={group}")
        return
    if xl is not None:
        if len(xl.ids) != w.shape[1] * group:
            cg.fix(xl.ids, f"{_label(node)}: input channels do not match group={group}")
            return
        blocks = xl.ids.reshape(group, -1)
        for j in range(1, group):
            cg.union(blocks[0], blocks[j])
        cg.edits.append(SliceInput(node, 1, 1, node.inputs[0], blocks=group))
    ids = np.tile(cg.fresh(w.shape[0] // group), group)
    cg.add_producer_ids(node, 1, 0, y, ids)
    cg.set_layout(y, Layout(1, w.ndim, ids))
    if has_bias:
        cg.edits.append(SliceInput(node, 2, 0, y))


def _conv_transpose(node: ir.Node, cg: ChannelGraph) -> None:
    x, y = node.inputs[0], node.outputs[0]
    w = constant_array(node.inputs[1]) if len(node.inputs) > 1 else None
    if w is None or w.ndim < 3 or _input_is_dynamic(node, 2) or int(attribute(node, "group", 1)) != 1:
        cg.fix_inputs(node, f"{_label(node)}: grouped or computed weights")
        return
    xl = cg.layout(x)
    if xl is not None:
        if xl.axis != 1 or len(xl.ids) != w.shape[0]:
            cg.fix(xl.ids, f"{_label(node)}: input channels do not match the weight")
        else:
            cg.add_consumer(node, 0, 1, 0, "conv_transpose")
    cg.add_producer(node, 1, 1, y, w.shape[1], 1, w.ndim)
    if len(node.inputs) > 2 and node.inputs[2] is not None:
        cg.edits.append(SliceInput(node, 2, 0, y))


def _gemm(node: ir.Node, cg: ChannelGraph) -> None:
    a, y = node.inputs[0], node.outputs[0]
    b = constant_array(node.inputs[1])
    if b is None or b.ndim != 2:
        cg.fix_inputs(node, f"{_label(node)}: weight computed at run time")
        return
    trans_a, trans_b = int(attribute(node, "transA", 0)), int(attribute(node, "transB", 0))
    al = cg.layout(a)
    k_axis = 0 if trans_a else 1
    if al is not None:
        if al.axis == k_axis and len(al.ids) == (b.shape[1] if trans_b else b.shape[0]):
            cg.add_consumer(node, 0, 1, 1 if trans_b else 0, "gemm")
        else:
            cg.fix(al.ids, f"{_label(node)} reads tracked channels on its row axis")
    n = b.shape[0] if trans_b else b.shape[1]
    ids = cg.add_producer(node, 1, 0 if trans_b else 1, y, n, 1, 2)
    if len(node.inputs) > 2 and node.inputs[2] is not None:
        c = node.inputs[2]
        carray = constant_array(c)
        if carray is None:
            c_dims = dims_of(c)
            if not c_dims or c_dims[-1] != 1:
                cg.fix(ids, f"{_label(node)}: bias computed at run time")
        elif carray.ndim >= 1 and carray.shape[-1] == n and n > 1:
            cg.edits.append(SliceInput(node, 2, carray.ndim - 1, y))


def _matmul(node: ir.Node, cg: ChannelGraph) -> None:
    a, b, y = node.inputs[0], node.inputs[1], node.outputs[0]
    a_const, b_const = constant_array(a), constant_array(b)
    if b_const is not None and a_const is None and b_const.ndim == 2:
        rank = _rank(cg, a)
        al = cg.layout(a)
        if rank is None or rank < 2:
            cg.fix_value(a, f"{_label(node)}: input rank unknown or 1")
            return
        if al is not None:
            if al.axis == rank - 1 and len(al.ids) == b_const.shape[0]:
                cg.add_consumer(node, 0, 1, 0, "matmul")
            else:
                cg.fix(al.ids, f"{_label(node)} reads tracked channels on a row axis")
        cg.add_producer(node, 1, 1, y, b_const.shape[1], rank - 1, rank)
        return
    if a_const is None and b_const is None:
        _dynamic_matmul(node, cg)
        return
    cg.fix_inputs(node, f"{_label(node)}: constant left operand")


def _dynamic_matmul(node: ir.Node, cg: ChannelGraph) -> None:
    """Both operands computed (attention): batch axes pass through, the contracted axis must match."""
    a, b, y = node.inputs[0], node.inputs[1], node.outputs[0]
    ra, rb = _rank(cg, a), _rank(cg, b)
    if ra is None or rb is None or ra < 2 or rb < 2:
        cg.fix_inputs(node, f"{_label(node)}: operand rank unknown or 1")
        return
    ry = max(ra, rb)
    al, bl = cg.layout(a), cg.layout(b)

    def target(layout: Layout | None, rank: int, contracted: int, kept: int) -> int | str | None:
        if layout is None:
            return None
        if layout.axis == contracted:
            return "k"
        if layout.axis == kept:
            return ry - 2 if kept == rank - 2 else ry - 1
        return layout.axis + ry - rank

    ta = target(al, ra, ra - 1, ra - 2)
    tb = target(bl, rb, rb - 2, rb - 1)
    reason = f"{_label(node)}: operand channels do not line up"
    if ta == "k" or tb == "k":
        if ta == "k" and tb == "k" and al is not None and bl is not None and len(al.ids) == len(bl.ids):
            cg.union(al.ids, bl.ids)
            return
        cg.fix_inputs(node, reason)
        return
    tracked = [(t, lay, v, r) for t, lay, v, r in ((ta, al, a, ra), (tb, bl, b, rb)) if lay is not None]
    axes = {t for t, *_ in tracked}
    if len(axes) != 1:
        cg.fix_inputs(node, reason)
        return
    out_axis = int(axes.pop())  # type: ignore[arg-type]
    if len(tracked) == 2:
        if len(al.ids) != len(bl.ids):  # type: ignore[union-attr]
            cg.fix_inputs(node, reason)
            return
        cg.union(al.ids, bl.ids)  # type: ignore[union-attr]
    else:
        # the other operand must broadcast along this axis (size 1 or absent) if it is a batch axis
        other, other_rank = (b, rb) if al is not None else (a, ra)
        if out_axis < ry - 2:
            odims = dims_of(other)
            local = out_axis - (ry - other_rank)
            if local >= 0 and (odims is None or odims[local] != 1):
                cg.fix_inputs(node, reason)
                return
    lay = tracked[0][1]
    cg.set_layout(y, Layout(out_axis, ry, lay.ids))


# --- ops that keep channels where they are ------------------------------------------------------


def _elementwise(node: ir.Node, cg: ChannelGraph) -> None:
    """Broadcasting ops (Relu, Add, Mul, Clip, Where, ...): tracked inputs are tied, per-channel constants sliced."""
    tracked = cg.tracked_inputs(node)
    if not tracked:
        return
    present = [(i, v) for i, v in enumerate(node.inputs) if v is not None and v.name != ""]
    ranks = {i: _rank(cg, v) for i, v in present}
    if any(r is None for r in ranks.values()):
        cg.fix_inputs(node, f"{_label(node)}: an operand's rank is unknown")
        return
    out_rank = max(r for r in ranks.values() if r is not None)
    layouts = [cg.layouts[v] for v in tracked]
    axes = {lay.axis + out_rank - lay.rank for lay in layouts}
    lengths = {len(lay.ids) for lay in layouts}
    if len(axes) != 1 or len(lengths) != 1:
        cg.fix_inputs(node, f"{_label(node)}: operands carry channels on different axes")
        return
    axis, length = axes.pop(), lengths.pop()
    for lay in layouts[1:]:
        cg.union(layouts[0].ids, lay.ids)
    slices: list[SliceInput] = []
    for i, v in present:
        if v in cg.layouts:
            continue
        rank = ranks[i]
        assert rank is not None
        local = axis - (out_rank - rank)
        const = constant_array(v)
        size = (const.shape[local] if const is not None else (dims_of(v) or [None] * rank)[local]) if local >= 0 else 1
        if size == 1 and length != 1:
            continue
        if const is not None and size == length:
            slices.append(SliceInput(node, i, local, node.outputs[0]))
            continue
        cg.fix(layouts[0].ids, f"{_label(node)}: combined per channel with a tensor prune does not track")
        return
    cg.edits.extend(slices)
    for out in node.outputs:
        if out is not None:
            cg.set_layout(out, Layout(axis, out_rank, layouts[0].ids))


def _channel_params(*indices: int) -> Handler:
    """BatchNormalization / InstanceNormalization: per-channel parameter vectors on axis 1."""

    def handle(node: ir.Node, cg: ChannelGraph) -> None:
        xl = cg.layout(node.inputs[0])
        if xl is None:
            return
        if xl.axis != 1 or attribute(node, "training_mode", 0) or any(o.uses() for o in node.outputs[1:]):
            cg.fix(xl.ids, f"{_label(node)}: tracked axis is not the channel axis, or training mode")
            return
        for i in indices:
            if len(node.inputs) <= i or node.inputs[i] is None:
                continue
            p = constant_array(node.inputs[i])
            if p is None or p.ndim != 1 or len(p) != len(xl.ids):
                cg.fix(xl.ids, f"{_label(node)}: per-channel parameters computed or mis-shaped")
                return
        for i in indices:
            if len(node.inputs) > i and node.inputs[i] is not None:
                cg.edits.append(SliceInput(node, i, 0, node.outputs[0]))
        cg.set_layout(node.outputs[0], xl)

    return handle


def _mixing_axes(node: ir.Node, layout: Layout, opset: int) -> set[int]:
    """Axes an op normalizes or reduces across (channels on them cannot be removed independently)."""
    op, rank = node.op_type, layout.rank
    if op == "LayerNormalization":
        return set(range(int(attribute(node, "axis", -1)) % rank, rank))
    if op in ("LRN", "GroupNormalization"):
        return {1}
    if op == "MeanVarianceNormalization":
        return {a % rank for a in attribute(node, "axes", [0, 2, 3])}
    if op in ("Softmax", "LogSoftmax", "Hardmax"):
        if opset < 13:  # older opsets coerce the input to 2-D at ``axis``: everything after it mixes
            return set(range(int(attribute(node, "axis", 1)) % rank, rank))
        return {int(attribute(node, "axis", -1)) % rank}
    return set()


def _normalize(node: ir.Node, cg: ChannelGraph) -> None:
    """LayerNorm, LRN, Softmax and kin: fine along other axes, mixing along the normalized ones."""
    xl = cg.layout(node.inputs[0])
    if xl is None:
        return
    if xl.axis in _mixing_axes(node, xl, cg.opset):
        cg.fix(xl.ids, f"{_label(node)} normalizes across the channels")
        return
    for out in node.outputs:
        if out is not None:
            cg.set_layout(out, xl)


def _pool(node: ir.Node, cg: ChannelGraph) -> None:
    xl = cg.layout(node.inputs[0])
    if xl is None:
        return
    if xl.axis != 1 or (len(node.outputs) > 1 and node.outputs[1].uses()):
        cg.fix(xl.ids, f"{_label(node)}: pools over the tracked axis or its indices are used")
        return
    cg.set_layout(node.outputs[0], xl)


def _transpose(node: ir.Node, cg: ChannelGraph) -> None:
    xl = cg.layout(node.inputs[0])
    if xl is None:
        return
    perm = attribute(node, "perm") or list(range(xl.rank))[::-1]
    cg.set_layout(node.outputs[0], Layout(list(perm).index(xl.axis), xl.rank, xl.ids))


def _resize(node: ir.Node, cg: ChannelGraph) -> None:
    xl = cg.layout(node.inputs[0])
    if xl is None:
        return
    if node.op_type == "Upsample" or len(node.inputs) == 2:
        scales = _ints_float(node, "scales", 1)
        sizes = None
    else:
        scales = _ints_float(node, "scales", 2)
        sizes = _ints(node, "sizes", 3) if len(node.inputs) > 3 and node.inputs[3] is not None else None
    axes = attribute(node, "axes")
    local = xl.axis if axes is None else ([a % xl.rank for a in axes].index(xl.axis) if xl.axis in [a % xl.rank for a in axes] else None)
    if local is None:
        cg.set_layout(node.outputs[0], xl)
        return
    if sizes is not None and sizes[local] == len(xl.ids):
        cg.edits.append(SetShapeEntry(node, 3, local, node.outputs[0]))
        cg.set_layout(node.outputs[0], xl)
        return
    if sizes is None and scales is not None and len(scales) > local and scales[local] == 1.0:
        cg.set_layout(node.outputs[0], xl)
        return
    cg.fix(xl.ids, f"{_label(node)} resizes the channel axis, or its scales are computed")


def _ints_float(node: ir.Node, attr: str, index: int) -> list[float] | None:
    if len(node.inputs) > index and node.inputs[index] is not None:
        array = constant_array(node.inputs[index])
        return None if array is None or array.size == 0 else [float(v) for v in array.reshape(-1)]
    value = attribute(node, attr)
    return None if value is None else [float(v) for v in value]


def _pad(node: ir.Node, cg: ChannelGraph) -> None:
    xl = cg.layout(node.inputs[0])
    if xl is None:
        return
    pads = _ints(node, "pads", 1)
    axes = _ints(node, "axes", 3) if len(node.inputs) > 3 else None
    axes = [a % xl.rank for a in axes] if axes else list(range(xl.rank))
    if pads is None or len(pads) != 2 * len(axes):
        cg.fix(xl.ids, f"{_label(node)}: pads computed at run time")
        return
    if xl.axis in axes:
        k = axes.index(xl.axis)
        if pads[k] != 0 or pads[k + len(axes)] != 0:
            cg.fix(xl.ids, f"{_label(node)} pads the channel axis")
            return
    cg.set_layout(node.outputs[0], xl)


def _tile(node: ir.Node, cg: ChannelGraph) -> None:
    xl = cg.layout(node.inputs[0])
    if xl is None:
        return
    repeats = _ints(node, "repeats", 1)
    if repeats is None or repeats[xl.axis] != 1:
        cg.fix(xl.ids, f"{_label(node)} repeats the channel axis")
        return
    cg.set_layout(node.outputs[0], xl)


# --- ops that move the channel axis --------------------------------------------------------------


def _unsqueeze(node: ir.Node, cg: ChannelGraph) -> None:
    xl = cg.layout(node.inputs[0])
    if xl is None:
        return
    axes = _ints(node, "axes", 1 if len(node.inputs) > 1 else None)
    if axes is None:
        cg.fix(xl.ids, f"{_label(node)}: axes computed at run time")
        return
    rank = xl.rank + len(axes)
    inserted = sorted(a % rank for a in axes)
    kept = [i for i in range(rank) if i not in inserted]
    cg.set_layout(node.outputs[0], Layout(kept[xl.axis], rank, xl.ids))


def _squeeze(node: ir.Node, cg: ChannelGraph) -> None:
    xl = cg.layout(node.inputs[0])
    if xl is None:
        return
    axes = _ints(node, "axes", 1 if len(node.inputs) > 1 else None)
    if axes is None:  # squeezes every size-1 axis: a channel axis pruned down to one would go too
        cg.fix(xl.ids, f"{_label(node)}: Squeeze without axes")
        return
    axes = [a % xl.rank for a in axes]
    if xl.axis in axes:
        cg.fix(xl.ids, f"{_label(node)} squeezes the channel axis")
        return
    cg.set_layout(node.outputs[0], Layout(xl.axis - sum(a < xl.axis for a in axes), xl.rank - len(axes), xl.ids))


def _reduce(node: ir.Node, cg: ChannelGraph) -> None:
    xl = cg.layout(node.inputs[0])
    if xl is None:
        return
    if node.op_type in ("ArgMax", "ArgMin"):
        axes: list[int] | None = [int(attribute(node, "axis", 0))]
    else:
        axes = _ints(node, "axes", 1 if len(node.inputs) > 1 else None)
    keepdims = int(attribute(node, "keepdims", 1))
    if not axes:
        if axes is not None and attribute(node, "noop_with_empty_axes", 0):
            cg.set_layout(node.outputs[0], xl)
            return
        cg.fix(xl.ids, f"{_label(node)} reduces over every axis")
        return
    axes = [a % xl.rank for a in axes]
    if xl.axis in axes:
        cg.fix(xl.ids, f"{_label(node)} reduces over the channels")
        return
    if keepdims:
        cg.set_layout(node.outputs[0], xl)
    else:
        cg.set_layout(node.outputs[0], Layout(xl.axis - sum(a < xl.axis for a in axes), xl.rank - len(axes), xl.ids))


def _merge_ids(ids: np.ndarray, dims: list[int], at: int) -> np.ndarray:
    """Channel ids of a flattened block of axes ``dims`` (row-major) whose axis ``at`` is the channel axis."""
    shape = [1] * len(dims)
    shape[at] = len(ids)
    full = list(dims)
    full[at] = len(ids)
    return np.broadcast_to(ids.reshape(shape), full).reshape(-1)


def _flatten(node: ir.Node, cg: ChannelGraph) -> None:
    xl = cg.layout(node.inputs[0])
    if xl is None:
        return
    dims = dims_of(node.inputs[0])
    f = int(attribute(node, "axis", 1)) % max(xl.rank, 1) if xl.rank else 0
    lo, hi, out_axis = (0, f, 0) if xl.axis < f else (f, xl.rank, 1)
    if dims is None or any(d is None for i, d in enumerate(dims[lo:hi], lo) if i != xl.axis):
        cg.fix(xl.ids, f"{_label(node)} flattens channels with dims of unknown size")
        return
    block = [int(d) if i != xl.axis else len(xl.ids) for i, d in enumerate(dims[lo:hi], lo)]  # type: ignore[arg-type]
    cg.set_layout(node.outputs[0], Layout(out_axis, 2, _merge_ids(xl.ids, block, xl.axis - lo)))


def _reshape(node: ir.Node, cg: ChannelGraph) -> None:
    """Reshapes that keep or merge the channel axis (Flatten-like, [N,C,1,1]->[N,C]); head splits on request.

    Each step returns what it found or why the channels must stay as they are (then fixed with that reason).
    """
    x, y = node.inputs[0], node.outputs[0]
    xl = cg.layout(x)
    if xl is None:
        return
    shapes = _reshape_dims(node, xl)
    if isinstance(shapes, str):
        cg.fix(xl.ids, shapes)
        return
    target, src, resolved = shapes
    found = _channels_after_reshape(node, cg, xl, src, resolved)
    if isinstance(found, str):
        cg.fix(xl.ids, found)
        return
    ids, out_axis = found
    literal = target[out_axis]
    if literal > 0:
        cg.edits.append(SetShapeEntry(node, 1, out_axis, y))
    elif literal == 0 and not (out_axis == xl.axis and ids is xl.ids):
        cg.fix(xl.ids, f"{_label(node)} copies a dim (0) onto the channel axis")
        return
    cg.set_layout(y, Layout(out_axis, len(resolved), ids))


#: A dim as ``(n, p)`` = n * B**p, where B stands for an unknown leading batch dim.
_Dim = tuple[int, int]


def _reshape_dims(node: ir.Node, xl: Layout) -> tuple[list[int], list[_Dim], list[_Dim]] | str:
    """The literal target shape, and the input and output dims as ``(n, p)``; or why they cannot be known."""
    shape = constant_array(node.inputs[1]) if len(node.inputs) > 1 else None
    if shape is None:
        return f"{_label(node)}: target shape computed at run time"
    target = [int(d) for d in shape.reshape(-1)]
    dims = dims_of(node.inputs[0])
    if dims is None:
        return f"{_label(node)}: input shape unknown"
    dims = list(dims)
    dims[xl.axis] = len(xl.ids)
    src: list[_Dim] = []
    for i, d in enumerate(dims):
        if d is None and i == 0:
            src.append((1, 1))
        elif d is None:
            return f"{_label(node)}: input dim {i} of unknown size"
        else:
            src.append((d, 0))
    resolved = _target_dims(node, target, src)
    return resolved if isinstance(resolved, str) else (target, src, resolved)


def _target_dims(node: ir.Node, target: list[int], src: list[_Dim]) -> list[_Dim] | str:
    """The output dims: literal sizes, 0 copied from the input (unless allowzero), one -1 solved for."""
    allowzero = int(attribute(node, "allowzero", 0))
    out: list[_Dim | None] = []
    for i, d in enumerate(target):
        if d > 0:
            out.append((d, 0))
        elif d == 0 and not allowzero and i < len(src):
            out.append(src[i])
        elif d == -1:
            out.append(None)
        else:
            return f"{_label(node)}: zero-size target shape"
    total = (int(np.prod([n for n, _ in src], dtype=np.int64)), sum(p for _, p in src))
    if out.count(None) == 1:
        known = (int(np.prod([o[0] for o in out if o is not None], dtype=np.int64)), sum(o[1] for o in out if o is not None))
        if known[0] == 0 or total[0] % known[0] or total[1] - known[1] not in (0, 1):
            return f"{_label(node)}: target shape does not divide the input"
        out[out.index(None)] = (total[0] // known[0], total[1] - known[1])
    elif out.count(None) > 1:
        return f"{_label(node)}: several -1 in the target shape"
    return [o for o in out if o is not None]


def _prefixes(ds: list[_Dim]) -> list[_Dim]:
    """Running products of the dims: where two shapes agree on a prefix, the axes before it map onto each other."""
    acc, res = (1, 0), [(1, 0)]
    for n, p in ds:
        acc = (acc[0] * n, acc[1] + p)
        res.append(acc)
    return res


def _channels_after_reshape(node: ir.Node, cg: ChannelGraph, xl: Layout, src: list[_Dim], resolved: list[_Dim]
                            ) -> tuple[np.ndarray, int] | str:
    """The channel ids along the output and the output axis that carries them; or why the reshape mixes them."""
    pin, pout = _prefixes(src), _prefixes(resolved)
    a = xl.axis
    if pin[a] not in pout:
        return f"{_label(node)} mixes the channels with the axes before them"
    b = pout.index(pin[a])
    while b < len(resolved) and resolved[b] == (1, 0) and pout[b + 1] != pin[a + 1]:
        b += 1  # skip inserted unit axes
    if b >= len(resolved):
        return f"{_label(node)}: channel axis not found in the target shape"
    if pout[b + 1] in pin[a + 1:]:  # the channel axis kept, or merged with the axes after it
        end = pin.index(pout[b + 1], a + 1)
        block = [n for n, p in src[a:end]]
        if any(p for _, p in src[a + 1:end]):
            return f"{_label(node)} merges the channels with the batch axis"
        return (xl.ids if end == a + 1 else _merge_ids(xl.ids, block, 0)), b
    if b + 2 <= len(resolved) and pout[b + 2] == pin[a + 1] and resolved[b][1] == 0:
        return _split_channels(node, cg, xl, resolved[b][0], resolved[b + 1][0], b)
    hint = "" if cg.attention_heads else " (attention heads are pruned with prune.attention_heads=true)"
    return f"{_label(node)} splits the channel axis{hint}"


def _split_channels(node: ir.Node, cg: ChannelGraph, xl: Layout, outer: int, inner: int, b: int) -> tuple[np.ndarray, int] | str:
    """The channel axis split in two (``outer`` x ``inner``): a shuffle, a grouping, or attention heads."""
    blocks = xl.ids.reshape(outer, inner)
    roots = np.array([[cg.find(int(i)) for i in row] for row in blocks.tolist()])
    if (roots == roots[:1]).all():  # channel shuffle after a grouped Conv: the id depends on the inner axis only
        return blocks[0].copy(), b + 1
    if (roots == roots[:, :1]).all():
        return blocks[:, 0].copy(), b
    if cg.attention_heads:  # heads: all channels of a head go together
        for j in range(1, inner):
            cg.union(blocks[:, 0], blocks[:, j])
        return blocks[:, 0].copy(), b
    return f"{_label(node)} splits the channel axis (attention heads are pruned with prune.attention_heads=true)"


# --- ops that cut or join the channel axis -------------------------------------------------------


def _concat(node: ir.Node, cg: ChannelGraph) -> None:
    tracked = cg.tracked_inputs(node)
    if not tracked:
        return
    rank = cg.layouts[tracked[0]].rank
    axis = int(attribute(node, "axis", 0)) % rank
    layouts = [cg.layouts[v] for v in tracked]
    if all(lay.axis == axis for lay in layouts):
        parts = []
        for v in node.inputs:
            lay = cg.layout(v)
            if lay is not None:
                parts.append(lay.ids)
                continue
            dims = dims_of(v)
            if dims is None or dims[axis] is None:
                cg.fix_inputs(node, f"{_label(node)}: an input's size on the concat axis is unknown")
                return
            parts.append(cg.fresh(int(dims[axis]), reason=f"{_label(node)}: concatenated with a tensor prune does not track"))
        cg.set_layout(node.outputs[0], Layout(axis, rank, np.concatenate(parts)))
        return
    # joined along another axis: every operand must carry the same channels
    if len(tracked) != len([v for v in node.inputs if v is not None]) or len({(lay.axis, len(lay.ids)) for lay in layouts}) != 1:
        cg.fix_inputs(node, f"{_label(node)} joins tensors whose channels do not line up")
        return
    for lay in layouts[1:]:
        cg.union(layouts[0].ids, lay.ids)
    cg.set_layout(node.outputs[0], layouts[0])


def _split(node: ir.Node, cg: ChannelGraph) -> None:
    xl = cg.layout(node.inputs[0])
    if xl is None:
        return
    axis = int(attribute(node, "axis", 0)) % xl.rank
    outputs = [o for o in node.outputs]
    if axis != xl.axis:
        for o in outputs:
            cg.set_layout(o, xl)
        return
    sizes = _ints(node, "split", 1 if len(node.inputs) > 1 else None)
    if sizes is None and _input_is_dynamic(node, 1):
        cg.fix(xl.ids, f"{_label(node)}: split sizes computed at run time")
        return
    n = len(outputs)
    if sizes is None:
        if len(xl.ids) % n:
            cg.fix(xl.ids, f"{_label(node)}: uneven split of the channels")
            return
        sizes = [len(xl.ids) // n] * n
    if sum(sizes) != len(xl.ids) or len(sizes) != n:
        cg.fix(xl.ids, f"{_label(node)}: split sizes do not match the channels")
        return
    starts = np.cumsum([0, *sizes])
    for o, s, e in zip(outputs, starts[:-1], starts[1:]):
        cg.set_layout(o, Layout(axis, xl.rank, xl.ids[s:e]))
    cg.edits.append(SetSplitSizes(node, tuple(outputs)))


def _slice(node: ir.Node, cg: ChannelGraph) -> None:
    xl = cg.layout(node.inputs[0])
    if xl is None:
        return
    from_inputs = len(node.inputs) > 1
    starts = _ints(node, "starts", 1 if from_inputs else None)
    ends = _ints(node, "ends", 2 if from_inputs else None)
    axes = _ints(node, "axes", 3 if from_inputs else None)
    steps = _ints(node, "steps", 4) if from_inputs and len(node.inputs) > 4 else None
    if starts is None or ends is None or (from_inputs and len(node.inputs) > 3 and node.inputs[3] is not None and axes is None) \
            or (from_inputs and len(node.inputs) > 4 and node.inputs[4] is not None and steps is None):
        cg.fix(xl.ids, f"{_label(node)}: bounds computed at run time")
        return
    axes = [a % xl.rank for a in (axes if axes is not None else range(len(starts)))]
    if xl.axis not in axes:
        cg.set_layout(node.outputs[0], xl)
        return
    k = axes.index(xl.axis)
    if steps is not None and steps[k] != 1:
        cg.fix(xl.ids, f"{_label(node)} slices the channels with a step")
        return
    length = len(xl.ids)
    start, end = starts[k], ends[k]
    start = min(max(start + length if start < 0 else start, 0), length)
    end = min(max(end + length if end < 0 else end, 0), length)
    if end <= start:
        cg.fix(xl.ids, f"{_label(node)}: empty slice of the channels")
        return
    cg.edits.append(SetSliceBounds(node, k, node.inputs[0], start, end))
    cg.set_layout(node.outputs[0], Layout(xl.axis, xl.rank, xl.ids[start:end]))


def _shape(node: ir.Node, cg: ChannelGraph) -> None:
    xl = cg.layout(node.inputs[0])
    if xl is None:
        return
    start = int(attribute(node, "start", 0)) % (xl.rank + 1) if attribute(node, "start") is not None else 0
    end_attr = attribute(node, "end")
    end = xl.rank if end_attr is None else (int(end_attr) + xl.rank if int(end_attr) < 0 else min(int(end_attr), xl.rank))
    if start <= xl.axis < end:
        cg.fix(xl.ids, f"{_label(node)} reads the channel count at run time")


ELEMENTWISE = (
    "Relu", "LeakyRelu", "PRelu", "Elu", "Selu", "Celu", "Gelu", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh",
    "Softplus", "Softsign", "Mish", "ThresholdedRelu", "Erf", "Exp", "Log", "Abs", "Neg", "Sqrt", "Reciprocal",
    "Floor", "Ceil", "Round", "Sign", "Sin", "Cos", "Identity", "Dropout", "Cast", "Clip", "Not", "IsNaN", "IsInf",
    "Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Sum", "Mean", "Where", "Equal", "Less", "Greater",
    "LessOrEqual", "GreaterOrEqual", "And", "Or", "Xor", "Mod", "BitShift",
)

#: op type -> how it maps channels (ops of the default ONNX domain only; anything else fixes its inputs)
PROPAGATION: dict[str, Handler] = {
    "Conv": _conv,
    "ConvTranspose": _conv_transpose,
    "Gemm": _gemm,
    "MatMul": _matmul,
    **{op: _elementwise for op in ELEMENTWISE},
    "BatchNormalization": _channel_params(1, 2, 3, 4),
    "InstanceNormalization": _channel_params(1, 2),
    **{op: _normalize for op in ("LayerNormalization", "LRN", "GroupNormalization", "MeanVarianceNormalization",
                                 "Softmax", "LogSoftmax", "Hardmax")},
    **{op: _pool for op in ("MaxPool", "AveragePool", "LpPool", "GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool")},
    "Resize": _resize,
    "Upsample": _resize,
    "Pad": _pad,
    "Tile": _tile,
    "Transpose": _transpose,
    "Unsqueeze": _unsqueeze,
    "Squeeze": _squeeze,
    **{op: _reduce for op in ("ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2",
                              "ReduceLogSum", "ReduceLogSumExp", "ReduceSumSquare", "ArgMax", "ArgMin")},
    "Flatten": _flatten,
    "Reshape": _reshape,
    "Concat": _concat,
    "Split": _split,
    "Slice": _slice,
    "Shape": _shape,
}


def discover(model: ir.Model, *, attention_heads: bool = False) -> ChannelGraph:
    """Walk the main graph in order, propagating channel ids through :data:`PROPAGATION`."""
    cg = ChannelGraph(model, opset=opset_version(model), attention_heads=attention_heads)
    for node in model.graph:
        default_domain = node.domain in ("", "ai.onnx")
        handler = PROPAGATION.get(node.op_type) if default_domain else None
        if handler is None:
            if cg.tracked_inputs(node):
                _unknown(node, cg)
            continue
        handler(node, cg)
    cg.finish()
    return cg
