"""Masking, built apart from prune's surgery: the reference "pruning equals masking" is checked against.

Pruning a channel should compute what the dense model computes once that
channel's *output* is zeroed. Here that is done without touching a weight:
a ``Mul`` by a 0/1 mask goes after every layer that computes the channel (a
Conv, Gemm or MatMul producing it, and a depthwise Conv passing it on),
past the per-channel ops that follow the layer (BatchNorm, the activation,
a constant bias or scale). So a BatchNorm's shift and an activation that
does not map 0 to 0 (HardSigmoid in a squeeze-excite gate) are masked
too, as removal does. Where an op between a mask and the next layer maps 0
to something else (a BatchNorm after a residual Add), the channel reaches
that layer non-zero; :func:`nonzero_at_readers` finds those channels so a
test can leave their groups out, as the property only holds where zeros
flow through.

Only discovery (which channels exist and where) is shared with the pass;
the edits are not.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import onnx_ir as ir

from onnxopt.graph import Names, add_initializer, cleanup, constant_array, expose_values, is_onnx_op, make_node
from onnxopt.io import infer_shapes
from onnxopt_passes.prune.constants import fold_constant_chains, fold_reshape_targets
from onnxopt_passes.prune.groups import ChannelGraph, Group
from onnxopt_passes.prune.ops import discover
from onnxopt_passes.prune.surgery import apply_surgery

from tests.helpers import run_model

__all__ = ["prepared", "removal", "masked_copy", "pruned_copy", "nonzero_at_readers"]

LAYERS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
#: per-channel ops a mask moves past: they act on each channel alone (with constants), so the mask must follow them
PER_CHANNEL = ("BatchNormalization", "Relu", "LeakyRelu", "PRelu", "Elu", "Selu", "Celu", "Gelu", "Sigmoid",
               "HardSigmoid", "HardSwish", "Tanh", "Softplus", "Mish", "Clip", "Identity", "Add", "Sub", "Mul", "Div", "Sum")


def prepared(model: ir.Model) -> ir.Model:
    """The model as prune sees it before discovery (shapes inferred, constant chains folded): exact rewrites only."""
    infer_shapes(model)
    names = Names(model)
    seen: set[str] = set()
    for node in model.graph:  # unique names: the masked copy's readers are found by name
        if not node.name or node.name in seen:
            node.name = names.fresh(node.name or node.op_type)
        seen.add(node.name)
    if fold_constant_chains(model) + fold_reshape_targets(model):
        cleanup(model)
    return model


def removal(cg: ChannelGraph, groups: list[Group], share: float, rng: np.random.Generator) -> np.ndarray:
    """``keep`` by channel root with a random ``share`` (at least one) of each given group's prunable channels removed."""
    keep = np.ones(cg.num_ids, dtype=bool)
    for g in groups:
        if len(g.roots) < 2:
            continue
        n = max(1, int(len(g.roots) * share))
        keep[rng.choice(g.roots, size=n, replace=False)] = False
    return keep


def _only_user(value: ir.Value) -> ir.Node | None:
    uses = list(value.uses())
    return uses[0][0] if len(uses) == 1 else None


def _mask_point(value: ir.Value, cg: ChannelGraph) -> ir.Value:
    """Where the mask goes: past the per-channel ops reading ``value`` alone.

    Their other inputs are constants, or (an Add joining a layer's parallel
    branches, or a residual) tensors carrying the same channels, which are
    masked alike: the mask lands on the channel's output as the next layer sees it.
    """
    while not value.is_graph_output():
        user = _only_user(value)
        if user is None or not is_onnx_op(user, *PER_CHANNEL) or user.outputs[0] is None:
            break
        others = [v for v in user.inputs if v is not None and v is not value]
        joins = is_onnx_op(user, "Add", "Sum") and value in cg.layouts
        if any(constant_array(v) is None and not (joins and v in cg.layouts) for v in others):
            break
        value = user.outputs[0]
    return value


def _computes_channels(node: ir.Node, cg: ChannelGraph) -> bool:
    """A layer with a constant weight whose output carries tracked channels (producers and depthwise convs alike)."""
    return (is_onnx_op(node, *LAYERS) and len(node.inputs) > 1 and constant_array(node.inputs[1]) is not None
            and node.outputs[0] in cg.layouts)


def masked_copy(model: ir.Model, keep: np.ndarray) -> ir.Model:
    """A dense copy whose removed channels are zeroed by ``Mul`` masks after the layers that compute them."""
    copy = model.clone()
    cg = discover(copy)  # same walk, same channel ids as on the model the keep was built for
    names = Names(copy)
    points = {id(v): v for node in list(copy.graph) if _computes_channels(node, cg)
              for v in [_mask_point(node.outputs[0], cg)]}
    for value in points.values():
        layout = cg.layouts.get(value)
        if layout is None:
            continue
        mask = keep[cg.roots(layout.ids)]
        if mask.all():
            continue
        shape = [1] * layout.rank
        shape[layout.axis] = len(mask)
        const = add_initializer(copy.graph, mask.astype(np.float32).reshape(shape), names.fresh("prune_mask"))
        users = list(value.uses())  # before the mask reads it too
        mul = make_node("Mul", [value, const], names=names, name_hint="prune_mask_mul")
        producer = value.producer()
        assert producer is not None
        copy.graph.insert_after(producer, [mul])
        mul.outputs[0].dtype, mul.outputs[0].shape = value.dtype, value.shape
        for user, index in users:
            user.replace_input_with(index, mul.outputs[0])
    cleanup(copy)
    return copy


def pruned_copy(model: ir.Model, keep: np.ndarray) -> ir.Model:
    """A copy with the removed channels cut out by prune's surgery."""
    copy = model.clone()
    apply_surgery(copy, discover(copy), keep)
    cleanup(copy)
    return copy


def nonzero_at_readers(model: ir.Model, keep: np.ndarray, feed: Mapping[str, np.ndarray]) -> set[int]:
    """Roots of removed channels that reach a reading layer non-zero in :func:`masked_copy` (zeros did not flow)."""
    cg = discover(model.clone())
    masked = masked_copy(model, keep)
    by_name = {node.name: node for node in masked.graph}
    # a mask right before a reader renames its input: expose what the reader reads in the masked model
    wanted: dict[str, ir.Value] = {}
    for c in cg.consumers:
        node = by_name[c.node.name]
        read = node.inputs[c.data_index]
        assert read is not None and read.name
        wanted[read.name] = c.value
    outputs = run_model(expose_values(masked, list(wanted)), feed) if wanted else []
    bad: set[int] = set()
    for original, array in zip(wanted.values(), outputs):
        layout = cg.layouts[original]
        roots = cg.roots(layout.ids)
        removed = ~keep[roots]
        if not removed.any():
            continue
        x = np.moveaxis(np.asarray(array), layout.axis, 0)[removed].reshape(int(removed.sum()), -1)
        bad.update(roots[removed][np.abs(x).max(axis=1) != 0].tolist())
    return bad
