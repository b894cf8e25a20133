"""Metrics against direct numpy formulas; datasets matched to models; validation, drop and the --max-drop gate."""

from __future__ import annotations

import dataclasses
import json
import types
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from onnxopt import Pass, PassContext, PassResult, hookimpl
from onnxopt.api import apply
from onnxopt.data import input_specs, load_dataset, synthetic_dataset
from onnxopt.errors import OnnxoptError
from onnxopt.graph import constant_array, is_onnx_op, replace_input_weight, Names
from onnxopt.io import load_model
from onnxopt.measure import count_macs, count_parameters
from onnxopt.metrics import cosine, max_abs_error, snr_db, top1_accuracy, top1_agreement
from onnxopt.plugins import get_plugin_manager, load_registry

from tests.graphs import conv_bn_relu, gemm_chain
from tests.helpers import run_cli, to_ir


def test_metrics_match_direct_formulas() -> None:
    rng = np.random.default_rng(0)
    ref = rng.standard_normal((50, 10)).astype(np.float32)
    cand = ref + 0.1 * rng.standard_normal((50, 10)).astype(np.float32)
    labels = rng.integers(0, 10, 50)
    r, c = ref.astype(np.float64).ravel(), cand.astype(np.float64).ravel()
    assert top1_accuracy(cand, labels) == pytest.approx(float((cand.argmax(1) == labels).mean()))
    assert top1_agreement(ref, cand) == pytest.approx(float((cand.argmax(1) == ref.argmax(1)).mean()))
    assert cosine(ref, cand) == pytest.approx(float(r @ c / np.sqrt((r @ r) * (c @ c))))
    assert snr_db(ref, cand) == pytest.approx(float(10 * np.log10((r @ r) / ((r - c) @ (r - c)))))
    assert max_abs_error(ref, cand) == pytest.approx(float(np.abs(r - c).max()))
    assert top1_accuracy(rng.standard_normal(50), labels) is None  # not a score output


def test_macs_and_parameters_by_hand() -> None:
    model = to_ir(conv_bn_relu(cin=3, cout=8))
    macs = count_macs(model, {"x": (1, 3, 6, 6)})
    assert macs.total == 8 * 6 * 6 * 3 * 3 * 3 and not macs.unknown
    assert count_parameters(model) == 8 * 3 * 9 + 8 * 5
    mlp = to_ir(gemm_chain((16, 32, 8)))
    assert count_macs(mlp, {"x": (4, 16)}).total == 4 * (16 * 32 + 32 * 8)


def test_npz_batches_follow_the_model(digits: Path) -> None:
    specs = input_specs(load_model(digits / "cnn.onnx"))
    data = load_dataset(digits / "eval.npz", specs, batch_size=100)
    sizes = [b["x"].shape[0] for b in data.batches()]
    assert sum(sizes) == len(data) == data.labels.shape[0] and max(sizes) == 100


def test_test_data_folder(tmp_path: Path, digits: Path) -> None:
    x = np.load(digits / "eval.npz")["x"][:2]
    for i in range(2):
        folder = tmp_path / f"test_data_set_{i}"
        folder.mkdir()
        (folder / "input_0.pb").write_bytes(numpy_helper.from_array(x[i : i + 1], "x").SerializeToString())
    data = load_dataset(tmp_path, input_specs(load_model(digits / "cnn.onnx")))
    assert [b["x"].shape for b in data.batches()] == [(1, 1, 8, 8), (1, 1, 8, 8)]


def test_synthetic_needs_shapes_for_free_dims() -> None:
    model = to_ir(conv_bn_relu())
    assert next(synthetic_dataset(input_specs(model)).batches())["x"].shape[1:] == (3, 6, 6)  # only the batch is free
    proto = conv_bn_relu()
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    dims[2].dim_param, dims[3].dim_param = "H", "W"
    with pytest.raises(OnnxoptError, match="--shape"):
        synthetic_dataset(input_specs(to_ir(proto)))
    data = synthetic_dataset(input_specs(model), {"x": (2, 3, 6, 6)})
    assert data.fidelity_only and next(data.batches())["x"].shape == (2, 3, 6, 6)


@dataclasses.dataclass(frozen=True)
class NoiseConfig:
    """Keys of the noise pass."""

    scale: float = dataclasses.field(default=1.0, metadata={"doc": "noise on the classifier weights, relative"})


class NoisePass(Pass[NoiseConfig]):
    """Damage the last Gemm's weights (a stand-in for a lossy pass)."""

    name = "noise"
    Config = NoiseConfig

    def run(self, model, config, ctx):
        report = self.new_report(config)
        gemm = [n for n in model.graph if is_onnx_op(n, "Gemm")][-1]
        w = constant_array(gemm.inputs[1])
        replace_input_weight(gemm, 1, w + config.scale * np.abs(w).mean() * ctx.rng.standard_normal(w.shape).astype(w.dtype), Names(model))
        return PassResult(model, True, report)


@pytest.fixture()
def noisy_registry():
    @hookimpl
    def onnxopt_register_passes(register):
        register(NoisePass)

    pm = get_plugin_manager()
    pm.register(types.SimpleNamespace(onnxopt_register_passes=onnxopt_register_passes), name="noise_plugin")
    return load_registry(pm)


def test_gate_blocks_and_force_writes(tmp_path: Path, digits: Path, noisy_registry) -> None:
    out = tmp_path / "out.onnx"
    run = apply(digits / "cnn.onnx", ["fold", "noise"], out, settings={"noise": {"scale": "3"}}, eval_data=digits / "eval.npz",
                max_drop=0.001, registry=noisy_registry, report=tmp_path / "r.json", rollback=False)
    assert run.validation is not None and run.validation.drop > 0.001
    assert run.gate_passed is False and not run.written and not out.exists()
    report = json.loads((tmp_path / "r.json").read_text())
    acc = report["validation"]["accuracy"]
    assert report["validation"]["drop"] == pytest.approx(acc["reference"] - acc["candidate"])
    run = apply(digits / "cnn.onnx", ["noise"], out, settings={"noise": {"scale": "3"}}, eval_data=digits / "eval.npz",
                max_drop=0.001, force=True, registry=noisy_registry)
    assert run.written and out.exists()


def test_lossless_chain_passes_the_gate_via_cli(tmp_path: Path, digits: Path) -> None:
    out, report = tmp_path / "cnn.onnx", tmp_path / "r.json"
    proc = run_cli("apply", digits / "cnn.onnx", "--pass", "fold", "--eval", digits / "eval.npz", "--max-drop", "0",
                   "-o", out, "--report", report)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(report.read_text())
    assert data["gate_passed"] is True and data["written"] is True
    assert data["validation"]["outputs"]["logits"]["max_abs_error"] < 1e-4
    assert data["validation"]["candidate"]["size_bytes"] == out.stat().st_size
    assert data["validation"]["reference"]["latency_ms"] > 0
    onnx.checker.check_model(str(out), full_check=True)


def test_validate_command_and_inspect(tmp_path: Path, digits: Path) -> None:
    proc = run_cli("validate", digits / "cnn.onnx", digits / "cnn.onnx", "--eval", digits / "eval.npz", "--report", tmp_path / "v.json")
    assert proc.returncode == 0, proc.stderr
    v = json.loads((tmp_path / "v.json").read_text())["validation"]
    assert v["drop"] == 0 and v["outputs"]["logits"]["top1_agreement"] == 1.0
    info = json.loads(run_cli("inspect", digits / "cnn.onnx", "--json").stdout)
    assert info["ops"]["Conv"] == 8 and info["macs"]["total"] > 0 and info["weights"]["initializers"] > 0
