"""quant: SmoothQuant migration is float-exact and rescues static int8 behind a LayerNormalization with outliers."""

from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper

from onnxopt import PassContext
from onnxopt.data import Dataset
from onnxopt.sessions import SessionFactory
from onnxopt_passes.quant import QuantConfig, QuantPass
from onnxopt_passes.quant.smooth import smooth_layernorms

from tests.graphs import init, make_model
from tests.helpers import run_model, to_ir

RNG = np.random.default_rng(0)


def _outlier_block():
    gamma = np.ones(64, np.float32)
    gamma[:4] = 60.0  # a few huge channels, as in transformer LayerNorm outputs
    nodes = [helper.make_node("LayerNormalization", ["x", "gamma", "beta"], ["h"], axis=-1, name="ln"),
             helper.make_node("MatMul", ["h", "w1"], ["a"], name="mm1"), helper.make_node("Relu", ["a"], ["r"]),
             helper.make_node("MatMul", ["r", "w2"], ["y"], name="mm2")]
    inits = [init("gamma", gamma), init("beta", (RNG.standard_normal(64) * 0.1).astype(np.float32)),
             init("w1", (RNG.standard_normal((64, 48)) / 8).astype(np.float32)),
             init("w2", (RNG.standard_normal((48, 16)) / 7).astype(np.float32))]
    return make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 10, 64])],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10, 16])], inits, opset=17)


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def test_smoothing_is_float_exact() -> None:
    proto = _outlier_block()
    model = to_ir(proto)
    calib = Dataset("calib", {"x": RNG.standard_normal((16, 10, 64)).astype(np.float32)}, batch_size=8)
    assert smooth_layernorms(model, calib, SessionFactory(), 0.5) == 1
    x = RNG.standard_normal((8, 10, 64)).astype(np.float32)
    ref, got = run_model(proto, {"x": x})[0], run_model(model, {"x": x})[0]
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * float(np.abs(ref).max()))


def test_smoothquant_lowers_static_int8_error() -> None:
    proto = _outlier_block()
    calib = Dataset("calib", {"x": RNG.standard_normal((32, 10, 64)).astype(np.float32)}, batch_size=8)
    x = RNG.standard_normal((32, 10, 64)).astype(np.float32)  # held out
    ref = run_model(proto, {"x": x})[0]
    errors = {}
    for alpha in (0.0, 0.5):
        result = QuantPass().apply(to_ir(proto), QuantConfig(smoothquant=alpha, speed_guard="off"),
                                   PassContext(calibration=calib))
        errors[alpha] = 1 - _cos(ref, run_model(result.model, {"x": x})[0])
    assert errors[0.5] < 0.5 * errors[0.0], errors
