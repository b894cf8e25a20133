"""The plugin as its users meet it: discovered by onnxopt, run through the CLI, checked on ONNX Runtime."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from onnxopt_fp16_weights import kl_divergence

EXAMPLES = Path(__file__).resolve().parents[3] / "examples" / "digits"


def onnxopt(*args: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "onnxopt", *map(str, args)], capture_output=True, text=True, timeout=300)


def test_discovered_with_its_distribution() -> None:
    listing = json.loads(onnxopt("passes", "--json").stdout)
    entry = next(e for e in listing if e["name"] == "fp16")
    assert entry["distribution"].startswith("onnxopt-fp16-weights ")
    assert [f["key"] for f in entry["config"]] == ["min_elements"]


def test_apply_halves_weights_and_keeps_outputs(tmp_path: Path) -> None:
    out, report = tmp_path / "cnn16.onnx", tmp_path / "r.json"
    proc = onnxopt("apply", EXAMPLES / "cnn.onnx", "--pass", "fp16", "--eval", EXAMPLES / "eval.npz", "-o", out, "--report", report)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(report.read_text())
    assert data["validation"]["ratios"]["size_bytes"] < 0.6
    assert "kl_divergence" in data["validation"]["outputs"]["logits"]
    weights = [t for t in onnx.load(str(out)).graph.initializer if t.data_type == onnx.TensorProto.FLOAT16]
    assert weights
    x = np.load(EXAMPLES / "eval.npz")["x"][:64]
    ref = ort.InferenceSession(str(EXAMPLES / "cnn.onnx")).run(None, {"x": x})[0]
    got = ort.InferenceSession(str(out)).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, ref, rtol=0.02, atol=0.02)


def test_kl_divergence_matches_direct_formula() -> None:
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((5, 4)), rng.standard_normal((5, 4))
    p = np.exp(a) / np.exp(a).sum(1, keepdims=True)
    q = np.exp(b) / np.exp(b).sum(1, keepdims=True)
    assert abs(kl_divergence(a, b) - float(np.mean(np.sum(p * np.log(p / q), axis=1)))) < 1e-12
    assert kl_divergence(a, a) == 0.0
