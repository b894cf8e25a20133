"""quant: the u8 x s8 int16 pair saturation of CPUs without VNNI, emulated in numpy, detected and fixed per layer."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper

from onnxopt import PassContext
from onnxopt.data import Dataset
from onnxopt_passes.quant import QuantConfig, QuantPass
from onnxopt_passes.quant.saturation import PAIR_LIMIT, check_weight, pair_safe_scale, reduction_rows, saturating_dot
from onnxopt_passes.quant.scheme import quantize, weight_params

from tests.graphs import init, make_model
from tests.helpers import to_ir
from tests.test_quant import _initializers

RNG = np.random.default_rng(0)


def _exact(a: np.ndarray, w: np.ndarray) -> np.ndarray:
    return a.astype(np.int64) @ w.astype(np.int64).T


def test_emulation_saturates_only_same_sign_pairs_past_the_limit() -> None:
    a = np.full((1, 4), 255, np.uint8)
    over = np.array([[127, 2, 0, 0]], np.int8)        # 255 * 129 > 32767
    at = np.array([[127, 1, 0, 0]], np.int8)          # 255 * 128 = 32640 fits
    opposite = np.array([[127, -127, 0, 0]], np.int8)  # opposite signs never overflow with a >= 0
    assert saturating_dot(a, over)[0, 0] == 32767 != _exact(a, over)[0, 0]
    assert saturating_dot(a, at)[0, 0] == _exact(a, at)[0, 0]
    assert saturating_dot(a, opposite)[0, 0] == _exact(a, opposite)[0, 0]
    assert check_weight([over]).can_overflow and not check_weight([at]).can_overflow
    assert not check_weight([opposite]).can_overflow


def test_pair_safe_scale_makes_every_input_exact() -> None:
    # a conv-like weight [C, K] whose channels have large same-sign neighbours
    w = RNG.standard_normal((16, 72)).astype(np.float32)
    w[:, 1::2] = np.abs(w[:, 1::2]) * np.sign(w[:, ::2])  # neighbours share a sign
    plain = weight_params(w, 0)
    q_plain = quantize(w, plain, 0, "int8", 0)
    assert check_weight([q_plain]).can_overflow
    safe = pair_safe_scale([w], plain)
    q_safe = quantize(w, safe, 0, "int8", 0)
    check = check_weight([q_safe])
    assert not check.can_overflow and check.worst_pair <= PAIR_LIMIT
    assert np.all(safe >= plain) and np.all(safe <= 2 * plain * 1.0001)  # at most one bit lost
    for a in (np.full((1, 72), 255, np.uint8), RNG.integers(0, 256, (64, 72)).astype(np.uint8)):
        assert np.array_equal(saturating_dot(a, q_safe), _exact(a, q_safe))
    worst = np.full((1, 72), 255, np.uint8)
    assert not np.array_equal(saturating_dot(worst, q_plain), _exact(worst, q_plain))


def _conv_model() -> onnx.ModelProto:
    w = RNG.standard_normal((8, 4, 3, 3)).astype(np.float32)
    w[:, :, :, 1] = np.abs(w[:, :, :, 1]) * np.sign(w[:, :, :, 0])  # adjacent taps along kw share a sign
    w[0, 0, 0, :2] = [2.5, 2.5]  # channel 0: two adjacent maximal weights
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1], name="conv"),
             helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("GlobalAveragePool", ["r"], ["g"]), helper.make_node("Flatten", ["g"], ["f"]),
             helper.make_node("Gemm", ["f", "fc"], ["y"], name="fc", transB=1)]
    return make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 6, 6])],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])],
                      [init("w", w), init("fc", RNG.standard_normal((3, 8)).astype(np.float32))])


def _conv_weight_int8(model) -> np.ndarray:
    inits, proto = _initializers(model)
    dq = next(n for n in proto.graph.node if n.op_type == "DequantizeLinear" and inits[n.input[0]].ndim == 4)
    return inits[dq.input[0]]


def test_pass_fixes_the_layer_and_reports_it() -> None:
    proto = _conv_model()
    calib = Dataset("calib", {"x": RNG.standard_normal((16, 4, 6, 6)).astype(np.float32)}, batch_size=8)
    results = {mode: QuantPass().apply(to_ir(proto), QuantConfig(saturation=mode, speed_guard="off"),
                                       PassContext(calibration=calib)) for mode in ("fix", "report")}
    worst = np.full((1, 36), 255, np.uint8)  # every activation at the top of the uint8 range
    for mode, result in results.items():
        w_q = _conv_weight_int8(result.model)
        rows = reduction_rows(w_q, "Conv")  # NCHW and NHWC reduction orders
        flagged = {s["node"]: s for s in result.report.figures["saturation"]}
        assert "conv" in flagged and flagged["conv"]["overflowing_channels"] >= 1
        exact_everywhere = all(np.array_equal(saturating_dot(worst, r), _exact(worst, r)) for r in rows)
        if mode == "fix":
            assert flagged["conv"]["fixed"] and exact_everywhere
            assert any("fixed by widening" in n for n in result.report.notes)
        else:
            assert not flagged["conv"]["fixed"] and not exact_everywhere
            assert any("not fixed" in n for n in result.report.notes)


def test_dynamic_int8_widens_the_pairs_that_can_saturate_and_runs_exact_on_this_cpu() -> None:
    """DynamicQuantizeLinear feeds uint8 to a u8 x s8 kernel: the same int16 pairs as static int8. A [64, 16]
    Gaussian weight has same-sign pairs up to ~214 at absmax/127 scales; on a CPU without VNNI ORT's result was 4%
    off. After the fix no pair can overflow, and ORT's output equals exact integer arithmetic on any CPU."""
    from tests.helpers import run_model
    from tests.test_quant import _quant, matmul_model

    proto = matmul_model()
    results = {mode: _quant(proto, None, mode="dynamic", saturation=mode) for mode in ("fix", "report")}
    report = results["report"].report.figures["saturation"]
    assert report and not report[0]["fixed"] and report[0]["worst_pair"] > PAIR_LIMIT  # the plain scales overflow
    result = results["fix"]
    inits, _ = _initializers(result.model)
    w_q, w_scale = inits["mm_weight_quantized"], inits["mm_weight_scale"]
    assert not check_weight([w_q.T]).can_overflow
    fixed = {s["node"]: s for s in result.report.figures["saturation"]}
    assert fixed["mm"]["fixed"] and fixed["mm"]["max_scale_widening"] > 1
    assert any("fixed by widening" in n for n in result.report.notes)
    # ORT against DynamicQuantizeLinear + an exact int64 MatMulInteger in numpy, on inputs that fill the uint8 range
    x = RNG.uniform(-3, 3, (32, 64)).astype(np.float32)
    lo, hi = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
    x_scale = np.float32((hi - lo) / 255)
    zp = np.clip(np.rint(-lo / x_scale), 0, 255)
    xq = np.clip(np.rint(x / x_scale) + zp, 0, 255).astype(np.int64)
    want = ((xq - zp.astype(np.int64)) @ w_q.astype(np.int64)).astype(np.float32) * (x_scale * w_scale)
    (got,) = run_model(result.model, {"x": x})
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(np.abs(want).max()))


def test_the_reported_widening_is_the_pair_fix_not_a_dead_channels_bias_fit() -> None:
    """A channel whose weights are ~0 next to a real bias (PP-OCRv4 rec has them) gets its weight scale raised
    far more than 2x so that the int32 bias fits; that is not the pair fix's doing, which never needs more than
    2x (|w_i + w_j| <= 2 absmax), and the report said "widened at most 9.6x" for it."""
    proto = _conv_model()
    w = onnx.numpy_helper.to_array(proto.graph.initializer[0]).copy()
    w[5] = 1e-15  # a dead channel
    proto.graph.initializer[0].CopyFrom(onnx.numpy_helper.from_array(w, "w"))
    proto.graph.node[0].input.append("b")
    proto.graph.initializer.append(onnx.numpy_helper.from_array(np.full(8, 1.5, np.float32), "b"))
    calib = Dataset("calib", {"x": RNG.standard_normal((16, 4, 6, 6)).astype(np.float32)}, batch_size=8)
    result = QuantPass().apply(to_ir(proto), QuantConfig(speed_guard="off"), PassContext(calibration=calib))
    flagged = {s["node"]: s for s in result.report.figures["saturation"]}
    assert flagged["conv"]["fixed"] and 1.0 < flagged["conv"]["max_scale_widening"] <= 2.0
