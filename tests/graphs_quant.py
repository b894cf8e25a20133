"""Hand-built graphs for the quant tests: a MobileNetV3-style net (HardSwish, squeeze-excite), a YOLO-style head."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper

from tests.graphs import init, make_model

__all__ = ["mbv3_net", "yolo_head", "activation_chain", "transition_bound", "exported_hardswish_chain", "gelu_mlp", "GELU_FORMS"]


class _Builder:
    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.n = 0

    def name(self, hint: str) -> str:
        self.n += 1
        return f"{hint}{self.n}"

    def conv(self, x: str, cin: int, cout: int, k: int = 1, stride: int = 1, group: int = 1) -> str:
        w = (self.rng.standard_normal((cout, cin // group, k, k)) * np.sqrt(2.0 / (cin // group * k * k))).astype(np.float32)
        b = (self.rng.standard_normal(cout) * 0.1).astype(np.float32)
        name = self.name("conv")
        self.inits += [init(f"{name}_w", w), init(f"{name}_b", b)]
        self.nodes.append(helper.make_node("Conv", [x, f"{name}_w", f"{name}_b"], [name], name=name, kernel_shape=[k, k],
                                           pads=[k // 2] * 4, strides=[stride, stride], group=group))
        return name

    def op(self, op: str, inputs: list[str], **attrs: object) -> str:
        name = self.name(op.lower())
        self.nodes.append(helper.make_node(op, inputs, [name], name=name, **attrs))
        return name

    def const(self, value: np.ndarray) -> str:
        name = self.name("c")
        self.inits.append(init(name, np.asarray(value, np.float32)))
        return name


def mbv3_net(width: int = 16, blocks: int = 3, size: int = 32, classes: int = 10, seed: int = 0,
             act: str = "HardSwish") -> onnx.ModelProto:
    """MobileNetV3-style: stem conv + ``act``; blocks of 1x1 expand + act, depthwise 3x3 + act, squeeze-excite
    (GlobalAveragePool, 1x1 + Relu, 1x1 + HardSigmoid, Mul), 1x1 project, residual Add; GAP + Gemm head."""
    b = _Builder(seed)
    x = b.op(act, [b.conv("x", 3, width, 3, 2)])
    for _ in range(blocks):
        e = b.op(act, [b.conv(x, width, width * 3, 1)])
        d = b.op(act, [b.conv(e, width * 3, width * 3, 3, 1, group=width * 3)])
        s = b.op("GlobalAveragePool", [d])
        s = b.op("Relu", [b.conv(s, width * 3, width, 1)])
        s = b.op("HardSigmoid", [b.conv(s, width, width * 3, 1)], alpha=1.0 / 6, beta=0.5)
        d = b.op("Mul", [d, s])
        x = b.op("Add", [x, b.conv(d, width * 3, width, 1)])
    x = b.op(act, [b.conv(x, width, width * 4, 1)])
    x = b.op("Flatten", [b.op("GlobalAveragePool", [x])])
    w = (b.rng.standard_normal((classes, width * 4)) * 0.3).astype(np.float32)
    b.inits += [init("fc_w", w), init("fc_b", np.zeros(classes, np.float32))]
    b.nodes.append(helper.make_node("Gemm", [x, "fc_w", "fc_b"], ["logits"], name="fc", transB=1))
    return make_model(b.nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, size, size])],
                      [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", classes])], b.inits, opset=14)


def activation_chain(act: str, channels: int = 8, seed: int = 0) -> onnx.ModelProto:
    """Conv -> ``act`` -> Conv: the smallest graph where an activation sits between two integer kernels."""
    b = _Builder(seed)
    attrs = {"alpha": 1.0 / 6, "beta": 0.5} if act == "HardSigmoid" else {}
    a = b.conv("x", 3, channels, 3)
    y = b.op(act, [a], **attrs)
    if act == "HardSigmoid":  # x * HardSigmoid(x), as exporters write hard-swish
        y = b.op("Mul", [a, y])
    b.conv(y, channels, channels, 3)
    b.nodes[-1].output[0] = "y"
    return make_model(b.nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", channels, 8, 8])], b.inits,
                      opset=24 if act == "Swish" else 14)


def yolo_head(classes: int = 80, anchors_hw: int = 8, seed: int = 0) -> onnx.ModelProto:
    """YOLOv8-style head: features -> Conv -> boxes in pixels [N, 4, A]; Conv -> Sigmoid -> scores [N, classes, A];
    Concat on axis 1 -> one output [N, 4 + classes, A]."""
    b = _Builder(seed)
    f = b.op("Relu", [b.conv("x", 3, 32, 3)])
    a = anchors_hw * anchors_hw
    box = b.conv(f, 32, 4, 1)
    box = b.op("Mul", [b.op("Relu", [box]), b.const(np.array(40.0))])  # pixel coordinates, 0..~600
    box = b.op("Reshape", [box, "shape_box"])
    cls = b.conv(f, 32, classes, 1)
    cls = b.op("Add", [cls, b.const(np.array(-4.0))])  # most anchors see no object: scores mostly near 0
    cls = b.op("Reshape", [b.op("Sigmoid", [cls]), "shape_cls"])
    b.inits += [init("shape_box", np.array([-1, 4, a], np.int64)), init("shape_cls", np.array([-1, classes, a], np.int64))]
    b.nodes.append(helper.make_node("Concat", [box, cls], ["y"], name="concat", axis=1))
    return make_model(b.nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, anchors_hw, anchors_hw])],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4 + classes, a])], b.inits, opset=14)


def transition_bound(blocks: int = 12, channels: int = 4, size: int = 32, seed: int = 0) -> onnx.ModelProto:
    """Tiny 1x1 convs separated by Abs (no integer kernel in ONNX Runtime): quantized, every conv needs a
    Quantize before and a Dequantize after, and the integer kernels save almost nothing, so int8 cannot pay."""
    b = _Builder(seed)
    x = "x"
    for _ in range(blocks):
        x = b.op("Abs", [b.conv(x, channels, channels, 1)])
    b.nodes[-1].output[0] = "y"
    return make_model(b.nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", channels, size, size])],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", channels, size, size])], b.inits)


def exported_hardswish_chain(channels: int = 8, seed: int = 0) -> onnx.ModelProto:
    """Conv -> x * Clip(x + 3, 0, 6) / 6 (hard-swish as Paddle and older exporters write it) -> Conv, opset 13."""
    b = _Builder(seed)
    a = b.conv("x", 3, channels, 3)
    c = b.op("Clip", [b.op("Add", [a, b.const(np.array(3.0))]), b.const(np.array(0.0)), b.const(np.array(6.0))])
    y = b.op("Div", [b.op("Mul", [a, c]), b.const(np.array(6.0))])
    b.conv(y, channels, channels, 3)
    b.nodes.append(helper.make_node("GlobalAveragePool", [b.nodes[-1].output[0]], ["y"], name="gap"))
    return make_model(b.nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", channels, 1, 1])], b.inits, opset=13)


GELU_FORMS = ("torch_tanh", "pow_tanh", "onnx_tanh", "fastgelu", "erf_chain", "onnx_erf", "ms_gelu")


def gelu_mlp(form: str, dim: int = 32, hidden: int = 128, layers: int = 1, seed: int = 0) -> onnx.ModelProto:
    """A transformer MLP block: ``layers`` times MatMul + Add -> GELU -> MatMul + Add, with GELU written as ``form``:

    - ``torch_tanh``: PyTorch's tanh export, Mul(0.5, x) * (1 + Tanh(√(2/π)·(x + 0.044715·x·(x·x))));
    - ``pow_tanh``: x * (1 + Tanh(...(x + 0.044715·Pow(x, 3)))) * 0.5;
    - ``onnx_tanh`` / ``onnx_erf``: the opset-20 Gelu op (approximate tanh / none);
    - ``fastgelu`` / ``ms_gelu``: com.microsoft FastGelu (tanh form) / Gelu (erf);
    - ``erf_chain``: PyTorch's erf export, x * (1 + Erf(x / √2)) * 0.5.
    """
    b = _Builder(seed)
    c = lambda v: b.const(np.array(v, np.float32))  # noqa: E731
    x = "x"
    for _ in range(layers):
        w1 = (b.rng.standard_normal((dim, hidden)) / np.sqrt(dim)).astype(np.float32)
        w2 = (b.rng.standard_normal((hidden, dim)) / np.sqrt(hidden)).astype(np.float32)
        n = b.name("fc")
        b.inits += [init(f"{n}_w1", w1), init(f"{n}_b1", (b.rng.standard_normal(hidden) * 0.3).astype(np.float32)),
                    init(f"{n}_w2", w2), init(f"{n}_b2", np.zeros(dim, np.float32))]
        h = b.op("Add", [b.op("MatMul", [x, f"{n}_w1"]), f"{n}_b1"])
        if form == "torch_tanh":
            cube = b.op("Mul", [h, b.op("Mul", [h, h])])
            inner = b.op("Mul", [c(np.sqrt(2 / np.pi)), b.op("Add", [h, b.op("Mul", [c(0.044715), cube])])])
            g = b.op("Mul", [b.op("Mul", [c(0.5), h]), b.op("Add", [c(1.0), b.op("Tanh", [inner])])])
        elif form == "pow_tanh":
            cube = b.op("Pow", [h, c(3.0)])
            inner = b.op("Mul", [b.op("Add", [h, b.op("Mul", [cube, c(0.044715)])]), c(np.sqrt(2 / np.pi))])
            g = b.op("Mul", [b.op("Mul", [h, b.op("Add", [b.op("Tanh", [inner]), c(1.0)])]), c(0.5)])
        elif form == "erf_chain":
            erf = b.op("Erf", [b.op("Div", [h, c(np.sqrt(2.0))])])
            g = b.op("Mul", [b.op("Mul", [h, b.op("Add", [erf, c(1.0)])]), c(0.5)])
        elif form in ("onnx_tanh", "onnx_erf"):
            g = b.op("Gelu", [h], approximate="tanh" if form == "onnx_tanh" else "none")
        else:
            g = b.name("gelu")
            b.nodes.append(helper.make_node("FastGelu" if form == "fastgelu" else "Gelu", [h], [g], name=g,
                                            domain="com.microsoft"))
        x = b.op("Add", [b.op("MatMul", [g, f"{n}_w2"]), f"{n}_b2"])
    b.nodes[-1].output[0] = "y"
    model = make_model(b.nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", dim])],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", dim])], b.inits,
                       opset=20 if form.startswith("onnx_") else 17)
    if form in ("fastgelu", "ms_gelu"):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return model
