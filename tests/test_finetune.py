"""`onnxopt finetune`: a pruned student trained against its teacher recovers accuracy, measured on ONNX Runtime."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

torch = pytest.importorskip("torch")

from onnxopt import OnnxoptError, PassContext  # noqa: E402
from onnxopt.api import apply  # noqa: E402
from onnxopt.cli import cli  # noqa: E402
from onnxopt.config import config_fields  # noqa: E402
from onnxopt.finetune import FinetuneConfig, finetune  # noqa: E402
from onnxopt.finetune.loss import distill_loss  # noqa: E402
from onnxopt.finetune.recover import require_torch  # noqa: E402
from onnxopt.io import load_model  # noqa: E402
from onnxopt_passes.distill import DistillConfig, DistillPass  # noqa: E402

from tests.graphs import gemm_chain  # noqa: E402
from tests.helpers import file_digest, run_cli, run_model, to_ir  # noqa: E402

FAST = {"threads": 1}


@pytest.fixture(scope="module")
def pruned(digits: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The digits CNN with 70% of its channels removed by the real prune pass (no refit): badly damaged."""
    out = tmp_path_factory.mktemp("pruned") / "cnn_pruned.onnx"
    run = apply(digits / "cnn.onnx", ["prune"], out, settings={"prune": {"ratio": 0.7}}, validate_result=False)
    assert run.written
    return out


def _graph_signature(model: onnx.ModelProto) -> list[tuple[str, tuple[str, ...], tuple[str, ...], str]]:
    return [(n.op_type, tuple(n.input), tuple(n.output), str(n.attribute)) for n in model.graph.node]


def test_pruned_student_recovers(pruned: Path, digits: Path, tmp_path: Path) -> None:
    out = tmp_path / "recovered.onnx"
    before_bytes = file_digest(pruned)
    report = finetune(pruned, out, data=digits / "train.npz", teacher=digits / "cnn.onnx", eval_data=digits / "eval.npz",
                      config=FinetuneConfig(epochs=2, **FAST))
    acc = report.accuracy
    assert acc["teacher"] is not None and acc["before"] is not None and acc["after"] is not None
    assert acc["before"] < acc["teacher"] - 0.05, "the pruned model is not damaged enough for this test to mean anything"
    assert acc["after"] > acc["before"] + (acc["teacher"] - acc["before"]) / 2  # at least half the gap recovered
    # the figures are ORT's on the written file
    data = np.load(digits / "eval.npz")
    written = run_model(out, {"x": data["x"]})[0]
    assert float(np.mean(written.argmax(1) == data["labels"])) == acc["after"]
    # same graph, new weights (running statistics re-estimated too); the input file is untouched
    new, old = onnx.load(out), onnx.load(pruned)
    assert _graph_signature(new) == _graph_signature(old)
    new_w = {t.name: onnx.numpy_helper.to_array(t) for t in new.graph.initializer}
    old_w = {t.name: onnx.numpy_helper.to_array(t) for t in old.graph.initializer}
    assert new_w.keys() == old_w.keys() and all(new_w[k].shape == old_w[k].shape for k in new_w)
    changed = [k for k in new_w if not np.array_equal(new_w[k], old_w[k])]
    assert len(changed) == report.trainable_tensors + 2 * sum(n.op_type == "BatchNormalization" for n in old.graph.node)
    assert file_digest(pruned) == before_bytes
    assert report.fidelity["torch_vs_ort_before"] < 1e-4 and report.fidelity["ort_written_vs_torch_trained"] < 1e-4
    assert len(report.epochs) == 2 and report.epochs[1]["loss"] < report.epochs[0]["loss"]


def test_torch_loss_equals_fused_graph(digits: Path) -> None:
    """The trainer's loss is the distill pass's loss: same numbers on the same batch."""
    config = DistillConfig(teacher=str(digits / "cnn.onnx"), temperature=3.0, alpha=0.4)
    fused = DistillPass().apply(load_model(digits / "mlp.onnx"), config, PassContext()).model
    data = np.load(digits / "eval.npz")
    x, labels = data["x"][:48], data["labels"][:48]
    names = [v.name for v in fused.graph.outputs]
    got = dict(zip(names, run_model(fused, {"x": x, "labels": labels})))
    s, t = run_model(digits / "mlp.onnx", {"x": x})[0], run_model(digits / "cnn.onnx", {"x": x})[0]
    terms = distill_loss(torch.from_numpy(s), torch.from_numpy(t), torch.from_numpy(labels), temperature=3.0, alpha=0.4)
    for name, value in (("kd_loss", terms.kd), ("ce_loss", terms.ce), ("total_loss", terms.total)):
        np.testing.assert_allclose(float(value), got[name], atol=1e-5, rtol=1e-5, err_msg=name)


def test_labels_only_and_no_label_errors(digits: Path, tmp_path: Path) -> None:
    mlp = digits / "mlp.onnx"
    report = finetune(mlp, None, data=digits / "calib.npz", eval_data=digits / "eval.npz",
                      config=FinetuneConfig(epochs=1, lr=1e-3, **FAST))
    assert "teacher" not in report.accuracy and report.accuracy["after"] is not None
    assert any("no teacher" in n for n in report.notes)
    data = np.load(digits / "calib.npz")
    np.savez(tmp_path / "unlabelled.npz", x=data["x"])
    with pytest.raises(OnnxoptError, match="has no labels"):
        finetune(mlp, None, data=tmp_path / "unlabelled.npz", teacher=digits / "cnn.onnx", config=FinetuneConfig(**FAST))
    # KD alone needs no labels; accuracy then is agreement with the teacher
    report = finetune(mlp, None, data=tmp_path / "unlabelled.npz", teacher=digits / "cnn.onnx",
                      eval_data=tmp_path / "unlabelled.npz", config=FinetuneConfig(epochs=1, alpha=1.0, **FAST))
    assert report.accuracy_basis == "top-1 agreement with the teacher" and report.accuracy["teacher"] == 1.0
    with pytest.raises(OnnxoptError, match="is the student model"):
        finetune(mlp, mlp, data=digits / "calib.npz")


def test_unsupported_student_is_a_clear_error(tmp_path: Path, digits: Path) -> None:
    quantized = tmp_path / "q.onnx"
    # speed_fallback off: the student must hold Q/DQ nodes, which the speed guard's float-compute build (chosen by
    # timing when int8 is slower than fp32, as it is for this mlp) replaces with Cast+Mul
    apply(digits / "mlp.onnx", ["quant"], quantized, data=digits / "calib.npz", validate_result=False,
          settings={"quant": {"speed_fallback": "off"}})
    with pytest.raises(OnnxoptError, match="no torch conversion for op (QuantizeLinear|DequantizeLinear|DynamicQuantizeLinear)"):
        finetune(quantized, None, data=digits / "calib.npz", teacher=digits / "mlp.onnx", config=FinetuneConfig(**FAST))


def test_missing_torch_is_a_one_line_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torch", None)  # what `import torch` sees when it is not installed
    with pytest.raises(OnnxoptError, match=r"install onnxopt\[train\]"):
        require_torch()


def test_config_is_validated() -> None:
    with pytest.raises(ValueError, match="alpha"):
        FinetuneConfig(alpha=1.5)
    with pytest.raises(OnnxoptError, match="unknown augmentation"):
        FinetuneConfig(augment=("rotate",))


def test_cli_finetune(pruned: Path, digits: Path, tmp_path: Path) -> None:
    out, report = tmp_path / "ft.onnx", tmp_path / "ft.json"
    run = run_cli("finetune", pruned, "--teacher", digits / "cnn.onnx", "--data", digits / "calib.npz", "-o", out,
                  "--eval", digits / "eval.npz", "--epochs", "1", "--augment", "shift,noise", "--set", "threads=1",
                  "--report", report, "-q")
    assert run.returncode == 0, run.stderr
    assert "drop vs teacher" in run.stdout and out.exists() and report.exists()
    onnx.checker.check_model(str(out), full_check=True)
    bad = CliRunner().invoke(cli, ["finetune", str(pruned), "--data", str(digits / "calib.npz"), "-o", str(out),
                                   "--augment", "rotate"])
    assert bad.exit_code == 2 and bad.stderr.count("\n") == 1 and "unknown augmentation" in bad.stderr
    # the defaults the help text quotes are the config's
    defaults = {f.name: f.default for f in config_fields(FinetuneConfig)}
    help_text = " ".join(CliRunner().invoke(cli, ["finetune", "--help"]).stdout.split())
    for key, flag in (("epochs", "Passes over the data"), ("lr", "cosine decay"), ("batch_size", "Samples per step"),
                      ("temperature", "temperature T"), ("alpha", "(1-alpha)*CE"), ("seed", "torch")):
        assert f"[{defaults[key]:g}]" in help_text.split(flag, 1)[1][:30], key


def test_finetune_trains_a_hand_built_student(tmp_path: Path) -> None:
    """A tiny Gemm chain distilled from a wider one gets closer to it (KD loss falls)."""
    student, teacher = gemm_chain((16, 8, 4), seed=0), gemm_chain((16, 64, 4), seed=1)
    onnx.save(student, tmp_path / "s.onnx")
    onnx.save(teacher, tmp_path / "t.onnx")
    x = np.random.default_rng(0).standard_normal((256, 16)).astype(np.float32)
    np.savez(tmp_path / "d.npz", x=x)
    report = finetune(tmp_path / "s.onnx", tmp_path / "out.onnx", data=tmp_path / "d.npz", teacher=tmp_path / "t.onnx",
                      config=FinetuneConfig(epochs=5, alpha=1.0, lr=0.01, batch_size=32, **FAST))
    assert report.epochs[-1]["kd"] < 0.7 * report.epochs[0]["kd"]
    fused_config = DistillConfig(teacher=str(tmp_path / "t.onnx"), labels=None)
    kd = lambda path: float(dict(zip(["y", "soft_labels", "kd_loss", "total_loss"], run_model(  # noqa: E731
        DistillPass().apply(to_ir(onnx.load(path)), fused_config, PassContext()).model, {"x": x})))["kd_loss"])
    assert kd(tmp_path / "out.onnx") < 0.7 * kd(tmp_path / "s.onnx")  # measured by the fused graph on ORT


def test_fixed_batch_student_trains_with_its_batch(tmp_path: Path) -> None:
    student, teacher = gemm_chain((16, 8, 4), seed=0), gemm_chain((16, 32, 4), seed=1)
    student.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 4  # the exporter fixed the batch at 4
    onnx.save(student, tmp_path / "s.onnx")
    onnx.save(teacher, tmp_path / "t.onnx")
    np.savez(tmp_path / "d.npz", x=np.random.default_rng(0).standard_normal((30, 16)).astype(np.float32))
    report = finetune(tmp_path / "s.onnx", tmp_path / "o.onnx", data=tmp_path / "d.npz", teacher=tmp_path / "t.onnx",
                      config=FinetuneConfig(epochs=2, alpha=1.0, **FAST))
    assert any("fixed batch of 4" in n for n in report.notes) and report.written
    assert report.epochs[-1]["kd"] < report.epochs[0]["kd"]
