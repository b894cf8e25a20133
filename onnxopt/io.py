"""Model I/O: load a model safely into the IR, and save it atomically.

Loading refuses what could hurt the user (external data outside the model's
folder), normalises how weights are held (Constant and ConstantOfShape nodes
become initializers) and keeps external data memory-mapped instead of reading
it. Saving writes into a temporary folder next to the target and renames into
place only once the model has been written and checked, so a failure or an
interrupt never leaves a half-written output.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
from google.protobuf.message import DecodeError
from onnx_ir.passes import common as ir_passes

from onnxopt.errors import OnnxoptError

__all__ = [
    "PROTOBUF_LIMIT",
    "load_model",
    "save_model",
    "serialize_model",
    "tensor_bytes",
    "has_external_data",
    "same_file",
    "iter_tensor_protos",
]

#: Protobuf cannot serialise a message of 2 GiB or more; we stay clear of it.
PROTOBUF_LIMIT = 2**31 - 2**26

LOAD_NOTES = "onnxopt.load_notes"


def iter_tensor_protos(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield sparse.values
        yield sparse.indices
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            if attr.HasField("g"):
                yield from iter_tensor_protos(attr.g)
            for sub in attr.graphs:
                yield from iter_tensor_protos(sub)


def _check_external_data(proto: onnx.ModelProto, base_dir: Path) -> int:
    """Refuse external data that escapes the model's folder or is missing; return its byte count."""
    root = base_dir.resolve()
    total = 0
    for tensor in iter_tensor_protos(proto.graph):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = {entry.key: entry.value for entry in tensor.external_data}
        location = info.get("location", "")
        where = f"tensor {tensor.name!r}: external data location {location!r}"
        if not location:
            raise OnnxoptError(f"{where} is empty", "re-save the model with onnx.save_model(..., save_as_external_data=True)")
        rel = Path(location)
        if rel.is_absolute() or location.startswith(("/", "\\")) or ":" in rel.parts[0]:
            raise OnnxoptError(f"{where} is an absolute path; refused for safety",
                               "keep the data file next to the model and reference it by a relative name")
        if ".." in rel.parts:
            raise OnnxoptError(f"{where} contains '..'; refused for safety",
                               "keep the data file inside the model's folder")
        target = (root / rel).resolve()
        if target != root and root not in target.parents:
            raise OnnxoptError(f"{where} resolves outside the model's folder (a link?); refused for safety",
                               "copy the data file into the model's folder")
        if not target.is_file():
            raise OnnxoptError(f"{where}: file {target} not found",
                               "copy the external data file next to the model")
        offset = int(info.get("offset", "0") or 0)
        length = info.get("length")
        size = target.stat().st_size
        if length is not None and offset + int(length) > size:
            raise OnnxoptError(f"{where}: needs bytes {offset}..{offset + int(length)} but {target.name} has {size}",
                               "the data file is truncated or belongs to another model")
        total += int(length) if length is not None else size - offset
    return total


def _read_proto(path: Path) -> onnx.ModelProto:
    if not path.exists():
        raise OnnxoptError(f"{path}: no such file", "check the path")
    if path.is_dir():
        raise OnnxoptError(f"{path} is a folder, not an ONNX file", "pass the path of the .onnx file")
    try:
        proto = onnx.load_model(str(path), load_external_data=False)
    except (DecodeError, RuntimeError, ValueError, OSError, UnicodeDecodeError) as err:
        detail = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise OnnxoptError(f"{path} is not a readable ONNX model ({detail})",
                           "the file is truncated, corrupt or of another format; re-export it") from None
    if not proto.HasField("graph") or (proto.ir_version == 0 and not proto.opset_import):
        raise OnnxoptError(f"{path} is not an ONNX model (no graph or IR version)",
                           "pass a model exported to ONNX (.onnx)")
    return proto


def _constant_of_shape_to_initializers(graph: ir.Graph) -> int:
    """Replace ConstantOfShape nodes whose shape is a constant with initializers."""
    count = 0
    for node in list(graph):
        if node.op_type != "ConstantOfShape" or node.domain not in ("", "ai.onnx"):
            continue
        shape_value = node.inputs[0] if node.inputs else None
        if shape_value is None or shape_value.const_value is None:
            continue
        out = node.outputs[0]
        if out.is_graph_output():
            continue
        shape = [int(d) for d in shape_value.const_value.numpy().reshape(-1)]
        attr = node.attributes.get("value")
        if attr is not None:
            fill = attr.as_tensor().numpy().reshape(-1)
            dtype, value = fill.dtype, fill[0]
        else:
            dtype, value = np.dtype(np.float32), 0.0
        if any(d < 0 for d in shape):
            continue
        array = np.full(shape, value, dtype=dtype)
        init = ir.Value(name=out.name, shape=ir.Shape(shape), type=ir.TensorType(ir.DataType.from_numpy(dtype)),
                        const_value=ir.tensor(array, name=out.name))
        out.name = None  # frees the name for the initializer
        graph.register_initializer(init)
        out.replace_all_uses_with(init)
        graph.remove(node, safe=True)
        count += 1
    return count


def _normalize_weights(model: ir.Model) -> list[str]:
    notes: list[str] = []
    overridable = [v.name for v in model.graph.inputs if v.const_value is not None]
    if overridable:
        # Old exporters list weights as graph inputs too; that makes them overridable, so
        # neither ORT nor a pass may treat them as constants. Nobody feeds them in practice.
        ir_passes.RemoveInitializersFromInputsPass()(model)
        notes.append(f"{len(overridable)} initializer(s) removed from the graph inputs")
    if model.ir_version < 4:
        # IR 3 requires every initializer to be a graph input; IR 4 lifts that rule.
        notes.append(f"IR version {model.ir_version} -> 4")
        model.ir_version = 4
    before = sum(1 for n in ir.traversal.RecursiveGraphIterator(model.graph) if n.op_type == "Constant")
    ir_passes.LiftConstantsToInitializersPass(lift_all_constants=False, size_limit=0)(model)
    after = sum(1 for n in ir.traversal.RecursiveGraphIterator(model.graph) if n.op_type == "Constant")
    if before - after:
        notes.append(f"{before - after} Constant node(s) became initializers")
    graphs = [model.graph, *model.graph.subgraphs()]
    lifted = sum(_constant_of_shape_to_initializers(g) for g in graphs)
    if lifted:
        notes.append(f"{lifted} ConstantOfShape node(s) with constant shapes became initializers")
    return notes


def load_model(path: str | os.PathLike[str], *, check: bool = True, normalize: bool = True) -> ir.Model:
    """Load an ONNX model into the IR, refusing unsafe or broken files with a one-line error.

    External data stays memory-mapped (read on first use). With ``normalize``,
    Constant/ConstantOfShape weight producers become initializers, and shapes
    are inferred where ONNX can; notes on what changed are kept in
    ``model.meta["onnxopt.load_notes"]``.
    """
    path = Path(path)
    proto = _read_proto(path)
    _check_external_data(proto, path.parent)
    if check:
        try:
            onnx.checker.check_model(str(path))
        except (onnx.checker.ValidationError, onnx.onnx_cpp2py_export.checker.ValidationError) as err:  # type: ignore[attr-defined]
            first = str(err).strip().splitlines()[0] if str(err).strip() else "checker failed"
            raise OnnxoptError(f"{path} is not a valid ONNX model: {first}",
                               "re-export the model; onnx.checker.check_model shows the full report") from None
    try:
        model = ir.serde.deserialize_model(proto)
    except Exception as err:  # the IR refuses some malformed graphs the checker lets through
        raise OnnxoptError(f"{path} could not be read into the graph IR: {str(err).splitlines()[0]}",
                           "re-export the model or check it with onnx.checker") from None
    ir.external_data.set_base_dir(model.graph, path.parent)
    notes: list[str] = []
    if normalize:
        notes += _normalize_weights(model)
        notes += infer_shapes(model)
    model.meta[LOAD_NOTES] = notes
    return model


def infer_shapes(model: ir.Model) -> list[str]:
    """Run ONNX shape inference on the model in place; return a note if it failed (not fatal)."""
    try:
        ir_passes.ShapeInferencePass(strict_mode=False)(model)
    except Exception as err:  # ONNX shape inference rejects some models ORT runs fine
        return [f"shape inference failed, shapes left as exported ({str(err).splitlines()[0][:120]})"]
    return []


def tensor_bytes(model: ir.Model) -> int:
    """Bytes held by all initializers (main graph and subgraphs), without reading external data."""
    total = 0
    for graph in (model.graph, *model.graph.subgraphs()):
        for value in graph.initializers.values():
            if value.const_value is not None:
                total += value.const_value.nbytes
    return total


def has_external_data(model: ir.Model) -> bool:
    """True when any initializer still lives in an external data file."""
    return any(isinstance(v.const_value, ir.ExternalTensor)
               for g in (model.graph, *model.graph.subgraphs()) for v in g.initializers.values())


def serialize_model(model: ir.Model) -> bytes:
    """Serialise a model under the protobuf limit to bytes (external tensors are read in)."""
    if tensor_bytes(model) >= PROTOBUF_LIMIT:
        raise OnnxoptError("model is over 2 GB and cannot be serialised in memory",
                           "save it with external data instead")
    if has_external_data(model):
        # Read external tensors into a clone: the caller's model keeps its memory-mapped weights.
        model = ir.external_data.load_to_model(model.clone())
    return ir.serde.serialize_model(model).SerializeToString()


def same_file(a: str | os.PathLike[str], b: str | os.PathLike[str]) -> bool:
    """True when two paths name the same file (resolving links), even if one does not exist yet."""
    pa, pb = Path(a), Path(b)
    if pa.exists() and pb.exists():
        return os.path.samefile(pa, pb)
    return pa.resolve() == pb.resolve()


def save_model(
    model: ir.Model,
    path: str | os.PathLike[str],
    *,
    external_data: bool | None = None,
    check: bool = True,
) -> Path:
    """Save atomically: write and check in a temporary folder beside ``path``, then rename into place.

    ``external_data=None`` keeps weights external when the input had them
    external or when the model is over the protobuf limit; the data file is
    ``<name>.data`` next to the model.
    """
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise OnnxoptError(f"output folder {parent} does not exist", "create it first or choose another -o path")
    if path.is_dir():
        raise OnnxoptError(f"output {path} is a folder", "give a file name ending in .onnx")
    if external_data is None:
        external_data = has_external_data(model) or tensor_bytes(model) >= PROTOBUF_LIMIT
    data_name = path.name + ".data"
    tmpdir = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=parent))
    try:
        tmp_model = tmpdir / path.name
        if external_data:
            ir.save(model, tmp_model, external_data=data_name)
        else:
            tmp_model.write_bytes(serialize_model(model))
        if check:
            try:
                onnx.checker.check_model(str(tmp_model))
            except Exception as err:
                first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
                raise OnnxoptError(f"refusing to save an invalid model: {first}",
                                   "this is a bug in the pass that produced it; run with --debug and report it") from None
        if external_data and (tmpdir / data_name).exists():
            os.replace(tmpdir / data_name, parent / data_name)
        os.replace(tmp_model, path)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    return path
