"""quant: empirical bias correction folds each layer's own mean weight-rounding error into its bias."""

from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper

from onnxopt import PassContext
from onnxopt.data import Dataset
from onnxopt_passes.quant import QuantConfig, QuantPass

from tests.graphs import init, make_model
from tests.helpers import run_model, to_ir

RNG = np.random.default_rng(0)


def test_bias_correction_removes_the_mean_output_error_per_channel() -> None:
    # inputs with a large mean: the weight rounding error times that mean shifts every output channel
    w = (RNG.standard_normal((32, 16, 3, 3)) * 0.2).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv"),  # no padding: every output sees the mean
             helper.make_node("GlobalAveragePool", ["c"], ["g"]), helper.make_node("Flatten", ["g"], ["f"]),
             helper.make_node("Gemm", ["f", "fc"], ["y"], name="fc", transB=1)]
    proto = make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16, 8, 8])],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])],
                       [init("w", w), init("b", np.zeros(32, np.float32)),
                        init("fc", RNG.standard_normal((10, 32)).astype(np.float32))])
    calib = Dataset("calib", {"x": (RNG.uniform(2, 3, (32, 16, 8, 8))).astype(np.float32)}, batch_size=8)
    x = RNG.uniform(2, 3, (64, 16, 8, 8)).astype(np.float32)  # held out
    ref = run_model(proto, {"x": x})[0]
    errors = {}
    for corrected in (False, True):
        result = QuantPass().apply(to_ir(proto), QuantConfig(bias_correction=corrected, speed_guard="off"),
                                   PassContext(calibration=calib))
        got = run_model(result.model, {"x": x})[0]
        errors[corrected] = float(np.abs((got - ref).mean(axis=0)).mean())  # mean error per output, averaged
        assert any("bias correction" in n for n in result.report.notes) == corrected
    assert errors[True] < 0.5 * errors[False], errors
