"""ONNX operators as torch functions, looked up by op type (a table, not an if-chain).

Covers the ops the example models and onnxopt's passes produce (convolutions,
Gemm/MatMul, normalisations, activations, pooling, shape plumbing, attention
building blocks). Each function gets the node's inputs (``None`` for an
omitted optional input) and an :class:`OpCall` with its attributes and the
model's opset, and returns one tensor or a tuple of them. Semantics follow
the ONNX spec at that opset (e.g. Softmax's 2-D coercion before opset 13,
axes as attributes or inputs), so the converted module computes what ONNX
Runtime computes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from onnxopt.errors import OnnxoptError

__all__ = ["RunMode", "OpCall", "OpFn", "OPS", "TORCH_DTYPES", "unsupported"]

Tensor = torch.Tensor
Inputs = Sequence["Tensor | None"]


@dataclass
class RunMode:
    """How the module runs now, shared by all its op calls.

    ``batch_statistics``: BatchNormalization normalises with the batch's own
    mean and variance and updates its running statistics (as in training a
    torch model); otherwise it uses the stored statistics (inference).
    """

    batch_statistics: bool = False
    momentum: float = 0.1


@dataclass(frozen=True)
class OpCall:
    """What an op function needs besides its inputs: attributes (Python values), opset, node name, output counts.

    ``live_outputs`` counts outputs up to the last one something reads (optional
    outputs nobody reads need not be computed); ``num_outputs`` counts them all.
    """

    attrs: dict[str, Any] = field(default_factory=dict)
    opset: int = 18
    name: str = ""
    op_type: str = ""
    live_outputs: int = 1
    num_outputs: int = 1
    mode: RunMode = field(default_factory=RunMode)

    def get(self, key: str, default: Any = None) -> Any:
        return self.attrs.get(key, default)


OpFn = Callable[[Inputs, OpCall], "Tensor | tuple[Tensor, ...]"]

#: ONNX TensorProto data types (ints) to torch dtypes.
TORCH_DTYPES: dict[int, torch.dtype] = {
    1: torch.float32, 2: torch.uint8, 3: torch.int8, 5: torch.int16, 6: torch.int32, 7: torch.int64,
    9: torch.bool, 10: torch.float16, 11: torch.float64, 16: torch.bfloat16,
}


def unsupported(call: OpCall, what: str) -> OnnxoptError:
    """A one-line error for an attribute or input combination the converter does not handle."""
    return OnnxoptError(f"finetune cannot convert {call.op_type} node {call.name!r} to torch: {what}",
                        "simplify the model first (e.g. --pass fold), or train it in its original framework")


def _ints(t: Tensor | None) -> list[int]:
    return [] if t is None else [int(v) for v in t.reshape(-1).tolist()]


def _axes(inputs: Inputs, call: OpCall, index: int = 1) -> list[int] | None:
    """Axes given as an input (newer opsets) or as the ``axes`` attribute (older ones); None when absent."""
    if len(inputs) > index and inputs[index] is not None:
        return _ints(inputs[index])
    axes = call.get("axes")
    return None if axes is None else list(axes)


# ---- padding and convolution -------------------------------------------------------------------------------


def _same_pads(size: Sequence[int], kernel: Sequence[int], strides: Sequence[int], dilations: Sequence[int], upper: bool) -> tuple[list[int], list[int]]:
    begins, ends = [], []
    for n, k, s, d in zip(size, kernel, strides, dilations):
        total = max((math.ceil(n / s) - 1) * s + (k - 1) * d + 1 - n, 0)
        small, large = total // 2, total - total // 2
        begins.append(small if upper else large)
        ends.append(large if upper else small)
    return begins, ends


def _padding(x: Tensor, call: OpCall, kernel: Sequence[int], strides: Sequence[int], dilations: Sequence[int],
             fill: float = 0.0) -> tuple[Tensor, list[int]]:
    """Apply ONNX pads/auto_pad; torch's symmetric ``padding`` is returned, asymmetric pads are applied to ``x``."""
    nd = len(kernel)
    auto = call.get("auto_pad", "NOTSET")
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        begins, ends = _same_pads(x.shape[2:], kernel, strides, dilations, auto == "SAME_UPPER")
    elif auto == "VALID":
        begins, ends = [0] * nd, [0] * nd
    else:
        pads = list(call.get("pads", [0] * 2 * nd))
        begins, ends = pads[:nd], pads[nd:]
    if begins == ends:
        return x, begins
    flat = [p for b, e in zip(reversed(begins), reversed(ends)) for p in (b, e)]
    return F.pad(x, flat, value=fill), [0] * nd


_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def _conv(i: Inputs, c: OpCall) -> Tensor:
    x, w = i[0], i[1]
    b = i[2] if len(i) > 2 else None
    nd = w.ndim - 2
    if nd not in _CONV:
        raise unsupported(c, f"{nd}-D convolution")
    strides = list(c.get("strides", [1] * nd))
    dilations = list(c.get("dilations", [1] * nd))
    x, padding = _padding(x, c, list(c.get("kernel_shape", w.shape[2:])), strides, dilations)
    return _CONV[nd](x, w, b, strides, padding, dilations, int(c.get("group", 1)))


_CONV_TRANSPOSE = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


def _conv_transpose(i: Inputs, c: OpCall) -> Tensor:
    x, w = i[0], i[1]
    b = i[2] if len(i) > 2 else None
    nd = w.ndim - 2
    if nd not in _CONV_TRANSPOSE or c.get("output_shape") is not None or c.get("auto_pad", "NOTSET") != "NOTSET":
        raise unsupported(c, "output_shape, auto_pad or a rank other than 1-3-D")
    pads = list(c.get("pads", [0] * 2 * nd))
    if pads[:nd] != pads[nd:]:
        raise unsupported(c, "asymmetric pads")
    return _CONV_TRANSPOSE[nd](x, w, b, list(c.get("strides", [1] * nd)), pads[:nd],
                               list(c.get("output_padding", [0] * nd)), int(c.get("group", 1)),
                               list(c.get("dilations", [1] * nd)))


#: (ONNX mode, coordinate transformation, nearest mode) -> (torch mode, align_corners); "*" matches any nearest mode.
_RESIZE_MODES: dict[tuple[str, str, str], tuple[str, bool | None]] = {
    ("nearest", "asymmetric", "floor"): ("nearest", None),
    ("nearest", "half_pixel", "round_prefer_ceil"): ("nearest-exact", None),
    ("linear", "half_pixel", "*"): ("linear", False),
    ("linear", "pytorch_half_pixel", "*"): ("linear", False),
    ("linear", "align_corners", "*"): ("linear", True),
    ("cubic", "half_pixel", "*"): ("cubic", False),
    ("cubic", "align_corners", "*"): ("cubic", True),
}
_INTERPOLATE = {"linear": {1: "linear", 2: "bilinear", 3: "trilinear"}, "cubic": {2: "bicubic"}}


def _resize(i: Inputs, c: OpCall) -> Tensor:
    x = i[0]
    mode = c.get("mode", "nearest")
    transform = c.get("coordinate_transformation_mode", "half_pixel" if c.opset >= 11 else "asymmetric")
    nearest = c.get("nearest_mode", "round_prefer_floor") if mode == "nearest" else "*"
    found = _RESIZE_MODES.get((mode, transform, nearest))
    if found is None or c.get("antialias", 0) or (mode == "cubic" and float(c.get("cubic_coeff_a", -0.75)) != -0.75):
        raise unsupported(c, f"mode {mode}, coordinate transformation {transform}, nearest mode {nearest}")
    torch_mode, align = found
    torch_mode = _INTERPOLATE.get(torch_mode, {}).get(x.ndim - 2, torch_mode)
    scales_at, sizes_at = (1, None) if c.opset < 11 else (2, 3)
    sizes = _ints(i[sizes_at]) if sizes_at is not None and len(i) > sizes_at and i[sizes_at] is not None else []
    scales = [float(v) for v in i[scales_at].reshape(-1).tolist()] if len(i) > scales_at and i[scales_at] is not None else []
    if sizes:
        if list(sizes[:2]) != list(x.shape[:2]):
            raise unsupported(c, "resizing the batch or channel axis")
        return F.interpolate(x, size=sizes[2:], mode=torch_mode, align_corners=align)
    if not scales or scales[:2] != [1.0, 1.0]:
        raise unsupported(c, "no scales, or scales on the batch or channel axis")
    return F.interpolate(x, scale_factor=scales[2:], mode=torch_mode, align_corners=align, recompute_scale_factor=False)


def _pool(kind: str) -> OpFn:
    def pool(i: Inputs, c: OpCall) -> Tensor:
        x = i[0]
        kernel = list(c.get("kernel_shape"))
        nd = len(kernel)
        strides = list(c.get("strides", [1] * nd))
        dilations = list(c.get("dilations", [1] * nd))
        if c.live_outputs > 1:
            raise unsupported(c, "pooling indices output")
        ceil = bool(c.get("ceil_mode", 0))
        if kind == "max":
            x, padding = _padding(x, c, kernel, strides, dilations, fill=-math.inf)
            fn = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}[nd]
            return fn(x, kernel, strides, padding, dilations, ceil_mode=ceil)
        include = bool(c.get("count_include_pad", 0))
        padded, padding = _padding(x, c, kernel, strides, dilations)
        if padded is not x and not include:
            raise unsupported(c, "asymmetric pads with count_include_pad=0")
        if any(d != 1 for d in dilations):
            raise unsupported(c, "dilated average pooling")
        fn = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}[nd]
        return fn(padded, kernel, strides, padding, ceil_mode=ceil, count_include_pad=include)

    return pool


def _global_pool(reduce: Callable[..., Tensor]) -> OpFn:
    return lambda i, c: reduce(i[0], dim=tuple(range(2, i[0].ndim)), keepdim=True)


# ---- linear algebra and normalisation ----------------------------------------------------------------------


def _gemm(i: Inputs, c: OpCall) -> Tensor:
    a = i[0].transpose(0, 1) if c.get("transA", 0) else i[0]
    b = i[1].transpose(0, 1) if c.get("transB", 0) else i[1]
    y = a @ b
    alpha, beta = float(c.get("alpha", 1.0)), float(c.get("beta", 1.0))
    if alpha != 1.0:
        y = alpha * y
    if len(i) > 2 and i[2] is not None and beta != 0.0:
        y = y + (i[2] if beta == 1.0 else beta * i[2])
    return y


def _batch_norm(i: Inputs, c: OpCall) -> Tensor:
    if c.get("training_mode", 0) or c.live_outputs > 1:
        raise unsupported(c, "BatchNormalization in training mode")
    x, scale, bias, mean, var = i[:5]
    # with batch statistics, torch updates `mean` and `var` in place: the module's own copies
    return F.batch_norm(x, mean, var, scale, bias, training=c.mode.batch_statistics, momentum=c.mode.momentum,
                        eps=float(c.get("epsilon", 1e-5)))


def _instance_norm(i: Inputs, c: OpCall) -> Tensor:
    return F.instance_norm(i[0], weight=i[1], bias=i[2], eps=float(c.get("epsilon", 1e-5)))


def _layer_norm(i: Inputs, c: OpCall) -> Tensor:
    if c.live_outputs > 1:
        raise unsupported(c, "mean/inverse-std outputs")
    x, scale = i[0], i[1]
    bias = i[2] if len(i) > 2 else None
    axis = int(c.get("axis", -1)) % x.ndim
    eps = float(c.get("epsilon", 1e-5))
    shape = tuple(x.shape[axis:])
    if tuple(scale.shape) == shape and (bias is None or tuple(bias.shape) == shape):
        return F.layer_norm(x, shape, scale, bias, eps)
    dims = tuple(range(axis, x.ndim))
    mean = x.mean(dim=dims, keepdim=True)
    var = ((x - mean) ** 2).mean(dim=dims, keepdim=True)
    y = (x - mean) / torch.sqrt(var + eps) * scale
    return y if bias is None else y + bias


def _softmax(fn: Callable[..., Tensor]) -> OpFn:
    def softmax(i: Inputs, c: OpCall) -> Tensor:
        x = i[0]
        if c.opset >= 13:
            return fn(x, dim=int(c.get("axis", -1)))
        # before opset 13 the input is coerced to 2-D at `axis` and normalised over the second dim
        axis = int(c.get("axis", 1)) % max(x.ndim, 1)
        flat = x.reshape(math.prod(x.shape[:axis]), -1)
        return fn(flat, dim=1).reshape(x.shape)

    return softmax


# ---- element-wise ------------------------------------------------------------------------------------------


def _div(i: Inputs, c: OpCall) -> Tensor:
    a, b = i[0], i[1]
    if not a.is_floating_point() and not b.is_floating_point():
        return torch.div(a, b, rounding_mode="trunc")
    return a / b


def _clip(i: Inputs, c: OpCall) -> Tensor:
    if c.opset < 11:
        lo, hi = c.get("min"), c.get("max")
    else:
        lo = i[1] if len(i) > 1 else None
        hi = i[2] if len(i) > 2 else None
    return torch.clamp(i[0], lo, hi)


def _variadic(fn: Callable[[Tensor, Tensor], Tensor]) -> OpFn:
    def reduce(i: Inputs, c: OpCall) -> Tensor:
        out = i[0]
        for x in i[1:]:
            out = fn(out, x)
        return out

    return reduce


def _mean(i: Inputs, c: OpCall) -> Tensor:
    return _variadic(torch.add)(i, c) / len(i)


def _hard_sigmoid(i: Inputs, c: OpCall) -> Tensor:
    return torch.clamp(float(c.get("alpha", 0.2)) * i[0] + float(c.get("beta", 0.5)), 0.0, 1.0)


def _gelu(i: Inputs, c: OpCall) -> Tensor:
    return F.gelu(i[0], approximate=c.get("approximate", "none"))


def _prelu(i: Inputs, c: OpCall) -> Tensor:
    x, slope = i[0], i[1]
    return torch.where(x < 0, slope * x, x)


def _unary(fn: Callable[[Tensor], Tensor]) -> OpFn:
    return lambda i, c: fn(i[0])


def _binary(fn: Callable[[Tensor, Tensor], Tensor]) -> OpFn:
    return lambda i, c: fn(i[0], i[1])


# ---- shapes and data movement ------------------------------------------------------------------------------


def _reshape(i: Inputs, c: OpCall) -> Tensor:
    x, shape = i[0], _ints(i[1])
    if not c.get("allowzero", 0):
        shape = [x.shape[k] if d == 0 else d for k, d in enumerate(shape)]
    return x.reshape(shape)


def _flatten(i: Inputs, c: OpCall) -> Tensor:
    x = i[0]
    axis = int(c.get("axis", 1))
    axis = axis + x.ndim if axis < 0 else axis
    return x.reshape(math.prod(x.shape[:axis]), math.prod(x.shape[axis:]))


def _transpose(i: Inputs, c: OpCall) -> Tensor:
    perm = c.get("perm")
    return i[0].permute(*(perm if perm is not None else reversed(range(i[0].ndim))))


def _concat(i: Inputs, c: OpCall) -> Tensor:
    return torch.cat([x for x in i if x is not None], dim=int(c.get("axis")))


def _split(i: Inputs, c: OpCall) -> tuple[Tensor, ...]:
    x = i[0]
    axis = int(c.get("axis", 0))
    sizes = _ints(i[1]) if len(i) > 1 and i[1] is not None else list(c.get("split", []))
    if not sizes:
        parts = int(c.get("num_outputs", c.num_outputs))
        step = math.ceil(x.shape[axis] / parts)
        sizes = [min(step, x.shape[axis] - k * step) for k in range(parts)]
    return tuple(torch.split(x, sizes, dim=axis))


def _slice(i: Inputs, c: OpCall) -> Tensor:
    x = i[0]
    if c.opset < 10:
        starts, ends = list(c.get("starts")), list(c.get("ends"))
        axes = list(c.get("axes", range(len(starts))))
        steps = [1] * len(starts)
    else:
        starts, ends = _ints(i[1]), _ints(i[2])
        axes = _ints(i[3]) if len(i) > 3 and i[3] is not None else list(range(len(starts)))
        steps = _ints(i[4]) if len(i) > 4 and i[4] is not None else [1] * len(starts)
    index: list[slice] = [slice(None)] * x.ndim
    for start, end, axis, step in zip(starts, ends, axes, steps):
        if step <= 0:
            raise unsupported(c, "negative slice steps")
        n = x.shape[axis]
        start = min(max(start + n if start < 0 else start, 0), n)
        end = min(max(end + n if end < 0 else end, 0), n)
        index[axis] = slice(start, end, step)
    return x[tuple(index)]


def _squeeze(i: Inputs, c: OpCall) -> Tensor:
    axes = _axes(i, c)
    if axes is None:
        return i[0].squeeze()
    return i[0].squeeze(tuple(a % i[0].ndim for a in axes))


def _unsqueeze(i: Inputs, c: OpCall) -> Tensor:
    x = i[0]
    axes = _axes(i, c) or []
    rank = x.ndim + len(axes)
    for axis in sorted(a % rank for a in axes):
        x = x.unsqueeze(axis)
    return x


def _shape(i: Inputs, c: OpCall) -> Tensor:
    dims = list(i[0].shape)
    start, end = c.get("start", 0), c.get("end")
    return torch.tensor(dims[start:end], dtype=torch.int64)


def _gather(i: Inputs, c: OpCall) -> Tensor:
    x, idx = i[0], i[1].long()
    axis = int(c.get("axis", 0)) % x.ndim
    idx = torch.where(idx < 0, idx + x.shape[axis], idx)
    picked = x.index_select(axis, idx.reshape(-1))
    return picked.reshape(*x.shape[:axis], *idx.shape, *x.shape[axis + 1 :])


def _gather_elements(i: Inputs, c: OpCall) -> Tensor:
    x, idx = i[0], i[1].long()
    axis = int(c.get("axis", 0)) % x.ndim
    return torch.gather(x, axis, torch.where(idx < 0, idx + x.shape[axis], idx))


def _cast(i: Inputs, c: OpCall) -> Tensor:
    to = int(c.get("to"))
    if to not in TORCH_DTYPES:
        raise unsupported(c, f"cast to ONNX data type {to}")
    return i[0].to(TORCH_DTYPES[to])


def _constant(i: Inputs, c: OpCall) -> Tensor:
    for key, dtype in (("value", None), ("value_float", torch.float32), ("value_floats", torch.float32),
                       ("value_int", torch.int64), ("value_ints", torch.int64)):
        if key in c.attrs:
            value = c.attrs[key]
            return value if isinstance(value, torch.Tensor) else torch.tensor(value, dtype=dtype)
    raise unsupported(c, "a Constant without a tensor, float or int value")


def _constant_of_shape(i: Inputs, c: OpCall) -> Tensor:
    value = c.get("value")
    fill = value.reshape(-1)[0] if isinstance(value, torch.Tensor) else torch.tensor(0.0)
    return torch.full(_ints(i[0]), fill.item(), dtype=fill.dtype)


def _expand(i: Inputs, c: OpCall) -> Tensor:
    return i[0].expand(torch.broadcast_shapes(i[0].shape, tuple(_ints(i[1]))))


def _tile(i: Inputs, c: OpCall) -> Tensor:
    return i[0].repeat(*_ints(i[1]))


def _pad(i: Inputs, c: OpCall) -> Tensor:
    x = i[0]
    mode = c.get("mode", "constant")
    if c.opset < 11:
        pads, value = list(c.get("pads")), float(c.get("value", 0.0))
        axes = list(range(x.ndim))
    else:
        pads = _ints(i[1])
        value = float(i[2].item()) if len(i) > 2 and i[2] is not None else 0.0
        axes = [a % x.ndim for a in _ints(i[3])] if len(i) > 3 and i[3] is not None else list(range(x.ndim))
    n = len(axes)
    per_axis = {a: (pads[k], pads[k + n]) for k, a in enumerate(axes)}
    # torch pads trailing axes only (reflect/replicate at most 3): list them from the last back to the first padded one
    first = min((a for a, pair in per_axis.items() if any(pair)), default=x.ndim - 1)
    flat = [p for a in range(x.ndim - 1, first - 1, -1) for p in per_axis.get(a, (0, 0))]
    if any(p < 0 for p in flat):
        raise unsupported(c, "negative pads")
    torch_mode = {"constant": "constant", "reflect": "reflect", "edge": "replicate"}.get(mode)
    if torch_mode is None:
        raise unsupported(c, f"pad mode {mode!r}")
    return F.pad(x, flat, mode=torch_mode, value=value) if torch_mode == "constant" else F.pad(x, flat, mode=torch_mode)


def _where(i: Inputs, c: OpCall) -> Tensor:
    return torch.where(i[0], i[1], i[2])


def _range(i: Inputs, c: OpCall) -> Tensor:
    return torch.arange(i[0].item(), i[1].item(), i[2].item(), dtype=i[0].dtype)


def _reduce(fn: Callable[..., Tensor]) -> OpFn:
    def reduce(i: Inputs, c: OpCall) -> Tensor:
        x = i[0]
        axes = _axes(i, c)  # an input from opset 13 (ReduceSum) or 18 (the others), an attribute before
        keep = bool(c.get("keepdims", 1))
        if not axes:
            if c.get("noop_with_empty_axes", 0):
                return x
            axes = list(range(x.ndim))
        return fn(x, dim=tuple(a % x.ndim for a in axes), keepdim=keep)

    return reduce


def _reduce_max(x: Tensor, dim: tuple[int, ...], keepdim: bool) -> Tensor:
    return torch.amax(x, dim=dim, keepdim=keepdim)


def _reduce_min(x: Tensor, dim: tuple[int, ...], keepdim: bool) -> Tensor:
    return torch.amin(x, dim=dim, keepdim=keepdim)


def _reduce_prod(x: Tensor, dim: tuple[int, ...], keepdim: bool) -> Tensor:
    for d in sorted(dim, reverse=True):  # from the last axis, so the others keep their index
        x = torch.prod(x, d, keepdim=keepdim)
    return x


def _reduce_l2(x: Tensor, dim: tuple[int, ...], keepdim: bool) -> Tensor:
    return torch.sqrt(torch.sum(x * x, dim=dim, keepdim=keepdim))


def _arg(fn: Callable[..., Tensor]) -> OpFn:
    def arg(i: Inputs, c: OpCall) -> Tensor:
        if c.get("select_last_index", 0):
            raise unsupported(c, "select_last_index=1")
        return fn(i[0], dim=int(c.get("axis", 0)), keepdim=bool(c.get("keepdims", 1)))

    return arg


def _identity(i: Inputs, c: OpCall) -> Tensor:
    if c.live_outputs > 1:
        raise unsupported(c, "Dropout mask output")
    return i[0]


def _einsum(i: Inputs, c: OpCall) -> Tensor:
    return torch.einsum(c.get("equation"), *i)


#: ONNX op type (default domain) -> torch function.
OPS: dict[str, OpFn] = {
    "Conv": _conv,
    "ConvTranspose": _conv_transpose,
    "Resize": _resize,
    "MaxPool": _pool("max"),
    "AveragePool": _pool("avg"),
    "GlobalAveragePool": _global_pool(torch.mean),
    "GlobalMaxPool": _global_pool(torch.amax),
    "Gemm": _gemm,
    "MatMul": _binary(torch.matmul),
    "Einsum": _einsum,
    "BatchNormalization": _batch_norm,
    "InstanceNormalization": _instance_norm,
    "LayerNormalization": _layer_norm,
    "Softmax": _softmax(F.softmax),
    "LogSoftmax": _softmax(F.log_softmax),
    "Add": _binary(torch.add),
    "Sub": _binary(torch.sub),
    "Mul": _binary(torch.mul),
    "Div": _div,
    "Pow": _binary(torch.pow),
    "Max": _variadic(torch.maximum),
    "Min": _variadic(torch.minimum),
    "Sum": _variadic(torch.add),
    "Mean": _mean,
    "Equal": _binary(torch.eq),
    "Less": _binary(torch.lt),
    "LessOrEqual": _binary(torch.le),
    "Greater": _binary(torch.gt),
    "GreaterOrEqual": _binary(torch.ge),
    "And": _binary(torch.logical_and),
    "Or": _binary(torch.logical_or),
    "Not": _unary(torch.logical_not),
    "Where": _where,
    "Relu": _unary(torch.relu),
    "Sigmoid": _unary(torch.sigmoid),
    "Tanh": _unary(torch.tanh),
    "Exp": _unary(torch.exp),
    "Log": _unary(torch.log),
    "Sqrt": _unary(torch.sqrt),
    "Reciprocal": _unary(torch.reciprocal),
    "Neg": _unary(torch.neg),
    "Abs": _unary(torch.abs),
    "Erf": _unary(torch.erf),
    "Floor": _unary(torch.floor),
    "Ceil": _unary(torch.ceil),
    "Sign": _unary(torch.sign),
    "Softplus": _unary(F.softplus),
    "Softsign": _unary(F.softsign),
    "Mish": _unary(F.mish),
    "HardSwish": _unary(F.hardswish),
    "HardSigmoid": _hard_sigmoid,
    "LeakyRelu": lambda i, c: F.leaky_relu(i[0], float(c.get("alpha", 0.01))),
    "Elu": lambda i, c: F.elu(i[0], float(c.get("alpha", 1.0))),
    "Selu": lambda i, c: F.selu(i[0]),
    "Gelu": _gelu,
    "PRelu": _prelu,
    "Clip": _clip,
    "Identity": _identity,
    "Dropout": _identity,
    "Reshape": _reshape,
    "Flatten": _flatten,
    "Transpose": _transpose,
    "Concat": _concat,
    "Split": _split,
    "Slice": _slice,
    "Squeeze": _squeeze,
    "Unsqueeze": _unsqueeze,
    "Shape": _shape,
    "Gather": _gather,
    "GatherElements": _gather_elements,
    "Cast": _cast,
    "Constant": _constant,
    "ConstantOfShape": _constant_of_shape,
    "Expand": _expand,
    "Tile": _tile,
    "Pad": _pad,
    "Range": _range,
    "ReduceSum": _reduce(torch.sum),
    "ReduceMean": _reduce(torch.mean),
    "ReduceMax": _reduce(_reduce_max),
    "ReduceMin": _reduce(_reduce_min),
    "ReduceProd": _reduce(_reduce_prod),
    "ReduceL2": _reduce(_reduce_l2),
    "ArgMax": _arg(torch.argmax),
    "ArgMin": _arg(torch.argmin),
}

