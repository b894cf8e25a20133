"""QDQ insertion: turn a :class:`~onnxopt_passes.quant.plan.Plan` and calibrated ranges into QuantizeLinear/DequantizeLinear nodes.

Activations get a Q -> DQ pair; weights are stored quantized (int8, per
output channel) behind a DQ; biases are stored int32 with scale = input
scale x weight scale, as the integer kernels add them. A tensor that comes
out of an integer kernel is read by everyone through its DQ, so ONNX
Runtime can fuse the producer; a float tensor keeps its float readers and
only quantized readers see the DQ.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import ml_dtypes
import numpy as np
import onnx_ir as ir

from onnxopt.graph import Names, add_initializer, attribute, constant_array, is_weight, make_node, reroute

from onnxopt_passes.quant.handlers import Placement, rescale_factor
from onnxopt_passes.quant.grid import grid_levels
from onnxopt_passes.quant.plan import NodePlan, Plan
from onnxopt_passes.quant.saturation import SaturationCheck, check_weight, layer_record, pair_safe_scale, reduction_rows
from onnxopt_passes.quant.scheme import QParams, activation_params, quantize, quantize_bias, weight_params

__all__ = ["InsertionStats", "group_params", "insert_qdq", "Rounder"]

#: (node, float weight, weight scale, scale axis) -> the weight's int8 levels, or None to round to nearest
Rounder = Callable[[ir.Node, np.ndarray, np.ndarray, "int | None"], "np.ndarray | None"]


@dataclass
class InsertionStats:
    """What insertion wrote: QDQ pairs on activations, quantized weights and biases, bytes of weights saved."""

    activation_pairs: int = 0
    weights: int = 0
    biases: int = 0
    float_weight_bytes: int = 0
    int_weight_bytes: int = 0
    params: dict[str, QParams] = field(default_factory=dict)
    #: weights stored in 4 bits (already on an int4 grid, see :mod:`grid`)
    int4_weights: int = 0
    #: layers whose u8 x s8 pairs can saturate int16 on CPUs without VNNI (see :mod:`saturation`)
    saturation: list[dict[str, object]] = field(default_factory=list)


def group_params(plan: Plan, ranges: Mapping[str, tuple[float, float]], activation_type: str) -> dict[str, QParams]:
    """QParams of every planned tensor: one per scale group, from the union of its members' ranges."""
    out: dict[str, QParams] = {}
    for members in plan.members().values():
        known = [ranges[m] for m in members if m in ranges]
        if not known:
            continue
        lo, hi = min(r[0] for r in known), max(r[1] for r in known)
        floor = lo >= 0 and any(m in plan.absorbed for m in members)
        params = activation_params(lo, hi, activation_type, non_negative=floor)  # type: ignore[arg-type]
        for m in members:
            out[m] = params
    return out


class _Writer:
    """Creates Q/DQ nodes and quantized initializers in the right graph, with fresh names."""

    def __init__(self, names: Names, stats: InsertionStats, saturation: str = "off", int4_grid: bool = False,
                 rounder: Rounder | None = None) -> None:
        self.names = names
        self.stats = stats
        self.saturation = saturation
        self.int4_grid = int4_grid
        self.rounder = rounder
        self._weights: dict[tuple[int, int | None, float], ir.Value] = {}

    def const(self, graph: ir.Graph, array: np.ndarray, hint: str) -> ir.Value:
        # np.ascontiguousarray would turn a scalar into shape [1]; ORT fuses Add/Mul only with scalar scales
        return add_initializer(graph, np.asarray(array, order="C"), self.names.fresh(hint))

    def dequantize(self, graph: ir.Graph, q: np.ndarray, scale: np.ndarray, zero_point: np.ndarray | None,
                   axis: int | None, hint: str, before: ir.Node | None = None) -> ir.Value:
        """DequantizeLinear of constant ``q``; ``zero_point=None`` leaves that input out (zero, ``q``'s type)."""
        inputs = [self.const(graph, q, f"{hint}_quantized"), self.const(graph, scale, f"{hint}_scale")]
        if zero_point is not None:
            inputs.append(self.const(graph, zero_point, f"{hint}_zero_point"))
        attrs = {"axis": axis} if axis is not None and scale.ndim == 1 else {}
        node = make_node("DequantizeLinear", inputs, attrs, names=self.names, name_hint=f"{hint}_DequantizeLinear")
        if before is not None:
            graph.insert_before(before, [node])
        else:
            graph.append(node)
        return node.outputs[0]

    def pair(self, graph: ir.Graph, value: ir.Value, params: QParams) -> tuple[ir.Node, ir.Value]:
        hint = value.name or "t"
        scale = self.const(graph, params.scale_array(), f"{hint}_scale")
        zero_point = self.const(graph, params.zero_point_array(), f"{hint}_zero_point")
        q = make_node("QuantizeLinear", [value, scale, zero_point], names=self.names, name_hint=f"{hint}_QuantizeLinear")
        dq = make_node("DequantizeLinear", [q.outputs[0], scale, zero_point], names=self.names,
                       name_hint=f"{hint}_DequantizeLinear")
        if value.dtype is not None:
            dq.outputs[0].dtype = value.dtype
            dq.outputs[0].shape = value.shape
        graph.append(q)
        graph.append(dq)
        self.stats.activation_pairs += 1
        return q, dq.outputs[0]


def _consumer_slots(plan: Plan, value: ir.Value) -> list[tuple[ir.Node, int]]:
    """(node, slot) of every quantized reader of ``value`` at one of its activation slots."""
    out = []
    for node, slot in value.uses():
        planned = plan.nodes.get(id(node))
        if planned is not None and slot in planned.placement.activations:
            out.append((node, slot))
    return out


def _quantize_tensor(value: ir.Value, params: QParams, plan: Plan, writer: _Writer) -> None:
    if plan.int_producer(value):
        graph = value.graph
        assert graph is not None
        q, dq = writer.pair(graph, value, params)
        public = value.name if value.is_graph_output() else None
        reroute(value, dq)
        q.replace_input_with(0, value)
        if public is not None:
            value.name = writer.names.fresh(f"{public}_prequant")
        return
    by_graph: dict[int, list[tuple[ir.Node, int]]] = {}
    for node, slot in _consumer_slots(plan, value):
        by_graph.setdefault(id(node.graph), []).append((node, slot))
    for slots in by_graph.values():
        graph = slots[0][0].graph
        assert graph is not None
        _, dq = writer.pair(graph, value, params)
        for node, slot in slots:
            node.replace_input_with(slot, dq)


def _constant_input(planned: NodePlan, slot: int, params: QParams | None, writer: _Writer, activation_type: str) -> None:
    node = planned.node
    value = node.inputs[slot]
    array = constant_array(value)
    assert array is not None and node.graph is not None
    if params is None:
        params = activation_params(float(array.min()) if array.size else 0.0, float(array.max()) if array.size else 0.0,
                                   activation_type)  # type: ignore[arg-type]
    q = quantize(array, params.scale, params.zero_point, params.dtype)
    out = writer.dequantize(node.graph, q, params.scale_array(), params.zero_point_array(), None, value.name or "c")
    node.replace_input_with(slot, out)


def _weight_and_bias(planned: NodePlan, input_params: QParams, writer: _Writer) -> None:
    node, placement = planned.node, planned.placement
    graph = node.graph
    assert graph is not None and placement.weight is not None
    w_value = node.inputs[placement.weight]
    w = constant_array(w_value)
    assert w is not None
    axis = placement.weight_axis
    grid = grid_levels(w, axis) if writer.int4_grid else None
    plain = weight_params(w, axis) if grid is None else None
    w_scale = grid if grid is not None else plain
    rows = None
    if writer.saturation != "off" and input_params.dtype == "uint8":
        rows = reduction_rows(w, node.op_type, bool(attribute(node, "transB", 0)))
        if writer.saturation == "fix":
            w_scale = pair_safe_scale(rows, w_scale)
    pair_scale = w_scale  # the report's widening is the pair fix's: quantize_bias may raise a dead channel's more
    if placement.bias is not None:
        b = constant_array(node.inputs[placement.bias])
        assert b is not None
        b_q, b_scale, w_scale = quantize_bias(b, input_params.scale, w_scale)
        # no zero point: an int32 bias's is 0 by default, and ORT fuses it all the same (measured on ORT 1.32; a
        # weight's DequantizeLinear without one is not fused into QGemm); saves 4 bytes a channel
        out = writer.dequantize(graph, b_q, b_scale, None, 0, node.inputs[placement.bias].name or "bias")  # type: ignore[union-attr]
        node.replace_input_with(placement.bias, out)
        writer.stats.biases += 1
        key = None  # the scales depend on this node's input: not shareable
    else:
        key = (id(w_value), axis, 0.0)
    if key is not None and key in writer._weights:
        node.replace_input_with(placement.weight, writer._weights[key])
        return
    # a weight shared from an outer scope (an If/Loop/Scan body reading a main-graph initializer) is stored once, in
    # the graph that owns it, ahead of its nodes: every body reading it sees the one DequantizeLinear
    owner = w_value.graph if key is not None and w_value.is_initializer() and w_value.graph is not None else graph  # type: ignore[union-attr]
    first = owner.node(0) if owner is not graph and len(owner) else None
    if rows is not None and plain is None:
        plain = weight_params(w, axis)
    # checked before w_q exists: the plain-scale int8 copy it needs is then the only one of the weight's size
    before = _plain_check(node, w, plain) if rows is not None and plain is not None and writer.saturation == "fix" else None
    w_q = quantize(w, w_scale, 0, "int8", axis)
    if writer.rounder is not None and not (grid is not None and np.array_equal(w_scale, grid)):  # a grid is exact
        learned = writer.rounder(node, w, w_scale, axis)
        w_q = w_q if learned is None else learned
    if rows is not None and plain is not None:
        _record_saturation(node, w_q, plain, pair_scale, before, writer)
    # a Conv weight's zero point (0) is left out: ORT fuses QLinearConv all the same; its QGemm/MatMulInteger
    # fusions need it (both measured on ORT 1.32)
    zero = None if node.op_type == "Conv" else np.zeros(w_scale.shape, np.int8)
    four_bit = grid is not None and np.array_equal(w_scale, grid) and int(w_q.min(initial=0)) >= -8 and int(w_q.max(initial=0)) <= 7
    if four_bit:  # int4 on disk, widened to int8 by a Cast ORT folds at load (so QLinearConv still fuses)
        hint = w_value.name or "weight"  # type: ignore[union-attr]
        packed = writer.const(owner, ir.Tensor(w_q.astype(ml_dtypes.int4), dtype=ir.DataType.INT4), f"{hint}_int4")
        cast = make_node("Cast", [packed], {"to": ir.DataType.INT8}, names=writer.names, name_hint=f"{hint}_to_int8")
        inputs = [cast.outputs[0], writer.const(owner, w_scale, f"{hint}_scale")]
        if zero is not None:
            inputs.append(writer.const(owner, zero, f"{hint}_zero_point"))
        attrs = {"axis": axis} if axis is not None and w_scale.ndim == 1 else {}
        dq = make_node("DequantizeLinear", inputs, attrs, names=writer.names, name_hint=f"{hint}_DequantizeLinear")
        if first is not None:
            owner.insert_before(first, [cast, dq])
        else:
            owner.extend([cast, dq])
        out = dq.outputs[0]
        writer.stats.int4_weights += 1
    else:
        out = writer.dequantize(owner, w_q, w_scale, zero, axis, w_value.name or "weight", before=first)  # type: ignore[union-attr]
    node.replace_input_with(placement.weight, out)
    if key is not None:
        writer._weights[key] = out
    writer.stats.weights += 1
    writer.stats.float_weight_bytes += w.nbytes
    writer.stats.int_weight_bytes += (w_q.size + 1) // 2 if four_bit else w_q.nbytes


def _plain_check(node: ir.Node, w: np.ndarray, plain_scale: np.ndarray) -> SaturationCheck:
    """The saturation check of ``w`` quantized with its plain (unwidened) scale: what a fix saved it from."""
    trans_b = bool(attribute(node, "transB", 0))
    return check_weight(reduction_rows(quantize(w, plain_scale, 0, "int8", _axis_of(plain_scale, w, node)),
                                       node.op_type, trans_b))


def _record_saturation(node: ir.Node, w_q: np.ndarray, plain_scale: np.ndarray, scale: np.ndarray,
                       before: SaturationCheck | None, writer: _Writer) -> None:
    """Check the int8 weight as the kernels will pair it; ``before``: with a fix, what the plain scale would have
    risked (:func:`_plain_check`; None without one)."""
    trans_b = bool(attribute(node, "transB", 0))
    after = check_weight(reduction_rows(w_q, node.op_type, trans_b))
    before = after if before is None else before
    widened = float(np.max(np.asarray(scale) / np.asarray(plain_scale)))
    entry = layer_record(node.name or node.op_type, node.op_type, before, after, widened)
    if entry is not None:
        writer.stats.saturation.append(entry)


def _axis_of(scale: np.ndarray, w: np.ndarray, node: ir.Node) -> int | None:
    if np.ndim(scale) == 0:
        return None
    if node.op_type == "Conv":
        return 0
    if node.op_type == "Gemm":
        return 0 if attribute(node, "transB", 0) else 1
    return w.ndim - 1


def _group_params_of_node(planned: NodePlan, params: Mapping[str, QParams]) -> QParams | None:
    if not planned.rule.shared_scale or planned.output is None or planned.output.name not in params:
        return None
    return params[planned.output.name]


def insert_qdq(model: ir.Model, plan: Plan, ranges: Mapping[str, tuple[float, float]], activation_type: str,
               names: Names, *, saturation: str = "off", int4_grid: bool = False,
               rounder: Rounder | None = None) -> InsertionStats:
    """Edit ``model`` in place following ``plan``; every planned tensor must have a range.

    ``saturation``: ``fix`` widens weight scales where u8 x s8 int16 pairs could saturate, ``report`` only
    records those layers, ``off`` neither (see :mod:`~onnxopt_passes.quant.saturation`). ``int4_grid``: weights
    already on an int4 grid are stored in 4 bits (needs opset 21; see :mod:`~onnxopt_passes.quant.grid`).
    """
    stats = InsertionStats()
    writer = _Writer(names, stats, saturation, int4_grid, rounder)
    params = group_params(plan, ranges, activation_type)
    _rescaled_params(plan, params)
    stats.params = params
    # Weights and constants first: they need the input scales, and the reroutes below change node inputs.
    for planned in plan.nodes.values():
        placement: Placement = planned.placement
        node = planned.node
        shared = _group_params_of_node(planned, params)
        for slot in placement.activations:
            if slot < len(node.inputs) and is_weight(node.inputs[slot]):
                _constant_input(planned, slot, shared, writer, activation_type)
        if placement.weight is not None:
            first = node.inputs[placement.activations[0]]
            assert first is not None and first.name in params
            _weight_and_bias(planned, params[first.name], writer)
    for name, value in plan.tensors.items():
        _quantize_tensor(value, params[name], plan, writer)
    _fold_rescales(plan, writer)
    return stats


def _rescaled_params(plan: Plan, params: dict[str, QParams]) -> None:
    """Params of rescale outputs: the input's, with the scale times the factor (as the folded DQ computes it)."""
    pending = list(plan.rescales)
    while pending:
        done = [n for n in pending if n.inputs[plan.nodes[id(n)].placement.activations[0]].name in params]  # type: ignore[union-attr]
        if not done:
            return
        for node in done:
            source = params[node.inputs[plan.nodes[id(node)].placement.activations[0]].name]  # type: ignore[union-attr]
            scale = float(np.float32(source.scale) * np.float32(rescale_factor(node)))
            if node.outputs[0].name:
                params[node.outputs[0].name] = QParams(scale, source.zero_point, source.dtype)
            pending.remove(node)


def _fold_rescales(plan: Plan, writer: _Writer) -> None:
    """Remove each Div/Mul by a constant; its readers dequantize the same integers with the scale times the factor."""
    pending = list(plan.rescales)
    while pending:
        progressed = False
        for node in list(pending):
            slot = plan.nodes[id(node)].placement.activations[0]
            dq = node.inputs[slot].producer() if node.inputs[slot] is not None else None
            if dq is None or dq.op_type != "DequantizeLinear":
                continue  # its input is another rescale not folded yet
            graph = node.graph
            assert graph is not None
            factor = rescale_factor(node)
            assert factor is not None
            scale = constant_array(dq.inputs[1])
            assert scale is not None
            new_scale = writer.const(graph, (scale * np.float32(factor)).astype(np.float32), f"{node.name}_rescaled_scale")
            new = make_node("DequantizeLinear", [dq.inputs[0], new_scale, dq.inputs[2]], names=writer.names,
                            name_hint=f"{node.name}_DequantizeLinear")
            old = node.outputs[0]
            if old.dtype is not None:
                new.outputs[0].dtype, new.outputs[0].shape = old.dtype, old.shape
            graph.append(new)
            reroute(old, new.outputs[0])
            graph.remove(node, safe=True)
            pending.remove(node)
            progressed = True
        if not progressed:
            raise AssertionError(f"rescale nodes without a DequantizeLinear input: {[n.name for n in pending]}")
