"""Per-op placement table: which inputs of an op get QDQ, which are weights, and what ONNX Runtime runs it as.

The table is data: one :class:`OpRule` per op type. ``role`` says how an op
joins the integer region:

- ``anchor``: compute-heavy ops (Conv, MatMul, Gemm) that are always
  quantized when their weights allow it: the integer kernels are the win;
- ``follower``: ops with an integer kernel of their own (QLinearAdd,
  QLinearConcat, QLinearAveragePool, ...), quantized only where their
  neighbours are, so they remove conversions instead of adding them;
- ``passthrough``: ops that only move data (Reshape, MaxPool, Resize, ...):
  ONNX Runtime drops the QDQ around them when input and output share one
  scale, so they carry the integer tensor through;
- ``rescale``: Div or Mul of an integer tensor by a positive constant
  scalar (hard-swish's ``/ 6``, attention's ``* 1/sqrt(d)``). The op is
  removed and its readers dequantize the same integers with the scale
  divided or multiplied: exact, and no kernel at all.

Kernels listed are those of ONNX Runtime's CPU QDQ fusions
(``qdq_selector_action_transformer.cc``). Ops without one (HardSigmoid,
ConvTranspose, Div, LayerNormalization, ...) stay float; quantizing them
would only add conversions.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np
import onnx_ir as ir

from onnxopt.graph import attribute, constant_array, is_weight

__all__ = ["Placement", "PlaceContext", "OpRule", "RULES", "rule_for", "place", "rescale_factor", "ABSORBED_ACTIVATIONS"]

Role = Literal["anchor", "follower", "passthrough", "rescale"]
OutputMode = Literal["required", "optional"]


@dataclass(frozen=True)
class Placement:
    """Where QDQ goes on one node: activation input slots, the weight slot and its channel axis, the bias slot."""

    activations: tuple[int, ...]
    weight: int | None = None
    weight_axis: int | None = None
    bias: int | None = None


@dataclass(frozen=True)
class PlaceContext:
    """What a placement function may depend on besides the node."""

    activation_type: str = "uint8"
    per_channel: bool = True


PlaceFn = Callable[[ir.Node, PlaceContext], "Placement | str"]


@dataclass(frozen=True)
class OpRule:
    """How one op type is quantized: its role, its output rule, its placement function, ORT's kernel."""

    role: Role
    kernel: str
    place: PlaceFn
    #: ``required``: the integer kernel needs a quantized output (QLinearConv);
    #: ``optional``: it can emit float (MatMul -> MatMulIntegerToFloat, Gemm -> QGemm with float output).
    output: OutputMode = "required"
    #: one scale for all activation inputs and the output (Concat, and every passthrough op)
    shared_scale: bool = False


def _float_input(node: ir.Node, slot: int) -> bool:
    value = node.inputs[slot] if slot < len(node.inputs) else None
    return value is not None and value.dtype in (ir.DataType.FLOAT, None)


def _const_float_weight(node: ir.Node, slot: int) -> np.ndarray | str:
    value = node.inputs[slot] if slot < len(node.inputs) else None
    array = constant_array(value)
    if array is None:
        return "weight is not a constant"
    if array.dtype != np.float32:
        return f"weight is {array.dtype}, not float32"
    return array


def _bias_slot(node: ir.Node, slot: int, channels: int) -> int | None | str:
    value = node.inputs[slot] if slot < len(node.inputs) else None
    if value is None:
        return None
    bias = constant_array(value)
    if bias is None or bias.dtype != np.float32 or bias.shape != (channels,):
        return "bias is not a constant vector of one value per output channel"
    return slot


def _place_conv(node: ir.Node, pc: PlaceContext) -> Placement | str:
    if not _float_input(node, 0):
        return "input is not float32"
    w = _const_float_weight(node, 1)
    if isinstance(w, str):
        return w
    bias = _bias_slot(node, 2, w.shape[0])
    if isinstance(bias, str):
        return bias
    return Placement((0,), 1, 0 if pc.per_channel else None, bias)


def _place_matmul(node: ir.Node, pc: PlaceContext) -> Placement | str:
    if not (_float_input(node, 0) and _float_input(node, 1)):
        return "inputs are not float32"
    if is_weight(node.inputs[1]):
        w = _const_float_weight(node, 1)
        if isinstance(w, str):
            return w
        # per output column; weights of rank > 2 (batched) get one scale
        axis = w.ndim - 1 if pc.per_channel and w.ndim == 2 else None
        return Placement((0,), 1, axis)
    if is_weight(node.inputs[0]):
        return "constant first input (weight on the left) has no integer kernel"
    return Placement((0, 1))


def _place_gemm(node: ir.Node, pc: PlaceContext) -> Placement | str:
    if attribute(node, "transA", 0):
        return "transA=1 has no QGemm fusion"
    if float(attribute(node, "alpha", 1.0)) != 1.0 or float(attribute(node, "beta", 1.0)) != 1.0:
        return "alpha or beta is not 1 (the int32 bias would be scaled wrong)"
    w = _const_float_weight(node, 1)
    if isinstance(w, str):
        return w
    trans_b = int(attribute(node, "transB", 0))
    channels = w.shape[0] if trans_b else w.shape[1]
    bias = _bias_slot(node, 2, channels)
    if isinstance(bias, str):
        return bias
    axis = (0 if trans_b else 1) if pc.per_channel else None
    return Placement((0,), 1, axis, bias)


def _place_binary(node: ir.Node, pc: PlaceContext) -> Placement | str:
    if not (_float_input(node, 0) and _float_input(node, 1)):
        return "inputs are not float32"
    if is_weight(node.inputs[0]) and is_weight(node.inputs[1]):
        return "both inputs are constants (fold them first)"
    return Placement((0, 1))


def _place_all_inputs(node: ir.Node, pc: PlaceContext) -> Placement | str:
    if not all(_float_input(node, i) for i in range(len(node.inputs))):
        return "inputs are not float32"
    return Placement(tuple(range(len(node.inputs))))


def _place_first(node: ir.Node, pc: PlaceContext) -> Placement | str:
    if not _float_input(node, 0):
        return "input is not float32"
    return Placement((0,))


def _place_uint8_pool(node: ir.Node, pc: PlaceContext) -> Placement | str:
    if pc.activation_type != "uint8":
        return "ONNX Runtime's QLinearAveragePool takes uint8 only"
    return _place_first(node, pc)


def rescale_factor(node: ir.Node) -> float | None:
    """The factor of a Div/Mul by a positive finite constant scalar (Div: 1/divisor), else None."""
    if node.domain not in ("", "ai.onnx") or node.op_type not in ("Div", "Mul") or len(node.inputs) != 2:
        return None
    slots = (1,) if node.op_type == "Div" else (1, 0)
    for slot in slots:
        c = constant_array(node.inputs[slot])
        other = node.inputs[1 - slot]
        if c is None or c.size != 1 or other is None or is_weight(other) or other.dtype not in (ir.DataType.FLOAT, None):
            continue
        value = float(c.reshape(-1)[0])
        if np.isfinite(value) and value > 0 and c.dtype == np.float32 and c.ndim <= (other.shape.rank() if other.shape else 0):
            return 1.0 / value if node.op_type == "Div" else value
    return None


def _place_rescale(node: ir.Node, pc: PlaceContext) -> Placement | str:
    if rescale_factor(node) is None:
        return "not a division by a positive constant scalar"
    slot = 0 if node.op_type == "Div" or is_weight(node.inputs[1]) else 1
    return Placement((slot,))


def _place_maxpool(node: ir.Node, pc: PlaceContext) -> Placement | str:
    if len(node.outputs) > 1 and node.outputs[1].uses():
        return "MaxPool indices output is used"
    return _place_first(node, pc)


RULES: dict[str, OpRule] = {
    "Conv": OpRule("anchor", "QLinearConv", _place_conv),
    "MatMul": OpRule("anchor", "QLinearMatMul / MatMulIntegerToFloat", _place_matmul, output="optional"),
    "Gemm": OpRule("anchor", "QGemm", _place_gemm, output="optional"),
    "Add": OpRule("follower", "QLinearAdd", _place_binary),
    "Mul": OpRule("follower", "QLinearMul", _place_binary),
    "Div": OpRule("rescale", "none (folded into the next scale)", _place_rescale),
    "Concat": OpRule("follower", "QLinearConcat", _place_all_inputs, shared_scale=True),
    "AveragePool": OpRule("follower", "QLinearAveragePool", _place_uint8_pool),
    "GlobalAveragePool": OpRule("follower", "QLinearGlobalAveragePool", _place_uint8_pool),
    "Sigmoid": OpRule("follower", "QLinearSigmoid", _place_first),
    "LeakyRelu": OpRule("follower", "QLinearLeakyRelu", _place_first),
    "Softmax": OpRule("follower", "QLinearSoftmax", _place_first),
    "MaxPool": OpRule("passthrough", "MaxPool (uint8/int8)", _place_maxpool, shared_scale=True),
    "Resize": OpRule("passthrough", "Resize (uint8/int8)", _place_first, shared_scale=True),
    **{op: OpRule("passthrough", f"{op} (on the integer tensor)", _place_first, shared_scale=True)
       for op in ("Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze", "Gather", "Slice", "Expand", "Tile")},
}

#: Activations ONNX Runtime folds into the quantized output of the op before them
#: (ReluQuantFusion / ClipQuantFusion), when the output range starts at their floor.
ABSORBED_ACTIVATIONS = ("Relu", "Clip")


def rule_for(node: ir.Node) -> OpRule | None:
    """The rule of ``node``'s op type (default ONNX domain only)."""
    if node.domain not in ("", "ai.onnx"):
        return None
    return RULES.get(node.op_type)


def place(node: ir.Node, pc: PlaceContext) -> tuple[OpRule, Placement] | str:
    """The rule and placement of ``node``, or why it cannot be quantized."""
    rule = rule_for(node)
    if rule is None:
        return f"{node.op_type} has no integer kernel in ONNX Runtime"
    if node.op_type == "Mul" and rescale_factor(node) is not None:
        rule = RULES["Div"]
    placed = rule.place(node, pc)
    if isinstance(placed, str):
        return placed
    return rule, placed
