"""Float-exact rewrites done before quantization so more of the graph runs in integer kernels.

- HardSigmoid after a Conv/Gemm (squeeze-excite gates in MobileNetV3-style
  nets): ``HardSigmoid(y) = Clip(alpha*y + beta, 0, 1)``, and ``alpha*y + beta``
  folds into the producer's weights and bias. What is left is a Clip(0, 1),
  which ONNX Runtime folds into the quantized output of the integer Conv.
  Without this, each gate costs a dequantize, a float HardSigmoid and a
  quantize.
- Add of a per-channel constant after a Conv/Gemm (exporters that write the
  bias as a separate Add): folded into the producer's bias, so the integer
  Conv adds it instead of a QLinearAdd after it.
- HardSwish, HardSigmoid (with other readers of its input) and Swish, which
  ONNX Runtime has no integer kernel for, rebuilt from Add/Clip/Mul/Sigmoid,
  which its QDQ fusion runs as QLinearAdd/QLinearMul/QLinearSigmoid
  (:func:`expand_activations`). Where the quantizer leaves such an expansion
  wholly float, :func:`collapse_float_activations` puts the single op back.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from onnxopt.graph import (Names, add_initializer, attribute, constant_array, iter_graphs, make_node, only_consumer,
                           opset_version, replace_input_weight, reroute)

__all__ = ["fold_hardsigmoid", "fold_bias_add", "expand_activations", "collapse_float_activations", "expansion_groups", "rewrite_gelu", "fuse_tanh_gelu_chains",
           "tag_hardswish_chains"]


def _scale_producer(node: ir.Node, alpha: float, beta: float, names: Names) -> bool:
    """Make ``node`` compute alpha*y + beta; False when its weights do not allow it."""
    w = constant_array(node.inputs[1]) if len(node.inputs) > 1 else None
    if w is None or w.dtype != np.float32:
        return False
    if node.op_type == "Conv":
        channels = w.shape[0]
    elif node.op_type == "Gemm" and not attribute(node, "transA", 0) and float(attribute(node, "alpha", 1.0)) == 1.0 \
            and float(attribute(node, "beta", 1.0)) == 1.0:
        channels = w.shape[0] if attribute(node, "transB", 0) else w.shape[1]
    else:
        return False
    has_bias = len(node.inputs) > 2 and node.inputs[2] is not None
    b = constant_array(node.inputs[2]) if has_bias else np.zeros(channels, np.float32)
    if b is None or b.shape != (channels,):
        return False
    replace_input_weight(node, 1, (w * np.float32(alpha)).astype(np.float32), names)
    new_b = (b * np.float32(alpha) + np.float32(beta)).astype(np.float32)
    replace_input_weight(node, 2, new_b, names, hint=None if has_bias else f"{node.name or node.op_type}_bias")
    return True


def fold_hardsigmoid(model: ir.Model) -> int:
    """Fold every HardSigmoid that alone reads a Conv/Gemm output into it, leaving Clip(0, 1); returns the count."""
    names = Names(model)
    count = 0
    for graph in iter_graphs(model):
        for node in [n for n in graph if n.op_type == "HardSigmoid" and n.domain in ("", "ai.onnx")]:
            x = node.inputs[0]
            producer = x.producer() if x is not None else None
            if producer is None or producer.op_type not in ("Conv", "Gemm") or only_consumer(x) is not node:
                continue
            alpha, beta = float(attribute(node, "alpha", 0.2)), float(attribute(node, "beta", 0.5))
            if alpha <= 0 or not _scale_producer(producer, alpha, beta, names):
                continue
            lo = add_initializer(graph, np.array(0.0, np.float32), names.fresh(f"{node.name or 'hardsigmoid'}_min"))
            hi = add_initializer(graph, np.array(1.0, np.float32), names.fresh(f"{node.name or 'hardsigmoid'}_max"))
            clip = make_node("Clip", [x, lo, hi], names=names, name_hint=f"{node.name or 'HardSigmoid'}_clip")
            old = node.outputs[0]
            if old.dtype is not None:
                clip.outputs[0].dtype, clip.outputs[0].shape = old.dtype, old.shape
            graph.insert_after(node, clip)
            reroute(old, clip.outputs[0])
            graph.remove(node, safe=True)
            count += 1
    return count


def _per_channel(array: np.ndarray, channels: int, rank: int, axis: int) -> np.ndarray | None:
    """``array`` as one value per channel when it broadcasts along ``axis`` only (or is a scalar)."""
    if array.size == 1:
        return np.full(channels, array.reshape(-1)[0], np.float32)
    if array.size != channels or array.ndim > rank:
        return None
    shape = (1,) * (rank - array.ndim) + array.shape
    if shape[axis] != channels:
        return None
    return array.reshape(-1).astype(np.float32)


def fold_bias_add(model: ir.Model) -> int:
    """Fold Add(Conv/Gemm output, per-channel constant) into the producer's bias; returns the count."""
    names = Names(model)
    count = 0
    for graph in iter_graphs(model):
        for node in [n for n in graph if n.op_type == "Add" and n.domain in ("", "ai.onnx")]:
            for slot in (1, 0):
                x, c = node.inputs[1 - slot], constant_array(node.inputs[slot])
                producer = x.producer() if x is not None else None
                if c is None or c.dtype != np.float32 or producer is None or only_consumer(x) is not node:
                    continue
                rank = x.shape.rank() if x.shape is not None else None
                if producer.op_type == "Conv" and rank is not None and rank >= 3:
                    w = constant_array(producer.inputs[1])
                    axis = 1
                elif producer.op_type == "Gemm" and rank == 2:
                    w = constant_array(producer.inputs[1])
                    axis = 1
                else:
                    continue
                if w is None or (producer.op_type == "Gemm" and (attribute(producer, "transA", 0) or
                                                                 float(attribute(producer, "beta", 1.0)) != 1.0)):
                    continue
                channels = w.shape[0] if producer.op_type == "Conv" or attribute(producer, "transB", 0) else w.shape[1]
                add = _per_channel(c, channels, rank, axis)
                if add is None or (node.outputs[0].shape is not None and x.shape is not None
                                   and node.outputs[0].shape.rank() != rank):
                    continue
                has_bias = len(producer.inputs) > 2 and producer.inputs[2] is not None
                b = constant_array(producer.inputs[2]) if has_bias else np.zeros(channels, np.float32)
                if b is None or b.shape != (channels,):
                    continue
                replace_input_weight(producer, 2, (b + add).astype(np.float32), names,
                                     hint=None if has_bias else f"{producer.name or 'conv'}_bias")
                reroute(node.outputs[0], x)
                graph.remove(node, safe=True)
                count += 1
                break
    return count


# -- activations ORT has no integer kernel for, rebuilt from ops its QDQ fusion does run ----------------------------

#: Marks the nodes an activation expansion made, so :func:`collapse_float_activations` finds them again.
_TAG = "__qexp_"


def _scalar(graph: ir.Graph, value: float, names: Names, hint: str) -> ir.Value:
    return add_initializer(graph, np.array(value, np.float32), names.fresh(hint))


def _expand_hard_gate(graph: ir.Graph, node: ir.Node, x: ir.Value, alpha: float, beta: float, names: Names,
                      kind: str) -> list[ir.Node]:
    """``Clip(alpha*x + beta, 0, 1)`` as ``Clip(x + beta/alpha, 0, 1/alpha) * alpha`` (alpha > 0): an Add that
    runs as QLinearAdd, a Clip folded into its quantized output range, and a Mul by a constant that the
    quantizer folds into the next scale (no kernel at all)."""
    base = f"{node.name or node.op_type}{_TAG}{kind}"
    add = make_node("Add", [x, _scalar(graph, beta / alpha, names, f"{base}_shift")], names=names, name_hint=f"{base}_add")
    clip = make_node("Clip", [add.outputs[0], _scalar(graph, 0.0, names, f"{base}_lo"),
                              _scalar(graph, 1.0 / alpha, names, f"{base}_hi")], names=names, name_hint=f"{base}_clip")
    scale = make_node("Mul", [clip.outputs[0], _scalar(graph, alpha, names, f"{base}_alpha")], names=names,
                      name_hint=f"{base}_scale")
    if x.dtype is not None:
        for new in (add, clip, scale):
            new.outputs[0].dtype, new.outputs[0].shape = x.dtype, x.shape
    return [add, clip, scale]


def expand_activations(model: ir.Model) -> dict[str, int]:
    """Rewrite activations ONNX Runtime leaves float into ops its QDQ fusion turns into integer kernels.

    - ``HardSwish(x) = x * Clip(x + 3, 0, 6) * (1/6)``: QLinearAdd, the Clip folded into the quantized
      range, the ``1/6`` folded into a scale, QLinearMul;
    - ``HardSigmoid(x)`` whose input has other readers (``x * HardSigmoid(x)`` exporters; a HardSigmoid that
      alone reads a Conv/Gemm is folded into it by :func:`fold_hardsigmoid`): the same gate without the Mul by x;
    - ``Swish(x; alpha=1) = x * Sigmoid(x)``: QLinearSigmoid and QLinearMul.

    The rewrites are equal in float up to rounding (one ulp-level difference from evaluation order).
    Returns how many of each op were rewritten.
    """
    names = Names(model)
    counts: dict[str, int] = {}
    for graph in iter_graphs(model):
        for node in [n for n in graph if n.domain in ("", "ai.onnx") and n.op_type in ("HardSwish", "HardSigmoid", "Swish")]:
            x = node.inputs[0]
            if x is None or x.dtype not in (ir.DataType.FLOAT, None):
                continue
            if node.op_type == "HardSigmoid":
                alpha, beta = float(attribute(node, "alpha", 0.2)), float(attribute(node, "beta", 0.5))
                if alpha <= 0 or only_consumer(x) is node and x.producer() is not None \
                        and x.producer().op_type in ("Conv", "Gemm"):
                    continue  # fold_hardsigmoid's case, or a decreasing gate
                new = _expand_hard_gate(graph, node, x, alpha, beta, names, "hsig")
            elif node.op_type == "HardSwish":
                gate = _expand_hard_gate(graph, node, x, 1.0 / 6.0, 0.5, names, "hswish")
                mul = make_node("Mul", [x, gate[-1].outputs[0]], names=names, name_hint=f"{node.name or 'HardSwish'}{_TAG}hswish_mul")
                new = [*gate, mul]
            else:
                if float(attribute(node, "alpha", 1.0)) != 1.0:
                    continue
                sig = make_node("Sigmoid", [x], names=names, name_hint=f"{node.name or 'Swish'}{_TAG}swish_sigmoid")
                mul = make_node("Mul", [x, sig.outputs[0]], names=names, name_hint=f"{node.name or 'Swish'}{_TAG}swish_mul")
                new = [sig, mul]
            _swap(graph, node, new)
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


def _swap(graph: ir.Graph, node: ir.Node, new: list[ir.Node]) -> None:
    """Put ``new`` where ``node`` is; the last new node's output takes over ``node``'s output."""
    graph.insert_after(node, new)
    old, result = node.outputs[0], new[-1].outputs[0]
    if old.dtype is not None:
        result.dtype, result.shape = old.dtype, old.shape
    name = old.name
    reroute(old, result)
    graph.remove(node, safe=True)
    if not result.is_graph_output():  # the tensor keeps its name: calibrated ranges and exclusions find it
        old.name, result.name = None, name


def _expansions(model: ir.Model) -> dict[str, list[ir.Node]]:
    """Nodes of each activation expansion, by the name of the op it replaced (plus its kind)."""
    groups: dict[str, list[ir.Node]] = {}
    for graph in iter_graphs(model):
        for node in graph:
            if node.name and _TAG in node.name:
                head, _, tail = node.name.partition(_TAG)
                groups.setdefault(f"{head}{_TAG}{tail.split('_')[0]}", []).append(node)
    return groups


def expansion_groups(model: ir.Model) -> dict[str, list[str]]:
    """Node names of each activation expansion (key: the replaced op's name and kind)."""
    return {k: [n.name or "" for n in v] for k, v in _expansions(model).items()}


def _non_constant(node: ir.Node) -> ir.Value | None:
    return next((v for v in node.inputs if v is not None and constant_array(v) is None), None)


def _const_is(value: ir.Value | None, target: float) -> bool:
    c = constant_array(value)
    return c is not None and c.size == 1 and c.dtype == np.float32 and abs(float(c.reshape(-1)[0]) - target) <= 1e-6 * abs(target)


def tag_hardswish_chains(model: ir.Model) -> int:
    """Name exported hard-swish chains ``Mul(x, Clip(Add(x, 3), 0, 6)) / 6`` like the expansions of
    :func:`expand_activations`, so the speed guard can judge them with the Conv before them and a chain
    left wholly float is put back as one HardSwish (which float ONNX Runtime fuses into that Conv)."""
    names = Names(model)
    count = 0
    for graph in iter_graphs(model):
        for clip in [n for n in graph if n.op_type == "Clip" and n.domain in ("", "ai.onnx")]:
            if len(clip.inputs) < 3 or not (_const_is(clip.inputs[1], 0.0) and _const_is(clip.inputs[2], 6.0)):
                continue
            add = clip.inputs[0].producer() if clip.inputs[0] is not None else None
            if add is None or add.op_type != "Add" or only_consumer(add.outputs[0]) is not clip:
                continue
            x = _non_constant(add)
            if x is None or not any(_const_is(v, 3.0) for v in add.inputs if v is not x):
                continue
            mul = only_consumer(clip.outputs[0])
            if mul is None or mul.op_type != "Mul" or {id(v) for v in mul.inputs} != {id(x), id(clip.outputs[0])}:
                continue
            scale = only_consumer(mul.outputs[0])
            if scale is None or not ((scale.op_type == "Div" and _const_is(scale.inputs[1], 6.0)) or
                                     (scale.op_type == "Mul" and any(_const_is(v, 1.0 / 6.0) for v in scale.inputs))):
                continue
            if any(n.name and _TAG in n.name for n in (add, clip, mul, scale)):
                continue
            base = names.fresh("HardSwish")
            for node, role in ((add, "add"), (clip, "clip"), (mul, "mul"), (scale, "scale")):
                node.name = names.fresh(f"{base}{_TAG}hswish_{role}")
            count += 1
    return count


def collapse_float_activations(model: ir.Model, quantized: set[int]) -> int:
    """Put back the single float op for every expansion (or tagged exported chain) none of whose nodes is
    quantized (ids in ``quantized``): in float, one HardSwish is cheaper than four ops, and ONNX Runtime
    fuses it into the Conv before it. Returns how many were put back."""
    names = Names(model)
    count = 0
    for key, nodes in _expansions(model).items():
        if any(id(n) in quantized for n in nodes):
            continue
        kind = key.rpartition(_TAG)[2]
        members = {id(n) for n in nodes}
        # the last node: the one whose output no other member reads
        ends = [n for n in nodes if not any(id(u) in members for u, _ in n.outputs[0].uses())]
        if kind == "gelu":
            firsts = [n for n in nodes if (n.name or "").endswith("gelu_square")]
        else:
            firsts = [n for n in nodes if n.op_type == ("Sigmoid" if kind == "swish" else "Add")]
        graph = nodes[0].graph
        if len(ends) != 1 or len(firsts) != 1 or graph is None:
            continue
        last, first = ends[0], firsts[0]
        x = first.inputs[0] if kind == "gelu" else _non_constant(first)
        if x is None:
            continue
        base = key.partition(_TAG)[0]
        if kind == "hswish" and opset_version(model) < 14:
            continue  # no HardSwish before opset 14: the chain stays as it is
        if kind == "gelu":
            op = _tanh_gelu_op(model, x, names, base)
        elif kind == "hswish":
            op = make_node("HardSwish", [x], names=names, name_hint=base)
        elif kind == "swish":
            op = make_node("Swish", [x], names=names, name_hint=base)
        else:
            shift, alpha = constant_array(first.inputs[1]), constant_array(last.inputs[1])
            if shift is None or alpha is None:
                continue
            a = float(alpha)
            op = make_node("HardSigmoid", [x], {"alpha": a, "beta": float(shift) * a}, names=names, name_hint=base)
        _swap(graph, last, [op])
        for node in reversed(nodes):  # graph order, reversed: each is unread when removed
            if node is not last and node.graph is not None:
                graph.remove(node, safe=True)
        count += 1
    return count


# -- GELU -----------------------------------------------------------------------------------------------------------

#: tanh-form GELU, 0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³))), is x·sigmoid(2·√(2/π)·(x + 0.044715·x³)) exactly in
#: real arithmetic (0.5·(1 + tanh(z)) = sigmoid(2z)). Written as x·sigmoid(C·(x·(x² + 1/0.044715))), C = 2·√(2/π)·0.044715.
_GELU_K = float(np.sqrt(2.0 / np.pi))
_GELU_C = 0.044715
_SQRT_HALF = float(np.sqrt(0.5))


def _expand_gelu(graph: ir.Graph, x: ir.Value, names: Names, base: str) -> list[ir.Node]:
    """x·sigmoid(C·x·(x² + 1/0.044715)): QLinearMul (x²), QLinearAdd (the constant shift), QLinearMul (·x), the
    constant C folded into the next scale, QLinearSigmoid, QLinearMul (·x)."""
    base = f"{base}{_TAG}gelu"
    square = make_node("Mul", [x, x], names=names, name_hint=f"{base}_square")
    shift = make_node("Add", [square.outputs[0], _scalar(graph, 1.0 / _GELU_C, names, f"{base}_shift")], names=names,
                      name_hint=f"{base}_shift")
    cubic = make_node("Mul", [x, shift.outputs[0]], names=names, name_hint=f"{base}_cubic")
    scale = make_node("Mul", [cubic.outputs[0], _scalar(graph, 2.0 * _GELU_K * _GELU_C, names, f"{base}_k")], names=names,
                      name_hint=f"{base}_scale")
    sig = make_node("Sigmoid", [scale.outputs[0]], names=names, name_hint=f"{base}_sigmoid")
    mul = make_node("Mul", [x, sig.outputs[0]], names=names, name_hint=f"{base}_mul")
    new = [square, shift, cubic, scale, sig, mul]
    if x.dtype is not None:
        for node in new:
            node.outputs[0].dtype, node.outputs[0].shape = x.dtype, x.shape
    return new


def _producer(value: ir.Value | None, op: str) -> ir.Node | None:
    node = value.producer() if value is not None else None
    return node if node is not None and node.op_type == op and node.domain in ("", "ai.onnx") else None


def _other(node: ir.Node, value: ir.Value) -> ir.Value | None:
    """The input of a two-input ``node`` that is not ``value``."""
    ins = list(node.inputs)
    if len(ins) != 2 or not any(v is value for v in ins):
        return None
    return ins[1] if ins[0] is value else ins[0]


def _sole(value: ir.Value, op: str) -> ir.Node | None:
    node = only_consumer(value)
    return node if node is not None and node.op_type == op and node.domain in ("", "ai.onnx") else None


def _times_const(node: ir.Node | None, target: float, tol: float = 1e-5) -> ir.Value | None:
    """The non-constant input of ``node`` = Mul(v, target) (either order) or Div(v, 1/target), else None."""
    if node is None or len(node.inputs) != 2:
        return None
    if node.op_type == "Mul":
        for slot in (0, 1):
            c = constant_array(node.inputs[slot])
            if c is not None and c.size == 1 and abs(float(c.reshape(-1)[0]) - target) <= tol * abs(target):
                return node.inputs[1 - slot]
    if node.op_type == "Div":
        c = constant_array(node.inputs[1])
        if c is not None and c.size == 1 and float(c.reshape(-1)[0]) != 0 and \
                abs(1.0 / float(c.reshape(-1)[0]) - target) <= tol * abs(target):
            return node.inputs[0]
    return None


def _cube_of(value: ir.Value | None) -> tuple[ir.Value, list[ir.Node]] | None:
    """(x, the nodes computing it) when ``value`` = Pow(x, 3) or x·(x·x) in either order, each read only there."""
    node = value.producer() if value is not None else None
    if node is None or only_consumer(value) is None:
        return None
    if node.op_type == "Pow":
        c = constant_array(node.inputs[1])
        ok = c is not None and c.size == 1 and float(c.reshape(-1)[0]) == 3.0 and node.inputs[0] is not None
        return (node.inputs[0], [node]) if ok else None
    if node.op_type == "Mul" and len(node.inputs) == 2:
        for a, b in ((node.inputs[0], node.inputs[1]), (node.inputs[1], node.inputs[0])):
            sq = _producer(b, "Mul")
            if a is not None and sq is not None and sq.inputs[0] is a and sq.inputs[1] is a and only_consumer(b) is node:
                return a, [sq, node]
    return None


def _gelu_tail(one: ir.Node, x: ir.Value) -> list[ir.Node] | None:
    """The nodes after ``one`` = Add(g, 1) that make 0.5·x·one in any order of the two products, ending with the
    node whose output is the GELU; None when they do not."""
    first = _sole(one.outputs[0], "Mul")
    if first is None:
        return None
    other = _other(first, one.outputs[0])
    if other is x:  # x·(1+g), then ·0.5
        second = _sole(first.outputs[0], "Mul")
        return [first, second] if second is not None and _times_const(second, 0.5) is first.outputs[0] else None
    if other is not None and constant_array(other) is not None:  # (1+g)·0.5, then ·x
        second = _sole(first.outputs[0], "Mul")
        if _times_const(first, 0.5) is one.outputs[0] and second is not None and _other(second, first.outputs[0]) is x:
            return [first, second]
        return None
    half = _producer(other, "Mul")  # (0.5·x)·(1+g)
    if half is not None and _times_const(half, 0.5) is x and only_consumer(half.outputs[0]) is first:
        return [half, first]
    return None


def _gelu_chains(graph: ir.Graph, erf: bool) -> list[tuple[ir.Value, list[ir.Node], str]]:
    """Exported GELU chains: (x, their nodes in graph order, "tanh" or "erf"); erf ones only when ``erf``."""
    found = []
    for node in list(graph):
        if node.domain not in ("", "ai.onnx") or node.op_type not in ("Tanh", "Erf") or (node.op_type == "Erf" and not erf):
            continue
        pre = node.inputs[0].producer() if node.inputs[0] is not None else None
        if pre is None or only_consumer(node.inputs[0]) is not node:
            continue
        if node.op_type == "Tanh":  # tanh(√(2/π)·(x + 0.044715·x³))
            inner = _times_const(pre, _GELU_K)
            add = _producer(inner, "Add")
            if add is None or only_consumer(add.outputs[0]) is not pre:
                continue
            head = None
            for a, b in ((add.inputs[0], add.inputs[1]), (add.inputs[1], add.inputs[0])):
                cmul = b.producer() if b is not None else None
                cube = _cube_of(_times_const(cmul, _GELU_C)) if cmul is not None and only_consumer(b) is add else None
                if cube is not None and cube[0] is a:
                    head = (a, [*cube[1], cmul])
            if head is None:
                continue
            x, inner_nodes = head
            chain = [*inner_nodes, add, pre, node]
        else:  # erf(x/√2)
            x = _times_const(pre, _SQRT_HALF)
            if x is None:
                continue
            chain = [pre, node]
        one = _sole(node.outputs[0], "Add")
        if one is None or not any(constant_array(v) is not None and constant_array(v).size == 1
                                  and float(constant_array(v).reshape(-1)[0]) == 1.0 for v in one.inputs):
            continue
        tail = _gelu_tail(one, x)
        if tail is None:
            continue
        nodes = [*chain, one, *tail]
        if len({id(n) for n in nodes}) != len(nodes) or any(n.name and _TAG in n.name for n in nodes):
            continue
        found.append((x, nodes, "tanh" if node.op_type == "Tanh" else "erf"))
    return found


def rewrite_gelu(model: ir.Model, erf: bool = False) -> dict[str, int]:
    """Rebuild tanh-form GELU (opset-20 ``Gelu(approximate="tanh")``, com.microsoft ``FastGelu``, and the exported
    0.5·x·(1 + tanh(…)) chain) as x·sigmoid(…), which ONNX Runtime's QDQ fusion runs as integer kernels; equal
    in float up to rounding. Erf GELU (``Gelu``, com.microsoft ``Gelu``, the exported erf chain) has no exact such
    form: with ``erf`` it is replaced by the tanh form, an approximation (lossy). Returns counts by form."""
    names = Names(model)
    counts: dict[str, int] = {}

    def count(key: str) -> None:
        counts[key] = counts.get(key, 0) + 1

    for graph in iter_graphs(model):
        for node in list(graph):
            x = node.inputs[0] if node.inputs else None
            if x is None or x.dtype not in (ir.DataType.FLOAT, None) or len(node.outputs) != 1:
                continue
            onnx_gelu = node.op_type == "Gelu" and node.domain in ("", "ai.onnx")
            ms = node.domain == "com.microsoft" and node.op_type in ("FastGelu", "Gelu")
            if not (onnx_gelu or ms):
                continue
            tanh_form = (onnx_gelu and attribute(node, "approximate", "none") == "tanh") or node.op_type == "FastGelu"
            if not tanh_form and not erf:
                continue
            base = node.name or names.fresh("Gelu")
            pre = []
            if node.op_type == "FastGelu" and len(node.inputs) > 1 and node.inputs[1] is not None:
                bias = make_node("Add", [x, node.inputs[1]], names=names, name_hint=f"{base}_bias")
                bias.outputs[0].dtype, bias.outputs[0].shape = x.dtype, x.shape
                pre, x = [bias], bias.outputs[0]
            _swap(graph, node, [*pre, *_expand_gelu(graph, x, names, base)])
            count(f"{'com.microsoft.' if ms else ''}{node.op_type}{'' if tanh_form else ' (erf, approximated)'}")
        for x, nodes, form in _gelu_chains(graph, erf):
            base = names.fresh("Gelu")
            _swap(graph, nodes[-1], _expand_gelu(graph, x, names, base))
            for old in reversed(nodes[:-1]):
                graph.remove(old, safe=True)
            count("tanh chain" if form == "tanh" else "erf chain (approximated)")
    return counts


def _tanh_gelu_op(model: ir.Model, x: ir.Value, names: Names, base: str) -> ir.Node:
    """One tanh-form GELU op that float ONNX Runtime runs as a fused kernel: the ONNX op from opset 20, else
    ORT's com.microsoft FastGelu (ORT does not fuse an exported tanh chain by itself: measured on ORT 1.32)."""
    if opset_version(model) >= 20:
        return make_node("Gelu", [x], {"approximate": "tanh"}, names=names, name_hint=base)
    op = make_node("FastGelu", [x], names=names, name_hint=base)
    op.domain = "com.microsoft"
    model.opset_imports.setdefault("com.microsoft", 1)
    return op


def fuse_tanh_gelu_chains(model: ir.Model) -> int:
    """Replace each exported tanh-GELU chain (0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³))), a dozen float ops) by
    one GELU op, equal up to float rounding, for GELU left float; returns the count."""
    names = Names(model)
    count = 0
    for graph in iter_graphs(model):
        for x, nodes, _ in _gelu_chains(graph, erf=False):
            _swap(graph, nodes[-1], [_tanh_gelu_op(model, x, names, names.fresh("Gelu"))])
            for old in reversed(nodes[:-1]):
                graph.remove(old, safe=True)
            count += 1
    return count
