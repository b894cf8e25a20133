"""Fuzzing: mutated models are refused with onnxopt's own one-line error (exit 2), or handled; never a crash.

Each example mutates a small valid model (truncated or flipped bytes, dangling
inputs, cycles, wrong dtypes, huge dimensions, duplicate names, unknown
domains and ops, broken subgraphs), runs ``onnxopt apply`` on it in-process
(click's runner, the real command with its error wrapper) and checks: exit 2
with one line starting ``error:`` and no traceback (nor anything ONNX Runtime
prints on the process's stderr), no output file, no temp file, the input
unchanged; or, when the mutation left a valid model (a flipped weight byte),
exit 0 and a valid output. A second property runs every registered pass on
valid models whose weights hold NaN, Inf, 3e38, denormals or one constant:
a valid output or a one-line refusal, never a crash.
``ONNXOPT_FUZZ_EXAMPLES`` sets the number of examples (benchmarks/fuzz.py
runs thousands); ``ONNXOPT_FUZZ_LOG`` names a JSON file the outcome counts
are written to.
"""

from __future__ import annotations

import json
import os
import string
import tempfile
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnx.defs
import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper

from onnxopt.cli import cli
from onnxopt.corpus import corpus_settings
from onnxopt.io import load_model
from onnxopt.plugins import load_registry

from tests.graphs import SUBGRAPH_MODELS, conv_bn_relu, gemm_chain, init
from tests.helpers import run_cli

EXAMPLES = int(os.environ.get("ONNXOPT_FUZZ_EXAMPLES", "50"))
REGISTRY = load_registry()
LOG = os.environ.get("ONNXOPT_FUZZ_LOG")
HUGE = 2**40

BASES: dict[str, Callable[[], onnx.ModelProto]] = {
    "gemm": gemm_chain, "conv": conv_bn_relu, **{name: build for name, build in SUBGRAPH_MODELS.items()},
}


class FuzzCase:
    """A mutated model: what was done to it, its files, and whether it must be refused."""

    def __init__(self, kind: str, detail: str, model: bytes, must_fail: bool = True,
                 extra_files: dict[str, bytes] | None = None, base: str = "", pass_name: str = "fold") -> None:
        self.kind, self.detail, self.model, self.must_fail = kind, detail, model, must_fail
        self.extra_files = extra_files or {}
        self.base, self.pass_name = base, pass_name

    def __repr__(self) -> str:  # what hypothesis prints for a failing example (the bytes would flood it)
        return f"FuzzCase({self.kind!r}, {self.detail!r}, must_fail={self.must_fail}, {len(self.model)} bytes)"


def _copy(proto: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    return out


def _graphs(graph: onnx.GraphProto) -> list[onnx.GraphProto]:
    """The graph and its subgraphs, recursively."""
    found = [graph]
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                found += _graphs(attr.g)
            for sub in attr.graphs:
                found += _graphs(sub)
    return found


def _subgraphs(proto: onnx.ModelProto) -> list[onnx.GraphProto]:
    return _graphs(proto.graph)[1:]


def _extra_output(proto: onnx.ModelProto, source: str) -> None:
    """Make ``source`` feed a new graph output, so it cannot be dropped as dead."""
    proto.graph.node.append(helper.make_node("ReduceSum", [source], [f"{source}_sum"], keepdims=0, name=f"{source}_sum"))
    proto.graph.output.append(helper.make_tensor_value_info(f"{source}_sum", TensorProto.FLOAT, []))


# Each mutation takes hypothesis's `draw` and a copy of a valid base model, and returns the case.

def truncate(draw: st.DrawFn, proto: onnx.ModelProto) -> FuzzCase:
    data = proto.SerializeToString()
    cut = draw(st.integers(0, len(data) - 1))
    # a cut can land on a field boundary and leave a model that still parses and checks
    return FuzzCase("truncated bytes", f"kept {cut} of {len(data)} bytes", data[:cut], must_fail=False)


def flip(draw: st.DrawFn, proto: onnx.ModelProto) -> FuzzCase:
    data = bytearray(proto.SerializeToString())
    spots = draw(st.lists(st.integers(0, len(data) - 1), min_size=1, max_size=8))
    for spot in spots:
        data[spot] ^= draw(st.integers(1, 255))
    # a flip inside weight bytes leaves a valid model with other weights
    return FuzzCase("flipped bytes", f"{len(spots)} byte(s) at {spots[:4]}", bytes(data), must_fail=False)


def dangling(draw: st.DrawFn, proto: onnx.ModelProto) -> FuzzCase:
    graphs = [g for g in _graphs(proto.graph) if any(n.input for n in g.node)]
    graph = draw(st.sampled_from(graphs))
    node = draw(st.sampled_from([n for n in graph.node if n.input]))
    slot = draw(st.integers(0, len(node.input) - 1))
    node.input[slot] = "ghost_value"
    where = "main graph" if graph is proto.graph else f"subgraph {graph.name}"
    return FuzzCase("dangling input", f"{node.name or node.op_type}.input[{slot}] in {where}", proto.SerializeToString())


def cycle(draw: st.DrawFn, proto: onnx.ModelProto) -> FuzzCase:
    graphs = [g for g in _graphs(proto.graph) if any(n.input for n in g.node)]
    graph = draw(st.sampled_from(graphs))
    order = list(graph.node)
    i = draw(st.sampled_from([k for k, n in enumerate(order) if n.input]))
    j = draw(st.integers(i, len(order) - 1))  # j >= i: node i now needs what node j (after it) makes
    order[i].input[0] = order[j].output[0]
    return FuzzCase("cycle", f"node {i} reads node {j}'s output in {graph.name}", proto.SerializeToString())


OTHER_TYPES = [TensorProto.DOUBLE, TensorProto.INT32, TensorProto.INT64, TensorProto.FLOAT16, TensorProto.UINT8,
               TensorProto.BOOL, TensorProto.STRING, TensorProto.INT8]


def wrong_dtype(draw: st.DrawFn, proto: onnx.ModelProto) -> FuzzCase:
    where = draw(st.sampled_from(["input", "output", "initializer"]))
    if where == "initializer":
        target = draw(st.sampled_from(list(proto.graph.initializer)))
        old = target.data_type
        target.data_type = draw(st.sampled_from([t for t in OTHER_TYPES if t != old]))
        new = target.data_type
    else:
        values = proto.graph.input if where == "input" else proto.graph.output
        target = draw(st.sampled_from(list(values)))
        old = target.type.tensor_type.elem_type
        target.type.tensor_type.elem_type = draw(st.sampled_from([t for t in OTHER_TYPES if t != old]))
        new = target.type.tensor_type.elem_type
    return FuzzCase("wrong dtype", f"{where} {target.name}: {TensorProto.DataType.Name(old)} -> "
                    f"{TensorProto.DataType.Name(new)}", proto.SerializeToString())


def huge(draw: st.DrawFn, proto: onnx.ModelProto) -> FuzzCase:
    how = draw(st.sampled_from(["initializer", "constant", "constant_of_shape", "input", "external"]))
    dims = draw(st.sampled_from([[HUGE], [2**20, 2**20], [2**14, 2**13, 2**13], [2**62, 4]]))
    extra: dict[str, bytes] = {}
    if how == "initializer":
        target = draw(st.sampled_from([t for t in proto.graph.initializer if t.data_type == TensorProto.FLOAT]))
        del target.dims[:]
        target.dims.extend(dims)
    elif how == "constant":
        tensor = helper.make_tensor("big", TensorProto.FLOAT, [1], [1.0])
        del tensor.dims[:]
        tensor.dims.extend(dims)
        proto.graph.node.insert(0, helper.make_node("Constant", [], ["big"], value=tensor, name="big"))
        _extra_output(proto, "big")
    elif how == "constant_of_shape":
        proto.graph.initializer.append(init("big_shape", np.array(dims, np.int64)))
        proto.graph.node.insert(0, helper.make_node("ConstantOfShape", ["big_shape"], ["big"],
                                                    value=helper.make_tensor("v", TensorProto.FLOAT, [1], [1.0]), name="big"))
        _extra_output(proto, "big")
    elif how == "input":
        value = draw(st.sampled_from([v for v in proto.graph.input if v.type.tensor_type.shape.dim]))
        dim = draw(st.integers(0, len(value.type.tensor_type.shape.dim) - 1))
        value.type.tensor_type.shape.dim[dim].Clear()
        value.type.tensor_type.shape.dim[dim].dim_value = HUGE
        dims = [f"{value.name} dim {dim}"]  # type: ignore[list-item]
    else:  # weights in a data file far too small for the shape the model declares
        target = draw(st.sampled_from([t for t in proto.graph.initializer if t.data_type == TensorProto.FLOAT]))
        extra["model.data"] = target.raw_data or np.asarray(target.float_data, np.float32).tobytes()
        target.ClearField("raw_data")
        target.ClearField("float_data")
        target.data_location = TensorProto.EXTERNAL
        for key, value in (("location", "model.data"), ("offset", "0"), ("length", str(len(extra["model.data"])))):
            entry = target.external_data.add()
            entry.key, entry.value = key, value
        del target.dims[:]
        target.dims.extend(dims)
    # a huge declared input dim is legal (nobody can feed it; validation cannot run): a valid output is fine
    return FuzzCase("huge dimensions", f"{how} {dims}", proto.SerializeToString(), must_fail=how != "input", extra_files=extra)


def duplicate(draw: st.DrawFn, proto: onnx.ModelProto) -> FuzzCase:
    how = draw(st.sampled_from(["initializer", "input", "node output", "node name", "initializer shadows output"]))
    graph = proto.graph
    if how == "initializer":
        graph.initializer.append(draw(st.sampled_from(list(graph.initializer))))
    elif how == "input":
        graph.input.append(draw(st.sampled_from(list(graph.input))))
    else:
        a, b = draw(st.lists(st.sampled_from(list(graph.node)), min_size=2, max_size=2, unique_by=id))
        if how == "node output":
            b.output[0] = a.output[0]
        elif how == "node name":
            a.name = b.name = "twin"
        else:
            graph.initializer.append(init(a.output[0], np.zeros(2, np.float32)))
    return FuzzCase("duplicate names", how, proto.SerializeToString())


def _identifier(draw: st.DrawFn) -> str:
    name = draw(st.text(string.ascii_letters, min_size=1, max_size=12))
    return name if not onnx.defs.has(name) else f"Zz{name}"


def unknown(draw: st.DrawFn, proto: onnx.ModelProto) -> FuzzCase:
    how = draw(st.sampled_from(["op", "domain imported", "domain not imported", "opset version"]))
    graph = draw(st.sampled_from(_graphs(proto.graph)))
    node = draw(st.sampled_from(list(graph.node)))
    if how == "op":
        node.op_type = _identifier(draw)
    elif how == "opset version":
        proto.opset_import[0].version = draw(st.sampled_from([999, 10**6]))
    else:
        node.domain = f"com.{_identifier(draw).lower()}"
        if how == "domain imported":
            proto.opset_import.append(helper.make_opsetid(node.domain, 1))
    return FuzzCase("unknown domain/op", f"{how}: {node.domain}::{node.op_type}", proto.SerializeToString())


def broken_subgraph(draw: st.DrawFn, proto: onnx.ModelProto) -> FuzzCase:
    sub = draw(st.sampled_from(_subgraphs(proto)))
    how = draw(st.sampled_from(["extra output", "missing output", "extra input", "unknown op", "dangling"]))
    if how == "extra output":
        sub.output.append(helper.make_tensor_value_info(sub.node[0].output[0] + "_x", TensorProto.FLOAT, None))
        sub.node.append(helper.make_node("Identity", [sub.node[0].output[0]], [sub.node[0].output[0] + "_x"]))
    elif how == "missing output":
        del sub.output[-1]
    elif how == "extra input":
        sub.input.append(helper.make_tensor_value_info("surplus", TensorProto.FLOAT, [1]))
    elif how == "unknown op":
        draw(st.sampled_from(list(sub.node))).op_type = _identifier(draw)
    else:
        node = draw(st.sampled_from([n for n in sub.node if n.input]))
        node.input[0] = "ghost_value"
    return FuzzCase("broken subgraph", f"{sub.name}: {how}", proto.SerializeToString())


MUTATIONS: dict[str, Callable[[st.DrawFn, onnx.ModelProto], FuzzCase]] = {
    "truncate": truncate, "flip": flip, "dangling": dangling, "cycle": cycle, "dtype": wrong_dtype,
    "huge": huge, "duplicate": duplicate, "unknown": unknown, "subgraph": broken_subgraph,
}


@st.composite
def cases(draw: st.DrawFn, kinds: tuple[str, ...] = tuple(MUTATIONS)) -> FuzzCase:
    kind = draw(st.sampled_from(kinds))
    bases = [b for b in BASES if kind != "subgraph" or b in SUBGRAPH_MODELS]
    base = draw(st.sampled_from(bases))
    case = MUTATIONS[kind](draw, _copy(BASES[base]()))
    case.detail = f"{base}: {case.detail}"
    return case


def run_case(case: FuzzCase, folder: Path, read_fd_stderr: Callable[[], str]) -> str:
    """Run `onnxopt apply` on the case and check the contract; return the outcome (for the counts)."""
    model = folder / "model.onnx"
    model.write_bytes(case.model)
    for name, data in case.extra_files.items():
        (folder / name).write_bytes(data)
    out = folder / "out.onnx"
    result = CliRunner().invoke(cli, ["apply", str(model), "--pass", "fold", "-o", str(out)], catch_exceptions=False)
    fd_stderr = read_fd_stderr()
    what = f"{case.kind} ({case.detail}): exit {result.exit_code}: {result.output[-600:]}"
    assert model.read_bytes() == case.model, f"input changed: {what}"
    assert "Traceback" not in result.output and not fd_stderr.strip(), f"{what}\nprocess stderr: {fd_stderr[-600:]}"
    leftovers = [p.name for p in folder.iterdir() if p.name.startswith(".out.onnx") or p.name.startswith("out.onnx.")]
    assert not leftovers, f"temp files left: {leftovers}: {what}"
    if result.exit_code == 0 and not case.must_fail:
        onnx.checker.check_model(str(out))
        load_model(out)
        return "accepted: valid output written"
    assert result.exit_code == 2, what
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), what
    assert not out.exists(), what
    return "refused: one-line error, exit 2"


COUNTS: Counter[tuple[str, str]] = Counter()


def _write_log() -> None:
    if not LOG:
        return
    rows = [{"mutation": kind, "outcome": outcome, "examples": n} for (kind, outcome), n in sorted(COUNTS.items())]
    Path(LOG).write_text(json.dumps({"examples": EXAMPLES, "rows": rows}, indent=2))


@pytest.mark.parametrize("base", list(BASES))
def test_unmutated_models_are_accepted(base: str, tmp_path: Path) -> None:
    """The control: every base model goes through, so a refusal below is about the mutation (not, say, a broken plugin)."""
    (tmp_path / "model.onnx").write_bytes(BASES[base]().SerializeToString())
    result = CliRunner().invoke(cli, ["apply", str(tmp_path / "model.onnx"), "--pass", "fold", "-o", str(tmp_path / "out.onnx")],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    onnx.checker.check_model(str(tmp_path / "out.onnx"))


def test_mutated_models_are_refused_cleanly(capfd: pytest.CaptureFixture[str]) -> None:
    def read_fd_stderr() -> str:
        return capfd.readouterr().err

    @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=LOG is None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(cases())
    def check(case: FuzzCase) -> None:
        with tempfile.TemporaryDirectory(prefix="onnxopt-fuzz-") as folder:
            outcome = run_case(case, Path(folder), read_fd_stderr)
        COUNTS[(case.kind, outcome)] += 1

    try:
        check()
    finally:
        _write_log()


# Valid models with hostile weights (NaN, Inf, 1e38, denormals, constant tensors) through every pass.

NASTY_VALUES = [np.nan, np.inf, -np.inf, 3e38, -3e38, 0.0, -0.0, 1e-45, 1e-30]
#: Bases whose inputs stack along axis 0, so a calibration .npz can feed them.
DATA_BASES = {"gemm": (16,), "conv": (3, 6, 6), "loop": (64,), "scan": (64,)}


@st.composite
def nasty_weights(draw: st.DrawFn) -> FuzzCase:
    """A base model with some weights replaced by extreme values, and the pass to run on it."""
    from onnx import numpy_helper

    base = draw(st.sampled_from(list(DATA_BASES)))
    proto = _copy(BASES[base]())
    floats = [t for g in _graphs(proto.graph) for t in g.initializer if t.data_type == TensorProto.FLOAT and t.dims]
    target = draw(st.sampled_from(floats))
    array = numpy_helper.to_array(target).copy()
    how = draw(st.sampled_from(["spots", "all one value", "all zero"]))
    if how == "spots":
        for _ in range(draw(st.integers(1, 4))):
            array.flat[draw(st.integers(0, array.size - 1))] = draw(st.sampled_from(NASTY_VALUES))
    else:
        array[...] = 0.0 if how == "all zero" else draw(st.sampled_from(NASTY_VALUES))
    target.CopyFrom(numpy_helper.from_array(array.astype(np.float32), target.name))
    pass_name = draw(st.sampled_from(sorted(REGISTRY.passes)))
    return FuzzCase("hostile weights", f"{pass_name} on {base}, {target.name}: {how}", proto.SerializeToString(),
                    must_fail=False, base=base, pass_name=pass_name)


def test_every_pass_survives_hostile_weights(capfd: pytest.CaptureFixture[str]) -> None:
    """A pass on weights full of NaN/Inf/extremes either works (valid output) or refuses in one line; it never crashes."""

    @settings(max_examples=max(EXAMPLES // 2, 20), deadline=None, database=None, derandomize=LOG is None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(nasty_weights())
    def check(case: FuzzCase) -> None:
        base, data, pass_name = case.base, case.model, case.pass_name
        with tempfile.TemporaryDirectory(prefix="onnxopt-fuzz-") as name:
            folder = Path(name)
            model, out = folder / "model.onnx", folder / "out.onnx"
            model.write_bytes(data)
            rng = np.random.default_rng(0)
            np.savez(folder / "calib.npz", x=rng.standard_normal((8, *DATA_BASES[base])).astype(np.float32))
            settings_args = [a for k, v in corpus_settings(pass_name, model).items() for a in ("--set", f"{pass_name}.{k}={v}")]
            result = CliRunner().invoke(cli, ["apply", str(model), "--pass", pass_name, "--data", str(folder / "calib.npz"),
                                              *settings_args, "-o", str(out)], catch_exceptions=False)
            what = f"{case.detail}: exit {result.exit_code}: {result.output[-600:]}"
            assert "Traceback" not in result.output and not capfd.readouterr().err.strip(), what
            assert model.read_bytes() == data, what
            assert result.exit_code in (0, 2), what
            if result.exit_code == 2:
                lines = [line for line in result.output.splitlines() if line.strip()]
                assert len(lines) == 1 and lines[0].startswith("error: ") and not out.exists(), what
                COUNTS[(f"hostile weights, {pass_name}", "refused: one-line error, exit 2")] += 1
            else:
                onnx.checker.check_model(str(out))
                load_model(out)
                COUNTS[(f"hostile weights, {pass_name}", "accepted: valid output written")] += 1

    try:
        check()
    finally:
        _write_log()


# What fuzzing found, kept as fixed examples (each crashed or printed a traceback before its fix).

def _non_utf8_name(p: onnx.ModelProto) -> bytes:
    data = bytearray(p.SerializeToString())
    data[data.index(b"relu0")] = 0xE2  # protobuf hands the name over as bytes, not str
    return bytes(data)


def _raw_data_too_long(p: onnx.ModelProto) -> bytes:
    p.graph.initializer[0].data_type = TensorProto.FLOAT16  # the same bytes now hold twice the elements
    return p.SerializeToString()


def _wrong_dtype_initializer(p: onnx.ModelProto) -> bytes:
    p.graph.initializer[0].CopyFrom(init("w0", np.zeros((32, 16), np.int64)))  # shape inference fails loudly
    return p.SerializeToString()


def _huge_constant_of_shape(p: onnx.ModelProto) -> bytes:
    p.graph.initializer.append(init("big_shape", np.array([2**20, 2**20], np.int64)))
    p.graph.node.insert(0, helper.make_node("ConstantOfShape", ["big_shape"], ["big"]))
    _extra_output(p, "big")
    return p.SerializeToString()


REGRESSIONS: dict[str, Callable[[onnx.ModelProto], bytes]] = {
    "name not UTF-8": _non_utf8_name,
    "raw data longer than the shape": _raw_data_too_long,
    "initializer of the wrong dtype": _wrong_dtype_initializer,
    "ConstantOfShape of 2^40 elements": _huge_constant_of_shape,
    "no graph outputs": lambda p: (p.graph.ClearField("output"), p.SerializeToString())[-1],
}


@pytest.mark.parametrize("name", list(REGRESSIONS))
def test_fuzz_findings_stay_fixed(name: str, tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    case = FuzzCase(name, "regression", REGRESSIONS[name](gemm_chain()))
    assert run_case(case, tmp_path, lambda: capfd.readouterr().err) == "refused: one-line error, exit 2"


def test_fuzz_finding_external_data_shorter_than_its_shape(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    proto = gemm_chain()
    onnx.save_model(proto, str(tmp_path / "model.onnx"), save_as_external_data=True, location="model.data", size_threshold=0)
    stored = onnx.load(str(tmp_path / "model.onnx"), load_external_data=False)
    stored.graph.initializer[0].dims[0] *= 4  # the IR would map 4x the bytes the file holds for it
    case = FuzzCase("external data", "regression", stored.SerializeToString(),
                    extra_files={"model.data": (tmp_path / "model.data").read_bytes()})
    assert run_case(case, tmp_path, lambda: capfd.readouterr().err) == "refused: one-line error, exit 2"


# A few fixed examples through a real process, what a user's terminal shows: the ones ONNX Runtime's own
# C++ logging could reach (it writes to the process's stderr, which the in-process runner cannot see).
SUBPROCESS_CASES = {
    "huge constant_of_shape": lambda p: (p.graph.initializer.append(init("big_shape", np.array([2**20, 2**20], np.int64))),
                                         p.graph.node.insert(0, helper.make_node("ConstantOfShape", ["big_shape"], ["big"])),
                                         _extra_output(p, "big"), p),
    "wrong dtype": lambda p: (p.graph.initializer[0].CopyFrom(init("w0", np.zeros((32, 16), np.int64))), p),
    "unknown domain": lambda p: (setattr(p.graph.node[1], "domain", "com.nowhere"),
                                 p.opset_import.append(helper.make_opsetid("com.nowhere", 1)), p),
}


@pytest.mark.parametrize("name", list(SUBPROCESS_CASES))
def test_subprocess_shows_one_line(name: str, tmp_path: Path) -> None:
    proto = SUBPROCESS_CASES[name](gemm_chain())[-1]
    model = tmp_path / "model.onnx"
    model.write_bytes(proto.SerializeToString())
    proc = run_cli("apply", model, "--pass", "fold", "-o", tmp_path / "out.onnx")
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert not proc.stdout.strip()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]
