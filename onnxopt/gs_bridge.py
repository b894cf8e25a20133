"""The one bridge between the IR (onnx-ir) and onnx-graphsurgeon.

onnx-graphsurgeon stays for what it does best: ORT-backed constant folding
and joining graphs. The bridge round-trips through protobuf, so it is for
models under 2 GB; callers check :func:`bridgeable` first.
"""

from __future__ import annotations

import onnx
import onnx_graphsurgeon as gs
import onnx_ir as ir

from onnxopt.io import PROTOBUF_LIMIT, serialize_model, tensor_bytes

__all__ = ["bridgeable", "to_gs", "from_gs"]

# graphsurgeon's warnings (missing colour module, failed partial folds) are not the user's business
gs.logger.G_LOGGER.severity = gs.logger.G_LOGGER.ERROR


def bridgeable(model: ir.Model) -> bool:
    """True when the model is small enough to round-trip through protobuf."""
    return tensor_bytes(model) < PROTOBUF_LIMIT


def to_gs(model: ir.Model) -> gs.Graph:
    """An onnx-graphsurgeon graph of ``model`` (weights read into memory)."""
    proto = onnx.ModelProto()
    proto.ParseFromString(serialize_model(model))
    return gs.import_onnx(proto)


def from_gs(graph: gs.Graph, like: ir.Model) -> ir.Model:
    """Back to the IR, keeping ``like``'s opsets, IR version and metadata."""
    proto = gs.export_onnx(graph, do_type_check=False)
    proto.ir_version = like.ir_version
    del proto.opset_import[:]
    for domain, version in like.opset_imports.items():
        proto.opset_import.add(domain=domain, version=version)
    proto.producer_name = like.producer_name or ""
    proto.producer_version = like.producer_version or ""
    model = ir.serde.deserialize_model(proto)
    for key, value in like.metadata_props.items():
        model.metadata_props[key] = value
    return model
