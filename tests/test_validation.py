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


def _rate_switched_model() -> onnx.ModelProto:
    """Silero VAD's interface in small: input [?, ?], state [2, ?, 8], and an int64 scalar sr that an If compares
    with 16000 (then: one MatMul weight, else: another)."""
    from onnx import TensorProto, helper

    from tests.graphs import init, make_model

    rng = np.random.default_rng(4)

    def branch(name: str) -> onnx.GraphProto:
        nodes = [helper.make_node("ReduceMean", ["x", "axes"], [f"{name}_m"], keepdims=1),
                 helper.make_node("Mul", [f"{name}_m", "state"], [f"{name}_s"]),
                 helper.make_node("MatMul", [f"{name}_s", f"w_{name}"], [f"{name}_y"])]
        return helper.make_graph(nodes, name, [], [helper.make_tensor_value_info(f"{name}_y", TensorProto.FLOAT, [2, None, 8])])

    nodes = [helper.make_node("Equal", ["sr", "rate"], ["is16k"]),
             helper.make_node("If", ["is16k"], ["y"], then_branch=branch("hi"), else_branch=branch("lo"))]
    return make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, None]),
                              helper.make_tensor_value_info("state", TensorProto.FLOAT, [2, None, 8]),
                              helper.make_tensor_value_info("sr", TensorProto.INT64, [])],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, None, 8])],
                      [init("rate", np.array(16000, np.int64)), init("axes", np.array([1], np.int64)),
                       init("w_hi", rng.standard_normal((8, 8)).astype(np.float32)),
                       init("w_lo", rng.standard_normal((8, 8)).astype(np.float32))])


def test_free_dims_say_exactly_which_shapes_to_give(tmp_path: Path) -> None:
    model = tmp_path / "rate.onnx"
    onnx.save(_rate_switched_model(), model)
    proc = run_cli("apply", model, "--pass", "fold", "-o", tmp_path / "out.onnx")
    assert proc.returncode == 0, proc.stderr
    hint = "--shape x=1xD1 --shape state=2x1x8 (D1: the size of x's dim 1, free in the model)"
    assert hint in " ".join(proc.stdout.split()), proc.stdout
    proc = run_cli("validate", model, tmp_path / "out.onnx")
    assert proc.returncode == 2 and hint in " ".join(proc.stderr.split())
    # given as said, validation runs
    proc = run_cli("validate", model, tmp_path / "out.onnx", "--shape", "x=1x16", "--shape", "state=2x1x8")
    assert proc.returncode == 0, proc.stderr


def test_synthetic_scalar_inputs_take_the_values_the_model_compares_them_with() -> None:
    from onnxopt.api import load_data
    from onnxopt.data import compared_values

    model = to_ir(_rate_switched_model())
    assert compared_values(model) == {"sr": [16000]}
    data = load_data(model, None, {"x": (1, 16), "state": (2, 1, 8)})
    assert data is not None
    assert {int(feed["sr"]) for feed in data.batches()} == {16000}  # without it: 0 or 1, which never equals 16000
    assert "sr=16000: the values the model compares them with" in data.source  # said where validation says its data
    # a rate compared with no constant keeps the old random 0/1
    assert compared_values(to_ir(gemm_chain())) == {}
