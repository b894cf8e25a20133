"""quant: output-aware placement on a YOLO-style head (boxes in pixels and sigmoid scores joined by a Concat)."""

from __future__ import annotations

import numpy as np

from onnxopt import PassContext
from onnxopt.data import Dataset
from onnxopt_passes.quant import QuantConfig, QuantPass

from tests.graphs_quant import yolo_head
from tests.helpers import run_model, to_ir
from tests.test_quant import _optimized_ops

RNG = np.random.default_rng(0)


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    return float(a.ravel() @ b.ravel() / np.linalg.norm(a) / np.linalg.norm(b))


def _parts(keep: bool) -> tuple[np.ndarray, np.ndarray, list[str], object]:
    proto = yolo_head()
    calib = Dataset("calib", {"x": RNG.standard_normal((32, 3, 8, 8)).astype(np.float32)}, batch_size=8)
    result = QuantPass().apply(to_ir(proto), QuantConfig(keep_outputs_float=keep, speed_guard="off"),
                               PassContext(calibration=calib))
    x = RNG.standard_normal((32, 3, 8, 8)).astype(np.float32)  # not the calibration samples
    return run_model(proto, {"x": x})[0], run_model(result.model, {"x": x})[0], _optimized_ops(result.model), result


def test_detection_head_scores_keep_their_own_scale() -> None:
    ref, got, ops, result = _parts(keep=True)
    assert ref[:, :4].max() > 50 and ref[:, 4:].max() < 1  # boxes in pixels, scores in [0, 1]
    assert _cos(ref[:, 4:], got[:, 4:]) > 0.999 and _cos(ref[:, :4], got[:, :4]) > 0.999
    # the join, the sigmoid and the shift/scale by constants before it stay float, and so do the two head convs
    # whose 8-bit outputs would reach the output through them; the feature conv still runs as an integer kernel
    assert "QLinearConcat" not in ops and "Concat" in ops and "QLinearSigmoid" not in ops
    assert ops.count("QLinearConv") == 1
    # the graph output is not the output of a DequantizeLinear
    assert result.model.graph.outputs[0].producer().op_type == "Concat"
    reasons = {s.target: s.reason for s in result.report.skipped}
    assert any("reaches the graph output" in r for t, r in reasons.items() if t.startswith("Concat")), reasons


def test_shared_output_scale_is_what_destroys_the_scores() -> None:
    # the same head with the option off: one scale over pixels and scores (what ORT's quantize_static does)
    ref, got, ops, _ = _parts(keep=False)
    assert "QLinearConcat" in ops
    assert _cos(ref[:, 4:], got[:, 4:]) < 0.9
