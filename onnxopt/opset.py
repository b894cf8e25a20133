"""Opset upgrades for passes that need newer ops (per-channel QDQ needs 13, int4 needs 21)."""

from __future__ import annotations

import onnx
import onnx_ir as ir
from onnx import version_converter

from onnxopt.errors import OnnxoptError
from onnxopt.graph import opset_version
from onnxopt.io import PROTOBUF_LIMIT, restore_weights, serialize_model, tensor_bytes, weights_as_inputs

__all__ = ["ensure_opset"]


def ensure_opset(model: ir.Model, version: int, *, why: str = "") -> tuple[ir.Model, str | None]:
    """``model`` at default-domain opset ``version`` or newer; returns the model and a note when upgraded.

    Uses ``onnx.version_converter``; a model it cannot convert is a one-line error.
    """
    current = opset_version(model)
    if current >= version:
        return model, None
    domains = {n.domain or "ai.onnx" for n in ir.traversal.RecursiveGraphIterator(model.graph)}
    if not domains & {"ai.onnx"}:
        # no standard op to convert (an ai.onnx.ml or training-only graph): importing the opset changes nothing
        model.opset_imports[""] = version
        return model, f"ai.onnx opset {version} imported (the model has no ai.onnx ops to upgrade)"
    foreign = sorted(domains - {"ai.onnx"})
    # the converter works on protobuf: big weights cross as graph inputs (never read) and are put back after
    light = weights_as_inputs(model)
    if tensor_bytes(light) >= PROTOBUF_LIMIT:
        raise OnnxoptError(f"model is at opset {current} and holds over 2 GB of small tensors; cannot upgrade it to {version}",
                           "re-export the model at a newer opset")
    proto = onnx.ModelProto()
    proto.ParseFromString(serialize_model(light))
    try:
        upgraded = version_converter.convert_version(proto, version)
    except Exception as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if foreign:  # the converter asserts on ops of other domains; say so rather than quote its C++ assert
            raise OnnxoptError(f"cannot upgrade the model from ai.onnx opset {current} to {version}"
                               + (f" ({why})" if why else "") + f": onnx's version converter does not handle the "
                               f"{', '.join(foreign)} op(s) it also holds", f"export it at ai.onnx opset {version} or newer "
                               "from its source framework, or leave this pass out") from None
        raise OnnxoptError(f"cannot upgrade the model from opset {current} to {version}: {first[:200]}",
                           "re-export the model at a newer opset") from None
    changed = _interface_change(proto.graph, upgraded.graph)
    if changed:  # e.g. Scan 8 -> 9: the converter drops the batch axis from the graph's inputs and outputs
        raise OnnxoptError(f"cannot upgrade the model from opset {current} to {version}"
                           + (f" ({why})" if why else "") + f": onnx's version converter changes its interface "
                           f"({changed})", f"export it at opset {version} or newer from its source framework, "
                           "or leave this pass out")
    if upgraded.ir_version < 7:
        upgraded.ir_version = 7
    new = ir.serde.deserialize_model(upgraded)
    restore_weights(new, model)
    from onnxopt.io import infer_shapes

    infer_shapes(new)
    if current < 7 <= version:
        _prelu_slopes_per_channel(new)
    return new, f"opset upgraded {current} -> {version}" + (f" ({why})" if why else "")


def _interface_change(before: onnx.GraphProto, after: onnx.GraphProto) -> str | None:
    """What differs between the graphs' tensor inputs/outputs (names, element types, ranks, fixed dims), or None."""
    for kind, old, new in (("input", before.input, after.input), ("output", before.output, after.output)):
        if [v.name for v in old] != [v.name for v in new]:
            return f"its {kind}s are not the same"
        for a, b in zip(old, new):
            if not (a.type.HasField("tensor_type") and b.type.HasField("tensor_type")):
                continue
            ta, tb = a.type.tensor_type, b.type.tensor_type
            if ta.elem_type != tb.elem_type:
                return f"{kind} {a.name!r} changes its element type"
            if ta.HasField("shape") and tb.HasField("shape"):
                da, db = ta.shape.dim, tb.shape.dim
                if len(da) != len(db) or any(x.HasField("dim_value") and y.HasField("dim_value")
                                             and x.dim_value != y.dim_value for x, y in zip(da, db)):
                    return f"{kind} {a.name!r} goes from {_dims(da)} to {_dims(db)}"
    return None


def _dims(dims: object) -> str:
    return "[" + ", ".join(str(d.dim_value) if d.HasField("dim_value") else (d.dim_param or "?") for d in dims) + "]"


def _prelu_slopes_per_channel(model: ir.Model) -> None:
    """Reshape 1-D PRelu slopes of C values to [C, 1, ...]: opset 7 changed what they mean.

    Up to opset 6 such a slope holds one value per channel (axis 1); from 7
    PRelu broadcasts numpy-style, so the same 1-D slope lines up with the last
    axis (wrong values, or ONNX Runtime refuses to run). onnx.version_converter
    keeps the slope as it was.
    """
    from onnxopt.graph import Names, constant_array, is_onnx_op, iter_nodes, replace_input_weight

    names = Names(model)
    for node in list(iter_nodes(model)):
        if not is_onnx_op(node, "PRelu") or len(node.inputs) < 2:
            continue
        slope = constant_array(node.inputs[1])
        if slope is None or slope.ndim != 1 or slope.size == 1:
            continue
        shape = node.inputs[0].shape if node.inputs[0] is not None else None
        if shape is None:
            raise OnnxoptError(f"PRelu {node.name or node.outputs[0].name!r}: its per-channel slope cannot be carried past "
                               "opset 7 without the input's rank", "re-export the model at opset 7 or newer")
        if len(shape) > 2:
            replace_input_weight(node, 1, slope.reshape(slope.size, *[1] * (len(shape) - 2)), names)
