"""Keep what a removed channel adds whatever the input: fold its constant part into the readers' biases.

A channel whose filters are (near) zero is not silent: its BatchNorm shift
goes through the activation (HardSwish(beta), a squeeze-excite gate's
HardSigmoid(bias)) and the next layers add that constant to every output.
Magnitude saliency ranks exactly these channels first, and removing them
takes the constant away too, which shifts every reader's output. This
module measures each removed channel's *constant part* (what reaches the
readers when the channel's filters are zeroed and its biases kept) with one
ONNX Runtime run of a zero input, and adds ``W[:, c] * constant`` to each
reader's bias before surgery. For a reader that sums over a single tap
(1x1 Conv, Gemm, MatMul) and a dead filter this is exact; for a KxK reader
the image border, where padding reads zeros, is approximated by the
tensor's spatial mean.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import onnx_ir as ir

from onnxopt.graph import Names, attribute, constant_array, expose_values, graph_input_values, replace_input_weight
from onnxopt.sessions import SessionFactory

from .groups import ChannelGraph, Consumer
from .reconstruct import _following_bias

__all__ = ["constant_parts", "compensate"]


def _zero_feed(model: ir.Model, shapes: Mapping[str, tuple[int, ...]] | None) -> dict[str, np.ndarray] | None:
    """A zero input per graph input (batch 1), or None when a dim other than the batch is unknown."""
    feed = {}
    for value in graph_input_values(model.graph):
        shape = (shapes or {}).get(value.name or "")
        if shape is None:
            if value.shape is None or value.dtype is None:
                return None
            dims = [d if isinstance(d, int) else None for d in value.shape.dims]
            if any(d is None for d in dims[1:]):
                return None
            shape = tuple(1 if d is None else d for d in dims)  # type: ignore[misc]
        assert value.dtype is not None
        feed[value.name or ""] = np.zeros(shape, dtype=value.dtype.numpy())
    return feed


def constant_parts(model: ir.Model, cg: ChannelGraph, keep: np.ndarray, sessions: SessionFactory,
                   shapes: Mapping[str, tuple[int, ...]] | None) -> dict[ir.Value, np.ndarray] | None:
    """Per reader input holding removed channels: the value at each position along its channel axis (0 for kept ones).

    ``cg`` must describe ``model``. None when the model cannot be run on a
    zero input of known shape (a dynamic spatial dim and no data to size it).
    """
    values = {c.value: None for c in cg.consumers if not keep[cg.roots(cg.layouts[c.value].ids)].all()}
    if not values:
        return {}
    feed = _zero_feed(model, shapes)
    if feed is None:
        return None
    zeroed = model.clone()
    # discovery on the clone hands out the same ids, so producers line up by position
    twin = {id(a): b for a, b in zip(model.graph, zeroed.graph)}
    names = Names(zeroed)
    for p in cg.producers:
        removed = ~keep[cg.roots(p.ids)]
        if not removed.any():
            continue
        node = twin[id(p.node)]
        w = constant_array(node.inputs[p.weight_index])
        assert w is not None
        w = w.copy()
        index: list[slice | np.ndarray] = [slice(None)] * w.ndim
        index[p.weight_axis] = removed
        w[tuple(index)] = 0
        replace_input_weight(node, p.weight_index, w, names)
    wanted = [v.name for v in values if v.name]
    outputs = sessions.create(expose_values(zeroed, wanted)).run(wanted, feed)
    parts: dict[ir.Value, np.ndarray] = {}
    by_name = {v.name: v for v in values}
    for name, array in zip(wanted, outputs):
        value = by_name[name]
        layout = cg.layouts[value]
        x = np.moveaxis(np.asarray(array, dtype=np.float64), layout.axis, 0).reshape(len(layout.ids), -1)
        removed = ~keep[cg.roots(layout.ids)]
        parts[value] = np.where(removed, x.mean(axis=1), 0.0)
    return parts


def _shift(consumer: Consumer, part: np.ndarray) -> np.ndarray | None:
    """What the removed channels' constant parts add to each output of ``consumer`` (None: a kind not handled)."""
    node = consumer.node
    w = constant_array(node.inputs[consumer.weight_index])
    assert w is not None
    if consumer.kind == "conv":  # [out, in, taps...]: group 1 only (grouped readers are producers, not consumers)
        return w.reshape(w.shape[0], w.shape[1], -1).sum(axis=2, dtype=np.float64) @ part
    if consumer.kind == "gemm":
        rows = w.astype(np.float64).T if consumer.weight_axis == 1 else w.astype(np.float64)  # [in, out]
        return float(attribute(node, "alpha", 1.0)) * (part @ rows)
    if consumer.kind == "matmul":
        return part @ w.astype(np.float64)
    return None


def compensate(cg: ChannelGraph, parts: Mapping[ir.Value, np.ndarray], names: Names) -> tuple[int, list[str]]:
    """Add each reader's shift to its bias (made when absent); return readers changed and readers left as they were."""
    done, left = 0, []
    for consumer in cg.consumers:
        part = parts.get(consumer.value)
        if part is None or not part.any():
            continue
        shift = _shift(consumer, part)
        node = consumer.node
        if shift is None or not np.isfinite(shift).all():
            left.append(node.name or node.op_type)
            continue
        if consumer.kind == "conv":
            index = 2
            if len(node.inputs) < 3 or node.inputs[2] is None:
                node.resize_inputs(3)
                bias = np.zeros(len(shift))
            else:
                bias = constant_array(node.inputs[2])
        elif consumer.kind == "gemm":
            index = 2
            beta = float(attribute(node, "beta", 1.0))
            c = constant_array(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2] is not None else None
            if len(node.inputs) > 2 and node.inputs[2] is not None and (c is None or c.size not in (1, len(shift))):
                left.append(node.name or node.op_type)
                continue
            if beta == 0.0:
                left.append(node.name or node.op_type)
                continue
            if len(node.inputs) < 3 or node.inputs[2] is None:
                node.resize_inputs(3)
            bias = np.broadcast_to(c.reshape(-1), shift.shape) if c is not None else np.zeros(len(shift))
            shift = shift / beta
        else:
            found = _following_bias(node)
            b = constant_array(found[0].inputs[found[1]]) if found is not None else None
            if found is None or b is None or b.size != len(shift):
                left.append(node.name or node.op_type)
                continue
            node, index, bias = found[0], found[1], b
        assert bias is not None
        weight = constant_array(consumer.node.inputs[consumer.weight_index])
        assert weight is not None
        dtype = weight.dtype  # a bias made here from float64 zeros must still match the layer's type
        new = (np.asarray(bias, dtype=np.float64).reshape(-1) + shift).astype(dtype)
        if consumer.kind == "matmul":
            new = new.reshape(bias.shape)
        replace_input_weight(node, index, new, names, hint=f"{node.name or node.op_type}_bias")
        done += 1
    return done, left
