"""quant.rounding=adaround: weights rounded down or up as learned, to keep each layer's output on calibration data."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
from onnx import TensorProto, helper

from onnxopt import PassContext
from onnxopt.data import Dataset
from onnxopt.io import load_model
from onnxopt_passes.quant import QuantConfig, QuantPass
from onnxopt_passes.quant.adaround import adaround_rows, conv_patches

from tests.conftest import ROOT
from tests.graphs import init, make_model
from tests.helpers import run_model
from tests.test_quant import _optimized_ops


def test_adaround_lowers_the_output_error_on_held_out_activations() -> None:
    rng = np.random.default_rng(0)
    k, n = 64, 32
    mix = rng.standard_normal((k, k)) * 0.3 + np.eye(k)  # correlated inputs: rounding errors can cancel
    calib, held = rng.standard_normal((2000, k)) @ mix, rng.standard_normal((2000, k)) @ mix
    w = rng.standard_normal((n, k)) * 0.1
    scale = np.abs(w).max(axis=1) / 127 * 8  # a coarse grid, so that the rounding matters
    levels = adaround_rows(w, scale, (calib.T @ calib / len(calib))[None], iterations=300)
    nearest = np.clip(np.rint(w / scale[:, None]), -128, 127)
    assert np.all(np.abs(levels - w / scale[:, None]) < 1)  # each weight went to its floor or its ceiling

    def error(q: np.ndarray) -> float:
        return float(np.linalg.norm(held @ (q * scale[:, None]).T - held @ w.T) / np.linalg.norm(held @ w.T))

    assert error(levels) < 0.85 * error(nearest)


def test_conv_patches_reproduce_ort_conv() -> None:
    """The im2col behind a Conv's input moment: patches @ Wᵀ is the Conv (strides, pads, dilations, groups)."""
    rng = np.random.default_rng(1)
    w = rng.standard_normal((6, 2, 3, 3)).astype(np.float32)
    attrs = {"strides": [2, 1], "pads": [1, 0, 1, 2], "dilations": [1, 2], "group": 2}
    node = helper.make_node("Conv", ["x", "w"], ["y"], name="c", **attrs)
    proto = make_model([node], [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4, 9, 8])],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [init("w", w)])
    x = rng.standard_normal((2, 4, 9, 8)).astype(np.float32)
    want = run_model(proto, {"x": x})[0]
    model = ir.serde.deserialize_model(proto)
    cols = conv_patches(x.astype(np.float64), model.graph.node(0), (3, 3), 2)  # [groups, B·H'·W', K]
    rows = w.reshape(2, 3, -1)  # per group: 3 outputs, K = 2·3·3
    got = np.einsum("gsk,gnk->gsn", cols, rows)  # [groups, B·H'·W', 3]
    b, _, oh, ow = want.shape
    got = got.reshape(2, b, oh, ow, 3).transpose(1, 0, 4, 2, 3).reshape(want.shape)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_adaround_on_the_digits_cnn_beats_nearest_on_held_out_samples() -> None:
    digits = ROOT / "examples" / "digits"
    calib = np.load(digits / "calib.npz")
    held = np.load(digits / "eval.npz")  # never seen by the calibration
    data = Dataset("calib", {"x": calib["x"]}, batch_size=32)
    model = load_model(digits / "cnn.onnx")
    ref = run_model(str(digits / "cnn.onnx"), {"x": held["x"]})[0]
    out = {}
    for rounding in ("nearest", "adaround"):
        result = QuantPass().apply(model.clone(), QuantConfig(speed_guard="off", rounding=rounding),
                                   PassContext(calibration=data))
        y = run_model(result.model, {"x": held["x"]})[0]
        cos = np.sum(y * ref, axis=1) / np.linalg.norm(y, axis=1) / np.linalg.norm(ref, axis=1)
        out[rounding] = (result, float(1 - cos.mean()))
    result, error = out["adaround"]
    assert error < 0.6 * out["nearest"][1]
    assert any("AdaRound" in n for n in result.report.notes)
    assert _optimized_ops(result.model).count("QLinearConv") == 8  # still integer kernels
    saturation = result.report.figures["saturation"]
    assert saturation and all(layer["fixed"] for layer in saturation)  # learned rounding keeps the int16 pairs safe


def test_cluster_grid_adaround_beats_nearest_levels_on_held_out_samples() -> None:
    """cluster.rounding=adaround: the int4 grid's levels learned on calib.npz; judged on eval.npz (held out)."""
    from onnxopt_passes.cluster import ClusterConfig, ClusterPass

    digits = ROOT / "examples" / "digits"
    data = Dataset("calib", {"x": np.load(digits / "calib.npz")["x"]}, batch_size=32)
    held = np.load(digits / "eval.npz")["x"]
    model = load_model(digits / "cnn.onnx")
    ref = run_model(str(digits / "cnn.onnx"), {"x": held})[0]
    errors = {}
    for rounding in ("nearest", "adaround"):
        result = ClusterPass().apply(model.clone(), ClusterConfig(init="grid", k=16, granularity="channel",
                                                                  rounding=rounding), PassContext(calibration=data))
        y = run_model(result.model, {"x": held})[0]
        errors[rounding] = float(np.linalg.norm(y - ref) / np.linalg.norm(ref))
        if rounding == "adaround":
            assert any("AdaRound" in n for n in result.report.notes)
            assert {item["init"] for item in result.report.items} == {"grid (adaround)"}
    assert errors["adaround"] < 0.8 * errors["nearest"], errors
