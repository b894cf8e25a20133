"""A YOLO-style detector's raw output is gated by its detections (F-score after NMS), not by cosine over boxes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import onnxopt
from onnxopt.detection import DETECTION_SCORE, detection_f1, detection_layout, detections
from onnxopt.metrics import choose_metric, metric_drop, relative_error
from tests.graphs import init, make_model
from tests.helpers import confirmation_part, run_cli, run_model

CLASSES, ANCHORS = 3, 20


def _output() -> np.ndarray:
    """[2, 4 + 3, 20], anchors last: image 0 holds object A twice (two anchors, IoU 0.82: NMS keeps one) and B;
    image 1 holds C. Every other anchor has a box and scores below the threshold."""
    rng = np.random.default_rng(0)
    out = np.zeros((2, 4 + CLASSES, ANCHORS), np.float32)
    out[:, 0:2] = rng.uniform(20, 300, (2, 2, ANCHORS))
    out[:, 2:4] = rng.uniform(5, 40, (2, 2, ANCHORS))
    out[:, 4:] = rng.uniform(0, 0.2, (2, CLASSES, ANCHORS))
    out[0, :4, 0], out[0, 4, 0] = (100, 100, 40, 40), 0.9  # A
    out[0, :4, 1], out[0, 4, 1] = (102, 101, 40, 40), 0.8  # A again
    out[0, :4, 2], out[0, 5, 2] = (250, 60, 30, 20), 0.7  # B, class 1
    out[1, :4, 5], out[1, 6, 5] = (50, 200, 24, 60), 0.6  # C, class 2
    return out


def test_detections_are_thresholded_and_suppressed_per_class() -> None:
    out = _output()
    boxes, classes = detections(out[0], "anchors_last")
    assert classes.tolist() == [0, 1]  # A once (its second anchor suppressed), then B
    assert boxes[0].tolist() == [80, 80, 120, 120]  # corners of cx 100, cy 100, w 40, h 40
    same_box_other_class = out[0].copy()
    same_box_other_class[4:, 1] = (0.0, 0.8, 0.0)
    assert detections(same_box_other_class, "anchors_last")[1].tolist() == [0, 1, 1]  # NMS is per class
    at_threshold = out[1].copy()
    at_threshold[6, 5] = DETECTION_SCORE
    assert detections(at_threshold, "anchors_last")[1].size == 0  # a detection scores above it, not at it


def test_detection_f1_counts_matched_detections() -> None:
    ref = _output()
    cand = ref.copy()
    cand[0, 5, 2], cand[0, 6, 2] = 0.0, 0.7  # B read as class 2: no match
    cand[1, 0, 5] += 30  # C moved by 30 px of its 24 px width: IoU under 0.5, no match
    cand[1, :4, 7], cand[1, 4, 7] = (200, 200, 20, 20), 0.3  # a new detection
    # reference 3 detections, candidate 4, one matched (A)
    assert detection_f1(ref, cand) == pytest.approx(2 * 1 / (3 + 4))
    assert detection_f1(ref, ref) == 1.0
    empty = ref.copy()
    empty[:, 4:] = 0.0
    assert detection_f1(empty, empty) == 1.0  # nothing detected by either: the same list
    assert detection_f1(ref, empty) == 0.0
    nan = cand.copy()
    nan[0, 4:, :] = np.nan  # a broken candidate's NaN scores detect nothing, and do not crash the metric
    assert detection_f1(ref, nan) == pytest.approx(2 * 0 / (3 + 2))
    # YOLOv5's layout: anchors first, objectness before the class scores (a score is their product)
    def v5(a: np.ndarray) -> np.ndarray:
        rows = np.concatenate([a[:, :4], np.ones_like(a[:, :1]), a[:, 4:]], axis=1)
        return rows.transpose(0, 2, 1).copy()
    assert detection_layout(v5(ref)) == "anchors_first"
    assert detection_f1(v5(ref), v5(cand)) == pytest.approx(2 / 7)


def test_cosine_hides_a_lost_detection_that_the_detection_metric_sees() -> None:
    ref = _output()
    cand = ref.copy()
    cand[0, 5, 2] = 0.2  # B's score falls under the threshold: the user loses one of three objects
    assert metric_drop("cosine", ref, cand, None)[0] < 1e-4
    drop, basis, _ = metric_drop("detection", ref, cand, None)
    assert drop == pytest.approx(1 - 2 * 2 / (3 + 2)) and "3 reference, 2 candidate, 2 matched" in basis


def test_automatic_metric_reads_a_detector_output_by_its_detections_and_nothing_else() -> None:
    metric, reason = choose_metric(_output())
    assert metric == "detection" and "anchors last" in reason
    rng = np.random.default_rng(1)
    assert choose_metric(rng.random((2, 30, 40)).astype(np.float32))[0] == "cosine"  # a probability map: no pixels
    assert choose_metric(rng.standard_normal((2, 84, 2100)).astype(np.float32))[0] == "cosine"  # logits, negative sizes
    negative = _output()
    negative[0, 2, 3] = -1.0
    assert choose_metric(negative)[0] == "cosine"  # a negative width is not a box
    normalized = _output()
    normalized[:, :4] /= 400
    assert detection_layout(normalized) is None and detection_layout(normalized, pixels=False) == "anchors_last"
    assert metric_drop("detection", normalized, normalized, None)[0] == 0.0  # declared: boxes in [0, 1] are fine
    with pytest.raises(ValueError, match="raw output"):
        metric_drop("detection", rng.standard_normal((4, 10)).astype(np.float32),
                     rng.standard_normal((4, 10)).astype(np.float32), None)


def _yolo(folder: Path) -> tuple[Path, Path]:
    """x[N,3,32,32] -> Conv 4x4 stride 4 (8) -> Relu -> Conv 1x1 (4 + 3) -> [N, 7, 64] anchors; boxes in pixels
    (sigmoid x 32 for the centre, x 16 for the size) and sigmoid class scores: a YOLOv8-style raw output."""
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Conv", ["x", "w0", "b0"], ["c0"], kernel_shape=[4, 4], strides=[4, 4], name="conv0"),
             helper.make_node("Relu", ["c0"], ["r0"], name="relu0"),
             helper.make_node("Conv", ["r0", "w1", "b1"], ["c1"], name="conv1"),
             helper.make_node("Reshape", ["c1", "shape"], ["flat"], name="reshape"),
             helper.make_node("Sigmoid", ["flat"], ["unit"], name="sigmoid"),
             helper.make_node("Split", ["unit", "parts"], ["centre", "size", "scores"], axis=1, name="split"),
             helper.make_node("Mul", ["centre", "c32"], ["centre_px"], name="centre_px"),
             helper.make_node("Mul", ["size", "c16"], ["size_px"], name="size_px"),
             helper.make_node("Concat", ["centre_px", "size_px", "scores"], ["out"], axis=1, name="concat")]
    inits = [init("w0", (rng.standard_normal((8, 3, 4, 4)) / 4).astype(np.float32)), init("b0", np.zeros(8, np.float32)),
             init("w1", rng.standard_normal((7, 8, 1, 1)).astype(np.float32)),
             init("b1", np.array([0, 0, 0, 0, -1.5, -1.5, -1.5], np.float32)),
             init("shape", np.array([0, 7, 64], np.int64)), init("parts", np.array([2, 2, 3], np.int64)),
             init("c32", np.array(32.0, np.float32)), init("c16", np.array(16.0, np.float32))]
    model = make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 32, 32])],
                       [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", 7, 64])], inits)
    onnx.save(model, folder / "yolo.onnx")
    np.savez(folder / "eval.npz", x=rng.standard_normal((60, 3, 32, 32)).astype(np.float32))
    return folder / "yolo.onnx", folder / "eval.npz"


def test_apply_gates_a_detector_by_its_detections(tmp_path: Path) -> None:
    """Without --metric, apply reads the output as a detector's and gates 1 - F-score of the detections on the
    confirmation part, equal to the F-score of the two models' ORT outputs there."""
    model, eval_path = _yolo(tmp_path)
    run = onnxopt.apply(model, "cluster", tmp_path / "out.onnx", settings={"cluster": {"k": 4, "min_size": 16}},
                        eval_data=eval_path, force=True)
    v = run.validation
    assert v is not None and [r["metric"] for r in v.drop_outputs] == ["detection"] and "F-score of the detections" in v.drop_basis
    x = confirmation_part(eval_path)["x"]
    ref, out = run_model(model, {"x": x})[0], run_model(tmp_path / "out.onnx", {"x": x})[0]
    assert len(detections(ref[0], "anchors_last")[1]) > 0  # the premise: the reference detects something
    expected = 1.0 - detection_f1(ref, out)  # type: ignore[operator]
    assert 0.0 < expected and v.drop == pytest.approx(expected, abs=1e-12)

    digits = Path(__file__).resolve().parents[1] / "examples" / "digits"
    bad = run_cli("validate", digits / "mlp.onnx", digits / "mlp.onnx", "--eval", digits / "eval.npz",
                  "--metric", "logits=detection")
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "raw output" in bad.stderr


def test_ranking_error_weighs_a_detectors_scores_as_much_as_its_boxes() -> None:
    """quant's fallback and prune's scan rank by relative_error: over the whole tensor, every box moved by one pixel
    outweighs a lost detection 20 to 1; with boxes and scores each counted, the lost detection is the worse."""
    ref = _output()
    moved = ref.copy()
    moved[:, :4] += 1.0
    lost = ref.copy()
    lost[0, 5, 2] = 0.2
    whole = [float(np.linalg.norm(c - ref) / np.linalg.norm(ref)) for c in (moved, lost)]
    assert whole[0] > 10 * whole[1]  # the premise: the whole tensor sees the boxes
    assert relative_error(ref, lost) > 10 * relative_error(ref, moved)
    assert detection_f1(ref, moved) == 1.0 and detection_f1(ref, lost) < 1.0
    # batches are pooled per part; squared is the square of each part's figure
    assert relative_error([ref[:1], ref[1:]], [lost[:1], lost[1:]], squared=True) == pytest.approx(
        sum(float(np.sum((c - r) ** 2) / np.sum(r ** 2)) for r, c in ((ref[:, :4], lost[:, :4]), (ref[:, 4:], lost[:, 4:]))))
    # any other output: the plain figure, exactly as before
    rng = np.random.default_rng(3)
    a, b = rng.standard_normal((4, 10)), rng.standard_normal((4, 10))
    assert relative_error(a, b) == float(np.linalg.norm(b - a) / np.linalg.norm(a))
    assert relative_error([a[:2], a[2:]], [b[:2], b[2:]], squared=True) == pytest.approx(float(np.sum((b - a) ** 2) / np.sum(a ** 2)))
