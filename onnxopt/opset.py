"""Opset upgrades for passes that need newer ops (per-channel QDQ needs 13, int4 needs 21)."""

from __future__ import annotations

import onnx
import onnx_ir as ir
from onnx import version_converter

from onnxopt.errors import OnnxoptError
from onnxopt.graph import opset_version
from onnxopt.io import PROTOBUF_LIMIT, serialize_model, tensor_bytes

__all__ = ["ensure_opset"]


def ensure_opset(model: ir.Model, version: int, *, why: str = "") -> tuple[ir.Model, str | None]:
    """``model`` at default-domain opset ``version`` or newer; returns the model and a note when upgraded.

    Uses ``onnx.version_converter``; a model it cannot convert is a one-line error.
    """
    current = opset_version(model)
    if current >= version:
        return model, None
    if tensor_bytes(model) >= PROTOBUF_LIMIT:
        raise OnnxoptError(f"model is at opset {current} and over 2 GB; cannot upgrade it to {version}",
                           "re-export the model at a newer opset")
    proto = onnx.ModelProto()
    proto.ParseFromString(serialize_model(model))
    try:
        upgraded = version_converter.convert_version(proto, version)
    except Exception as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise OnnxoptError(f"cannot upgrade the model from opset {current} to {version}: {first[:200]}",
                           "re-export the model at a newer opset") from None
    if upgraded.ir_version < 7:
        upgraded.ir_version = 7
    new = ir.serde.deserialize_model(upgraded)
    from onnxopt.io import infer_shapes

    infer_shapes(new)
    return new, f"opset upgraded {current} -> {version}" + (f" ({why})" if why else "")
