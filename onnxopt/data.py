"""Data for calibration and validation: .npz files, ONNX test-data folders, or synthetic inputs.

A dataset is matched to a model's inputs when it is loaded, so a wrong name,
shape or dtype is a one-line error before any work starts, not an ORT
traceback halfway through.
"""

from __future__ import annotations

import math
import os
import re
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
from onnx import numpy_helper

from onnxopt.errors import OnnxoptError

__all__ = [
    "InputSpec",
    "Dataset",
    "input_specs",
    "load_dataset",
    "synthetic_dataset",
    "parse_shape",
    "shape_hint",
    "compared_values",
    "DEFAULT_BATCH",
    "read_value_proto",
    "value_kind",
]

#: Samples per ORT call when the model's batch dimension is free.
DEFAULT_BATCH = 64
#: Synthetic inputs larger than this are refused: the shapes come from an untrusted model or a typo.
SYNTHETIC_LIMIT = 2**30
LABELS_KEY = "labels"
#: A .npz file's arrays may decompress to at most this many bytes in all (raise with ONNXOPT_MAX_DATA_BYTES).
DATA_LIMIT = 4 * 2**30
DATA_LIMIT_ENV = "ONNXOPT_MAX_DATA_BYTES"


@dataclass(frozen=True)
class InputSpec:
    """A graph input: name, numpy dtype and dims (an int, or a str/None for a free dim)."""

    name: str
    dtype: np.dtype
    dims: tuple[int | str | None, ...] | None
    #: "tensor", or "sequence" / "optional" (fed as a list of arrays / an array or None; dims are the element's)
    kind: str = "tensor"

    @property
    def fixed_batch(self) -> int | None:
        """The batch size the model requires, when its first dim is a fixed number."""
        if self.dims and isinstance(self.dims[0], int):
            return int(self.dims[0])
        return None

    def describe(self) -> str:
        dims = "?" if self.dims is None else "x".join(str(d) if d is not None else "?" for d in self.dims)
        return f"{self.name}: {self.dtype} [{dims}]"


def input_specs(model: ir.Model) -> list[InputSpec]:
    """The inputs a user feeds (initializers that double as inputs excluded)."""
    specs = []
    for value in model.graph.inputs:
        if value.const_value is not None or value.name is None:
            continue
        dtype = value.dtype.numpy() if value.dtype is not None else np.dtype(np.float32)
        dims = None
        if value.shape is not None:
            # exporters write -1 or 0 for free dims too
            dims = tuple((d if d > 0 else None) if isinstance(d, int) else (d.value if isinstance(d, ir.SymbolicDim) else None)
                         for d in value.shape.dims)
        kind = ("sequence" if isinstance(value.type, ir.SequenceType)
                else "optional" if isinstance(value.type, ir.OptionalType) else "tensor")
        specs.append(InputSpec(value.name, np.dtype(dtype), dims, kind))
    return specs


@dataclass
class Dataset:
    """Model inputs and optional labels.

    ``arrays`` holds samples stacked along axis 0 and is fed in batches along
    it; ``feeds`` holds ready-made feeds (ONNX test-data sets), fed as they are.
    """

    source: str
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    feeds: list[dict[str, np.ndarray]] = field(default_factory=list)
    labels: np.ndarray | None = None
    fidelity_only: bool = False
    batch_size: int = DEFAULT_BATCH

    def __len__(self) -> int:
        if self.arrays:
            return int(next(iter(self.arrays.values())).shape[0])
        return sum(int(first.shape[0]) if isinstance(first := next(iter(f.values()), None), np.ndarray) and first.ndim else 1
                   for f in self.feeds)

    @property
    def num_batches(self) -> int:
        if self.arrays:
            return math.ceil(len(self) / self.batch_size)
        return len(self.feeds)

    def batches(self) -> Iterator[dict[str, np.ndarray]]:
        """Feeds for ``session.run``, one batch at a time."""
        if self.arrays:
            for start in range(0, len(self), self.batch_size):
                yield {k: v[start : start + self.batch_size] for k, v in self.arrays.items()}
        else:
            yield from self.feeds

    def take(self, n: int) -> Dataset:
        """The first ``n`` samples (or feeds) as a new dataset."""
        if self.arrays:
            return Dataset(self.source, {k: v[:n] for k, v in self.arrays.items()}, [],
                           None if self.labels is None else self.labels[:n], self.fidelity_only, self.batch_size)
        return Dataset(self.source, {}, self.feeds[:n], None if self.labels is None else self.labels[:n],
                       self.fidelity_only, self.batch_size)


def value_kind(type_proto: onnx.TypeProto) -> str:
    """"sequence", "optional" or "tensor": how a value of this declared type is stored and fed."""
    return "sequence" if type_proto.HasField("sequence_type") else "optional" if type_proto.HasField("optional_type") else "tensor"


def read_value_proto(data: bytes, kind: str = "tensor") -> object:
    """A test-data ``.pb`` value read by its declared kind: an array, a list (sequence), or None / a value (optional)."""
    if kind == "sequence":
        sequence = onnx.SequenceProto()
        sequence.ParseFromString(data)
        return numpy_helper.to_list(sequence)
    if kind == "optional":
        optional = onnx.OptionalProto()
        optional.ParseFromString(data)
        return numpy_helper.to_optional(optional)
    tensor = onnx.TensorProto()
    tensor.ParseFromString(data)
    return numpy_helper.to_array(tensor)


def _check_array(spec: InputSpec, array: np.ndarray, source: str, stacked: bool) -> None:
    if spec.kind != "tensor":
        expected = list if spec.kind == "sequence" else (np.ndarray, list, type(None))  # an optional may hold a sequence
        if not isinstance(array, expected):  # type: ignore[arg-type]
            raise OnnxoptError(f"{source}: input {spec.name!r} is a {spec.kind}, the data holds a {type(array).__name__}",
                               "store it as the model declares it (onnx.numpy_helper.from_list / from_optional)")
        return
    if array.dtype != spec.dtype:
        raise OnnxoptError(f"{source}: input {spec.name!r} has dtype {array.dtype}, the model expects {spec.dtype}",
                           f"convert it, e.g. np.asarray(x, dtype=np.{spec.dtype.name})")
    if spec.dims is None:
        return
    if array.ndim != len(spec.dims):
        raise OnnxoptError(f"{source}: input {spec.name!r} has {array.ndim} dims {list(array.shape)}, the model expects "
                           f"{len(spec.dims)} ({spec.describe()})",
                           "stack samples along the first axis with the model's own rank")
    dims = spec.dims[1:] if stacked else spec.dims
    shape = array.shape[1:] if stacked else array.shape
    for i, (want, have) in enumerate(zip(dims, shape)):
        if isinstance(want, int) and want != have:
            axis = i + 1 if stacked else i
            raise OnnxoptError(f"{source}: input {spec.name!r} has size {have} on axis {axis}, the model expects {want} "
                               f"({spec.describe()})", "resize or re-export the data to the model's input shape")


def _batch_size_for(specs: Sequence[InputSpec], requested: int | None) -> int:
    fixed = {s.fixed_batch for s in specs if s.fixed_batch is not None}
    if fixed:
        return fixed.pop()
    return requested or DEFAULT_BATCH


def _data_limit() -> int:
    return int(os.environ.get(DATA_LIMIT_ENV, DATA_LIMIT))


def _check_npz_sizes(path: Path) -> None:
    """Refuse a .npz whose arrays decompress past the limit, from the zip headers, before reading any.

    A few megabytes of zipped zeros can claim gigabytes; zipfile never returns
    more than a member's declared size (a member that lies fails its CRC), so
    the headers bound what reading costs.
    """
    try:
        with zipfile.ZipFile(path) as archive:
            members = [(info.filename, info.file_size) for info in archive.infolist()]
    except (zipfile.BadZipFile, OSError):
        return  # np.load reports what is wrong with the file
    limit = _data_limit()
    total = sum(size for _, size in members)
    if total > limit:
        name, size = max(members, key=lambda m: m[1])
        raise OnnxoptError(f"{path} decompresses to {total:,} bytes (largest member {name}: {size:,}), over the "
                           f"{limit:,}-byte limit for data files",
                           f"if the data is genuine, raise the limit with {DATA_LIMIT_ENV}=<bytes>")


def _load_npz(path: Path, specs: Sequence[InputSpec], batch_size: int | None) -> Dataset:
    _check_npz_sizes(path)
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except (ValueError, OSError, EOFError) as err:
        raise OnnxoptError(f"{path} is not a readable .npz file ({str(err).splitlines()[0]})",
                           "save data with np.savez(path, <input name>=array, labels=...)") from None
    labels = arrays.pop(LABELS_KEY, None)
    names = [s.name for s in specs]
    missing = [n for n in names if n not in arrays]
    if missing:
        raise OnnxoptError(f"{path}: no array for model input(s) {missing} (it has {sorted(arrays)})",
                           f"name the arrays after the model's inputs: {names}")
    extra = [k for k in arrays if k not in names]
    if extra:
        raise OnnxoptError(f"{path}: arrays {extra} match no model input (inputs: {names})",
                           "rename them, or remove them from the file")
    for spec in specs:
        _check_array(spec, arrays[spec.name], str(path), stacked=True)
    counts = {int(a.shape[0]) for a in arrays.values()}
    if len(counts) > 1:
        raise OnnxoptError(f"{path}: arrays have different sample counts {sorted(counts)}",
                           "stack the same number of samples for every input")
    n = counts.pop() if counts else 0
    if n == 0:
        raise OnnxoptError(f"{path} holds no samples", "save at least one sample")
    if labels is not None:
        labels = np.asarray(labels)
        if labels.ndim == 2:
            labels = labels.argmax(axis=1)
        if labels.shape[0] != n:
            raise OnnxoptError(f"{path}: {labels.shape[0]} labels for {n} samples", "give one label per sample")
    bs = _batch_size_for(specs, batch_size)
    return Dataset(str(path), arrays, [], labels, False, bs)


_INPUT_PB = re.compile(r"input_(\d+)\.pb$")


def _load_pb_folder(path: Path, specs: Sequence[InputSpec]) -> Dataset:
    sets = sorted(p for p in path.glob("test_data_set_*") if p.is_dir())
    if not sets and any(path.glob("input_*.pb")):
        sets = [path]
    if not sets:
        raise OnnxoptError(f"{path} holds no test_data_set_N folders or input_K.pb files",
                           "pass a .npz file or an ONNX test-data folder")
    feeds: list[dict[str, np.ndarray]] = []
    for folder in sets:
        files = sorted(folder.glob("input_*.pb"), key=lambda p: int(_INPUT_PB.search(p.name).group(1)))  # type: ignore[union-attr]
        feed: dict[str, np.ndarray] = {}
        by_name = {s.name: s for s in specs}
        for file in files:
            index = int(_INPUT_PB.search(file.name).group(1))  # type: ignore[union-attr]
            if index >= len(specs):
                raise OnnxoptError(f"{file}: input index {index} but the model has {len(specs)} inputs",
                                   "use the test data that belongs to this model")
            # read as the kind of the input at that index; a stored name that names another input wins
            kind = specs[index].kind
            try:
                named = onnx.TensorProto() if kind == "tensor" else onnx.SequenceProto() if kind == "sequence" else onnx.OptionalProto()
                named.ParseFromString(file.read_bytes())
                spec = by_name.get(named.name, specs[index])
                value = read_value_proto(file.read_bytes(), spec.kind)
            except Exception:
                raise OnnxoptError(f"{file} is not a {kind} .pb file", "regenerate the test data") from None
            feed[spec.name] = value  # type: ignore[assignment]
        for spec in specs:
            if spec.name not in feed:
                raise OnnxoptError(f"{folder}: no data for model input {spec.name!r}",
                                   "each test_data_set needs one input_K.pb per model input")
            _check_array(spec, feed[spec.name], str(folder), stacked=False)
        feeds.append(feed)
    return Dataset(str(path), {}, feeds, None, False, 1)


def load_dataset(path: str | Path, specs: Sequence[InputSpec], *, batch_size: int | None = None) -> Dataset:
    """Load ``.npz`` or an ONNX test-data folder and match it to the model's inputs."""
    path = Path(path)
    if not path.exists():
        raise OnnxoptError(f"data {path}: no such file or folder", "check the path given to --data/--eval")
    if path.is_dir():
        return _load_pb_folder(path, specs)
    if path.suffix == ".npz":
        return _load_npz(path, specs, batch_size)
    raise OnnxoptError(f"data {path}: unsupported format {path.suffix!r}",
                       "use a .npz file keyed by input names or an ONNX test-data folder")


def parse_shape(text: str) -> tuple[str, tuple[int, ...]]:
    """Parse ``name=1x3x224x224`` into ``("name", (1, 3, 224, 224))``."""
    name, sep, dims = text.partition("=")
    try:
        shape = tuple(int(d) for d in dims.lower().split("x")) if sep else ()
    except ValueError:
        shape = ()
    if not sep or not name or not shape:
        raise OnnxoptError(f"--shape {text!r} is not NAME=D1xD2x...", "for example --shape x=1x3x224x224")
    bad = [f"{d} (dim {i})" for i, d in enumerate(shape) if d <= 0]
    if bad:
        raise OnnxoptError(f"--shape {text!r}: every dim must be at least 1, got {', '.join(bad)}",
                           f"give a size for it, e.g. --shape {name}={'x'.join(str(d if d > 0 else 1) for d in shape)}")
    return name, shape


def _needs_shape(spec: InputSpec) -> bool:
    """True when synthetic data cannot shape the input by itself (a free dim past the first, or no dims at all)."""
    return spec.kind == "tensor" and (spec.dims is None or not all(isinstance(d, int) for d in spec.dims[1:]))


def shape_hint(specs: Sequence[InputSpec]) -> str:
    """The ``--shape`` options synthetic data needs, fixed dims filled in and the first free dim of each input taken
    as a batch of 1; a dim only the user knows is spelled by its name in the model, or ``D<axis>``, and listed.

    For Silero VAD (input [?, ?], state [2, ?, 128]): ``--shape input=1xD1 --shape state=2x1x128 (D1: the size
    of input's dim 1, free in the model)``.
    """
    options, unknown = [], []
    for spec in specs:
        if not _needs_shape(spec):
            continue
        if spec.dims is None:
            options.append(f"--shape {spec.name}=D0xD1x...")
            unknown.append(f"{spec.name}'s rank and dims, unknown in the model")
            continue
        dims, batch_taken = [], False
        for axis, d in enumerate(spec.dims):
            if isinstance(d, int):
                dims.append(str(d))
            elif not batch_taken:
                dims.append("1")
                batch_taken = True
            else:
                label = d if isinstance(d, str) and d.isidentifier() else f"D{axis}"
                dims.append(label)
                unknown.append(f"{label}: the size of {spec.name}'s dim {axis}, free in the model")
        options.append(f"--shape {spec.name}={'x'.join(dims)}")
    return " ".join(options) + (f" ({'; '.join(unknown)})" if unknown else "")


#: Comparisons whose constant operand tells which values of a scalar input the model tells apart.
_COMPARISONS = ("Equal", "Greater", "Less", "GreaterOrEqual", "LessOrEqual")


def compared_values(model: ir.Model) -> dict[str, list[int]]:
    """Per scalar integer input, the constants the model compares it with (an ``sr == 16000`` choosing an If
    branch): synthetic data feeds those, the values the model is written for, not a random 0 or 1 that takes
    whichever branch a mismatch takes. The other side of a comparison is not fed: the branch for another value
    may need other input shapes (Silero VAD's 8 kHz branch takes 288 samples, its 16 kHz one 576), which only
    the user knows: --eval data reaches it.
    """
    from onnxopt.graph import DEFAULT_DOMAINS, MOVEMENT_OPS, constant_array

    found: dict[str, list[int]] = {}
    for value in model.graph.inputs:
        if value.const_value is not None or value.name is None or value.dtype is None:
            continue
        if not value.dtype.is_integer() or value.shape is None or len(value.shape) != 0:
            continue
        seen: set[int] = set()
        stack, visited = [value], set()
        while stack:
            current = stack.pop()
            if id(current) in visited:
                continue
            visited.add(id(current))
            for node, index in current.uses():
                if node.domain not in DEFAULT_DOMAINS:
                    continue
                if node.op_type in MOVEMENT_OPS:
                    stack.extend(node.outputs)
                elif node.op_type in _COMPARISONS and len(node.inputs) == 2:
                    other = constant_array(node.inputs[1 - index])
                    if other is not None and other.size == 1 and np.isfinite(other).all():
                        seen.add(int(other.reshape(-1)[0]))
        if seen:
            found[value.name] = sorted(seen, reverse=True)
    return found


def synthetic_dataset(
    specs: Sequence[InputSpec],
    shapes: Mapping[str, tuple[int, ...]] | None = None,
    *,
    samples: int = 8,
    seed: int = 0,
    values: Mapping[str, Sequence[int]] | None = None,
) -> Dataset:
    """Random inputs from shapes (given, or the model's own when fully known): fidelity checks only.

    A scalar input listed in ``values`` (see :func:`compared_values`) takes those values in turn."""
    shapes = dict(shapes or {})
    unknown = [k for k in shapes if k not in {s.name for s in specs}]
    if unknown:
        raise OnnxoptError(f"--shape names {unknown} are not model inputs", f"inputs: {[s.name for s in specs]}")
    rng = np.random.default_rng(seed)
    arrays: dict[str, np.ndarray] = {}
    for spec in specs:
        if spec.name in shapes:
            shape = shapes[spec.name]
        elif spec.dims is not None and all(isinstance(d, int) for d in spec.dims):
            shape = tuple(int(d) for d in spec.dims)  # type: ignore[arg-type]
        elif spec.dims is not None and all(isinstance(d, int) for d in spec.dims[1:]):
            shape = (1, *(int(d) for d in spec.dims[1:]))  # type: ignore[arg-type]
        else:
            raise OnnxoptError(f"input {spec.describe()} has free dimensions",
                               f"give --eval data.npz (or an ONNX test-data folder), or {shape_hint(specs)}")
        batch = spec.fixed_batch or 1
        full = (samples * batch, *shape[1:]) if shape else (samples,)
        nbytes = math.prod(full) * np.dtype(spec.dtype).itemsize
        if nbytes > SYNTHETIC_LIMIT:  # a corrupt or absurd shape must be refused, not allocated
            raise OnnxoptError(f"synthetic inputs for {spec.describe()} would take {nbytes:,} bytes "
                               f"(shape {list(full)}), over the {SYNTHETIC_LIMIT >> 30} GiB limit",
                               "give a smaller --shape, or real data with --eval")
        if values and values.get(spec.name) and not shape:
            cycle = np.asarray(values[spec.name], dtype=np.int64)
            array = cycle[np.arange(samples) % cycle.size].astype(spec.dtype)
        elif np.issubdtype(spec.dtype, np.floating):
            array = rng.standard_normal(full).astype(spec.dtype)
        elif spec.dtype == np.bool_:
            array = rng.integers(0, 2, full).astype(np.bool_)
        else:
            array = rng.integers(0, 2, full).astype(spec.dtype)
        arrays[spec.name] = array
    batch = _batch_size_for(specs, None)
    given_batch = {s[0] for s in shapes.values() if s}
    if given_batch:
        batch = given_batch.pop()
    scalars = {s.name for s in specs if s.dims == () and s.name not in shapes}
    if scalars:
        # a scalar input (an If condition, a Loop trip count) has no batch axis: ready-made feeds, one value each
        # sample i of each other input is its own batch-sized slice (inputs may fix different first dims)
        rows = {s.name: s.fixed_batch or 1 for s in specs if s.name not in scalars}
        feeds = [{**{k: arrays[k][i * n:(i + 1) * n] for k, n in rows.items()},
                  **{k: np.asarray(arrays[k][i]) for k in scalars}} for i in range(samples)]
        fed = [f"{k}={', '.join(map(str, values[k]))}" for k in sorted(scalars) if values and values.get(k)]
        source = "synthetic" + (f" ({'; '.join(fed)}: the values the model compares them with; other branches need "
                                "--eval data)" if fed else "")
        return Dataset(source, {}, feeds, None, True, batch)
    return Dataset("synthetic", arrays, [], None, True, batch)
