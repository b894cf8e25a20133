"""ONNX Runtime sessions, made one way for validation, calibration and benchmarks."""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir
import onnxruntime as ort

from onnxopt.errors import OnnxoptError
from onnxopt.io import PROTOBUF_LIMIT, has_external_data, serialize_model, tensor_bytes

__all__ = ["SessionFactory", "available_providers", "check_threads", "give_back_memory", "ort_message", "resolve_providers",
           "run_batches", "LARGE_MODEL_BYTES"]

# ORT logs optimizer warnings to stderr by default; a user sees our report, not its internals.
ort.set_default_logger_severity(4)

#: Short CLI spellings of execution providers.
PROVIDER_ALIASES = {
    "cpu": "CPUExecutionProvider",
    "xnnpack": "XnnpackExecutionProvider",
    "acl": "ACLExecutionProvider",
    "armnn": "ArmNNExecutionProvider",
    "dnnl": "DnnlExecutionProvider",
    "openvino": "OpenVINOExecutionProvider",
    "cuda": "CUDAExecutionProvider",
}


def _libc_trim() -> Any:
    try:
        import ctypes

        # by its soname, not ctypes.util.find_library: that runs /sbin/ldconfig in a subprocess
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to call
        return None


_MALLOC_TRIM: list[Any] = []


def give_back_memory() -> None:
    """Return freed heap pages to the OS (glibc's malloc_trim; nothing elsewhere).

    A session's buffers (prepacked weights, its arena) are large blocks that
    glibc, once it has freed one that large, serves from the heap instead of
    fresh mappings, and keeps when they are freed: a process running a large
    model one segment's session after another grew by each session's size
    (24-48 MB per segment of a 300 MB chain) though only one was alive.
    """
    if not _MALLOC_TRIM:
        _MALLOC_TRIM.append(_libc_trim() if os.name == "posix" else None)
    if _MALLOC_TRIM[0] is not None:
        _MALLOC_TRIM[0](0)


def check_threads(threads: int) -> None:
    """Refuse a thread count below 1 (ORT would take 0 as "all cores" and a negative one is meaningless)."""
    if not isinstance(threads, int) or isinstance(threads, bool) or threads < 1:
        raise OnnxoptError(f"--threads {threads} is not a thread count", "give 1 or more, e.g. --threads 1 (the default)")


def ort_message(err: BaseException, limit: int = 600) -> str:
    """ORT's message on one line, its "[ONNXRuntimeError] : 2 : INVALID_ARGUMENT :" prefix dropped.

    ORT puts the useful part on later lines (e.g. "index: 2 Got: 640 Expected: 800"), so the lines are
    joined rather than the first one kept.
    """
    text = " ".join(str(err).split()) or type(err).__name__
    text = re.sub(r"^\[ONNXRuntimeError\] : \d+ : [A-Z_]+ : ", "", text)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def available_providers() -> list[str]:
    """Execution providers the installed onnxruntime build offers."""
    return list(ort.get_available_providers())


def resolve_providers(names: Sequence[str] | None) -> list[str]:
    """Map user spellings to provider names; CPU is always last as the fallback.

    A provider the installed onnxruntime lacks is a clear error, not a crash.
    """
    wanted = [PROVIDER_ALIASES.get(n.strip().lower(), n.strip()) for n in (names or []) if n.strip()]
    have = available_providers()
    missing = [p for p in wanted if p not in have]
    if missing:
        raise OnnxoptError(
            f"execution provider {', '.join(missing)} is not offered by this onnxruntime build (it has {', '.join(have)})",
            "install an onnxruntime build with that provider, or drop --providers",
        )
    providers = [p for p in wanted if p != "CPUExecutionProvider"]
    return [*providers, "CPUExecutionProvider"]


@dataclass
class SessionFactory:
    """Creates ORT sessions with one set of providers and a fixed thread count.

    ``threads`` fixes intra-op threads so latency figures are comparable
    (inter-op 1, sequential execution); ``optimization`` is ORT's graph
    optimization level; ``spinning=False`` lets idle intra-op threads sleep
    (on a shared machine spinning threads fight the load).
    """

    providers: list[str] = field(default_factory=lambda: ["CPUExecutionProvider"])
    threads: int = 1
    optimization: ort.GraphOptimizationLevel = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    spinning: bool = True

    def __post_init__(self) -> None:
        check_threads(self.threads)

    def options(self, optimized_model_path: str | os.PathLike[str] | None = None) -> ort.SessionOptions:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = self.threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = self.optimization
        if not self.spinning:
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        opts.log_severity_level = 4
        if optimized_model_path is not None:
            opts.optimized_model_filepath = str(optimized_model_path)
            # an optimized model over 2 GB cannot be one protobuf: its weights go to a data file beside it
            opts.add_session_config_entry("session.optimized_model_external_initializers_file_name",
                                          Path(optimized_model_path).name + ".data")
            opts.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
            # such a session is made to read its optimized graph, which prepacking (a copy of every MatMul weight
            # in the kernels' layout, made after the graph is saved) does not change
            opts.add_session_config_entry("session.disable_prepacking", "1")
        return opts

    def create(
        self,
        model: ir.Model | str | os.PathLike[str] | bytes,
        *,
        optimized_model_path: str | os.PathLike[str] | None = None,
    ) -> ort.InferenceSession:
        """A session for an in-memory model, a file, or serialised bytes.

        A model with external data, or with LARGE_MODEL_BYTES of weights or
        more, costs no second copy of its weights: ORT reads the unchanged
        ones from the input's data file and the rest from the IR's own arrays
        (see :func:`_weights_by_reference`); smaller models go over as bytes.
        """
        opts = self.options(optimized_model_path)
        if isinstance(model, ir.Model):
            if has_external_data(model) or tensor_bytes(model) >= LARGE_MODEL_BYTES:
                return self._large_session(model, opts)
            return self._session(serialize_model(model), opts)
        if isinstance(model, (bytes, bytearray)):
            return self._session(bytes(model), opts)
        return self._session(str(model), opts)

    def _large_session(self, model: ir.Model, opts: ort.SessionOptions) -> ort.InferenceSession:
        """A session that reads no weight into a second copy: see :func:`_weights_by_reference`."""
        source = _weights_by_reference(model)
        if source is not None:
            by_reference = self.options(opts.optimized_model_filepath or None)
            if source.folder is not None:
                by_reference.add_session_config_entry("session.model_external_initializers_file_folder_path", source.folder)
            if source.names:
                by_reference.add_external_initializers(source.names, source.values)
            try:
                session = self._session(source.proto, by_reference)
            except OnnxoptError:
                pass  # an onnxruntime without these options, or a model it refuses either way: the folder says which
            else:
                # ORT reads injected initializers straight from these arrays: they must live as long as the session
                session._onnxopt_initializers = source.values  # type: ignore[attr-defined]
                return session
        # write the model to a folder (external tensors are copied file to file in the kernel: memory stays flat)
        tmp = Path(tempfile.mkdtemp(prefix="onnxopt-session-"))
        try:
            path = tmp / "model.onnx"
            ir.save(model, path, external_data="model.onnx.data")
            return self._session(str(path), opts)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def _session(self, source: str | bytes, opts: ort.SessionOptions) -> ort.InferenceSession:
        try:
            return ort.InferenceSession(source, sess_options=opts, providers=self.providers)
        except Exception as err:  # ORT raises several types (Fail, InvalidGraph, NotImplemented, RuntimeError)
            raise OnnxoptError(f"ONNX Runtime cannot load the model: {ort_message(err)}",
                               "check the model with `onnxopt inspect`; unsupported ops need a newer onnxruntime") from None


#: Models with external data, or with at least this many bytes of weights, get sessions that copy no weight.
LARGE_MODEL_BYTES = 2**28
#: In-memory initializers from this size on are handed to ORT as OrtValues over their own buffer.
_INJECT_MIN_BYTES = 2**16
#: Past this many bytes of tensors ORT cannot take as OrtValues (int4, bfloat16, ...), writing the model to a folder
#: (streamed, tensor by tensor) costs less than inlining them: protobuf would hold three or four copies of them.
_INLINE_LIMIT = 2**26
#: Where a placeholder initializer says its data is; never read (ORT replaces it with the injected value first,
#: and a name that exists nowhere makes any read fail loudly instead of using wrong bytes).
_INJECTED_LOCATION = "onnxopt-injected-initializer"


@dataclass
class _ByReference:
    proto: bytes
    folder: str | None
    names: list[str]
    values: list[ort.OrtValue]


def _injectable(tensor: ir.TensorProtocol) -> bool:
    try:
        dtype = np.dtype(tensor.dtype.numpy())
    except (TypeError, ValueError):
        return False
    # ORT takes numpy's own dtypes only (not ml_dtypes' bfloat16/float8/int4) and no strings
    return tensor.dtype.bitwidth >= 8 and dtype.kind in "biuf" and dtype.type.__module__ == "numpy"


def _weights_by_reference(model: ir.Model) -> _ByReference | None:
    """The model as protobuf bytes whose weights ORT reads in place, or None when that cannot be done.

    Unchanged external weights stay in the input's data file (ORT maps it
    from the folder given in the session options); weights a pass made in
    memory, and external ones from other folders, are handed over as
    OrtValues over their own (possibly memory-mapped) buffers, behind
    placeholder initializers. Small tensors are inlined. Nothing is copied
    or written to disk, so a session on a model of any size costs no second
    copy of its weights. None when the tensors that must be inlined (types
    ORT cannot take from numpy) reach _INLINE_LIMIT.
    """
    externals = [v.const_value for g in (model.graph, *model.graph.subgraphs()) for v in g.initializers.values()
                 if isinstance(v.const_value, ir.ExternalTensor)]
    by_folder: dict[str, int] = {}
    for tensor in externals:
        folder = os.path.realpath(tensor.base_dir or ".")
        by_folder[folder] = by_folder.get(folder, 0) + tensor.nbytes
    folder = max(by_folder, key=by_folder.__getitem__) if by_folder else None
    swapped: list[tuple[ir.Value, ir.TensorProtocol]] = []
    names: list[str] = []
    values: list[ort.OrtValue] = []
    inline = 0
    try:
        for graph in (model.graph, *model.graph.subgraphs()):
            for value in graph.initializers.values():
                tensor = value.const_value
                if tensor is None:
                    continue
                external = isinstance(tensor, ir.ExternalTensor)
                if external and os.path.realpath(tensor.base_dir or ".") == folder:
                    swapped.append((value, tensor))
                    value.const_value = ir.ExternalTensor(  # a location relative to the folder ORT is told
                        os.path.relpath(os.path.realpath(tensor.path), folder), tensor.offset, tensor.length,
                        tensor.dtype, shape=tensor.shape, name=tensor.name)
                    continue
                if graph is model.graph and tensor.nbytes >= _INJECT_MIN_BYTES and _injectable(tensor):
                    array = np.ascontiguousarray(tensor.numpy())
                    swapped.append((value, tensor))
                    value.const_value = ir.ExternalTensor(_INJECTED_LOCATION, 0, array.nbytes, tensor.dtype,
                                                          shape=tensor.shape, name=tensor.name)
                    names.append(str(value.name))
                    values.append(ort.OrtValue.ortvalue_from_numpy(array))
                    continue
                if external:  # another folder, a type ORT cannot take from numpy: inline it
                    swapped.append((value, tensor))
                    value.const_value = ir.Tensor(np.array(tensor.numpy()), dtype=tensor.dtype, name=tensor.name)
                inline += tensor.nbytes
                if inline >= _INLINE_LIMIT:
                    return None
        proto = ir.serde.serialize_model(model).SerializeToString()
    finally:
        for value, tensor in reversed(swapped):
            value.const_value = tensor
    return _ByReference(proto, folder, names, values)


def run_batches(
    session: ort.InferenceSession,
    batches: Iterator[dict[str, np.ndarray]],
    output_names: Sequence[str] | None = None,
) -> Iterator[dict[str, np.ndarray]]:
    """Run ``session`` on each feed; yield ``{output name: array}`` per batch."""
    names = list(output_names) if output_names is not None else [o.name for o in session.get_outputs()]
    for feed in batches:
        try:
            results = session.run(names, feed)
        except Exception as err:
            raise OnnxoptError(f"ONNX Runtime failed while running the model: {ort_message(err)}",
                               "check that the data matches the model's inputs (`onnxopt inspect`)") from None
        yield dict(zip(names, results))
