"""Which nodes to quantize and which tensors get a QDQ pair: a plan, computed before any graph edit.

Anchors (Conv, MatMul, Gemm) are quantized when their placement allows.
A follower joins the integer region when all its activation inputs come out
of integer kernels, or some do and its output feeds one (then joining
removes conversions instead of adding them); passthrough and rescale ops
join when their input is integer. This repeats until nothing changes. An
output followed only by a Relu/Clip is quantized after it, where ONNX
Runtime folds the activation into the integer kernel. Tensors that must
share one scale (a Concat's inputs and output, both sides of a passthrough
op) are grouped.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import onnx_ir as ir

from onnxopt.graph import consumers, constant_array, is_weight, iter_graphs

from onnxopt_passes.quant.handlers import ABSORBED_ACTIVATIONS, OpRule, PlaceContext, Placement, place, rescale_factor

__all__ = ["NodePlan", "Plan", "build_plan"]


@dataclass
class NodePlan:
    """One quantized node: its rule, placement and whether its output is quantized (and after which activation)."""

    node: ir.Node
    rule: OpRule
    placement: Placement
    output: ir.Value | None = None
    absorbed: ir.Node | None = None


@dataclass
class Plan:
    """Quantized nodes, tensors to quantize and groups of tensors sharing one scale."""

    nodes: dict[int, NodePlan] = field(default_factory=dict)
    #: every non-constant tensor that gets a QDQ pair, by name
    tensors: dict[str, ir.Value] = field(default_factory=dict)
    #: tensor name -> name of its scale group's representative
    parent: dict[str, str] = field(default_factory=dict)
    #: tensors that are Relu/Clip outputs folded into the kernel before them (their range starts at the floor)
    absorbed: set[str] = field(default_factory=set)
    #: id of each quantized output value -> its node's plan
    outputs: dict[int, NodePlan] = field(default_factory=dict)
    #: Div/Mul-by-constant nodes to fold into the scale of the DequantizeLinear before them
    rescales: list[ir.Node] = field(default_factory=list)
    #: candidates left float, with why
    skipped: dict[int, tuple[ir.Node, str]] = field(default_factory=dict)

    def group(self, name: str) -> str:
        root = name
        while self.parent.get(root, root) != root:
            root = self.parent[root]
        self.parent[name] = root
        return root

    def merge(self, a: str, b: str) -> None:
        ra, rb = self.group(a), self.group(b)
        if ra != rb:
            self.parent[rb] = ra

    def members(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for name in self.tensors:
            out.setdefault(self.group(name), []).append(name)
        return out

    def int_producer(self, value: ir.Value) -> bool:
        """True when ``value`` comes out of an integer kernel (so every reader reads the dequantized copy)."""
        return id(value) in self.outputs


def _absorbing_activation(value: ir.Value) -> ir.Node | None:
    """The Relu/Clip that alone reads ``value`` and can be folded into the quantized output."""
    readers = consumers(value)
    if len(readers) != 1 or value.is_graph_output():
        return None
    act = readers[0]
    if act.domain not in ("", "ai.onnx") or act.op_type not in ABSORBED_ACTIVATIONS or act.graph is not value.graph:
        return None
    if act.op_type == "Clip":
        bounds = [constant_array(v) if v is not None else None for v in act.inputs[1:3]]
        if any(v is not None and b is None for v, b in zip(act.inputs[1:3], bounds)):
            return None  # bounds computed at run time
        if bounds and bounds[0] is not None and float(bounds[0]) > 0:
            return None
    return act


def _quantized_output(node: ir.Node) -> tuple[ir.Value, ir.Node | None]:
    out = node.outputs[0]
    if node.op_type in ("Div", "Mul") and rescale_factor(node) is not None:
        return out, None  # a rescale's output is its input's integers, read with another scale
    act = _absorbing_activation(out)
    return (act.outputs[0], act) if act is not None else (out, None)


def _activation_values(node: ir.Node, placement: Placement) -> list[ir.Value]:
    return [node.inputs[i] for i in placement.activations
            if i < len(node.inputs) and node.inputs[i] is not None and not is_weight(node.inputs[i])]


def build_plan(model: ir.Model, excluded: dict[int, tuple[ir.Node, str]], pc: PlaceContext,
               skip_graphs: Iterable[ir.Graph] = (), *, float_bias_outputs: bool = False) -> Plan:
    """The plan for ``model`` with the ``excluded`` nodes kept float (``float_bias_outputs``: see
    :func:`_drop_dead_end_constants`)."""
    plan = Plan()
    candidates = _candidates(model, excluded, pc, skip_graphs, plan)
    chosen = _grow_from_anchors(candidates)
    if float_bias_outputs:
        _drop_dead_end_constants(chosen)
    _record_tensors(plan, chosen)
    _share_scales(plan, chosen)
    return plan


Candidate = tuple[ir.Node, OpRule, Placement]


def _candidates(model: ir.Model, excluded: dict[int, tuple[ir.Node, str]], pc: PlaceContext,
                skip_graphs: Iterable[ir.Graph], plan: Plan) -> list[Candidate]:
    """Every node the placement table can quantize and nobody excluded; anchors it cannot take go to ``plan.skipped``."""
    blocked = {id(g) for g in skip_graphs}
    candidates: list[Candidate] = []
    for graph in iter_graphs(model):
        if id(graph) in blocked:
            continue
        for node in graph:
            placed = place(node, pc)
            if isinstance(placed, str):
                if node.op_type in ("Conv", "MatMul", "Gemm", "ConvTranspose"):
                    plan.skipped[id(node)] = (node, placed)
                continue
            if id(node) in excluded:
                continue
            rule, placement = placed
            candidates.append((node, rule, placement))
    return candidates


def _feeds_quantized(value: ir.Value, chosen: dict[int, Candidate]) -> bool:
    """Whether a chosen node reads ``value`` as a quantized activation."""
    for node in consumers(value):
        if id(node) in chosen:
            _, _, p = chosen[id(node)]
            if any(node.inputs[i] is value for i in p.activations if i < len(node.inputs)):
                return True
    return False


def _grow_from_anchors(candidates: list[Candidate]) -> dict[int, Candidate]:
    """The anchors (Conv/MatMul/Gemm), then every follower whose inputs are integer already, until nothing joins."""
    chosen: dict[int, Candidate] = {id(n): (n, r, p) for n, r, p in candidates if r.role == "anchor"}
    followers = [(n, r, p) for n, r, p in candidates if r.role != "anchor"]

    def int_available(value: ir.Value) -> bool:
        producer = value.producer()
        if producer is None:
            return False
        if producer.op_type in ABSORBED_ACTIVATIONS and producer.inputs and producer.inputs[0] is not None:
            before = producer.inputs[0].producer()
            if before is not None and id(before) in chosen and _absorbing_activation(producer.inputs[0]) is producer:
                return True
        return id(producer) in chosen and _quantized_output(producer)[0] is value

    changed = True
    while changed:
        changed = False
        for node, rule, placement in followers:
            if id(node) in chosen:
                continue
            acts = _activation_values(node, placement)
            if not acts:
                continue
            ints = [int_available(v) for v in acts]
            if rule.role in ("passthrough", "rescale"):
                joins = ints[0]
            else:
                joins = all(ints) or (any(ints) and _feeds_quantized(_quantized_output(node)[0], chosen))
            if joins:
                chosen[id(node)] = (node, rule, placement)
                changed = True
    return chosen


def _drop_dead_end_constants(chosen: dict[int, Candidate]) -> None:
    """Take back followers that combine one integer input with a constant (a MatMul's bias Add, a Div/Mul by a
    constant) when no quantized node reads their output, so the anchor before them keeps a float output.

    Where a projection's output carries outlier channels, its 8-bit grid is what costs fidelity: on
    all-MiniLM-L6-v2 (a pretrained sentence embedder, static int8) the attention-output, FFN and GELU-input
    projections gave embedding cosine 0.901 quantized, 0.934 with only the bias Adds float, 0.991 with their
    outputs float. The price: ONNX Runtime fuses a MatMul/Conv into its integer kernel only with a QuantizeLinear
    after it, so such a MatMul runs in float on weights dequantized at every run."""
    changed = True
    while changed:
        changed = False
        for key, (node, rule, placement) in list(chosen.items()):
            if rule.role not in ("follower", "rescale") or node.op_type not in ("Add", "Sub", "Mul", "Div"):
                continue
            acts = _activation_values(node, placement)
            constants = [v for v in node.inputs if v is not None and is_weight(v)]
            if len(acts) != 1 or not constants or _feeds_quantized(_quantized_output(node)[0], chosen):
                continue
            del chosen[key]
            changed = True


def _record_tensors(plan: Plan, chosen: dict[int, Candidate]) -> None:
    """Each chosen node's plan entry, and the tensors to calibrate (rescale outputs keep their input's grid)."""
    rescaled = {id(n.outputs[0]) for n, r, _ in chosen.values() if r.role == "rescale"}
    for node, rule, placement in chosen.values():
        out, act = _quantized_output(node)
        quantize_output = rule.output == "required" or _feeds_quantized(out, chosen)
        planned = NodePlan(node, rule, placement, out if quantize_output else None, act if quantize_output else None)
        plan.nodes[id(node)] = planned
        for value in _activation_values(node, placement):
            if value.name and id(value) not in rescaled:
                plan.tensors[value.name] = value
        if rule.role == "rescale":
            plan.rescales.append(node)
            continue
        if planned.output is not None and planned.output.name:
            plan.tensors[planned.output.name] = planned.output
            plan.outputs[id(planned.output)] = planned
            if act is not None:
                plan.absorbed.add(planned.output.name)


def _share_scales(plan: Plan, chosen: dict[int, Candidate]) -> None:
    """Ops whose kernel needs one grid on inputs and output (Concat, pooling, ...) get their tensors merged."""
    for node, rule, placement in chosen.values():
        if not rule.shared_scale:
            continue
        names = [v.name for v in _activation_values(node, placement) if v.name]
        out = plan.nodes[id(node)].output
        if out is not None and out.name:
            names.append(out.name)
        if rule.role != "passthrough" and 0 < sum(n in plan.absorbed for n in names) < len(names):
            # Relu outputs start at 0; sharing a scale with signed tensors would move their zero point
            # off the floor and keep ONNX Runtime from folding the Relu: let the kernel requantize instead.
            continue
        for other in names[1:]:
            plan.merge(names[0], other)
