"""Model I/O: load a model safely into the IR, and save it atomically.

Loading refuses what could hurt the user (external data outside the model's
folder), normalises how weights are held (Constant and ConstantOfShape nodes
become initializers) and keeps external data memory-mapped instead of reading
it. Saving writes into a temporary folder next to the target and renames into
place only once the model has been written and checked, so a failure or an
interrupt never leaves a half-written output.
"""

from __future__ import annotations

import math
import mmap
import os
import shutil
import signal
import tempfile
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
from google.protobuf.message import DecodeError, Message
from onnx_ir.passes import common as ir_passes

from onnxopt.errors import OnnxoptError

__all__ = [
    "PROTOBUF_LIMIT",
    "StagedModel",
    "stage_model",
    "load_model",
    "save_model",
    "serialize_model",
    "compact_proto",
    "tensor_bytes",
    "has_external_data",
    "same_file",
    "refuse_overwriting",
    "check_model_output",
    "external_data_files",
    "iter_tensor_protos",
    "MappedTensor",
    "map_external_tensors",
    "release_pages",
    "spill",
    "serialized_size",
    "weights_as_inputs",
    "restore_weights",
    "WEIGHT_OUT_BYTES",
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
        available = int(length) if length is not None else size - offset
        declared = _declared_bytes(tensor)
        if declared is None or declared > available:
            # the IR would map `available` bytes as a tensor of the declared shape and fail (or read past them)
            raise OnnxoptError(f"{where}: shape {list(tensor.dims)} of data type {tensor.data_type} needs "
                               f"{'an unknown number of' if declared is None else declared} bytes but the data holds {available}",
                               "the model or its data file is corrupt; re-export it")
        total += available
    return total


_TYPED_FIELDS = ("float_data", "int32_data", "string_data", "int64_data", "double_data", "uint64_data")
_COMPLEX = (onnx.TensorProto.COMPLEX64, onnx.TensorProto.COMPLEX128)


def _check_tensor_sizes(proto: onnx.ModelProto, path: Path) -> None:
    """Refuse tensors holding more data than their shape declares (the checker only catches too little)."""
    for tensor in iter_tensor_protos(proto.graph):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            continue
        where = f"{path}: tensor {tensor.name!r} of shape {list(tensor.dims)}"
        if tensor.HasField("raw_data"):
            declared = _declared_bytes(tensor)
            if declared is not None and len(tensor.raw_data) != declared:
                raise OnnxoptError(f"{where} holds {len(tensor.raw_data)} bytes of data, its shape and type need {declared}",
                                   "the model is corrupt; re-export it")
            continue
        try:
            bits = ir.DataType(tensor.data_type).bitwidth
        except (ValueError, TypeError):
            bits = 8  # strings: one entry per element
        if bits < 8 or any(d < 0 for d in tensor.dims):
            continue  # packed sub-byte types: the checker's lower bound is all we check
        entries = math.prod(int(d) for d in tensor.dims) * (2 if tensor.data_type in _COMPLEX else 1)
        stored = max(len(getattr(tensor, name)) for name in _TYPED_FIELDS)
        if stored > entries:
            raise OnnxoptError(f"{where} holds {stored} values, its shape needs {entries}",
                               "the model is corrupt; re-export it")


def _declared_bytes(tensor: onnx.TensorProto) -> int | None:
    """Bytes a tensor's shape and data type call for (Python ints: no overflow), None for an unknown type."""
    try:
        bits = ir.DataType(tensor.data_type).bitwidth
    except (ValueError, TypeError):
        return None
    if any(d < 0 for d in tensor.dims):
        return None
    return (math.prod(int(d) for d in tensor.dims) * bits + 7) // 8


class MappedTensor(ir.ExternalTensor):
    """An external tensor that maps its bytes on each read and unmaps them when the last array is dropped.

    onnx-ir's ExternalTensor maps the whole data file on first read and keeps
    the mapping (and every page it touched, which counts as resident memory)
    until ``release()``; a pass that reads every weight once would end up
    holding the whole model. Here ``numpy()`` maps only this tensor's byte
    range, the array keeps that mapping alive, and dropping the array unmaps
    it: memory holds the weights a pass is working on, not the model. The
    arrays are read-only, so nothing can write into the input model's data.
    Writing (``tofile``, used by saves) copies file to file in the kernel.
    """

    __slots__ = ()

    @classmethod
    def like(cls, tensor: ir.ExternalTensor) -> MappedTensor:
        """The same external bytes as ``tensor``, read the mapped way."""
        return cls(tensor.location, tensor.offset, tensor.length, tensor.dtype, shape=tensor.shape,
                   name=tensor.name, doc_string=tensor.doc_string, base_dir=tensor.base_dir)

    def numpy(self) -> np.ndarray:
        if not self.valid():
            raise ValueError(f"external tensor {self.name!r} was invalidated (its data file was overwritten)")
        if self.dtype == ir.DataType.STRING or self.size == 0 or self.dtype.bitwidth < 8:
            # packed sub-byte types need unpacking into a new array anyway: copy, then let go of the mapping
            array = np.array(super().numpy(), copy=True)
            self.release()
            return array
        offset = self.offset or 0
        start = offset - offset % mmap.ALLOCATIONGRANULARITY
        with open(self.path, "rb") as f:
            mapped = mmap.mmap(f.fileno(), offset - start + self.nbytes, offset=start, access=mmap.ACCESS_READ)
        # the array holds the only reference to the mapping: dropping it unmaps the pages
        dtype = np.dtype(self.dtype.numpy()).newbyteorder("<")
        return np.frombuffer(mapped, dtype=dtype, count=self.size, offset=offset - start).reshape(self.shape.numpy())

    def __array__(self, dtype: Any = None, copy: bool | None = None) -> np.ndarray:
        array = self.numpy()
        return array if dtype is None else array.astype(dtype)

    def tobytes(self) -> bytes:
        if not self.valid():
            raise ValueError(f"external tensor {self.name!r} was invalidated (its data file was overwritten)")
        with open(self.path, "rb") as f:
            f.seek(self.offset or 0)
            return f.read(self.length if self.length is not None else self.nbytes)


def release_pages(array: np.ndarray) -> bool:
    """Give back the resident pages of an array read from a :class:`MappedTensor`; True if it was one.

    The array stays valid: the pages are clean copies of the file, and
    touching them again reads them back. A pass that must keep many weights
    at hand (to compare them across layers) calls this once it is done
    reading each, so what stays resident is what it computed, not the model.
    """
    base: object = array
    while isinstance(base, np.ndarray):
        base = base.base
    mapped = base.obj if isinstance(base, memoryview) else base
    if not isinstance(mapped, mmap.mmap) or mapped.closed or not hasattr(mapped, "madvise"):
        return False
    mapped.madvise(mmap.MADV_DONTNEED)
    return True


class _Scratch:
    """One append-only scratch file per process for arrays a pass computed on a large model, removed at exit."""

    def __init__(self) -> None:
        self.folder: Path | None = None
        self.file: Any = None
        self.lock = threading.Lock()

    def write(self, array: np.ndarray) -> tuple[Path, int]:
        with self.lock:
            if self.file is None:
                import atexit

                self.folder = Path(tempfile.mkdtemp(prefix="onnxopt-scratch-"))
                self.file = open(self.folder / "spilled.data", "ab")  # noqa: SIM115 - closed at exit
                atexit.register(self.close)
            offset = self.file.seek(0, os.SEEK_END)
            np.ascontiguousarray(array).tofile(self.file)
            self.file.flush()
            return self.folder / "spilled.data", offset

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            shutil.rmtree(self.folder or "", ignore_errors=True)
            self.file = self.folder = None


_SCRATCH = _Scratch()


def spill(array: np.ndarray, name: str | None = None) -> MappedTensor:
    """``array`` written to the process's scratch file and read back mapped (:class:`MappedTensor`).

    A pass whose output weights are as large as its input's (cluster's dense
    floats) would otherwise hold a whole second model in anonymous memory
    until the save; spilled, each weight is on disk once computed, and what
    is resident is what a reader maps at the time (the save, a segment's
    session). The caller drops ``array``. The file lives until the process
    exits, so a model holding spilled tensors stays valid as long as it does.
    """
    path, offset = _SCRATCH.write(array)
    dtype = ir.DataType.from_numpy(array.dtype)
    return MappedTensor(path.name, offset, array.nbytes, dtype, shape=ir.Shape(array.shape), name=name,
                        base_dir=path.parent)


def map_external_tensors(model: ir.Model) -> int:
    """Make every external initializer (subgraphs too) a :class:`MappedTensor`; return how many."""
    count = 0
    for graph in (model.graph, *model.graph.subgraphs()):
        for value in graph.initializers.values():
            tensor = value.const_value
            if isinstance(tensor, ir.ExternalTensor) and not isinstance(tensor, MappedTensor):
                value.const_value = MappedTensor.like(tensor)
                count += 1
    return count


#: Weights from this size on are kept out of protobuf round trips (version converter, graphsurgeon) by default.
WEIGHT_OUT_BYTES = 2**16


def weights_as_inputs(model: ir.Model, names: Iterable[str] | None = None) -> ir.Model:
    """A clone of ``model`` whose main-graph weights ``names`` are graph inputs (type and shape, no data).

    For tools that work on protobuf (the version converter, graphsurgeon):
    the clone serialises to a few megabytes whatever the model's size, and no
    weight is read. ``names=None`` keeps out every weight of at least
    WEIGHT_OUT_BYTES. :func:`restore_weights` puts the tensors back afterwards.
    """
    clone = model.clone()  # shares the tensors: cheap, and the caller's model is not touched
    graph = clone.graph
    if names is None:
        names = [str(v.name) for v in graph.initializers.values()
                 if v.const_value is not None and v.const_value.nbytes >= WEIGHT_OUT_BYTES and not v.is_graph_input()]
    for name in list(names):
        value = graph.initializers[name]
        del graph.initializers[name]
        value.const_value = None
        graph.inputs.append(value)
    return clone


def restore_weights(model: ir.Model, like: ir.Model) -> int:
    """Make graph inputs of ``model`` that are weights of ``like`` initializers again, holding ``like``'s tensors.

    The inverse of :func:`weights_as_inputs` once a tool has given the model
    back; returns how many were restored.
    """
    own_inputs = {v.name for v in like.graph.inputs}
    restored = 0
    for value in [v for v in model.graph.inputs if v.name not in own_inputs and v.name in like.graph.initializers]:
        model.graph.inputs.remove(value)
        value.const_value = like.graph.initializers[str(value.name)].const_value
        model.graph.register_initializer(value)
        restored += 1
    return restored


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
    if not proto.graph.output:
        raise OnnxoptError(f"{path} has no graph outputs, so there is nothing to compute or compare",
                           "re-export the model with its outputs declared")
    bad_text = _non_utf8_field(proto)
    if bad_text:
        raise OnnxoptError(f"{path} is corrupt: a {bad_text} is not valid UTF-8 text",
                           "the file is damaged or was not written by an ONNX exporter; re-export it")
    return proto


def _non_utf8_field(message: Message) -> str | None:
    """The name of the first text field holding bytes that are not UTF-8, if any.

    Protobuf hands such a field over as ``bytes`` instead of failing; everything
    downstream (the IR, ORT, our messages) would then break on it in its own way.
    """
    for field, value in message.ListFields():
        repeated = field.is_repeated if hasattr(field, "is_repeated") else field.label == field.LABEL_REPEATED
        values = value if repeated else (value,)
        if field.type == field.TYPE_STRING:
            if any(isinstance(v, bytes) for v in values):
                return f"{message.DESCRIPTOR.name}.{field.name}"
        elif field.type == field.TYPE_MESSAGE:
            for item in values:
                found = _non_utf8_field(item)
                if found:
                    return found
    return None


#: ConstantOfShape nodes filling more bytes than this stay nodes at load time (never materialised here);
#: the light model zoo's largest weight made this way is 0.4 GB. Raise with ONNXOPT_MAX_CONSTANT_BYTES.
CONSTANT_OF_SHAPE_LIMIT = int(os.environ.get("ONNXOPT_MAX_CONSTANT_BYTES", 2**30))


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
        if math.prod(shape) * dtype.itemsize > CONSTANT_OF_SHAPE_LIMIT:
            # a 172-byte node can ask for gigabytes: past the limit it stays a node, made at run time by ORT
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

    External data is never read here: each weight becomes a :class:`MappedTensor`,
    mapped when a pass reads it and unmapped when the pass drops the array. With ``normalize``,
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
        except (onnx.checker.ValidationError, onnx.onnx_cpp2py_export.checker.ValidationError,  # type: ignore[attr-defined]
                UnicodeDecodeError) as err:  # the checker's message quotes a name that is not UTF-8
            raise OnnxoptError(f"{path} is not a valid ONNX model: {_one_line(err)}",
                               "re-export the model; onnx.checker.check_model shows the full report") from None
    _check_tensor_sizes(proto, path)
    try:
        model = ir.serde.deserialize_model(proto)
    except Exception as err:  # the IR refuses some malformed graphs the checker lets through
        while err.__cause__ is not None:  # the IR wraps the real reason in "Error calling ..." layers
            err = err.__cause__
        raise OnnxoptError(f"{path} could not be read into the graph IR: {_one_line(err)}",
                           "re-export the model or check it with onnx.checker") from None
    ir.external_data.set_base_dir(model.graph, path.parent)
    notes: list[str] = []
    if normalize:
        notes += _normalize_weights(model)
        notes += infer_shapes(model)
    map_external_tensors(model)  # weights are read one at a time and let go, never held all at once
    model.meta[LOAD_NOTES] = notes
    return model


def infer_shapes(model: ir.Model, *, data_prop: bool = False) -> list[str]:
    """Run ONNX shape inference on the model in place; return a note if it failed (not fatal).

    Inferred types only fill in what the model does not declare, and shapes
    only refine tensors of the same type: a declared type is never changed.
    (onnx-ir's own merge copies an inferred element type onto a value, which
    turns a sequence or optional inside a subgraph into a tensor, and the
    saved model then fails ONNX Runtime's type check.) Weights are not read:
    they cross as typed graph inputs.
    """
    try:
        proto = onnx.load_from_string(serialize_model(weights_as_inputs(model)))
        inferred = ir.serde.deserialize_model(
            onnx.shape_inference.infer_shapes(proto, check_type=True, strict_mode=False, data_prop=data_prop))
    except Exception as err:  # ONNX shape inference rejects some models ORT runs fine
        return [f"shape inference failed, shapes left as exported ({_one_line(err, 120)})"]
    for graph, found in zip(model.graphs(), inferred.graphs()):
        known = {v.name: v for v in _graph_values(found) if v.name}
        for value in _graph_values(graph):
            other = known.get(value.name) if value.name else None
            if other is None or other.type is None:
                continue
            if value.type is None:
                value.type = other.type
                value.shape = other.shape
            elif value.type == other.type and other.shape is not None and _refines(value.shape, other.shape):
                value.shape = other.shape
    return []


def _refines(declared: ir.Shape | None, inferred: ir.Shape) -> bool:
    """True when ``inferred`` says more than ``declared`` and contradicts none of its fixed dims."""
    if declared is None:
        return True
    if len(declared) != len(inferred) or declared == inferred:
        return False
    return all(not isinstance(d, int) or d == i for d, i in zip(declared.dims, inferred.dims))


def _graph_values(graph: ir.Graph) -> list[ir.Value]:
    """A graph's own values (inputs, node outputs, outputs), not those of its subgraphs."""
    return [*graph.inputs, *(v for node in graph for v in node.outputs), *graph.outputs]


def _one_line(err: BaseException, limit: int = 300) -> str:
    """An exception's message on one line (checker and IR messages span several), at most ``limit`` characters."""
    while err.__cause__ is not None and not str(err).strip():
        err = err.__cause__
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


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


def serialize_model(model: ir.Model, *, compact: bool = False) -> bytes:
    """Serialise a model under the protobuf limit to bytes (external tensors are read in); ``compact``: see
    :func:`compact_proto`."""
    if tensor_bytes(model) >= PROTOBUF_LIMIT:
        raise OnnxoptError("model is over 2 GB and cannot be serialised in memory",
                           "save it with external data instead")
    if has_external_data(model):
        # Read external tensors into a clone: the caller's model keeps its memory-mapped weights.
        model = ir.external_data.load_to_model(model.clone())
    proto = ir.serde.serialize_model(model)
    if compact:
        compact_proto(proto)
    return proto.SerializeToString()


def _varint_bytes(n: int) -> int:
    return max(1, (n.bit_length() + 6) // 7)


def serialized_size(model: ir.Model, *, min_bytes: int = WEIGHT_OUT_BYTES) -> int:
    """``len(serialize_model(model))`` for a model without external data, without building that protobuf.

    Main-graph tensors of ``min_bytes`` or more are measured one at a time
    and stood in for by external references in the skeleton that is
    serialised: memory holds one tensor's copy at a time, not the model's
    (the whole protobuf of a large model in memory is a second copy of it).
    """
    swapped: list[tuple[ir.Value, ir.TensorProtocol]] = []
    change = 0  # bytes the real initializer fields take beyond their stand-ins
    try:
        for value in model.graph.initializers.values():
            tensor = value.const_value
            if tensor is None or tensor.nbytes < min_bytes or isinstance(tensor, ir.ExternalTensor):
                continue
            real = ir.serde.serialize_tensor(tensor).ByteSize()
            stand_in = ir.ExternalTensor("s", 0, tensor.nbytes, tensor.dtype, shape=tensor.shape, name=tensor.name)
            stand = ir.serde.serialize_tensor(stand_in).ByteSize()
            change += (_varint_bytes(real) + real) - (_varint_bytes(stand) + stand)
            swapped.append((value, tensor))
            value.const_value = stand_in
        proto = ir.serde.serialize_model(model)
        graph = proto.graph.ByteSize()
        return proto.ByteSize() - _varint_bytes(graph) + _varint_bytes(graph + change) + change
    finally:
        for value, tensor in reversed(swapped):
            value.const_value = tensor


def _short_names() -> Iterator[str]:
    """a, b, ..., z, aa, ab, ...: the shortest names first."""
    letters = "abcdefghijklmnopqrstuvwxyz"
    width = 1
    while True:
        for i in range(len(letters) ** width):
            name = ""
            for _ in range(width):
                i, r = divmod(i, len(letters))
                name = letters[r] + name
            yield name
        width += 1


def compact_proto(proto: onnx.ModelProto) -> None:
    """Shorten every internal tensor name, drop node names, the nodes' exporter metadata and the intermediate shape
    annotations, in place.

    All are lossless for ONNX Runtime (it infers shapes at load, and reads no node metadata), and on a small
    quantized model they are much of the file: a 4-bit 19k-parameter CNN holds ~9 KB of weights but ~15 KB of
    names and value_info; PyTorch's dynamo exporter writes each node's FX stack trace into its metadata_props
    (626 KB of Silero VAD's 2.8 MB op18 model). The main
    graph's inputs and outputs keep their names (callers feed and read them); subgraphs and local functions
    are renamed through one map, so a body still reads its outer-scope values (local functions have their own
    scope and are left as they are).
    """
    main = proto.graph
    keep = {v.name for v in (*main.input, *main.output)}
    fresh = (n for n in _short_names() if n not in keep)
    rename: dict[str, str] = {}

    def new(name: str) -> str:
        if not name or name in keep:
            return name
        if name not in rename:
            rename[name] = next(fresh)
        return rename[name]

    nodes = (n for n in iter_nodes_proto(main))
    graphs = [main, *iter_subgraphs_proto(main)]
    for graph in graphs:
        del graph.value_info[:]
        for value in (*(graph.input if graph is not main else ()), *(graph.output if graph is not main else ())):
            value.name = new(value.name)
        for tensor in graph.initializer:
            tensor.name = new(tensor.name)
        for sparse in graph.sparse_initializer:
            sparse.values.name = new(sparse.values.name)
        for annotation in graph.quantization_annotation:
            annotation.tensor_name = new(annotation.tensor_name)
    for node in nodes:
        node.input[:] = [new(n) for n in node.input]
        node.output[:] = [new(n) for n in node.output]
        node.ClearField("name")  # optional in ONNX; ORT names nodes itself
        node.ClearField("doc_string")
        del node.metadata_props[:]


def iter_subgraphs_proto(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    """Every subgraph (If/Loop/Scan bodies) under ``graph``, recursively."""
    for node in graph.node:
        for attr in node.attribute:
            for sub in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else
                        list(attr.graphs) if attr.type == onnx.AttributeProto.GRAPHS else []):
                yield sub
                yield from iter_subgraphs_proto(sub)


def iter_nodes_proto(graph: onnx.GraphProto) -> Iterator[onnx.NodeProto]:
    """Every node of ``graph`` and of its subgraphs."""
    for g in (graph, *iter_subgraphs_proto(graph)):
        yield from g.node


def same_file(a: str | os.PathLike[str], b: str | os.PathLike[str]) -> bool:
    """True when two paths name the same file (resolving links), even if one does not exist yet."""
    pa, pb = Path(a), Path(b)
    if pa.exists() and pb.exists():
        return os.path.samefile(pa, pb)
    return pa.resolve() == pb.resolve()


def external_data_files(model: ir.Model) -> set[Path]:
    """The data files the model's external tensors are read from."""
    return {Path(v.const_value.path) for g in (model.graph, *model.graph.subgraphs())
            for v in g.initializers.values() if isinstance(v.const_value, ir.ExternalTensor)}


def refuse_overwriting(
    reads: Iterable[tuple[str, str | os.PathLike[str] | None]],
    writes: Iterable[tuple[str, str | os.PathLike[str] | None]],
) -> None:
    """Refuse a run that would write over one of its own inputs (also through a symlink or a hard link)."""
    reads = [(what, Path(p)) for what, p in reads if p is not None]
    for write_what, target in writes:
        if target is None:
            continue
        for read_what, source in reads:
            if source.exists() and same_file(source, target):
                raise OnnxoptError(f"{write_what} {target} is {read_what} ({source})",
                                   "write to another path; onnxopt never overwrites what it reads")


def check_model_output(path: str | os.PathLike[str] | None, flag: str = "-o") -> None:
    """Refuse, before any work, an output model path that is a folder, has no ``.onnx`` name, or whose folder is missing.

    A run can take minutes; a path that cannot take the model must fail before it, not after.
    """
    if path is None:
        return
    raw = os.fspath(path)
    target = Path(raw)
    if target.suffix.lower() != ".onnx" and not (raw.endswith(("/", os.sep)) or target.is_dir()):
        raise OnnxoptError(f"{flag} {raw} does not end in .onnx, and onnxopt writes an ONNX model there",
                           f"name it e.g. {flag} {target.with_suffix('.onnx') if target.suffix else raw + '.onnx'}")
    _writable_destination(raw, flag)


def _writable_destination(raw: str, flag: str) -> Path:
    """The folder a model file ``raw`` goes into; refuses a folder given as the file, or a missing folder."""
    target = Path(raw)
    if raw.endswith(("/", os.sep)) or target.is_dir():
        raise OnnxoptError(f"{flag} {raw} is a folder, not a model file name",
                           f"give a file in it, e.g. {flag} {target / 'model.onnx'}")
    parent = target.parent if str(target.parent) else Path(".")
    if not parent.is_dir():
        raise OnnxoptError(f"{flag} {raw}: folder {parent} does not exist", "create it first or choose another path")
    return parent


class StagedModel:
    """A model written and checked in a temporary folder beside its destination, not yet in place.

    :meth:`commit` renames it into place (model and data file together);
    :meth:`discard` removes it. Until then :attr:`path` can be read like any
    model file (a large run validates its candidate from there).
    """

    def __init__(self, tmpdir: Path, path: Path, moves: list[tuple[Path, Path]]) -> None:
        self.tmpdir, self.destination, self.moves = tmpdir, path, moves
        self.path = tmpdir / path.name

    def commit(self) -> Path:
        try:
            _commit(self.moves)
        except OSError as err:
            raise OnnxoptError(f"could not write {self.destination}: {err.strerror or err}",
                               "check the free space and permissions there") from None
        finally:
            self.discard()
        return self.destination

    def discard(self) -> None:
        shutil.rmtree(self.tmpdir, ignore_errors=True)


def stage_model(
    model: ir.Model,
    path: str | os.PathLike[str],
    *,
    external_data: bool | None = None,
    check: bool = True,
    compact: bool = False,
) -> StagedModel:
    """Write and check ``model`` in a temporary folder beside ``path``; :func:`save_model` then commits it.

    ``compact`` shortens internal names and drops intermediate shape annotations (:func:`compact_proto`); a model
    written with external data is not compacted (its names are a small share of it)."""
    parent = _writable_destination(os.fspath(path), "output")
    path = Path(path)
    if external_data is None:
        external_data = has_external_data(model) or tensor_bytes(model) >= PROTOBUF_LIMIT
    data_name = path.name + ".data"
    try:
        tmpdir = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=parent))
    except OSError as err:
        raise OnnxoptError(f"cannot write into {parent}: {err.strerror or err}", "choose a folder you can write to") from None
    try:
        tmp_model = tmpdir / path.name
        if external_data:
            ir.save(model, tmp_model, external_data=data_name)
        else:
            tmp_model.write_bytes(serialize_model(model, compact=compact))
        if check:
            try:
                onnx.checker.check_model(str(tmp_model))
            except Exception as err:
                first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
                raise OnnxoptError(f"refusing to save an invalid model: {first}",
                                   "this is a bug in the pass that produced it; run with --debug and report it") from None
        moves = [(tmpdir / data_name, parent / data_name)] if external_data and (tmpdir / data_name).exists() else []
        return StagedModel(tmpdir, path, [*moves, (tmp_model, path)])
    except OSError as err:  # a full disk, a read-only mount: nothing was put in place
        shutil.rmtree(tmpdir, ignore_errors=True)
        raise OnnxoptError(f"could not write {path}: {err.strerror or err}", "check the free space and permissions there") from None
    except BaseException:
        shutil.rmtree(tmpdir, ignore_errors=True)
        raise


def save_model(
    model: ir.Model,
    path: str | os.PathLike[str],
    *,
    external_data: bool | None = None,
    check: bool = True,
    compact: bool = False,
) -> Path:
    """Save atomically: write and check in a temporary folder beside ``path``, then rename into place.

    ``external_data=None`` keeps weights external when the input had them
    external or when the model is over the protobuf limit; the data file is
    ``<name>.data`` next to the model.
    """
    return stage_model(model, path, external_data=external_data, check=check, compact=compact).commit()


def _commit(moves: list[tuple[Path, Path]]) -> None:
    """Rename finished files into place with SIGINT/SIGTERM deferred until all are moved.

    A model and its data file are two renames; an interrupt between them would
    leave a new data file beside no model (or beside the old one). A signal
    that arrives meanwhile is raised again right after, once the output is
    complete. (Python runs signal handlers in the main thread, whichever
    thread the OS hands the signal to, so swapping the handlers is enough.)
    """
    pending: list[int] = []
    previous: dict[int, Any] = {}
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGINT, signal.SIGTERM):
            if signal.getsignal(signum) is not None:  # None: set outside Python, cannot be put back
                previous[signum] = signal.signal(signum, lambda number, frame: pending.append(number))
    try:
        for source, target in moves:
            os.replace(source, target)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        for signum in pending:
            signal.raise_signal(signum)
