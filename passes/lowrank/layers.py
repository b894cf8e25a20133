"""The layers lowrank can factor, each read as ``Y = X · W`` per group, with ``W`` of shape (G, K, N).

Gemm and MatMul are one matrix (G = 1); a Conv is its im2col matrix per
group (channel decomposition) or, for the spatial option, a matrix over
(input channel, kernel row) × (output channel, kernel column). One reader
per op type turns a node into a :class:`Layer` or says why it cannot.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import onnx_ir as ir

from onnxopt.graph import attribute, constant_array, consumers, is_onnx_op, iter_nodes, only_consumer, opset_version, static_shape

__all__ = ["Form", "RowView", "Layer", "find_layers", "layer_label", "CANDIDATE_OPS", "GEMM_OPTIONAL_C", "GEMM_BROADCASTS"]

#: How a layer is rewritten (see :mod:`onnxopt_passes.lowrank.rewrite`).
Form = Literal["gemm", "matmul", "conv", "conv-spatial"]


@dataclass(frozen=True)
class RowView:
    """How a layer's input tensor becomes the rows of X (one sample per row, K features).

    ``transpose``: Gemm with transA reads its input as X^T. ``kernel`` set:
    a Conv, whose rows are the im2col patches of each group.
    """

    transpose: bool = False
    kernel: tuple[int, ...] = ()
    strides: tuple[int, ...] = ()
    pads: tuple[int, ...] = ()
    dilations: tuple[int, ...] = ()
    group: int = 1
    auto_pad: str = "NOTSET"


@dataclass
class Layer:
    """A node whose constant weight can be factored, read as ``Y_g = X_g · W_g``.

    ``out_scale`` (G, N) weights the output columns when a BatchNormalization
    alone reads the layer (its per-channel scale multiplies the error the
    truncation makes, so the SVD is taken after it). ``positions`` is how
    many rows X has in one run at the measured input shapes (MACs / (G·K·N));
    ``first_scale`` is how many more the first factor runs on (a strided
    spatial split runs its kh×1 conv at full width).
    """

    index: int
    node: ir.Node
    form: Form
    weight: np.ndarray
    dtype: np.dtype
    rows: RowView | None
    can_shift_bias: bool
    opset: int = 18
    out_scale: np.ndarray | None = None
    positions: float = 1.0
    positions_known: bool = False
    first_scale: float = 1.0
    in_subgraph: bool = False

    @property
    def name(self) -> str:
        return layer_label(self.node)

    @property
    def groups(self) -> int:
        return int(self.weight.shape[0])

    @property
    def k(self) -> int:
        return int(self.weight.shape[1])

    @property
    def n(self) -> int:
        return int(self.weight.shape[2])

    @property
    def full_rank(self) -> int:
        return min(self.k, self.n)

    @property
    def params(self) -> int:
        return self.groups * self.k * self.n

    def factored_params(self, rank: int) -> int:
        return self.groups * rank * (self.k + self.n)

    @property
    def macs(self) -> float:
        return self.positions * self.params

    def factored_macs(self, rank: int | np.ndarray) -> float | np.ndarray:
        return self.positions * self.groups * rank * (self.first_scale * self.k + self.n)

    def max_rank(self, margin: float) -> int:
        """The largest rank whose cost stays within ``margin`` of the layer's (0 when none does)."""
        per_rank = self.first_scale * self.k + self.n
        return min(self.full_rank, int(math.floor(margin * self.k * self.n / per_rank + 1e-9)))


def layer_label(node: ir.Node) -> str:
    """The name reports use for a node (the same label :func:`onnxopt.measure.count_macs` keys by)."""
    return node.name or f"{node.op_type}:{node.outputs[0].name}"


def _float_weight(value: ir.Value | None) -> np.ndarray | str:
    array = constant_array(value)
    if array is None:
        return "the weight is computed at run time, not a constant"
    if not np.issubdtype(array.dtype, np.floating):
        return f"the weight is {array.dtype}, not floating point"
    if len(consumers(value)) > 1:  # type: ignore[arg-type]
        # factoring one reader's copy would add parameters instead of removing them
        return "the weight is shared with other nodes"
    return array


#: Gemm's C is optional from opset 11 (earlier, the writers give a zero C); before 7 it needs broadcast flags.
GEMM_OPTIONAL_C = 11
GEMM_BROADCASTS = 7


def _read_gemm(node: ir.Node, spatial: bool, opset: int) -> tuple[Form, np.ndarray, RowView, bool] | str:
    if opset < GEMM_BROADCASTS:
        return f"Gemm at opset {opset} needs broadcast attributes; upgrade the model to opset 7 or later"
    weight = _float_weight(node.inputs[1])
    if isinstance(weight, str):
        return weight
    alpha = float(attribute(node, "alpha", 1.0))
    w = weight.T if attribute(node, "transB", 0) else weight
    has_c = len(node.inputs) > 2 and node.inputs[2] is not None
    can_shift = not has_c or constant_array(node.inputs[2]) is not None
    # the weight as stored (a view of its memory map when external): the SVD reads it in float64 one layer at a time
    w = w if alpha == 1.0 else alpha * w.astype(np.float64)
    return "gemm", w[None], RowView(transpose=bool(attribute(node, "transA", 0))), can_shift


def _read_matmul(node: ir.Node, spatial: bool, opset: int) -> tuple[Form, np.ndarray, RowView, bool] | str:
    if constant_array(node.inputs[0]) is not None:
        if constant_array(node.inputs[1]) is not None:
            return "both inputs are constants (run fold first)"
        return "the constant is the left operand (W·X); only X·W is factored"
    weight = _float_weight(node.inputs[1])
    if isinstance(weight, str):
        return "no constant weight (both operands are computed)" if weight.startswith("the weight is computed") else weight
    if weight.ndim != 2:
        return f"the weight has {weight.ndim} dims; only 2-D weights are factored"
    return "matmul", weight[None], RowView(), True  # as stored, like Gemm's


def _read_conv(node: ir.Node, spatial: bool, opset: int) -> tuple[Form, np.ndarray, RowView | None, bool] | str:
    weight = _float_weight(node.inputs[1])
    if isinstance(weight, str):
        return weight
    if weight.ndim < 3:
        return f"the weight has {weight.ndim} dims; a Conv weight has at least 3"
    group = int(attribute(node, "group", 1))
    cout, cin_g, *kernel = weight.shape
    if cout % group:
        return f"{cout} output channels do not split into {group} groups"
    has_b = len(node.inputs) > 2 and node.inputs[2] is not None
    can_shift = not has_b or constant_array(node.inputs[2]) is not None
    auto_pad = attribute(node, "auto_pad", "NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else str(auto_pad)
    d = len(kernel)
    strides = tuple(attribute(node, "strides", None) or [1] * d)
    dilations = tuple(attribute(node, "dilations", None) or [1] * d)
    pads = tuple(attribute(node, "pads", None) or [0] * (2 * d))
    w = weight  # as stored, like Gemm's
    if spatial and d == 2 and group == 1 and min(kernel) > 1 and auto_pad == "NOTSET":
        # W[o, c, i, j] as a (c, i) × (o, j) matrix: a kh×1 conv then a 1×kw conv
        kh, kw = kernel
        return "conv-spatial", w.transpose(1, 2, 0, 3).reshape(cin_g * kh, cout * kw)[None], None, can_shift
    n = cout // group
    matrices = w.reshape(group, n, cin_g * math.prod(kernel)).transpose(0, 2, 1)
    view = RowView(kernel=tuple(kernel), strides=strides, pads=pads, dilations=dilations, group=group, auto_pad=auto_pad)
    return "conv", matrices, view, can_shift


def _batchnorm_scale(node: ir.Node, channels: int) -> np.ndarray | None:
    """|γ/√(σ²+ε)| per output channel when an inference BatchNormalization alone reads ``node`` on axis 1."""
    bn = only_consumer(node.outputs[0])
    if bn is None or not is_onnx_op(bn, "BatchNormalization") or attribute(bn, "training_mode", 0) or len(bn.inputs) < 5:
        return None
    shape = static_shape(node.outputs[0])
    if node.op_type == "MatMul" and (shape is None or len(shape) != 2):
        return None  # BatchNorm normalises axis 1, the features only when the output is 2-D
    gamma, var = constant_array(bn.inputs[1]), constant_array(bn.inputs[4])
    if gamma is None or var is None or gamma.size != channels or var.size != channels:
        return None
    scale = np.abs(gamma.astype(np.float64) / np.sqrt(var.astype(np.float64) + float(attribute(bn, "epsilon", 1e-5))))
    return np.maximum(scale, 1e-6 * max(float(scale.max()), 1e-30))  # a dead channel still gets a little weight


def _read_conv_transpose(node: ir.Node, spatial: bool, opset: int) -> str:
    return "ConvTranspose is not factored"


#: Per op type: a reader returning (form, W (G,K,N), row view, can shift bias) or a skip reason.
READERS: dict[str, Callable[[ir.Node, bool, int], tuple[Form, np.ndarray, RowView | None, bool] | str]] = {
    "Gemm": _read_gemm,
    "MatMul": _read_matmul,
    "Conv": _read_conv,
    "ConvTranspose": _read_conv_transpose,
}
CANDIDATE_OPS = tuple(READERS)


def find_layers(
    model: ir.Model,
    *,
    spatial: bool,
    exclude: Sequence[str],
    macs_by_node: dict[str, int],
) -> tuple[list[Layer], list[tuple[str, str]]]:
    """Every factorable layer of the model, and (label, reason) for each candidate left alone."""
    layers: list[Layer] = []
    skipped: list[tuple[str, str]] = []
    opset = opset_version(model)
    for index, node in enumerate(iter_nodes(model)):
        if not is_onnx_op(node, *CANDIDATE_OPS):
            continue
        label = layer_label(node)
        if _excluded(node, exclude):
            skipped.append((label, "excluded by the exclude patterns"))
            continue
        read = READERS[node.op_type](node, spatial, opset)
        if isinstance(read, str):
            skipped.append((label, read))
            continue
        form, weight, rows, can_shift = read
        layer = Layer(index, node, form, weight, constant_array(node.inputs[1]).dtype, rows, can_shift,  # type: ignore[union-attr]
                      in_subgraph=node.graph is not model.graph, opset=opset)
        if form != "conv-spatial":  # the spatial matrix's columns mix channels and kernel columns
            scale = _batchnorm_scale(node, layer.groups * layer.n)
            layer.out_scale = None if scale is None else scale.reshape(layer.groups, layer.n)
        macs = macs_by_node.get(label)
        if macs:
            layer.positions, layer.positions_known = macs / layer.params, True
        if form == "conv-spatial":
            strides = attribute(node, "strides", None) or [1, 1]
            layer.first_scale = float(strides[1])
        layers.append(layer)
    return layers, skipped


def _excluded(node: ir.Node, patterns: Iterable[str]) -> bool:
    names = [node.name or "", node.outputs[0].name or ""]
    return any(fnmatch.fnmatchcase(n, p) for p in patterns for n in names if n)
