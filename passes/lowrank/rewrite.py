"""Writing factors back: each layer becomes two nodes, the bias (and any mean correction) on the second.

One writer per form: Gemm → Gemm(X, A) then Gemm(·, B, C) with alpha
folded into the factors and transA kept on the first; MatMul → two Gemms on
X read as rows (a Reshape either side when X is 3-D or more) that take over
the bias Add after it, or two MatMuls when X's inner dims are not static;
Conv → a conv with r outputs per group and the original geometry, then a
grouped 1×1 conv; spatial Conv → a kh×1 conv then a 1×kw conv, the
vertical pads/strides/dilations on the first and the horizontal on the second.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import onnx_ir as ir

from onnxopt.graph import (
    Names,
    add_initializer,
    attribute,
    cleanup,
    constant_array,
    is_onnx_op,
    iter_nodes,
    make_node,
    only_consumer,
    replace_input_weight,
    replace_node,
)

from onnxopt_passes.lowrank.factor import Factorization
from onnxopt_passes.lowrank.layers import GEMM_BROADCASTS, GEMM_OPTIONAL_C, Form, Layer

__all__ = ["build_model", "WRITERS"]

Writer = Callable[[ir.Node, Layer, np.ndarray, np.ndarray, "np.ndarray | None", Names], None]


def _weight(node: ir.Node, array: np.ndarray, dtype: np.dtype, names: Names, suffix: str) -> ir.Value:
    graph = node.graph
    assert graph is not None
    return add_initializer(graph, np.ascontiguousarray(array, dtype=dtype), names.fresh(f"{_base(node)}.lowrank_{suffix}"))


def _base(node: ir.Node) -> str:
    return node.name or node.outputs[0].name or node.op_type


def _shifted(node: ir.Node, bias: ir.Value | None, shift: np.ndarray | None, dtype: np.dtype, names: Names,
             scale: float = 1.0) -> ir.Value | None:
    """``bias + shift/scale`` as a new initializer (``bias`` when there is nothing to add)."""
    if shift is None or not np.any(shift):
        return bias
    base = constant_array(bias) if bias is not None else None
    new = shift / scale if base is None else base.astype(np.float64) + shift / scale
    return _weight(node, new, dtype, names, "bias")


def _replace(old: Sequence[ir.Node], new: Sequence[ir.Node]) -> None:
    """Put ``new`` where the chain ``old`` was (:func:`onnxopt.graph.replace_node`); the factors between them
    carry the layer's float type."""
    for extra in new[:-1]:
        extra.outputs[0].type = old[-1].outputs[0].type
    replace_node(old, new)


def _gemm_c(node: ir.Node, layer: Layer, c: ir.Value | None, width: int, names: Names) -> list[ir.Value]:
    """Gemm's C input list: ``c``, or a zero bias where the opset still requires one."""
    if c is not None:
        return [c]
    return [_weight(node, np.zeros(width), layer.dtype, names, "zero")] if layer.opset < GEMM_OPTIONAL_C else []


def _write_gemm(node: ir.Node, layer: Layer, a: np.ndarray, b: np.ndarray, shift: np.ndarray | None, names: Names) -> None:
    first_attrs = {"transA": 1} if attribute(node, "transA", 0) else {}
    first = make_node("Gemm", [node.inputs[0], _weight(node, a[0], layer.dtype, names, "a"),
                               *_gemm_c(node, layer, None, a.shape[2], names)], first_attrs,
                      names=names, name_hint=f"{_base(node)}_lowrank_a")
    beta = float(attribute(node, "beta", 1.0))
    c = node.inputs[2] if len(node.inputs) > 2 and beta != 0.0 else None
    if c is None:
        beta = 1.0  # C absent or ignored: a mean correction, if any, becomes C with beta 1
    c = _shifted(node, c, None if shift is None else shift[0], layer.dtype, names, beta)
    inputs = [first.outputs[0], _weight(node, b[0], layer.dtype, names, "b"), *_gemm_c(node, layer, c, layer.n, names)]
    second = make_node("Gemm", inputs, {"beta": beta} if c is not None and beta != 1.0 else {},
                       names=names, name_hint=f"{_base(node)}_lowrank_b")
    _replace([node], [first, second])


def _bias_add(node: ir.Node, n: int, max_ndim: int = 1) -> tuple[ir.Node, int, np.ndarray] | None:
    """The Add that alone reads this node's output and adds a constant of N values along the last axis.

    Returns the Add, the constant's input index and the constant as (N,).
    """
    add = only_consumer(node.outputs[0])
    if add is None or not is_onnx_op(add, "Add") or len(add.inputs) != 2 or add.inputs[0] is add.inputs[1]:
        return None
    index = 1 if add.inputs[0] is node.outputs[0] else 0
    bias = constant_array(add.inputs[index])
    if bias is None or bias.size != n or (bias.ndim and bias.shape[-1] != n) or bias.ndim > max_ndim:
        return None  # a bias that broadcasts wider than the MatMul's output is not a bias
    return add, index, bias.reshape(n)


def _gemm_rows(value: ir.Value | None) -> tuple[int, ...] | None:
    """The static dims between batch and features of a MatMul input (``()`` for 2-D), None when unknown.

    With them, X (..., K) can be read as a 2-D matrix and the pair written as
    Gemms, whose bias ORT fuses (a 3-D MatMul + Add stays two kernels).
    """
    if value is None or value.shape is None or len(value.shape) < 2:
        return None
    inner = value.shape.dims[1:-1]
    return tuple(int(d) for d in inner) if all(isinstance(d, int) for d in inner) else None


def _write_matmul(node: ir.Node, layer: Layer, a: np.ndarray, b: np.ndarray, shift: np.ndarray | None, names: Names) -> None:
    base, graph = _base(node), node.graph
    assert graph is not None
    inner = _gemm_rows(node.inputs[0])
    if inner is None or layer.opset < GEMM_BROADCASTS:
        _write_matmul_pair(node, layer, a, b, shift, names)
        return
    bias_add = _bias_add(node, layer.n, len(inner) + 2)
    bias = None if bias_add is None else bias_add[2].astype(np.float64)
    if shift is not None and np.any(shift):
        bias = shift[0] if bias is None else bias + shift[0]
    nodes: list[ir.Node] = []
    rows = node.inputs[0]
    if inner:
        shape = add_initializer(graph, np.array([-1, layer.k], np.int64), names.fresh(f"{base}.lowrank_rows"))
        nodes.append(make_node("Reshape", [rows, shape], names=names, name_hint=f"{base}_lowrank_rows"))
        rows = nodes[-1].outputs[0]
    nodes.append(make_node("Gemm", [rows, _weight(node, a[0], layer.dtype, names, "a"),
                                    *_gemm_c(node, layer, None, a.shape[2], names)],
                           names=names, name_hint=f"{base}_lowrank_a"))
    c = None if bias is None else _weight(node, bias, layer.dtype, names, "bias")
    nodes.append(make_node("Gemm", [nodes[-1].outputs[0], _weight(node, b[0], layer.dtype, names, "b"),
                                    *_gemm_c(node, layer, c, layer.n, names)],
                           names=names, name_hint=f"{base}_lowrank_b"))
    if inner:
        shape = add_initializer(graph, np.array([-1, *inner, layer.n], np.int64), names.fresh(f"{base}.lowrank_shape"))
        nodes.append(make_node("Reshape", [nodes[-1].outputs[0], shape], names=names, name_hint=f"{base}_lowrank_shape"))
    _replace([node] if bias_add is None else [node, bias_add[0]], nodes)


def _write_matmul_pair(node: ir.Node, layer: Layer, a: np.ndarray, b: np.ndarray, shift: np.ndarray | None,
                       names: Names) -> None:
    """Two MatMuls (inputs of unknown or 1-D shape); a mean correction goes into the bias Add or a new one."""
    base = _base(node)
    first = make_node("MatMul", [node.inputs[0], _weight(node, a[0], layer.dtype, names, "a")],
                      names=names, name_hint=f"{base}_lowrank_a")
    second = make_node("MatMul", [first.outputs[0], _weight(node, b[0], layer.dtype, names, "b")],
                       names=names, name_hint=f"{base}_lowrank_b")
    nodes = [first, second]
    if shift is not None and np.any(shift):
        bias_add = _bias_add(node, layer.n, max_ndim=64)  # the constant keeps its shape here
        if bias_add is not None:
            add, index, bias = bias_add
            old = constant_array(add.inputs[index])
            assert old is not None
            new = (bias.astype(np.float64) + shift[0]).reshape(old.shape).astype(old.dtype)
            replace_input_weight(add, index, new, names, hint=f"{base}.lowrank_bias")
        else:
            bias_value = _shifted(node, None, shift[0], layer.dtype, names)
            nodes.append(make_node("Add", [second.outputs[0], bias_value], names=names, name_hint=f"{base}_lowrank_bias"))
    _replace([node], nodes)


def _conv_attrs(node: ir.Node) -> dict[str, Any]:
    return {name: attribute(node, name) for name in node.attributes}


def _write_conv(node: ir.Node, layer: Layer, a: np.ndarray, b: np.ndarray, shift: np.ndarray | None, names: Names) -> None:
    groups, _, rank = a.shape
    weight_shape = node.inputs[1].const_value.shape  # type: ignore[union-attr]
    cin_g, kernel = int(weight_shape[1]), [int(d) for d in weight_shape[2:]]
    # first: r outputs per group over the original window; second: a grouped 1x1 back to Cout
    wa = a.transpose(0, 2, 1).reshape(groups * rank, cin_g, *kernel)
    wb = b.transpose(0, 2, 1).reshape(groups * layer.n, rank, *[1] * len(kernel))
    first = make_node("Conv", [node.inputs[0], _weight(node, wa, layer.dtype, names, "a")], _conv_attrs(node),
                      names=names, name_hint=f"{_base(node)}_lowrank_a")
    bias = node.inputs[2] if len(node.inputs) > 2 else None
    bias = _shifted(node, bias, None if shift is None else shift.reshape(-1), layer.dtype, names)
    inputs = [first.outputs[0], _weight(node, wb, layer.dtype, names, "b")] + ([bias] if bias is not None else [])
    second = make_node("Conv", inputs, {"kernel_shape": [1] * len(kernel), "group": groups},
                       names=names, name_hint=f"{_base(node)}_lowrank_b")
    _replace([node], [first, second])


def _write_conv_spatial(node: ir.Node, layer: Layer, a: np.ndarray, b: np.ndarray, shift: np.ndarray | None, names: Names) -> None:
    cout, cin, kh, kw = (int(d) for d in node.inputs[1].const_value.shape)  # type: ignore[union-attr]
    rank = a.shape[2]
    pt, pl, pb, pr = attribute(node, "pads", None) or [0, 0, 0, 0]
    sh, sw = attribute(node, "strides", None) or [1, 1]
    dh, dw = attribute(node, "dilations", None) or [1, 1]
    wa = a[0].T.reshape(rank, cin, kh, 1)
    wb = b[0].reshape(rank, cout, kw).transpose(1, 0, 2)[:, :, None, :]
    first = make_node("Conv", [node.inputs[0], _weight(node, wa, layer.dtype, names, "a")],
                      {"kernel_shape": [kh, 1], "pads": [pt, 0, pb, 0], "strides": [sh, 1], "dilations": [dh, 1]},
                      names=names, name_hint=f"{_base(node)}_lowrank_a")
    bias = node.inputs[2] if len(node.inputs) > 2 else None
    bias = _shifted(node, bias, None if shift is None else shift.reshape(-1), layer.dtype, names)
    inputs = [first.outputs[0], _weight(node, wb, layer.dtype, names, "b")] + ([bias] if bias is not None else [])
    second = make_node("Conv", inputs,
                       {"kernel_shape": [1, kw], "pads": [0, pl, 0, pr], "strides": [1, sw], "dilations": [1, dw]},
                       names=names, name_hint=f"{_base(node)}_lowrank_b")
    _replace([node], [first, second])


#: Per form: how a layer is written as two nodes.
WRITERS: dict[Form, Writer] = {
    "gemm": _write_gemm,
    "matmul": _write_matmul,
    "conv": _write_conv,
    "conv-spatial": _write_conv_spatial,
}


def build_model(model: ir.Model, plan: Sequence[tuple[Layer, int, Factorization]]) -> ir.Model:
    """A copy of ``model`` with each planned layer factored at its rank (tensors of ``model`` untouched)."""
    clone = model.clone()
    nodes = list(iter_nodes(clone))  # layers are found by position: the clone keeps the order
    names = Names(clone)
    for layer, rank, factorization in plan:
        node = nodes[layer.index]
        assert node.op_type == layer.node.op_type, "layer positions must match the model they were read from"
        a, b, shift = factorization.factors(rank)
        WRITERS[layer.form](node, layer, a, b, shift, names)
    cleanup(clone)
    return clone
