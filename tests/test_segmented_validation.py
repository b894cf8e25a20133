"""Large models are validated a segment at a time; forced here on the digits models with ONNXOPT_SEGMENT_MIN_BYTES.

What must hold: the segmented path computes the outputs a whole-model ORT session computes (bit for bit on
MatMul/Gemm models, packed cluster decodes included, and within float rounding on the conv net, where ORT's
fusions at a boundary differ), so apply's figures are the normal path's; a packed decode is folded beside its
consumer, never carried across a boundary; the quant kernel check read a segment at a time counts the kernels
a whole-model session has; and an output ORT inflates at load is warned about.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest

from onnxopt import activations
from onnxopt.activations import held_bytes, model_segments
from onnxopt.api import apply, load_data
from onnxopt.errors import OnnxoptError
from onnxopt.io import load_model
from onnxopt.sessions import SessionFactory
from onnxopt.timing import TimingConfig
from onnxopt.validate import collect_outputs, outputs_by_segments, segmented_validation
from onnxopt_passes.quant.kernels import _may_cross, ort_kernels

DIGITS = Path(__file__).resolve().parents[1] / "examples" / "digits"
QUICK = TimingConfig(repeat=3, time_budget=0.5, warmup=1)


@pytest.fixture
def forced(monkeypatch):
    """Every model is "large": the segmented paths run."""
    monkeypatch.setenv("ONNXOPT_SEGMENT_MIN_BYTES", "1")


def _clustered(name: str, tmp_path: Path) -> Path:
    out = tmp_path / f"{name}_cluster.onnx"
    apply(DIGITS / f"{name}.onnx", "cluster", out, validate_result=False)  # k=16 packed: an in-graph decode
    return out


def _model(name: str, tmp_path: Path) -> Path:
    base, _, kind = name.partition("+")
    return _clustered(base, tmp_path) if kind == "cluster" else DIGITS / f"{base}.onnx"


@pytest.mark.parametrize("name", ["mlp", "transformer", "mlp+cluster", "transformer+cluster", "cnn", "cnn+cluster"])
def test_segmented_outputs_equal_a_whole_session(name, tmp_path, forced) -> None:
    model = load_model(_model(name, tmp_path))
    data = load_data(model, DIGITS / "eval.npz")
    out = [str(model.graph.outputs[0].name)]
    whole = collect_outputs(SessionFactory().create(model), data, out)[out[0]]
    got, times, parts = outputs_by_segments(model, out, data, SessionFactory(), feed=next(data.batches()),
                                            timing=QUICK)
    assert parts >= 2 and times is not None and len(times) >= QUICK.repeat and np.all(times > 0)
    if name.startswith("cnn"):
        # ORT's NCHWc convolutions fuse differently at a segment boundary: float rounding, not a different model
        np.testing.assert_allclose(got[out[0]], whole, rtol=0, atol=1e-5)
        assert np.array_equal(got[out[0]].argmax(1), whole.argmax(1))
    else:
        assert np.array_equal(got[out[0]], whole)


def test_a_packed_decode_goes_with_its_consumer(tmp_path, forced) -> None:
    model = load_model(_clustered("transformer", tmp_path))
    stored, folded = held_bytes(model)
    assert folded > stored > 0  # ORT decodes the packed indices back to floats when it loads the model
    segments = model_segments(model)
    assert segments is not None and len(segments) >= 2
    nodes = list(model.graph)
    constant = activations._constant_nodes(model.graph, nodes)
    made_by_constant = {out.name for i, node in enumerate(nodes) if constant[i] for out in node.outputs}
    for read in activations._reads(model, segments):
        assert not made_by_constant & set(read)  # no decoded weight crosses a boundary
    decoders = [i for i, node in enumerate(nodes) if node.op_type == "BitShift"]
    assert decoders and all(any(i in segment for segment in segments) for i in decoders)


def test_the_forced_large_path_gives_the_normal_figures(tmp_path, monkeypatch) -> None:
    kwargs = dict(settings={"cluster": {"k": 8}}, eval_data=DIGITS / "eval.npz", timing=QUICK)
    normal = apply(DIGITS / "cnn.onnx", "cluster", tmp_path / "a.onnx", **kwargs)
    monkeypatch.setenv("ONNXOPT_SEGMENT_MIN_BYTES", "1")
    assert segmented_validation(load_model(DIGITS / "cnn.onnx"))
    large = apply(DIGITS / "cnn.onnx", "cluster", tmp_path / "b.onnx", **kwargs)
    a, b = normal.validation, large.validation
    assert a is not None and b is not None and normal.written and large.written
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()
    assert b.drop == pytest.approx(a.drop, abs=1e-6) and b.accuracy == a.accuracy
    assert a.drop_basis == b.drop_basis
    for name, row in a.outputs.items():
        assert b.outputs[name] == pytest.approx(row, rel=1e-5, abs=1e-6)
    for field in ("size_bytes", "parameters", "weight_bytes", "macs"):
        assert getattr(b.candidate, field) == getattr(a.candidate, field)
        assert getattr(b.reference, field) == getattr(a.reference, field)
    assert a.latency is not None and a.latency.paired
    assert b.latency is not None and not b.latency.paired and b.candidate.latency_ms > 0
    assert any("a segment at a time" in w for w in b.latency.warnings)


def test_a_bad_threshold_is_one_clear_error(monkeypatch) -> None:
    monkeypatch.setenv("ONNXOPT_SEGMENT_MIN_BYTES", "lots")
    with pytest.raises(OnnxoptError, match="ONNXOPT_SEGMENT_MIN_BYTES"):
        activations.segment_min_bytes()


@pytest.mark.parametrize("name", ["cnn", "mlp", "transformer"])
# speed_fallback off: the test is about counting integer kernels, which the speed guard's float-compute build (a
# timing-dependent choice) would take away
@pytest.mark.parametrize("setting", [{"mode": "static", "speed_fallback": "off"}, {"mode": "dynamic"}, {"weight_bits": 4}],
                         ids=["static", "dynamic", "int4"])
def test_the_segmented_kernel_check_counts_the_whole_models_kernels(name, setting, tmp_path, monkeypatch) -> None:
    out = tmp_path / "q.onnx"
    apply(DIGITS / f"{name}.onnx", "quant", out, data=DIGITS / "calib.npz", validate_result=False,
          settings={"quant": setting})
    model = load_model(out)
    whole = ort_kernels(model, SessionFactory())
    assert sum(whole["integer"].values()) > 0
    monkeypatch.setenv("ONNXOPT_SEGMENT_MIN_BYTES", "1")
    segments = model_segments(model, budget=1, crosses=_may_cross)
    # where no cut leaves every fused group whole (the static cnn and mlp: Q/DQ or Relu on every edge), no check
    assert (segments is None) == (name != "transformer" and setting.get("mode") == "static")
    assert ort_kernels(model, SessionFactory()) == (None if segments is None else whole)


def test_the_kernel_check_of_a_large_model_it_cannot_cut_is_skipped_and_said(tmp_path, monkeypatch) -> None:
    """One session over a large int8 model beside the pass's copy of its weights was the chain's peak: a model past
    the segment size with no clean cut is not checked, and the report says so instead of giving counts."""
    settings = {"quant": {"mode": "static", "speed_fallback": "off"}}
    small = apply(DIGITS / "mlp.onnx", "quant", tmp_path / "a.onnx", data=DIGITS / "calib.npz",
                  validate_result=False, settings=settings)
    assert sum(small.passes[0].figures["ort_integer_kernels"].values()) > 0
    monkeypatch.setenv("ONNXOPT_SEGMENT_MIN_BYTES", "1")
    large = apply(DIGITS / "mlp.onnx", "quant", tmp_path / "b.onnx", data=DIGITS / "calib.npz",
                  validate_result=False, settings=settings)
    assert "ort_integer_kernels" not in large.passes[0].figures
    assert any("ORT kernel check skipped" in n for n in large.passes[0].notes)
    assert load_model(tmp_path / "b.onnx").graph.num_nodes() == load_model(tmp_path / "a.onnx").graph.num_nodes()


def test_an_output_ort_inflates_at_load_is_warned_about(tmp_path, monkeypatch) -> None:
    import onnxopt.api as api

    monkeypatch.setattr(api, "FOLD_WARNING_BYTES", 0)  # the digits models are far below the real threshold
    clustered = apply(DIGITS / "cnn.onnx", "cluster", tmp_path / "c.onnx", validate_result=False)
    assert any("disabled_optimizers=['ConstantFolding']" in w for w in clustered.warnings)
    quantized = apply(DIGITS / "cnn.onnx", "quant", tmp_path / "q.onnx", data=DIGITS / "calib.npz",
                      validate_result=False)
    assert not any("ConstantFolding" in w for w in quantized.warnings)


@pytest.mark.parametrize("kind", ["cnn", "transformer+cluster", "transformer+int4", "if"])
def test_serialized_size_is_the_protobufs_length(kind, tmp_path) -> None:
    """The ledger's size of an in-memory model, counted a tensor at a time (no whole-model protobuf copy)."""
    from onnxopt.io import serialize_model, serialized_size

    from tests.graphs import if_model
    from tests.helpers import to_ir

    if kind == "if":
        model = to_ir(if_model())
    elif kind == "transformer+int4":
        apply(DIGITS / "transformer.onnx", "quant", tmp_path / "q.onnx", validate_result=False,
              settings={"quant": {"weight_bits": 4}})
        model = load_model(tmp_path / "q.onnx")
    else:
        model = load_model(_model(kind, tmp_path))
    for value in model.graph.initializers.values():  # in memory, as a pass leaves them
        tensor = value.const_value
        if tensor is not None:
            value.const_value = ir.Tensor(tensor.numpy(), dtype=tensor.dtype, name=tensor.name)
    expected = len(serialize_model(model))
    assert serialized_size(model, min_bytes=0) == expected
    assert serialized_size(model, min_bytes=256) == expected
    assert len(serialize_model(model)) == expected  # the stand-ins were put back


def test_each_segment_holds_only_the_weights_its_nodes_read(tmp_path) -> None:
    """A segment's session is handed its model's in-memory weights: one that kept the whole model's (nodes removed
    unsafely still counted as their readers) gave every segment's session all of them to copy."""
    out = tmp_path / "l.onnx"
    apply(DIGITS / "mlp.onnx", "lowrank", out, settings={"lowrank": {"ratio": 0.5}}, validate_result=False)
    model = load_model(out)
    segments = model_segments(model, budget=1)
    assert segments is not None and len(segments) > 2
    total = 0
    for part in activations.segment_models(model, segments):
        read = {v.name for node in part.graph for v in node.inputs if v is not None}
        assert set(part.graph.initializers) <= read, sorted(set(part.graph.initializers) - read)
        total += len(part.graph.initializers)
    assert total >= len(model.graph.initializers)  # and none is missing (a weight read by two segments counts twice)
