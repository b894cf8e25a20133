"""Pass distill: the fused teacher-student graph runs on ONNX Runtime and its losses equal a numpy reference."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from onnxopt import OnnxoptError, PassContext
from onnxopt.io import load_model, serialize_model
from onnxopt_passes.distill import METADATA_PREFIX, DistillConfig, DistillPass

from tests.graphs import gemm_chain, init, make_model
from tests.helpers import run_cli, run_model, to_ir

TOL = 1e-5


def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = z.astype(np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def reference_losses(s: np.ndarray, t: np.ndarray, labels: np.ndarray | None, temperature: float, alpha: float) -> dict[str, np.ndarray]:
    """The losses in float64 numpy, written from their definitions."""
    log_p, log_q = _log_softmax(t / temperature), _log_softmax(s / temperature)
    p = np.exp(log_p)
    kd = temperature**2 * np.mean(np.sum(p * (log_p - log_q), axis=-1))
    out = {"soft_labels": p, "kd_loss": kd}
    if labels is None:
        out["total_loss"] = kd
    else:
        ce = -np.mean(np.take_along_axis(_log_softmax(s), labels[..., None], axis=-1))
        out.update(ce_loss=ce, total_loss=alpha * kd + (1 - alpha) * ce)
    return out


def _save(proto: onnx.ModelProto, folder: Path, name: str) -> Path:
    path = folder / name
    onnx.save(proto, path)
    return path


def _fuse(student: onnx.ModelProto, teacher_path: Path, **config: object) -> tuple[onnx.ModelProto, dict[str, object]]:
    result = DistillPass().apply(to_ir(student), DistillConfig(teacher=str(teacher_path), **config), PassContext())  # type: ignore[arg-type]
    proto = onnx.ModelProto()
    proto.ParseFromString(serialize_model(result.model))
    onnx.checker.check_model(proto, full_check=True)
    return proto, result.report.to_dict()


def _outputs(proto: onnx.ModelProto, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return dict(zip([o.name for o in proto.graph.output], run_model(proto, feed)))


@pytest.mark.parametrize("temperature,alpha", [(1.0, 0.5), (2.5, 0.3), (6.0, 1.0)])
def test_losses_equal_numpy_reference(tmp_path: Path, temperature: float, alpha: float) -> None:
    student = gemm_chain((16, 32, 8), seed=0)
    teacher = gemm_chain((16, 48, 24, 8), seed=1)
    fused, report = _fuse(student, _save(teacher, tmp_path, "t.onnx"), temperature=temperature, alpha=alpha)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((13, 16)).astype(np.float32) * 3
    labels = rng.integers(0, 8, 13)
    out = _outputs(fused, {"x": x, "labels": labels})
    s, t = run_model(student, {"x": x})[0], run_model(teacher, {"x": x})[0]
    ref = reference_losses(s, t, labels, temperature, alpha)
    np.testing.assert_array_equal(out["y"], s)  # the student's own output is untouched
    for name, expected in ref.items():
        np.testing.assert_allclose(out[name], expected, atol=TOL, rtol=TOL, err_msg=name)
    # the teacher's 3 Gemm (w, b) + 5 loss constants (T, T², class axis, alpha, 1 - alpha)
    assert report["figures"]["frozen_initializers"] == 6 + 5


def test_equal_student_and_teacher_give_zero_kd(tmp_path: Path) -> None:
    model = gemm_chain((16, 32, 8), seed=3)
    fused, _ = _fuse(model, _save(model, tmp_path, "same.onnx"), temperature=3.0, labels=None)
    x = np.random.default_rng(1).standard_normal((20, 16)).astype(np.float32)
    out = _outputs(fused, {"x": x})
    assert [i.name for i in fused.graph.input] == ["x"]  # no labels input when labels=none
    assert abs(float(out["kd_loss"])) < 1e-7
    assert float(out["total_loss"]) == float(out["kd_loss"])
    np.testing.assert_allclose(out["soft_labels"], np.exp(_log_softmax(run_model(model, {"x": x})[0] / 3.0)), atol=TOL)


def test_name_collisions_keep_student_names_and_freeze_teacher(tmp_path: Path) -> None:
    student = gemm_chain((16, 32, 8), seed=0)
    teacher = gemm_chain((16, 32, 8), seed=1)  # same value, initializer and node names as the student
    # a student name that is exactly what the prefix would make of a teacher name
    student.graph.initializer.append(init("teacher/w0", np.ones((8,), np.float32)))
    student.graph.node.append(helper.make_node("Add", ["y", "teacher/w0"], ["teacher/y"], name="teacher/gemm0"))
    student.graph.output.append(helper.make_tensor_value_info("teacher/y", TensorProto.FLOAT, ["N", 8]))
    fused, _ = _fuse(student, _save(teacher, tmp_path, "t.onnx"))
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in fused.graph.initializer}
    for t in student.graph.initializer:  # every student weight keeps its name and value
        np.testing.assert_array_equal(inits[t.name], onnx.numpy_helper.to_array(t))
    frozen = json.loads(next(p.value for p in fused.metadata_props if p.key == METADATA_PREFIX + "frozen"))
    teacher_weights = [n for n in frozen if not n.startswith("distill/")]
    assert sorted(onnx.numpy_helper.to_array(t).tobytes() for t in teacher.graph.initializer) == \
        sorted(inits[n].tobytes() for n in teacher_weights)
    assert all(n.startswith("teacher/") for n in teacher_weights) and "teacher/w0" not in frozen
    assert not set(frozen) & {t.name for t in student.graph.initializer}
    names = [o for n in fused.graph.node for o in n.output]
    assert len(names) == len(set(names))
    assert len({n.name for n in fused.graph.node}) == len(fused.graph.node)
    x = np.random.default_rng(2).standard_normal((5, 16)).astype(np.float32)
    out = _outputs(fused, {"x": x, "labels": np.arange(5)})
    s, t = run_model(student, {"x": x}), run_model(teacher, {"x": x})[0]
    np.testing.assert_array_equal(out["teacher/y"], s[1])
    np.testing.assert_allclose(out["kd_loss"], reference_losses(s[0], t, None, 4.0, 0.5)["kd_loss"], atol=TOL)


def _single_input(name: str, width: int, elem: int = TensorProto.FLOAT, opset: int = 18) -> onnx.ModelProto:
    w = np.random.default_rng(0).standard_normal((width, 4)).astype(np.float32)
    nodes = [helper.make_node("MatMul", [name, "w"], ["y"], name="mm")]
    if elem == TensorProto.DOUBLE:
        w = w.astype(np.float64)
    return make_model(nodes, [helper.make_tensor_value_info(name, elem, ["N", width])],
                      [helper.make_tensor_value_info("y", elem, ["N", 4])], [init("w", w)], opset=opset)


@pytest.mark.parametrize("teacher,message", [
    (_single_input("x", 12), "different shapes"),
    (_single_input("x", 16, TensorProto.DOUBLE), "different dtypes"),
    (_single_input("images", 16), "no student input 'images'"),
])
def test_mismatched_inputs_are_clear_errors(tmp_path: Path, teacher: onnx.ModelProto, message: str) -> None:
    with pytest.raises(OnnxoptError, match=message):
        _fuse(_single_input("x", 16), _save(teacher, tmp_path, "t.onnx"))


def test_input_map_feeds_a_renamed_teacher_input(tmp_path: Path) -> None:
    student, teacher = _single_input("x", 16), _single_input("images", 16)
    fused, _ = _fuse(student, _save(teacher, tmp_path, "t.onnx"), input_map=("images=x",), labels=None)
    assert [i.name for i in fused.graph.input] == ["x"]
    x = np.random.default_rng(0).standard_normal((3, 16)).astype(np.float32)
    assert abs(float(_outputs(fused, {"x": x})["kd_loss"])) < 1e-7  # same weights: the teacher reads x
    with pytest.raises(OnnxoptError, match="not teacher inputs"):
        _fuse(student, tmp_path / "t.onnx", input_map=("nope=x",))


def test_opsets_are_aligned(tmp_path: Path) -> None:
    old_teacher = gemm_chain((16, 24, 8), seed=1)
    old_teacher.opset_import[0].version = 11
    fused, report = _fuse(gemm_chain((16, 32, 8), seed=0), _save(old_teacher, tmp_path, "t11.onnx"))
    assert fused.opset_import[0].version == 18
    assert any("teacher opset upgraded 11 -> 18" in n for n in report["notes"])
    old_student = gemm_chain((16, 32, 8), seed=0)
    old_student.opset_import[0].version = 11
    fused, report = _fuse(old_student, tmp_path / "t11.onnx", temperature=2.0)
    assert fused.opset_import[0].version == 13  # the losses need opset 13
    x = np.random.default_rng(0).standard_normal((4, 16)).astype(np.float32)
    out = _outputs(fused, {"x": x, "labels": np.array([0, 1, 2, 7])})
    ref = reference_losses(run_model(old_student, {"x": x})[0], run_model(old_teacher, {"x": x})[0], np.array([0, 1, 2, 7]), 2.0, 0.5)
    np.testing.assert_allclose(out["total_loss"], ref["total_loss"], atol=TOL)


def test_bad_configs_are_one_line_errors(tmp_path: Path) -> None:
    student = gemm_chain((16, 32, 8))
    with pytest.raises(OnnxoptError, match="needs a teacher"):
        DistillPass().apply(to_ir(student), DistillConfig(), PassContext())
    with pytest.raises(OnnxoptError, match="different class counts"):
        _fuse(student, _save(gemm_chain((16, 32, 5)), tmp_path, "t5.onnx"))
    with pytest.raises(OnnxoptError, match="no output 'logits'"):
        _fuse(student, _save(gemm_chain((16, 32, 8)), tmp_path, "t8.onnx"), teacher_output="logits")
    with pytest.raises(ValueError, match="temperature"):
        DistillConfig(teacher="t.onnx", temperature=0)


def test_cli_fuses_the_digits_models(tmp_path: Path, digits: Path) -> None:
    out = tmp_path / "fused.onnx"
    # a relative teacher path is resolved against the student's folder
    run = run_cli("apply", digits / "mlp.onnx", "--pass", "distill", "--set", "distill.teacher=cnn.onnx",
                  "--set", "distill.temperature=2", "--set", "distill.alpha=0.25", "-o", out, "-q")
    assert run.returncode == 0, run.stderr
    assert "changes the model's interface" in run.stdout
    onnx.checker.check_model(str(out), full_check=True)
    data = np.load(digits / "eval.npz")
    x, labels = data["x"][:64], data["labels"][:64]
    got = _outputs(onnx.load(out), {"x": x, "labels": labels})
    ref = reference_losses(run_model(digits / "mlp.onnx", {"x": x})[0], run_model(digits / "cnn.onnx", {"x": x})[0],
                           labels, 2.0, 0.25)
    for name in ("soft_labels", "kd_loss", "ce_loss", "total_loss"):
        np.testing.assert_allclose(got[name], ref[name], atol=TOL, rtol=TOL, err_msg=name)
    model = load_model(out)
    outputs = json.loads(model.metadata_props[METADATA_PREFIX + "outputs"])
    assert outputs == {"student": "logits", "soft_labels": "soft_labels", "kd_loss": "kd_loss", "ce_loss": "ce_loss",
                       "total_loss": "total_loss"}
    bad = run_cli("apply", digits / "mlp.onnx", "--pass", "distill,fold", "--set", "distill.teacher=cnn.onnx", "-q")
    assert bad.returncode == 2 and "must be the last" in bad.stderr
