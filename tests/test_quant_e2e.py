"""quant end to end: the digits examples through the API and the CLI, measured on ORT; the accuracy fallback."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import onnxopt
from onnxopt import PassContext
from onnxopt.config import build_config
from onnxopt.data import Dataset
from onnxopt_passes.quant import QuantConfig, QuantPass

from tests.graphs import init, make_model
from tests.helpers import run_cli, run_model, to_ir


def _apply(digits: Path, tmp_path: Path, name: str, **settings: object) -> onnxopt.report.RunReport:  # type: ignore[name-defined]
    out = tmp_path / f"{name}_q.onnx"
    run = onnxopt.apply(digits / f"{name}.onnx", ["quant"], out, settings={"quant": settings}, data=digits / "calib.npz",
                        eval_data=digits / "eval.npz")
    assert run.written and out.exists()
    onnx.checker.check_model(str(out))
    return run


def test_cnn_static_int8_keeps_accuracy_and_runs_integer(digits: Path, tmp_path: Path) -> None:
    run = _apply(digits, tmp_path, "cnn")
    v = run.validation
    assert v is not None and v.accuracy is not None
    assert v.accuracy["reference"] - v.accuracy["candidate"] <= 0.005  # the bound: 0.5 pt
    figures = run.passes[0].figures
    assert figures["ort_kernel_types"]["QLinearConv"] == 8 and figures["ort_float_compute_left"] == {}
    assert v.ratio("size_bytes") < 0.4  # int8 weights


@pytest.mark.parametrize("mode", ["static", "dynamic"])
def test_transformer_static_and_dynamic(digits: Path, tmp_path: Path, mode: str) -> None:
    # speed_fallback=off: the integer kernels are under test; on this CPU the guard may find the transformer
    # faster computed in float on int8 weights (tested in test_quant_float_compute)
    run = _apply(digits, tmp_path, "transformer", mode=mode, **({"speed_fallback": "off"} if mode == "static" else {}))
    v = run.validation
    assert v is not None and v.accuracy is not None
    assert v.accuracy["reference"] - v.accuracy["candidate"] <= 0.01
    figures = run.passes[0].figures
    # 14 MatMuls have weights; static also runs the 3 activation x activation MatMuls of attention in int8
    assert figures["ort_integer_kernels"]["MatMul"] == (14 if mode == "dynamic" else 17)
    assert (figures["ort_kernel_types"].get("DynamicQuantizeMatMul", 0) > 0) == (mode == "dynamic")


def test_mlp_int4_weight_only(digits: Path, tmp_path: Path) -> None:
    run = _apply(digits, tmp_path, "mlp", weight_bits=4, block_size=32)
    v = run.validation
    assert v is not None and v.accuracy is not None
    assert v.accuracy["reference"] - v.accuracy["candidate"] <= 0.02
    assert run.passes[0].figures["ort_kernel_types"].get("MatMulNBits") == 3


def test_cli_quant_with_method_and_report(digits: Path, tmp_path: Path) -> None:
    out, report = tmp_path / "cnn_q.onnx", tmp_path / "report.json"
    proc = run_cli("apply", digits / "cnn.onnx", "--pass", "quant", "--set", "quant.method=entropy", "--data",
                   digits / "calib.npz", "--eval", digits / "eval.npz", "--max-drop", "0.01", "-o", out, "--report", report)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(report.read_text())
    assert data["gate_passed"] is True and data["passes"][0]["figures"]["method"] == "entropy"
    assert data["validation"]["drop"] <= 0.01
    # entropy clipping costs this cnn ~3 pt; the fallback returns the node that matters to float
    fallback = data["passes"][0]["figures"]["fallback"]
    assert fallback["initial_drop"] > 0.01 and fallback["kept_float"] and fallback["within_budget"]


def test_cli_quant_without_data_is_one_line_error(digits: Path, tmp_path: Path) -> None:
    proc = run_cli("apply", digits / "cnn.onnx", "--pass", "quant", "-o", tmp_path / "x.onnx")
    assert proc.returncode == 2 and "--data" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "x.onnx").exists()


def test_cli_wrong_shape_calibration_data(digits: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.npz"
    np.savez(bad, x=np.zeros((4, 1, 9, 9), np.float32))
    proc = run_cli("apply", digits / "cnn.onnx", "--pass", "quant", "--data", bad, "-o", tmp_path / "x.onnx")
    assert proc.returncode == 2 and "axis 2" in proc.stderr


def _outlier_model() -> tuple[onnx.ModelProto, np.ndarray]:
    """Two Gemms; the first reads an input whose feature 0 is huge and useless, so int8 on that input wrecks it.

    The classes depend on small features 1..15; per-tensor uint8 over the huge range rounds them away.
    """
    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((16, 32)).astype(np.float32)
    w1[0] = 1e-4  # the outlier feature barely matters
    w2 = rng.standard_normal((32, 5)).astype(np.float32)
    nodes = [helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], name="fc1"), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("Gemm", ["r", "w2", "b2"], ["y"], name="fc2")]
    proto = make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16])],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5])],
                       [init("w1", w1), init("b1", np.zeros(32, np.float32)), init("w2", w2), init("b2", np.zeros(5, np.float32))])
    x = rng.standard_normal((256, 16)).astype(np.float32) * 0.05
    x[:, 0] = rng.uniform(-3000, 3000, 256)
    return proto, x


def test_fallback_returns_the_wrecked_layer_to_float() -> None:
    proto, x = _outlier_model()
    model = to_ir(proto)
    calib, evaluation = Dataset("calib", {"x": x[:128]}), Dataset("eval", {"x": x[128:]})
    # plain weight scales: the saturation fix's wider scales on fc2 would add a second, unrelated fallback step
    # speed_fallback=off: the placement is under test, not whether int8 compute pays on this tiny model
    plain = QuantPass().apply(model, QuantConfig(saturation="off", speed_fallback="off"), PassContext(calibration=calib))
    ref, wrecked = run_model(proto, {"x": x[128:]})[0], run_model(plain.model, {"x": x[128:]})[0]
    plain_agreement = float(np.mean(ref.argmax(1) == wrecked.argmax(1)))
    assert plain_agreement < 0.9  # the premise: plain int8 breaks this model

    ctx = PassContext(calibration=calib, evaluation=evaluation, max_drop=0.01)
    result = QuantPass().apply(model, build_config(QuantConfig, {"saturation": "off", "speed_fallback": "off"},
                                                   pass_name="quant"), ctx)
    fallback = result.report.figures["fallback"]
    assert fallback["within_budget"] and fallback["final_drop"] <= 0.01
    assert fallback["initial_drop"] == pytest.approx(1 - plain_agreement)
    assert [k["node"] for k in fallback["kept_float"]] == ["fc1"]
    assert fallback["trials"] == 1  # the most sensitive node first, and within: no other trial
    got = run_model(result.model, {"x": x[128:]})[0]
    assert float(np.mean(ref.argmax(1) == got.argmax(1))) >= 0.99
    assert result.report.figures["quantized_nodes"] == {"Gemm": 1}  # fc2 stays int8
