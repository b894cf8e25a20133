"""--metric OUTPUT=textmap: a DB text detector's probability map, binarized at 0.3, by F-score against the original's."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import onnxopt
from onnxopt.metrics import TEXT_MAP_THRESHOLD, metric_drop, text_map_f1

from tests.graphs import init, make_model
from tests.helpers import confirmation_part, run_cli, run_model


def test_text_map_f1_counts_text_pixels() -> None:
    ref = np.zeros((2, 1, 4, 5), np.float32)
    cand = np.zeros_like(ref)
    ref.reshape(-1)[:10] = 0.9  # 10 text pixels
    cand.reshape(-1)[2:10] = 0.31  # 8 of them ...
    cand.reshape(-1)[30:34] = 1.0  # ... and 4 others
    cand.reshape(-1)[0] = TEXT_MAP_THRESHOLD  # at the threshold: not text (DBNet keeps > 0.3)
    assert text_map_f1(ref, cand) == pytest.approx(2 * 8 / (10 + 12))
    assert metric_drop("textmap", ref, cand, None)[0] == pytest.approx(1 - 16 / 22)
    assert text_map_f1(np.zeros_like(ref), np.zeros_like(ref)) == 1.0  # no text in either: the same map
    assert text_map_f1(ref[:, 0], cand[:, 0]) == pytest.approx(16 / 22)  # [N, H, W] too
    # not a probability map: logits, values beyond [0, 1], several channels, other shapes
    assert text_map_f1(np.zeros((4, 10), np.float32), np.zeros((4, 10), np.float32)) is None
    assert text_map_f1(ref * 3, cand) is None
    assert text_map_f1(np.zeros((2, 3, 4, 5), np.float32), np.zeros((2, 3, 4, 5), np.float32)) is None
    assert text_map_f1(ref, cand[:1]) is None
    with pytest.raises(ValueError, match="text probability map"):
        metric_drop("textmap", np.zeros((4, 10), np.float32), np.zeros((4, 10), np.float32), None)


def _detector(folder: Path) -> tuple[Path, Path]:
    """x[N,8,16,16] -> Conv 3x3 (16) -> Relu -> Conv 1x1 (1) -> Sigmoid -> map[N,1,16,16]: a DB-style head."""
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Conv", ["x", "w0", "b0"], ["c0"], pads=[1, 1, 1, 1], name="conv0"),
             helper.make_node("Relu", ["c0"], ["r0"], name="relu0"),
             helper.make_node("Conv", ["r0", "w1", "b1"], ["c1"], name="conv1"),
             helper.make_node("Sigmoid", ["c1"], ["map"], name="sigmoid")]
    inits = [init("w0", (rng.standard_normal((16, 8, 3, 3)) / 8).astype(np.float32)), init("b0", np.zeros(16, np.float32)),
             init("w1", (rng.standard_normal((1, 16, 1, 1)) / 2).astype(np.float32)),
             init("b1", np.array([-1.0], np.float32))]
    model = make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8, 16, 16])],
                       [helper.make_tensor_value_info("map", TensorProto.FLOAT, ["N", 1, 16, 16])], inits)
    onnx.save(model, folder / "det.onnx")
    np.savez(folder / "eval.npz", x=rng.standard_normal((40, 8, 16, 16)).astype(np.float32))
    return folder / "det.onnx", folder / "eval.npz"


def test_apply_gates_a_text_map_by_textmap(tmp_path: Path) -> None:
    """apply's gate with --metric map=textmap: the drop is 1 - F-score of the binarized maps on the confirmation part,
    computed here independently on ORT; on logits the metric is one clear error (exit 2)."""
    model, eval_path = _detector(tmp_path)
    run = onnxopt.apply(model, "cluster", tmp_path / "out.onnx", settings={"cluster": {"k": 2, "min_size": 16}},
                        eval_data=eval_path, metrics={"map": "textmap"}, force=True)
    v = run.validation
    assert v is not None and "F-score of the text pixels" in v.drop_basis
    x = confirmation_part(eval_path)["x"]
    ref, out = run_model(model, {"x": x})[0], run_model(tmp_path / "out.onnx", {"x": x})[0]
    expected = 1.0 - 2 * np.count_nonzero((ref > 0.3) & (out > 0.3)) / (np.count_nonzero(ref > 0.3) + np.count_nonzero(out > 0.3))
    assert 0.0 < expected and v.drop == pytest.approx(expected, abs=1e-12)

    bad = run_cli("validate", model, tmp_path / "out.onnx", "--eval", eval_path, "--metric", "map=textmap")
    assert bad.returncode == 0, bad.stderr
    digits = Path(__file__).resolve().parents[1] / "examples" / "digits"
    bad = run_cli("validate", digits / "mlp.onnx", digits / "mlp.onnx", "--eval", digits / "eval.npz",
                  "--metric", "logits=textmap")
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "text probability map" in bad.stderr
