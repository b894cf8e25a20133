"""quant: GPTQ second-order rounding of int4 weight-only MatMul against round-to-nearest."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest

from onnxopt import OnnxoptError, PassContext
from onnxopt.data import Dataset
from onnxopt_passes.quant import QuantConfig, QuantPass
from onnxopt_passes.quant.gptq import gptq_blockwise, output_error
from onnxopt_passes.quant.scheme import quantize_blockwise

from tests.helpers import run_model

RNG = np.random.default_rng(0)


def dequantize_blockwise(q: np.ndarray, scale: np.ndarray, block_size: int) -> np.ndarray:
    """What a block-wise DequantizeLinear along K gives back, written out in numpy for the comparison."""
    return (q.astype(np.float32) * np.repeat(scale, block_size, axis=0)[: q.shape[0]]).astype(np.float32)


def test_gptq_beats_nearest_on_a_layer_with_a_known_hessian() -> None:
    k, n = 128, 48
    mix = RNG.standard_normal((k, k)) * RNG.uniform(0.1, 3.0, k)[:, None]  # correlated inputs of uneven scale
    x, x_test = (RNG.standard_normal((2048, k)) @ mix), (RNG.standard_normal((512, k)) @ mix)
    w = (RNG.standard_normal((k, n)) / np.sqrt(k)).astype(np.float32)
    q, scale = gptq_blockwise(w, x.T @ x, 32)
    assert q.shape == (k, n) and scale.shape == (k // 32, n) and q.min() >= -8 and q.max() <= 7
    gptq = dequantize_blockwise(q, scale, 32)
    nearest = dequantize_blockwise(*quantize_blockwise(w, 32), 32)
    # on samples the Hessian was not built from, the output error is clearly lower
    assert output_error(x_test, w, gptq) < 0.8 * output_error(x_test, w, nearest)
    # with an identity Hessian there is nothing to trade: GPTQ is round-to-nearest
    q_eye, s_eye = gptq_blockwise(w, np.eye(k), 32)
    q_rtn, s_rtn = quantize_blockwise(w, 32)
    np.testing.assert_allclose(s_eye, s_rtn, rtol=1e-6)
    assert np.array_equal(q_eye, q_rtn.astype(np.int8))


def test_gptq_transformer_output_closer_than_nearest(digits: Path) -> None:
    calib = {k: v for k, v in np.load(digits / "calib.npz").items() if k != "labels"}
    held_out = {k: v for k, v in np.load(digits / "eval.npz").items() if k != "labels"}
    model_path = digits / "transformer.onnx"
    ref = run_model(model_path, held_out)[0].ravel()
    cos = {}
    for rounding in ("nearest", "gptq"):
        result = QuantPass().apply(ir.load(str(model_path)), QuantConfig(weight_bits=4, block_size=16, rounding=rounding),
                                   PassContext(calibration=Dataset("calib", calib, batch_size=32)))
        assert result.report.figures["quantized_nodes"] >= 10
        got = run_model(result.model, held_out)[0].ravel()
        cos[rounding] = float(ref @ got / np.linalg.norm(ref) / np.linalg.norm(got))
    assert 1 - cos["gptq"] < 0.6 * (1 - cos["nearest"]), cos


def test_gptq_without_data_is_a_clear_error(digits: Path) -> None:
    with pytest.raises(OnnxoptError, match="needs calibration data"):
        QuantPass().apply(ir.load(str(digits / "mlp.onnx")), QuantConfig(weight_bits=4, rounding="gptq"), PassContext())
