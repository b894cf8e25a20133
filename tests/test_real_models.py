"""The two real PP-OCR models (fetched by shared/models/fetch.sh; CI sets ONNXOPT_REAL_MODELS)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.conftest import unavailable
from tests.helpers import run_cli

REAL = Path(os.environ.get("ONNXOPT_REAL_MODELS", "/nonexistent"))
MODELS = ("ch_PP-OCRv4_det_infer.onnx", "ch_ppocr_mobile_v2.0_cls_infer.onnx")


@pytest.fixture()
def real_models() -> Path:
    """The fetched models; ONNXOPT_REAL_MODELS set but without them fails (a fetch that failed must not pass as a skip)."""
    missing = [m for m in MODELS if not (REAL / m).is_file()]
    if missing and "ONNXOPT_REAL_MODELS" in os.environ:
        pytest.fail(f"ONNXOPT_REAL_MODELS={REAL} lacks {', '.join(missing)} (did shared/models/fetch.sh fail?)", pytrace=False)
    if missing:
        unavailable("real-models", "set ONNXOPT_REAL_MODELS to a folder made by shared/models/fetch.sh")
    return REAL


needs_real = pytest.mark.usefixtures("real_models")


@needs_real
@pytest.mark.parametrize("name,shape", [("ch_PP-OCRv4_det_infer", "x=1x3x640x640"), ("ch_ppocr_mobile_v2.0_cls_infer", "x=1x3x48x192")])
def test_inspect_reports_constant_weights_and_macs(name: str, shape: str) -> None:
    proc = run_cli("inspect", REAL / f"{name}.onnx", "--shape", shape, "--json")
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    weights = info["weights"]
    assert weights["constant_nodes"] > 100 and weights["constant_bytes"] > 400_000 and weights["initializers"] == 0
    assert info["parameters"] * 4 == pytest.approx(weights["constant_bytes"], rel=0.05)
    assert info["macs"]["total"] > 10_000_000 and info["macs"]["by_op"]["Conv"] > 0
    text = run_cli("inspect", REAL / f"{name}.onnx", "--shape", shape).stdout
    assert "Constant nodes" in text and "MACs" in text


@needs_real
def test_fold_on_real_classifier_is_lossless(tmp_path: Path) -> None:
    out, report = tmp_path / "cls.onnx", tmp_path / "r.json"
    proc = run_cli("apply", REAL / "ch_ppocr_mobile_v2.0_cls_infer.onnx", "--pass", "fold", "--shape", "x=4x3x48x192",
                   "-o", out, "--report", report)
    assert proc.returncode == 0, proc.stderr
    v = json.loads(report.read_text())["validation"]
    assert v["fidelity_only"] and v["outputs"]["save_infer_model/scale_0.tmp_1"]["max_abs_error"] < 1e-5
