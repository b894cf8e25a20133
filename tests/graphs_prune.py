"""Tiny hand-built graphs, one per channel dependency pattern the prune pass follows, with numpy forwards.

Each :class:`Pattern` holds the model, a numpy implementation of the same
graph (``forward(x, weights)``, weights keyed by node name and input index)
and ``links``: for every layer that reads pruned channels, where its input
channels come from. A test prunes the model, reads which filters each
producer kept, zeroes the matching input columns of the readers in the
dense weights, and checks that numpy on those weights gives what ONNX
Runtime gives on the pruned model.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import onnx
from numpy.lib.stride_tricks import sliding_window_view
from onnx import TensorProto, helper

from tests.graphs import init, make_model

__all__ = ["Pattern", "Segment", "Link", "PATTERNS", "np_conv", "zero_channel_chain"]

Weights = dict[tuple[str, int], np.ndarray]


@dataclass(frozen=True)
class Segment:
    """Input channels of a reader taken from a producer's filters ``start:stop`` (each repeated ``repeat`` times)."""

    producer: str
    start: int = 0
    stop: int | None = None
    repeat: int = 1
    axis: int = 0  # the producer's output axis in its weight


@dataclass(frozen=True)
class Link:
    """A reader's weight (node, input index, axis) and where its input channels come from, in order."""

    node: str
    axis: int
    segments: tuple[Segment, ...]
    blocks: int = 1  # grouped Conv: the weight axis holds one of ``blocks`` equal blocks
    index: int = 1


@dataclass
class Pattern:
    proto: onnx.ModelProto
    forward: Callable[[np.ndarray, Weights], np.ndarray]
    links: list[Link]
    weights: Weights
    x_shape: tuple[int, ...]
    producers: dict[str, int] = field(default_factory=dict)  # producer node -> filters expected after 50% pruning
    producer_axis: dict[str, int] = field(default_factory=dict)  # a MatMul producer's output axis (default 0)
    attention_heads: bool = False


# --- numpy reference ops -------------------------------------------------------------------------


def np_conv(x: np.ndarray, w: np.ndarray, b: np.ndarray | None = None, stride: int = 1, pad: int = 0, group: int = 1) -> np.ndarray:
    n, _, _, _ = x.shape
    o, cg, kh, kw = w.shape
    xp = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    win = sliding_window_view(xp, (kh, kw), axis=(2, 3))[:, :, ::stride, ::stride]
    ho, wo = win.shape[2], win.shape[3]
    win = win.reshape(n, group, cg, ho, wo, kh, kw)
    y = np.einsum("ngchwij,gocij->ngohw", win, w.reshape(group, o // group, cg, kh, kw)).reshape(n, o, ho, wo)
    return y if b is None else y + b.reshape(1, -1, 1, 1)


def np_bn(x: np.ndarray, s: np.ndarray, b: np.ndarray, m: np.ndarray, v: np.ndarray) -> np.ndarray:
    shape = (1, -1, 1, 1)
    return (x - m.reshape(shape)) / np.sqrt(v.reshape(shape) + 1e-5) * s.reshape(shape) + b.reshape(shape)


def relu(x: np.ndarray) -> np.ndarray:
    return np.maximum(x, 0)


def hard_sigmoid(x: np.ndarray) -> np.ndarray:
    return np.clip(0.2 * x + 0.5, 0, 1)


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


# --- builders ------------------------------------------------------------------------------------


class _Builder:
    """Collects nodes and random initializers; weights are keyed (node name, input index) for the forward."""

    def __init__(self, seed: int = 0) -> None:
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.weights: Weights = {}

    def const(self, name: str, array: np.ndarray) -> str:
        self.inits.append(init(name, array))
        return name

    def rand(self, name: str, shape: tuple[int, ...], scale: float | None = None) -> np.ndarray:
        fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else 1
        return (self.rng.standard_normal(shape) * (scale if scale is not None else 1 / np.sqrt(fan_in))).astype(np.float32)

    def layer(self, op: str, name: str, inputs: list[str], weights: list[np.ndarray], **attrs: object) -> str:
        names = []
        for i, w in enumerate(weights, start=len(inputs)):
            self.weights[(name, i)] = w
            names.append(self.const(f"{name}_w{i}", w))
        self.nodes.append(helper.make_node(op, inputs + names, [name], name=name, **attrs))
        return name

    def op(self, op: str, inputs: list[str], out: str, **attrs: object) -> str:
        self.nodes.append(helper.make_node(op, inputs, [out], name=out, **attrs))
        return out

    def conv(self, name: str, x: str, cin: int, cout: int, k: int = 3, group: int = 1, stride: int = 1, bias: bool = True) -> str:
        pad = k // 2
        ws = [self.rand(name, (cout, cin // group, k, k))]
        if bias:
            ws.append(self.rand(name, (cout,), 0.1))
        return self.layer("Conv", name, [x], ws, pads=[pad] * 4, group=group, strides=[stride, stride])

    def bn(self, name: str, x: str, c: int) -> str:
        ws = [self.rng.uniform(0.5, 1.5, c).astype(np.float32), self.rand(name, (c,), 0.1),
              self.rand(name, (c,), 0.1), self.rng.uniform(0.5, 2.0, c).astype(np.float32)]
        return self.layer("BatchNormalization", name, [x], ws, epsilon=1e-5)

    def model(self, x_shape: tuple[int | str, ...], out: str, opset: int = 18,
              out_shape: list[int | str] | None = None) -> onnx.ModelProto:
        """The model; the output's shape is ``out_shape`` or what ONNX shape inference finds."""
        model = make_model(self.nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x_shape))],
                           [helper.make_tensor_value_info(out, TensorProto.FLOAT, out_shape)], self.inits, opset=opset)
        if out_shape is None:
            model.graph.output[0].CopyFrom(onnx.shape_inference.infer_shapes(model).graph.output[0])
        return model


def _conv_fw(w: Weights, name: str, x: np.ndarray, **kw: int) -> np.ndarray:
    return np_conv(x, w[(name, 1)], w.get((name, 2)), pad=w[(name, 1)].shape[-1] // 2, **kw)


def _bn_fw(w: Weights, name: str, x: np.ndarray) -> np.ndarray:
    return np_bn(x, w[(name, 1)], w[(name, 2)], w[(name, 3)], w[(name, 4)])


def bn_relu() -> Pattern:
    """Conv -> BatchNorm -> Relu -> Conv."""
    b = _Builder(1)
    y = b.conv("c2", b.op("Relu", [b.bn("bn", b.conv("c1", "x", 3, 8), 8)], "r"), 8, 4)
    fw = lambda x, w: _conv_fw(w, "c2", relu(_bn_fw(w, "bn", _conv_fw(w, "c1", x))))  # noqa: E731
    return Pattern(b.model(("N", 3, 6, 6), y), fw, [Link("c2", 1, (Segment("c1"),))], b.weights, (2, 3, 6, 6), {"c1": 4})


def residual() -> Pattern:
    """Both arms of a residual Add form one group: Conv -> Relu -> (Conv) + identity -> Relu -> Conv."""
    b = _Builder(2)
    r = b.op("Relu", [b.conv("c1", "x", 3, 8)], "r")
    s = b.op("Relu", [b.op("Add", [r, b.conv("c2", r, 8, 8)], "add")], "s")
    y = b.conv("c3", s, 8, 4)

    def fw(x: np.ndarray, w: Weights) -> np.ndarray:
        r = relu(_conv_fw(w, "c1", x))
        return _conv_fw(w, "c3", relu(r + _conv_fw(w, "c2", r)))

    links = [Link("c2", 1, (Segment("c1"),)), Link("c3", 1, (Segment("c1"),))]
    return Pattern(b.model(("N", 3, 6, 6), y), fw, links, b.weights, (2, 3, 6, 6), {"c1": 4, "c2": 4})


def silu_sum() -> Pattern:
    """SiLU (x * Sigmoid(x)), a three-way Sum of residual arms, Clip and HardSwish: one group across all of them."""
    b = _Builder(20)
    a = b.conv("c1", "x", 3, 8)
    s = b.op("Mul", [a, b.op("Sigmoid", [a], "sig")], "silu")
    arm1 = b.conv("c2", s, 8, 8)
    lo, hi = b.const("lo", np.array(-1.0, dtype=np.float32)), b.const("hi", np.array(2.0, dtype=np.float32))
    arm2 = b.op("Clip", [b.conv("c3", s, 8, 8, k=1), lo, hi], "clip")
    h = b.op("HardSwish", [b.op("Sum", [s, arm1, arm2], "sum")], "hsw")
    y = b.conv("c4", h, 8, 4)

    def fw(x: np.ndarray, w: Weights) -> np.ndarray:
        a = _conv_fw(w, "c1", x)
        s = a / (1 + np.exp(-a))
        t = s + _conv_fw(w, "c2", s) + np.clip(_conv_fw(w, "c3", s), -1, 2)
        return _conv_fw(w, "c4", t * np.clip(t / 6 + 0.5, 0, 1))

    links = [Link("c2", 1, (Segment("c1"),)), Link("c3", 1, (Segment("c1"),)), Link("c4", 1, (Segment("c1"),))]
    return Pattern(b.model(("N", 3, 6, 6), y), fw, links, b.weights, (2, 3, 6, 6), {"c1": 4, "c2": 4, "c3": 4})


def per_channel_constants() -> Pattern:
    """Mul, Add and PRelu with broadcast per-channel constants of different ranks."""
    b = _Builder(3)
    s = b.rand("s", (1, 8, 1, 1), 1.0)
    t = b.rand("t", (8, 1, 1), 1.0)
    p = np.abs(b.rand("p", (8, 1, 1), 0.3))
    b.weights.update({("mul", 1): s, ("add", 1): t, ("prelu", 1): p})
    h = b.layer("Mul", "mul", [b.conv("c1", "x", 3, 8)], [s])
    h = b.layer("Add", "add", [h], [t])
    h = b.layer("PRelu", "prelu", [h], [p])
    y = b.conv("c2", h, 8, 4)

    def fw(x: np.ndarray, w: Weights) -> np.ndarray:
        h = _conv_fw(w, "c1", x) * w[("mul", 1)] + w[("add", 1)]
        h = np.where(h >= 0, h, h * w[("prelu", 1)])
        return _conv_fw(w, "c2", h)

    return Pattern(b.model(("N", 3, 6, 6), y), fw, [Link("c2", 1, (Segment("c1"),))], b.weights, (2, 3, 6, 6), {"c1": 4})


def squeeze_excite() -> Pattern:
    """GlobalAveragePool -> Conv -> Relu -> Conv -> HardSigmoid -> Mul back onto the trunk."""
    b = _Builder(4)
    a = b.op("Relu", [b.conv("c1", "x", 3, 8)], "a")
    g = b.op("GlobalAveragePool", [a], "gap")
    e = b.conv("ex", b.op("Relu", [b.conv("sq", g, 8, 4, k=1)], "sr"), 4, 8, k=1)
    m = b.op("Mul", [a, b.op("HardSigmoid", [e], "hs", alpha=0.2, beta=0.5)], "m")
    y = b.conv("c2", m, 8, 4)

    def fw(x: np.ndarray, w: Weights) -> np.ndarray:
        a = relu(_conv_fw(w, "c1", x))
        g = a.mean(axis=(2, 3), keepdims=True)
        e = _conv_fw(w, "ex", relu(_conv_fw(w, "sq", g)))
        return _conv_fw(w, "c2", a * hard_sigmoid(e))

    links = [Link("sq", 1, (Segment("c1"),)), Link("c2", 1, (Segment("c1"),)), Link("ex", 1, (Segment("sq"),))]
    return Pattern(b.model(("N", 3, 6, 6), y), fw, links, b.weights, (2, 3, 6, 6), {"c1": 4, "ex": 4, "sq": 2})


def concat() -> Pattern:
    """Two branches joined by Concat on the channel axis: the reader's input columns are offset per branch."""
    b = _Builder(5)
    c = b.op("Concat", [b.conv("ca", "x", 3, 8), b.conv("cb", "x", 3, 8, k=1)], "cat", axis=1)
    y = b.conv("c2", b.op("Relu", [c], "r"), 16, 4)

    def fw(x: np.ndarray, w: Weights) -> np.ndarray:
        return _conv_fw(w, "c2", relu(np.concatenate([_conv_fw(w, "ca", x), _conv_fw(w, "cb", x)], axis=1)))

    return Pattern(b.model(("N", 3, 6, 6), y), fw, [Link("c2", 1, (Segment("ca"), Segment("cb")))], b.weights,
                   (2, 3, 6, 6), {"ca": 4, "cb": 4})


def split() -> Pattern:
    """Split on the channel axis: each half is its own group; the sizes are rewritten."""
    b = _Builder(6)
    b.nodes.append(helper.make_node("Split", [b.conv("c1", "x", 3, 8)], ["h0", "h1"], name="split", axis=1))
    b.inits.append(init("split_sizes", np.array([4, 4], dtype=np.int64)))
    b.nodes[-1].input.append("split_sizes")
    y = b.op("Add", [b.conv("ca", "h0", 4, 4), b.conv("cb", "h1", 4, 4)], "y")

    def fw(x: np.ndarray, w: Weights) -> np.ndarray:
        h = _conv_fw(w, "c1", x)
        return _conv_fw(w, "ca", h[:, :4]) + _conv_fw(w, "cb", h[:, 4:])

    links = [Link("ca", 1, (Segment("c1", 0, 4),)), Link("cb", 1, (Segment("c1", 4, 8),))]
    return Pattern(b.model(("N", 3, 6, 6), y), fw, links, b.weights, (2, 3, 6, 6), {"c1": 4})


def slice_channels() -> Pattern:
    """Slice [2:6] of the channel axis: the bounds move to the pruned tensor."""
    b = _Builder(7)
    starts, ends, axes = (b.const(n, np.array([v], dtype=np.int64)) for n, v in (("st", 2), ("en", 6), ("ax", 1)))
    s = b.op("Slice", [b.conv("c1", "x", 3, 8), starts, ends, axes], "sl")
    y = b.conv("c2", s, 4, 4)
    fw = lambda x, w: _conv_fw(w, "c2", _conv_fw(w, "c1", x)[:, 2:6])  # noqa: E731
    return Pattern(b.model(("N", 3, 6, 6), y), fw, [Link("c2", 1, (Segment("c1", 2, 6),))], b.weights, (2, 3, 6, 6),
                   {"c1": 4})


def depthwise() -> Pattern:
    """A depthwise Conv passes channels through; its ``group`` shrinks with them."""
    b = _Builder(8)
    h = b.op("Relu", [b.bn("bn1", b.conv("c1", "x", 3, 8), 8)], "r1")
    h = b.op("Relu", [b.bn("bn2", b.conv("dw", h, 8, 8, group=8), 8)], "r2")
    y = b.conv("c2", h, 8, 4, k=1)

    def fw(x: np.ndarray, w: Weights) -> np.ndarray:
        h = relu(_bn_fw(w, "bn1", _conv_fw(w, "c1", x)))
        h = relu(_bn_fw(w, "bn2", _conv_fw(w, "dw", h, group=8)))
        return _conv_fw(w, "c2", h)

    return Pattern(b.model(("N", 3, 6, 6), y), fw, [Link("c2", 1, (Segment("c1"),))], b.weights, (2, 3, 6, 6), {"c1": 4})


def grouped() -> Pattern:
    """A grouped Conv (group=2): every group keeps as many input and output channels as the other."""
    b = _Builder(9)
    h = b.op("Relu", [b.conv("c1", "x", 3, 8)], "r1")
    h = b.op("Relu", [b.conv("g", h, 8, 8, group=2)], "r2")
    y = b.conv("c2", h, 8, 4)

    def fw(x: np.ndarray, w: Weights) -> np.ndarray:
        h = relu(_conv_fw(w, "c1", x))
        return _conv_fw(w, "c2", relu(_conv_fw(w, "g", h, group=2)))

    links = [Link("g", 1, (Segment("c1"),), blocks=2), Link("c2", 1, (Segment("g"),))]
    return Pattern(b.model(("N", 3, 6, 6), y), fw, links, b.weights, (2, 3, 6, 6), {"c1": 4, "g": 4})


def channel_shuffle() -> Pattern:
    """ShuffleNet: grouped Conv -> Reshape [N,g,C/g,H,W] -> Transpose -> Reshape [N,C,H,W] -> grouped Conv."""
    b = _Builder(10)
    h = b.op("Relu", [b.conv("g1", "x", 4, 8, group=2)], "r1")
    s1, s2 = b.const("shape5", np.array([0, 2, 4, 6, 6], dtype=np.int64)), b.const("shape4", np.array([0, 8, 6, 6], dtype=np.int64))
    h = b.op("Reshape", [b.op("Transpose", [b.op("Reshape", [h, s1], "rs1")], "tr", perm=[0, 2, 1, 3, 4]), s2], "rs2")
    y = b.conv("c2", b.op("Relu", [b.conv("g2", h, 8, 8, group=2)], "r2"), 8, 4)

    def fw(x: np.ndarray, w: Weights) -> np.ndarray:
        h = relu(_conv_fw(w, "g1", x, group=2))
        n = h.shape[0]
        h = h.reshape(n, 2, 4, 6, 6).transpose(0, 2, 1, 3, 4).reshape(n, 8, 6, 6)
        return _conv_fw(w, "c2", relu(_conv_fw(w, "g2", h, group=2)))

    # after the shuffle, position p of g2's input is filter (p // 2) + 4 * (p % 2) of g1... as ids go, filter k of
    # every g1 group is one channel, so position p carries g1's filter p // 2 of each group
    links = [Link("g2", 1, (Segment("g1", 0, 4, repeat=2),), blocks=2), Link("c2", 1, (Segment("g2"),))]
    return Pattern(b.model(("N", 4, 6, 6), y), fw, links, b.weights, (2, 4, 6, 6), {"g1": 4, "g2": 4})


def pooling() -> Pattern:
    """MaxPool, AveragePool and GlobalAveragePool keep channels; Flatten -> Gemm reads them."""
    b = _Builder(11)
    h = b.op("MaxPool", [b.op("Relu", [b.conv("c1", "x", 3, 8)], "r")], "mp", kernel_shape=[2, 2], strides=[2, 2])
    h = b.op("AveragePool", [h], "ap", kernel_shape=[3, 3], pads=[1, 1, 1, 1], count_include_pad=1)
    h = b.op("Flatten", [b.op("GlobalAveragePool", [h], "gap")], "fl", axis=1)
    y = b.layer("Gemm", "fc", [h], [b.rand("fc", (5, 8)), b.rand("fc", (5,), 0.1)], transB=1)

    def fw(x: np.ndarray, w: Weights) -> np.ndarray:
        h = relu(_conv_fw(w, "c1", x))
        n, c = h.shape[:2]
        h = h.reshape(n, c, 3, 2, 3, 2).max(axis=(3, 5))
        hp = np.pad(h, ((0, 0), (0, 0), (1, 1), (1, 1)))
        h = sliding_window_view(hp, (3, 3), axis=(2, 3)).mean(axis=(4, 5))
        return h.mean(axis=(2, 3)) @ w[("fc", 1)].T + w[("fc", 2)]

    return Pattern(b.model(("N", 3, 6, 6), y), fw, [Link("fc", 1, (Segment("c1"),))], b.weights, (2, 3, 6, 6), {"c1": 4})


def resize() -> Pattern:
    """Resize by scales (channel scale 1) and by sizes (the channel entry is rewritten)."""
    b = _Builder(12)
    h = b.conv("c1", "x", 3, 8)
    empty = b.const("roi", np.zeros(0, dtype=np.float32))
    up = b.op("Resize", [h, empty, b.const("scales", np.array([1, 1, 2, 2], dtype=np.float32))], "up", mode="nearest")
    sized = b.op("Resize", [h, empty, "", b.const("sizes", np.array([2, 8, 12, 12], dtype=np.int64))], "sized", mode="nearest")
    y = b.conv("c2", b.op("Add", [up, sized], "sum"), 8, 4)

    def fw(x: np.ndarray, w: Weights) -> np.ndarray:
        h = _conv_fw(w, "c1", x).repeat(2, axis=2).repeat(2, axis=3)
        return _conv_fw(w, "c2", 2 * h)

    return Pattern(b.model((2, 3, 6, 6), y), fw, [Link("c2", 1, (Segment("c1"),))], b.weights, (2, 3, 6, 6), {"c1": 4})


def flatten_gemm() -> Pattern:
    """Flatten -> Gemm: each channel is 9 rows of the Gemm weight (3x3 spatial)."""
    b = _Builder(13)
    h = b.op("Flatten", [b.op("Relu", [b.conv("c1", "x", 3, 8, stride=2)], "r")], "fl", axis=1)
    y = b.layer("Gemm", "fc", [h], [b.rand("fc", (72, 5)), b.rand("fc", (5,), 0.1)], transB=0)

    def fw(x: np.ndarray, w: Weights) -> np.ndarray:
        h = relu(np_conv(x, w[("c1", 1)], w[("c1", 2)], stride=2, pad=1))
        return h.reshape(h.shape[0], -1) @ w[("fc", 1)] + w[("fc", 2)]

    return Pattern(b.model(("N", 3, 6, 6), y), fw, [Link("fc", 0, (Segment("c1", repeat=9),))], b.weights,
                   (2, 3, 6, 6), {"c1": 4})


def reshape_matmul() -> Pattern:
    """Reshape [-1, C*H*W] (a literal size, rewritten) -> MatMul."""
    b = _Builder(14)
    shape = b.const("shape", np.array([-1, 72], dtype=np.int64))
    h = b.op("Reshape", [b.op("Relu", [b.conv("c1", "x", 3, 8, stride=2)], "r"), shape], "rs")
    y = b.layer("MatMul", "mm", [h], [b.rand("mm", (72, 5))])

    def fw(x: np.ndarray, w: Weights) -> np.ndarray:
        h = relu(np_conv(x, w[("c1", 1)], w[("c1", 2)], stride=2, pad=1))
        return h.reshape(h.shape[0], -1) @ w[("mm", 1)]

    return Pattern(b.model(("N", 3, 6, 6), y), fw, [Link("mm", 0, (Segment("c1", repeat=9),))], b.weights,
                   (2, 3, 6, 6), {"c1": 4})


def conv_transpose() -> Pattern:
    """ConvTranspose reads channels on its weight's axis 0 and makes them on axis 1 (kernel 2, stride 2)."""
    b = _Builder(19)
    h = b.op("Relu", [b.conv("c1", "x", 3, 8)], "r1")
    h = b.layer("ConvTranspose", "ct", [h], [b.rand("ct", (8, 6, 2, 2)), b.rand("ct", (6,), 0.1)], strides=[2, 2])
    y = b.conv("c2", b.op("Relu", [h], "r2"), 6, 4)

    def fw(x: np.ndarray, w: Weights) -> np.ndarray:
        h = relu(_conv_fw(w, "c1", x))
        n, _, hh, ww = h.shape
        t = np.einsum("nchw,coab->nohawb", h, w[("ct", 1)]).reshape(n, -1, 2 * hh, 2 * ww) + w[("ct", 2)].reshape(1, -1, 1, 1)
        return _conv_fw(w, "c2", relu(t))

    links = [Link("ct", 0, (Segment("c1"),)), Link("c2", 1, (Segment("ct"),))]
    return Pattern(b.model(("N", 3, 6, 6), y), fw, links, b.weights, (2, 3, 6, 6), {"c1": 4, "ct": 3}, {"ct": 1})


def computed_reshape() -> Pattern:
    """Reshape(x, Concat(Shape(x)[0:1], [C])) as Paddle exports a flatten: the target is made constant first."""
    b = _Builder(18)
    g = b.op("GlobalAveragePool", [b.op("Relu", [b.conv("c1", "x", 3, 8)], "r")], "gap")
    starts, ends = b.const("zero", np.array([0], dtype=np.int64)), b.const("one", np.array([1], dtype=np.int64))
    batch = b.op("Slice", [b.op("Shape", [g], "shape"), starts, ends], "batch")
    target = b.op("Concat", [batch, b.const("channels", np.array([8], dtype=np.int64))], "target", axis=0)
    y = b.layer("MatMul", "mm", [b.op("Reshape", [g, target], "flat")], [b.rand("mm", (8, 5))])
    fw = lambda x, w: relu(_conv_fw(w, "c1", x)).mean(axis=(2, 3)) @ w[("mm", 1)]  # noqa: E731
    return Pattern(b.model(("N", 3, 6, 6), y, out_shape=["N", 5]), fw, [Link("mm", 0, (Segment("c1"),))], b.weights,
                   (2, 3, 6, 6), {"c1": 4})


def ffn() -> Pattern:
    """A transformer FFN on [N, T, D]: MatMul -> Add -> Relu -> MatMul; hidden units are one group."""
    b = _Builder(15)
    h = b.layer("Add", "b1", [b.layer("MatMul", "m1", ["x"], [b.rand("m1", (6, 16))])], [b.rand("b1", (16,), 0.1)])
    y = b.layer("MatMul", "m2", [b.op("Relu", [h], "r")], [b.rand("m2", (16, 6))])
    fw = lambda x, w: relu(x @ w[("m1", 1)] + w[("b1", 1)]) @ w[("m2", 1)]  # noqa: E731
    return Pattern(b.model(("N", 5, 6), y), fw, [Link("m2", 0, (Segment("m1", axis=1),))], b.weights, (2, 5, 6),
                   {"m1": 8}, {"m1": 1})


def attention() -> Pattern:
    """Multi-head attention (4 heads of 4): heads are removed whole from Q, K, V and the output projection."""
    b = _Builder(16)
    d, heads, t = 16, 4, 5
    split = b.const("split_shape", np.array([0, t, heads, d // heads], dtype=np.int64))
    merge = b.const("merge_shape", np.array([0, t, d], dtype=np.int64))
    scale = b.const("scale", np.array(1 / np.sqrt(d // heads), dtype=np.float32))
    proj = {}
    for p in "qkv":
        lin = b.layer("Add", f"{p}b", [b.layer("MatMul", p, ["x"], [b.rand(p, (d, d))])], [b.rand(f"{p}b", (d,), 0.1)])
        proj[p] = b.op("Reshape", [lin, split], f"{p}_split")
    q = b.op("Transpose", [proj["q"]], "qt", perm=[0, 2, 1, 3])
    k = b.op("Transpose", [proj["k"]], "kt", perm=[0, 2, 3, 1])
    v = b.op("Transpose", [proj["v"]], "vt", perm=[0, 2, 1, 3])
    att = b.op("Softmax", [b.op("Mul", [b.op("MatMul", [q, k], "qk"), scale], "qks")], "att", axis=-1)
    o = b.op("Reshape", [b.op("Transpose", [b.op("MatMul", [att, v], "av")], "ot", perm=[0, 2, 1, 3]), merge], "merged")
    y = b.layer("MatMul", "out", [o], [b.rand("out", (d, d))])

    def fw(x: np.ndarray, w: Weights) -> np.ndarray:
        n = x.shape[0]
        q, k, v = ((x @ w[(p, 1)] + w[(f"{p}b", 1)]).reshape(n, t, heads, d // heads) for p in "qkv")
        q, k, v = q.transpose(0, 2, 1, 3), k.transpose(0, 2, 3, 1), v.transpose(0, 2, 1, 3)
        o = (softmax(q @ k / np.sqrt(d // heads)) @ v).transpose(0, 2, 1, 3).reshape(n, t, d)
        return o @ w[("out", 1)]

    return Pattern(b.model(("N", t, d), y, out_shape=["N", t, d]), fw, [Link("out", 0, (Segment("v", axis=1),))], b.weights, (2, t, d),
                   {"q": 8, "k": 8, "v": 8}, {"q": 1, "k": 1, "v": 1}, attention_heads=True)


#: name -> builder of each dependency pattern
PATTERNS: dict[str, Callable[[], Pattern]] = {
    "bn_relu": bn_relu,
    "residual": residual,
    "silu_sum": silu_sum,
    "per_channel_constants": per_channel_constants,
    "squeeze_excite": squeeze_excite,
    "concat": concat,
    "split": split,
    "slice": slice_channels,
    "depthwise": depthwise,
    "grouped": grouped,
    "channel_shuffle": channel_shuffle,
    "pooling": pooling,
    "resize": resize,
    "flatten_gemm": flatten_gemm,
    "reshape_matmul": reshape_matmul,
    "computed_reshape": computed_reshape,
    "conv_transpose": conv_transpose,
    "ffn": ffn,
    "attention": attention,
}


def zero_channel_chain(zero: tuple[int, ...] = (1, 3, 4, 6)) -> onnx.ModelProto:
    """Conv(8) -> Relu -> Conv(8) -> Relu -> Gemm after Flatten, where filters ``zero`` of both convs are exactly zero."""
    b = _Builder(17)
    w1, b1 = b.rand("c1", (8, 3, 3, 3)), b.rand("c1", (8,), 0.1)
    w2, b2 = b.rand("c2", (8, 8, 3, 3)), b.rand("c2", (8,), 0.1)
    for w, bias in ((w1, b1), (w2, b2)):
        w[list(zero)] = 0
        bias[list(zero)] = 0
    h = b.op("Relu", [b.layer("Conv", "c1", ["x"], [w1, b1], pads=[1] * 4)], "r1")
    h = b.op("Relu", [b.layer("Conv", "c2", [h], [w2, b2], pads=[1] * 4)], "r2")
    h = b.op("Flatten", [b.op("GlobalAveragePool", [h], "gap")], "fl")
    y = b.layer("Gemm", "fc", [h], [b.rand("fc", (5, 8)), b.rand("fc", (5,), 0.1)], transB=1)
    return b.model(("N", 3, 6, 6), y)
