"""quant: numerics against numpy, placement against ONNX Runtime's optimized graph, modes, exclusions, subgraphs, bad input."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from onnxopt import OnnxoptError, PassContext
from onnxopt.config import build_config
from onnxopt.data import Dataset
from onnxopt.io import serialize_model
from onnxopt.sessions import SessionFactory
from onnxopt_passes.quant import QuantConfig, QuantPass
from onnxopt_passes.quant.calibration import Histogram, RangeStats, range_from_histogram

from tests.graphs import gemm_chain, init, make_model
from tests.helpers import run_model, to_ir

RNG = np.random.default_rng(0)


def _config(**kw: object) -> QuantConfig:
    # placement is under test here: int8 compute stays even where the speed guard would find these tiny graphs
    # faster in float on int8-stored weights (that fallback is tested in test_quant_float_compute)
    kw.setdefault("speed_fallback", "off")
    return build_config(QuantConfig, kw, pass_name="quant")


def _quant(proto: onnx.ModelProto, data: dict[str, np.ndarray] | None, **kw: object):
    ctx = PassContext(calibration=Dataset("test", data, batch_size=8) if data is not None else None)
    return QuantPass().apply(to_ir(proto), _config(**kw), ctx)


def _optimized_ops(model) -> list[str]:
    """Op types of the graph ONNX Runtime really runs (its optimized model file)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "opt.onnx"
        SessionFactory().create(model, optimized_model_path=path)
        return [n.op_type for n in onnx.load(str(path)).graph.node]


def _initializers(model) -> dict[str, np.ndarray]:
    proto = onnx.ModelProto()
    proto.ParseFromString(serialize_model(model))
    return {t.name: onnx.numpy_helper.to_array(t) for t in proto.graph.initializer}, proto


def conv_relu(cin: int = 3, cout: int = 4) -> onnx.ModelProto:
    w = RNG.standard_normal((cout, cin, 3, 3)).astype(np.float32) * np.linspace(0.2, 2.0, cout, dtype=np.float32)[:, None, None, None]
    b = RNG.standard_normal(cout).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1], name="conv"),
             helper.make_node("Relu", ["c"], ["y"], name="relu")]
    return make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", cin, 6, 6])],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", cout, 6, 6])], [init("w", w), init("b", b)])


def matmul_model(k: int = 64, n: int = 16) -> onnx.ModelProto:
    w = (RNG.standard_normal((k, n)) / np.sqrt(k)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")]
    return make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", k])],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", n])], [init("w", w)])


# ------------------------------------------------------------------------------------------ numerics


def test_conv_relu_scales_match_numpy_and_fuse_to_qlinearconv() -> None:
    proto = conv_relu()
    x = RNG.uniform(-1.5, 2.5, (16, 3, 6, 6)).astype(np.float32)
    # the output conv quantized too, with the plain symmetric weight scales (no saturation widening): its scales are checked
    result = _quant(proto, {"x": x}, keep_outputs_float=False, saturation="off")
    inits, qproto = _initializers(result.model)
    # input: uint8 asymmetric over [min, max] widened to 0
    lo, hi = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
    scale = np.float32((hi - lo) / 255)
    np.testing.assert_allclose(inits["x_scale"], scale, rtol=1e-6)
    assert inits["x_zero_point"] == np.uint8(np.round(-lo / scale)) and inits["x_zero_point"].dtype == np.uint8
    # output taken after the Relu: [0, max(relu)] from the float model
    (y,) = run_model(proto, {"x": x})
    np.testing.assert_allclose(inits["y_scale"] if "y_scale" in inits else next(v for k, v in inits.items() if k.startswith("y") and k.endswith("_scale")),
                               np.float32(y.max() / 255), rtol=1e-5)
    # weights: symmetric int8 per output channel, absmax / 127; bias int32 at input scale x weight scale
    w = onnx.numpy_helper.to_array(next(t for t in proto.graph.initializer if t.name == "w"))
    b = onnx.numpy_helper.to_array(next(t for t in proto.graph.initializer if t.name == "b"))
    w_scale = np.abs(w).reshape(4, -1).max(1) / 127
    np.testing.assert_allclose(inits["w_scale"], w_scale, rtol=1e-6)
    np.testing.assert_array_equal(inits["w_quantized"], np.clip(np.rint(w / w_scale[:, None, None, None]), -128, 127).astype(np.int8))
    np.testing.assert_array_equal(inits["b_quantized"], np.rint(b / (scale * w_scale.astype(np.float32))).astype(np.int32))
    # ONNX Runtime runs it as one integer kernel with the Relu folded in
    ops = _optimized_ops(result.model)
    assert "QLinearConv" in ops and "Conv" not in ops and "Relu" not in ops
    assert result.report.figures["ort_kernel_types"].get("QLinearConv") == 1
    # the plain scales can saturate int16 weight pairs on a CPU without VNNI (quant.saturation): the accuracy is
    # checked on the default, pair-safe model, which must hold on every CPU
    (q,) = run_model(_quant(proto, {"x": x}, keep_outputs_float=False).model, {"x": x})
    assert np.abs(q - y).max() < 0.05 * y.max()


def test_streaming_histogram_grows_and_keeps_every_count() -> None:
    values = [RNG.normal(0, s, 5000).astype(np.float32) for s in (0.1, 1.0, 10.0)]  # the range grows twice
    stats = RangeStats(histogram=Histogram(512))
    for v in values:
        stats.add(v)
    everything = np.concatenate(values)
    h = stats.histogram
    assert h is not None and h.counts.sum() == everything.size
    assert stats.lo == everything.min() and stats.hi == everything.max()
    edges = h.edges()
    assert edges[0] <= everything.min() and edges[-1] >= everything.max()
    lo, hi = range_from_histogram(stats, "percentile", percentile=99.0)
    np.testing.assert_allclose([lo, hi], np.percentile(everything, [0.5, 99.5]), atol=2 * h.width)


@pytest.mark.parametrize("method", ["percentile", "entropy"])
def test_histogram_methods_clip_outliers(method: str) -> None:
    stats = RangeStats(histogram=Histogram(2048))
    data = np.concatenate([RNG.normal(0, 1, 20000), [60.0, -55.0]]).astype(np.float32)
    stats.add(data)
    lo, hi = range_from_histogram(stats, method, percentile=99.99)
    assert stats.lo <= lo < 0 < hi <= stats.hi
    assert hi < 30 and lo > -30, (lo, hi)  # the two outliers do not set the scale
    assert hi > 2.5 and lo < -2.5  # the bulk is kept


def test_mse_range_has_least_squared_error() -> None:
    """The mse range beats minmax and a 99% clip on the squared error of quantizing the data itself."""
    data = RNG.standard_t(3, 50000).astype(np.float32)
    stats = RangeStats(histogram=Histogram(2048))
    stats.add(data)

    def sq_error(lo: float, hi: float) -> float:
        scale = (hi - lo) / 255
        q = np.clip(np.rint((data - lo) / scale), 0, 255) * scale + lo
        return float(np.sum((q - data) ** 2))

    chosen = sq_error(*range_from_histogram(stats, "mse"))
    assert chosen <= sq_error(stats.lo, stats.hi)
    assert chosen <= sq_error(*np.percentile(data, [0.5, 99.5]))


# ------------------------------------------------------------------------------------------ modes


def test_dynamic_matmul_fuses_and_stays_close() -> None:
    proto = matmul_model()
    result = _quant(proto, None, mode="dynamic")
    ops = _optimized_ops(result.model)
    assert "DynamicQuantizeMatMul" in ops or "MatMulIntegerToFloat" in ops
    assert "MatMul" not in ops
    x = RNG.standard_normal((32, 64)).astype(np.float32)
    (y,) = run_model(proto, {"x": x})
    (q,) = run_model(result.model, {"x": x})
    assert np.linalg.norm(q - y) / np.linalg.norm(y) < 0.02


def test_dynamic_leaves_conv_float_with_reason() -> None:
    result = _quant(conv_relu(), None, mode="dynamic")
    assert result.modified is False and "nothing to quantize dynamically" in result.report.summary


def test_int4_blockwise_matches_numpy() -> None:
    proto = matmul_model(k=72, n=8)  # 72 rows: the last block of 16 is partial
    result = _quant(proto, None, weight_bits=4, block_size=16)
    inits, qproto = _initializers(result.model)
    assert qproto.opset_import[0].version >= 21
    w = onnx.numpy_helper.to_array(proto.graph.initializer[0])
    padded = np.zeros((80, 8), np.float32)
    padded[:72] = w
    scale = np.abs(padded.reshape(5, 16, 8)).max(1) / 7
    q_ref = np.clip(np.rint(w / np.repeat(scale, 16, 0)[:72]), -8, 7)
    q = next(v for k, v in inits.items() if k.endswith("weight_int4"))
    s = next(v for k, v in inits.items() if k.endswith("weight_scale"))
    np.testing.assert_allclose(s, scale, rtol=1e-6)
    np.testing.assert_array_equal(q.astype(np.int8), q_ref.astype(np.int8))
    x = RNG.standard_normal((4, 72)).astype(np.float32)
    # the graph's own semantics (no fusion): x @ dequantized weight, exactly
    plain = SessionFactory(optimization=ort.GraphOptimizationLevel.ORT_DISABLE_ALL).create(result.model)
    np.testing.assert_allclose(plain.run(None, {"x": x})[0], x @ (q_ref * np.repeat(scale, 16, 0)[:72]), rtol=1e-5, atol=1e-5)
    # what ORT runs: MatMulNBits (it also quantizes the activations to int8 by default: close, not equal)
    assert "MatMulNBits" in _optimized_ops(result.model)
    (got,) = run_model(result.model, {"x": x})
    (ref,) = run_model(proto, {"x": x})
    assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < 0.2


# ------------------------------------------------------------------------------------------ exclusions


def test_exclusions_by_op_name_and_first_last() -> None:
    proto = gemm_chain((16, 32, 32, 8))
    x = RNG.standard_normal((32, 16)).astype(np.float32)
    quantized = lambda r: r.report.figures["quantized_nodes"].get("Gemm", 0)  # noqa: E731
    assert quantized(_quant(proto, {"x": x})) == 3
    assert _quant(proto, {"x": x}, exclude_ops="Gemm").report.summary.startswith("skipped: nothing to quantize")
    by_name = _quant(proto, {"x": x}, exclude_nodes="gemm1*")
    assert quantized(by_name) == 2 and any("exclude_nodes" in s.reason for s in by_name.report.skipped)
    first_last = _quant(proto, {"x": x}, keep_first_last=True)
    assert quantized(first_last) == 1 and {s.target for s in first_last.report.skipped} == {"Gemm gemm0", "Gemm gemm2"}


def test_index_arithmetic_stays_exact() -> None:
    """A MatMul whose result becomes Gather indices stays float; the data MatMul is quantized."""
    w1 = RNG.standard_normal((8, 4)).astype(np.float32)
    w2 = RNG.standard_normal((8, 6)).astype(np.float32)
    table = RNG.standard_normal((10, 6)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["a"], name="index_mm"),
             helper.make_node("Abs", ["a"], ["aa"]), helper.make_node("Cast", ["aa"], ["ai"], to=TensorProto.INT64),
             helper.make_node("Clip", ["ai", "zero", "nine"], ["idx"]),
             helper.make_node("Gather", ["table", "idx"], ["g"], axis=0),
             helper.make_node("MatMul", ["x", "w2"], ["d"], name="data_mm"),
             helper.make_node("ReduceSum", ["g", "axes"], ["gs"], keepdims=0),
             helper.make_node("Add", ["d", "gs"], ["y"])]
    inits = [init("w1", w1), init("w2", w2), init("table", table), init("zero", np.array(0, np.int64)),
             init("nine", np.array(9, np.int64)), init("axes", np.array([1], np.int64))]
    proto = make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 6])], inits)
    result = _quant(proto, {"x": RNG.standard_normal((16, 8)).astype(np.float32)})
    reasons = {s.target: s.reason for s in result.report.skipped}
    assert "index or shape used by Gather" in reasons["MatMul index_mm"]
    assert [i["node"] for i in result.report.items if i["op"] == "MatMul"] == ["data_mm"]
    x = RNG.standard_normal((4, 8)).astype(np.float32)
    # the gathered rows are the float model's: only the data MatMul moved
    (ref,) = run_model(proto, {"x": x})
    (got,) = run_model(result.model, {"x": x})
    assert np.abs(got - ref).max() < 0.1


def test_dsp_front_end_stays_float() -> None:
    """STFT as a strided Conv and a mel filterbank on a raw signal stay float; the learned conv after Log is quantized."""
    stft = RNG.standard_normal((16, 1, 256)).astype(np.float32)
    mel = np.abs(RNG.standard_normal((8, 16, 1))).astype(np.float32)
    learned = RNG.standard_normal((4, 8, 3)).astype(np.float32)
    nodes = [helper.make_node("Unsqueeze", ["audio", "one"], ["a3"]),
             helper.make_node("Conv", ["a3", "stft"], ["spec"], strides=[128], name="stft_conv"),
             helper.make_node("Mul", ["spec", "spec"], ["power"]),
             helper.make_node("Conv", ["power", "mel"], ["melspec"], name="mel_conv"),
             helper.make_node("Add", ["melspec", "eps"], ["m1"]), helper.make_node("Log", ["m1"], ["logmel"]),
             helper.make_node("Conv", ["logmel", "learned"], ["h"], pads=[1, 1], name="learned_conv"),
             helper.make_node("Relu", ["h"], ["y"])]
    inits = [init("one", np.array([1], np.int64)), init("stft", stft), init("mel", mel), init("learned", learned),
             init("eps", np.array(1e-3, np.float32))]
    proto = make_model(nodes, [helper.make_tensor_value_info("audio", TensorProto.FLOAT, ["N", "samples"])],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, "frames"])], inits)
    result = _quant(proto, {"audio": RNG.standard_normal((4, 4096)).astype(np.float32)}, keep_outputs_float=False)
    reasons = {s.target: s.reason for s in result.report.skipped}
    assert "DSP front end" in reasons["Conv stft_conv"] and "DSP front end" in reasons["Conv mel_conv"]
    assert [i["node"] for i in result.report.items if i["op"] == "Conv"] == ["learned_conv"]


# ------------------------------------------------------------------------------------------ subgraphs


def test_if_branches_are_quantized() -> None:
    """Both branches of an If hold a MatMul; calibration reaches both through exposed branch outputs."""
    def branch(name: str, w: np.ndarray) -> onnx.GraphProto:
        return helper.make_graph([helper.make_node("MatMul", ["x", f"{name}_w"], [f"{name}_mm"], name=f"{name}_matmul"),
                                  helper.make_node("Relu", [f"{name}_mm"], [f"{name}_out"])], name, [],
                                 [helper.make_tensor_value_info(f"{name}_out", TensorProto.FLOAT, [1, 8])], [init(f"{name}_w", w)])
    w_then, w_else = (RNG.standard_normal((16, 8)).astype(np.float32) for _ in range(2))
    nodes = [helper.make_node("ReduceMean", ["x"], ["m"], keepdims=0),
             helper.make_node("Greater", ["m", "zero"], ["cond"]),
             helper.make_node("If", ["cond"], ["y"], then_branch=branch("then", w_then), else_branch=branch("else", w_else))]
    proto = make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16])],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8])], [init("zero", np.array(0, np.float32))])
    samples = RNG.standard_normal((32, 1, 16)).astype(np.float32) + np.where(np.arange(32) % 2, 0.5, -0.5)[:, None, None].astype(np.float32)
    ctx = PassContext(calibration=Dataset("test", {"x": samples.reshape(32, 16)}, batch_size=1))
    result = QuantPass().apply(to_ir(proto), _config(), ctx)
    assert sorted(i["node"] for i in result.report.items if i["op"] == "MatMul") == ["else_matmul", "then_matmul"]
    proto_q = onnx.ModelProto()
    proto_q.ParseFromString(serialize_model(result.model))
    onnx.checker.check_model(proto_q, full_check=True)
    for attr in proto_q.graph.node[-1].attribute:
        assert {"QuantizeLinear", "DequantizeLinear", "MatMul"} <= {n.op_type for n in attr.g.node}
    for sample in samples[:4]:
        (ref,) = run_model(proto, {"x": sample})
        (got,) = run_model(result.model, {"x": sample})
        assert np.abs(got - ref).max() < 0.05 * max(np.abs(ref).max(), 1.0)


# ------------------------------------------------------------------------------------------ bad input


def test_static_without_calibration_data_is_a_clear_error() -> None:
    with pytest.raises(OnnxoptError, match="--data"):
        _quant(conv_relu(), None)


def test_wrong_shape_calibration_data_is_a_clear_error() -> None:
    with pytest.raises(OnnxoptError, match="ONNX Runtime failed while running the model"):
        _quant(conv_relu(), {"x": RNG.standard_normal((4, 5, 6, 6)).astype(np.float32)}, keep_outputs_float=False)


def test_nothing_to_quantize_is_reported_not_failed() -> None:
    nodes = [helper.make_node("Relu", ["x"], ["h"]), helper.make_node("MatMul", ["h", "x2"], ["y"], name="act_mm")]
    proto = make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4]),
                               helper.make_tensor_value_info("x2", TensorProto.FLOAT, [4, 4])],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])])
    data = {"x": RNG.standard_normal((4, 4)).astype(np.float32), "x2": RNG.standard_normal((4, 4)).astype(np.float32)}
    # MatMul of two activations is quantizable; excluding it leaves nothing
    result = _quant(proto, data, exclude_ops="MatMul")
    assert result.modified is False and result.report.summary.startswith("skipped: nothing to quantize")


def test_config_rejects_bad_values() -> None:
    with pytest.raises(OnnxoptError, match="block_size"):
        _config(block_size=24)
    with pytest.raises(OnnxoptError, match="method"):
        _config(method="kl")



def test_per_tensor_weights_have_one_scale() -> None:
    proto = conv_relu()
    x = RNG.uniform(-1, 1, (16, 3, 6, 6)).astype(np.float32)
    result = _quant(proto, {"x": x}, per_channel=False, keep_outputs_float=False, saturation="off")
    inits, _ = _initializers(result.model)
    w = onnx.numpy_helper.to_array(next(t for t in proto.graph.initializer if t.name == "w"))
    assert inits["w_scale"].shape == () and np.isclose(inits["w_scale"], np.abs(w).max() / 127)
    (y,) = run_model(proto, {"x": x})
    # the plain scale can saturate int16 weight pairs on a CPU without VNNI: accuracy on the default, pair-safe model
    (q,) = run_model(_quant(proto, {"x": x}, per_channel=False, keep_outputs_float=False).model, {"x": x})
    assert np.abs(q - y).max() < 0.1 * y.max()


def test_float_bias_outputs_keeps_projection_outputs_that_reach_only_float_readers_float() -> None:
    """MatMul -> Add(bias) -> Tanh (no integer kernel): with float_bias_outputs the Add stays float and the
    MatMul's output is not quantized; the same Add before another MatMul still joins. Off by default."""
    rng = np.random.default_rng(7)
    w1, w2 = rng.standard_normal((16, 16)).astype(np.float32), rng.standard_normal((16, 8)).astype(np.float32)
    b = rng.standard_normal(16).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["m1"], name="mm1"), helper.make_node("Add", ["m1", "b"], ["a1"], name="bias1"),
             helper.make_node("Tanh", ["a1"], ["t"], name="tanh"), helper.make_node("MatMul", ["t", "w1b"], ["m2"], name="mm2"),
             helper.make_node("Add", ["m2", "b2"], ["a2"], name="bias2"), helper.make_node("MatMul", ["a2", "w2"], ["y"], name="mm3")]
    proto = make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16])],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8])],
                       [init("w1", w1), init("b", b), init("w1b", w1.T.copy()), init("b2", b), init("w2", w2)])
    data = {"x": rng.standard_normal((32, 16)).astype(np.float32)}
    plain = _quant(proto, data, speed_guard="off")
    assert {"mm1", "mm2", "mm3", "bias1", "bias2"} <= {i["node"] for i in plain.report.items if "kernel" in i}
    result = _quant(proto, data, speed_guard="off", float_bias_outputs=True)
    items = {i["node"]: i for i in result.report.items if "kernel" in i}
    assert {"mm1", "mm2", "mm3", "bias2"} <= set(items) and "bias1" not in items, items
    assert items["mm1"]["output"] is None and items["mm2"]["output"] is not None  # mm1's output stays float
