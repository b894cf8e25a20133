"""Packed weights that quant leaves float go back to the packed form they came in.

quant's preparation folds every constant subgraph (``fold.max_growth=0``)
because it needs each weight as a constant to quantize it; that unpacks a
clustered model's decode (indices and codebook -> Gather) into fp32 weights.
The nodes quant then leaves float (fallback, speed guard, exclusions, ops
without an integer kernel) would keep those fp32 copies and the file would
grow back to nearly its unclustered size. So the decodes are read before the
preparation (:func:`packed_decodes`), and after quantizing every float
weight that one of them computes, bit for bit as ONNX Runtime computes it,
is replaced by that decode again (:func:`restore_packed`); a weight the
preparation scaled after unpacking it (a BatchNorm folded in, in float64)
becomes the decode times a float64 scale per slice, rounded once to float32,
when that gives every value bit for bit. ORT folds the decode at session
start, so the float nodes read exactly the same values.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from onnxopt.graph import Names, add_initializer
from onnxopt.sessions import SessionFactory

from onnxopt_passes.fold import GROWTH_FLOOR_BYTES, FoldConfig

__all__ = ["PackedDecode", "packed_decodes", "restore_packed"]

#: A decode is put back when the weight it computes is this many times its stored bytes (fold's default rule).
_GROWTH = FoldConfig().max_growth
#: Ops whose value is no function of their inputs: such a subgraph is no decode.
_NOT_PURE = frozenset({"RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Bernoulli",
                       "Multinomial", "Dropout"})
#: The decodes' unpacked weights are evaluated in groups of at most this many bytes (memory stays bounded).
_EVAL_BYTES = 256 << 20


@dataclass(frozen=True)
class _Step:
    domain: str
    op_type: str
    inputs: tuple[str | None, ...]
    outputs: tuple[str, ...]
    attributes: tuple[ir.Attr, ...]


@dataclass(frozen=True)
class PackedDecode:
    """A weight computed in the graph from constants only: the value it computes, its nodes in order and the
    initializers they read (shared with the model, never written to)."""

    value: str
    steps: tuple[_Step, ...]
    constants: tuple[tuple[str, ir.TensorProtocol], ...]
    #: (node name, input index) of the nodes reading it: a weight changed later (BatchNorm folded into it) gets a
    #: new name, its readers keep theirs
    readers: tuple[tuple[str, int], ...] = ()

    @property
    def stored_bytes(self) -> int:
        return sum(int(t.nbytes) for _, t in self.constants) + sum(
            int(a.value.nbytes) for s in self.steps for a in s.attributes if isinstance(a.value, ir.TensorProtocol))


def packed_decodes(model: ir.Model) -> list[PackedDecode]:
    """Every value of the main graph computed from constants only (standard ops, no subgraphs, nothing random)
    and read by a node that is not, or a graph output: the decodes a fold would unpack. Nothing is evaluated.
    The model's nodes should be named (:func:`onnxopt.graph.name_nodes`): their names find the weights again."""
    graph = model.graph
    # name -> the initializer's tensor, or the node computing it from constants
    constant: dict[str, ir.Node | ir.TensorProtocol] = {
        v.name: v.const_value for v in graph.initializers.values()
        if v.name and v.const_value is not None and not v.is_graph_input()}
    for node in graph:
        pure = (node.domain in ("", "ai.onnx") and node.op_type not in _NOT_PURE
                and not any(a.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS) for a in node.attributes.values()))
        if pure and all(v is None or v.name in constant for v in node.inputs):
            for out in node.outputs:
                if out.name:
                    constant[out.name] = node
    found = []
    for node in graph:
        for value in node.outputs:
            if constant.get(value.name or "") is not node:
                continue
            # where a constant enters the rest of the model: a reader that is not constant itself
            if value.is_graph_output() or any(constant.get(o.name or "") is not r for r, _ in value.uses()
                                              for o in r.outputs):
                decode = _decode(value.name or "", constant, graph)
                readers = tuple((r.name, i) for r, i in value.uses() if r.name and constant.get(r.outputs[0].name or "") is not r)
                found.append(PackedDecode(decode.value, decode.steps, decode.constants, readers))
    return found


def _decode(name: str, constant: dict[str, ir.Node | ir.TensorProtocol], graph: ir.Graph) -> PackedDecode:
    """The nodes (in graph order) and initializers ``name`` is computed from."""
    nodes: dict[int, ir.Node] = {}
    tensors: dict[str, ir.TensorProtocol] = {}
    todo = [name]
    while todo:
        current = todo.pop()
        source = constant[current]
        if not isinstance(source, ir.Node):
            tensors[current] = source
        elif id(source) not in nodes:
            nodes[id(source)] = source
            todo.extend(v.name for v in source.inputs if v is not None and v.name)
    order = {id(n): i for i, n in enumerate(graph)}
    steps = tuple(_Step(n.domain, n.op_type, tuple(v.name if v is not None else None for v in n.inputs),
                        tuple(o.name or "" for o in n.outputs), tuple(n.attributes.values()))
                  for n in sorted(nodes.values(), key=lambda n: order[id(n)]))
    return PackedDecode(name, steps, tuple(sorted(tensors.items())))


def restore_packed(model: ir.Model, decodes: Sequence[PackedDecode], sessions: SessionFactory) -> tuple[int, int]:
    """Put back, in ``model``'s main graph, the decode of every float initializer one of ``decodes`` computes bit
    for bit (as ONNX Runtime evaluates the decode at ``model``'s opset), or that decode times a scale per slice, when
    the initializer is ``max_growth`` times larger than its packed form; returns how many were put back and the
    bytes of weights saved."""
    graph = model.graph
    by_name = {n.name: n for n in graph if n.name}
    candidates = []
    for decode in decodes:
        value = _weight(graph, decode, by_name)
        if (value is None or value.const_value is None or value.is_graph_input() or value.is_graph_output()
                or not value.uses()):
            continue  # quantized (its float copy is gone) or not a weight any more
        unpacked = int(value.const_value.nbytes)
        if unpacked > GROWTH_FLOOR_BYTES and unpacked > _GROWTH * decode.stored_bytes:
            candidates.append((decode, value))
    restored = saved = 0
    names = Names(model)
    for group in _groups(candidates):
        for (decode, value), array in zip(group, _evaluate([d for d, _ in group], model, sessions)):
            weight = value.const_value.numpy()  # type: ignore[union-attr]
            if array is not None and _bit_equal(array, weight):
                saved += int(weight.nbytes) - decode.stored_bytes
                _put_back(graph, decode, value, names)
                restored += 1
                continue
            # changed after unpacking (a BatchNorm folded into it scales each output channel, a HardSigmoid the whole
            # weight): the decode times a scale per slice may still hold it exactly
            stored = None if array is None else _rescaled(graph, decode, value, weight, array, names)
            del array
            if stored is not None:
                saved += int(weight.nbytes) - stored
                restored += 1
    return restored, saved


def _weight(graph: ir.Graph, decode: PackedDecode, by_name: dict[str, ir.Node]) -> ir.Value | None:
    """The initializer standing where ``decode``'s value was: under its name, or read by the same nodes."""
    value = graph.initializers.get(decode.value)
    if value is not None:
        return value
    for node_name, index in decode.readers:
        node = by_name.get(node_name)
        source = node.inputs[index] if node is not None and index < len(node.inputs) else None
        if source is not None and source.name and graph.initializers.get(source.name) is source:
            return source
    return None


def _groups(candidates: list[tuple[PackedDecode, ir.Value]]) -> Iterator[list[tuple[PackedDecode, ir.Value]]]:
    group: list[tuple[PackedDecode, ir.Value]] = []
    used = 0
    for decode, value in candidates:
        size = int(value.const_value.nbytes)  # type: ignore[union-attr]
        if group and used + size > _EVAL_BYTES:
            yield group
            group, used = [], 0
        group.append((decode, value))
        used += size
    if group:
        yield group


def _bit_equal(a: np.ndarray, b: np.ndarray) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return bool(np.array_equal(np.ascontiguousarray(a).reshape(-1).view(np.uint8),
                               np.ascontiguousarray(b).reshape(-1).view(np.uint8)))


def _build(graph: ir.Graph, decode: PackedDecode, names: Names, shared: dict[str, ir.Value]) -> tuple[list[ir.Node], ir.Value]:
    """The decode's nodes (not yet in a graph) reading initializers of ``graph`` (reused by name from ``shared``
    when the same tensor is there, else added under fresh names); returns them and the decoded value."""
    mapping: dict[str, ir.Value] = {}
    for name, tensor in decode.constants:
        existing = shared.get(name)
        if existing is None or existing.const_value is None or not (
                existing.const_value is tensor or _bit_equal(existing.const_value.numpy(), tensor.numpy())):
            fresh = names.fresh(name)
            existing = add_initializer(graph, ir.Tensor(tensor.numpy(), name=fresh), fresh)
            shared.setdefault(name, existing)
        mapping[name] = existing
    nodes = []
    for step in decode.steps:
        node = ir.Node(step.domain, step.op_type, [mapping[i] if i else None for i in step.inputs], step.attributes,
                       num_outputs=len(step.outputs), name=names.fresh(step.outputs[0] or step.op_type))
        for out, name in zip(node.outputs, step.outputs):
            out.name = names.fresh(name or step.op_type)
            mapping[name] = out
        nodes.append(node)
    return nodes, mapping[decode.value]


def _evaluate(decodes: list[PackedDecode], model: ir.Model, sessions: SessionFactory) -> list[np.ndarray | None]:
    """The weights ``decodes`` compute, evaluated by ONNX Runtime at ``model``'s opsets (None where it cannot)."""
    graph = ir.Graph([], [], nodes=[], opset_imports=dict(model.opset_imports), name="decodes")
    names, shared, outputs = Names(ir.Model(graph, ir_version=model.ir_version)), {}, []
    for decode in decodes:
        nodes, out = _build(graph, decode, names, shared)
        graph.extend(nodes)
        outputs.append(out)
    graph.outputs.extend(outputs)
    try:
        session = sessions.create(ir.Model(graph, ir_version=model.ir_version))
        return list(session.run(None, {}))
    except Exception:  # noqa: BLE001 - a decode ORT cannot run at this opset is simply not put back
        if len(decodes) == 1:
            return [None]
        return [r for d in decodes for r in _evaluate([d], model, sessions)]


def _row_scales(original: np.ndarray, weight: np.ndarray) -> np.ndarray | None:
    """Per row, a float64 ``s`` with ``float32(float64(original) * s) == weight`` bit for bit (how a BatchNorm scale
    folded into the weight in float64 got there), or None when some row has none.

    Each nonzero element bounds ``s`` to the interval that rounds to its float32 target; the middle of the rows'
    intersections is taken and checked."""
    o = original.astype(np.float64)
    t = weight.astype(np.float32)
    # the float64 interval of products that round to each float32 target (its halfway points to the neighbours)
    below = (t.astype(np.float64) + np.nextafter(t, np.float32(-np.inf)).astype(np.float64)) / 2
    above = (t.astype(np.float64) + np.nextafter(t, np.float32(np.inf)).astype(np.float64)) / 2
    nonzero = o != 0
    safe = np.where(nonzero, o, 1.0)
    a, b = below / safe, above / safe
    lo = np.where(nonzero, np.minimum(a, b), -np.inf).max(axis=1)
    hi = np.where(nonzero, np.maximum(a, b), np.inf).min(axis=1)
    scales = np.where(np.isfinite(lo) & np.isfinite(hi), (lo + hi) / 2, 1.0)
    exact = (o * scales[:, None]).astype(np.float32)
    if not _bit_equal(exact, t):
        return None
    return scales


def _rescaled(graph: ir.Graph, decode: PackedDecode, value: ir.Value, weight: np.ndarray, original: np.ndarray,
              names: Names) -> int | None:
    """``value`` written as its decode times a float64 scale per slice of one axis, rounded once to float32 (a
    BatchNorm folded into the weight scales its output channels so), when that holds it bit for bit and saves
    bytes; returns the bytes stored."""
    from onnxopt_passes.cluster.storage import as_rows

    if (original.shape != weight.shape or original.dtype != np.float32 or weight.dtype != np.float32
            or not weight.ndim):
        return None
    for axis in range(weight.ndim):
        stored = decode.stored_bytes + 8 * weight.shape[axis]
        if weight.nbytes <= _GROWTH * stored:
            continue
        scales = _row_scales(np.ascontiguousarray(as_rows(original, axis)), np.ascontiguousarray(as_rows(weight, axis)))
        if scales is None:
            continue
        shape = [1] * weight.ndim
        shape[axis] = weight.shape[axis]
        scale = add_initializer(graph, scales.reshape(shape), names.fresh(f"{value.name}.scale"))
        shared = {k: v for k, v in graph.initializers.items() if not v.is_graph_input()}
        nodes, decoded = _build(graph, decode, names, shared)
        # in float64, as the fold multiplied: the same rounding, once, to float32 (ORT folds this at session start)
        wide = ir.Node("", "Cast", [decoded], [ir.AttrInt64("to", int(ir.DataType.DOUBLE))], num_outputs=1,
                       name=names.fresh(f"{value.name}.f64"))
        mul = ir.Node("", "Mul", [wide.outputs[0], scale], num_outputs=1, name=names.fresh(f"{value.name}.rescale"))
        back = ir.Node("", "Cast", [mul.outputs[0]], [ir.AttrInt64("to", int(ir.DataType.FLOAT))], num_outputs=1,
                       name=names.fresh(f"{value.name}.f32"))
        for node in (wide, mul, back):
            node.outputs[0].name = node.name
        _replace(graph, value, [*nodes, wide, mul, back], back.outputs[0])
        return stored
    return None


def _replace(graph: ir.Graph, value: ir.Value, nodes: list[ir.Node], out: ir.Value) -> None:
    """The initializer ``value`` replaced by ``out``, computed by ``nodes`` put at the graph's start; same name."""
    name = value.name
    out.type, out.shape = value.type, value.shape
    graph.insert_before(next(iter(graph)), nodes)
    value.replace_all_uses_with(out)
    graph.initializers.pop(name)
    out.name = name


def _put_back(graph: ir.Graph, decode: PackedDecode, value: ir.Value, names: Names) -> None:
    """``value`` (an initializer equal to what ``decode`` computes) replaced by the decode, at the graph's start."""
    shared = {k: v for k, v in graph.initializers.items() if not v.is_graph_input()}
    nodes, out = _build(graph, decode, names, shared)
    _replace(graph, value, nodes, out)
