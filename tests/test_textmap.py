"""--metric OUTPUT=textmap: a DB text detector's probability map, binarized at 0.3, by F-score against the original's."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import onnxopt
from onnxopt.data import Dataset
from onnxopt.metrics import TEXT_MAP_THRESHOLD, metric_drop, text_map_f1
from onnxopt.split import split_dataset

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
    # float32 Sigmoid on ORT returns 1.0000001 on sure text (PP-OCRv4 det on rendered pages): still a probability map
    sure = ref.copy()
    sure.reshape(-1)[0] = np.nextafter(np.float32(1.0), np.float32(2.0))
    assert text_map_f1(sure, cand) == pytest.approx(16 / 22)
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


def _f1_drop(ref: np.ndarray, out: np.ndarray) -> float:
    r, c = ref > TEXT_MAP_THRESHOLD, out > TEXT_MAP_THRESHOLD
    total = np.count_nonzero(r) + np.count_nonzero(c)
    return 0.0 if total == 0 else 1.0 - 2 * np.count_nonzero(r & c) / total


def test_a_rung_within_by_its_textmap_drop_alone_is_rejected_by_its_per_sample_margin(tmp_path: Path) -> None:
    """cluster's budget ladder with --metric map=textmap: the strongest rung (k=2) measures a pooled drop under the
    budget on the selection part, but not once one standard error of its per-sample drops (computed here on ORT,
    independently) is added: the ladder must not pick it (before the margin for non-share metrics, it did)."""
    model, eval_path = _detector(tmp_path)
    with np.load(eval_path) as f:
        x_all = f["x"]
    split = split_dataset(Dataset(str(eval_path), {"x": x_all}, []), 0)
    x = x_all[split.selection_indices]
    strongest = onnxopt.apply(model, "cluster", tmp_path / "k2.onnx", settings={"cluster": {"k": 2, "min_size": 16}},
                              eval_data=eval_path, metrics={"map": "textmap"}, force=True)
    assert strongest.written
    ref, out = run_model(model, {"x": x})[0], run_model(tmp_path / "k2.onnx", {"x": x})[0]
    drop = _f1_drop(ref, out)
    per_sample = np.array([_f1_drop(ref[i], out[i]) for i in range(len(x))])
    error = per_sample.std(ddof=1) / np.sqrt(len(x))
    assert drop > 0.0 and error > 0.0
    limit = float(drop + error / 2)  # within by the pooled drop alone, over with one standard error
    run = onnxopt.apply(model, "cluster", tmp_path / "out.onnx", settings={"cluster": {"min_size": 16}},
                        eval_data=eval_path, metrics={"map": "textmap"}, max_drop=limit, force=True)
    budget = run.passes[0].figures["budget"]
    k2 = next(t for t in budget["tried"] if t["setting"].startswith("k=2 "))
    assert k2["drop"] == pytest.approx(drop, abs=1e-12) and k2["margin"] == pytest.approx(error, rel=1e-9)
    assert k2["drop"] <= limit and not k2["within"]
    assert budget["chosen"] is None or not budget["chosen"].startswith("k=2 ")
    for t in budget["tried"]:
        assert t["within"] == (t["drop"] + t["margin"] <= limit + 1e-12)
    if budget["chosen"] is not None:
        chosen = next(t for t in budget["tried"] if t["setting"] == budget["chosen"])
        assert chosen["margin"] > 0.0 and "per-sample" in budget["reason"]


def test_search_adds_the_per_sample_margin_to_a_textmap_drop(tmp_path: Path) -> None:
    """search's candidates follow the same rule: a k=2 cluster candidate whose pooled textmap drop on the selection
    part is within, but not with one standard error of its per-sample drops (computed here on ORT), is not within."""
    from onnxopt.api import load_data
    from onnxopt.io import load_model
    from onnxopt.plugins import load_registry
    from onnxopt.search import apply_recipe, recipe_from_json, search
    from onnxopt.search.space import PassSpace
    from onnxopt.search.strategy import within_budget
    from onnxopt.sessions import SessionFactory
    from onnxopt.timing import TimingConfig

    model, eval_path = _detector(tmp_path)
    reference = load_model(model)
    split = split_dataset(load_data(reference, eval_path), 0)
    x = np.load(eval_path)["x"][split.selection_indices]
    space = {"cluster": PassSpace("ladder", ({"k": 2},), fixed={"min_size": 16})}
    timing = TimingConfig(repeat=2, time_budget=0.5)
    first = search(model, eval_data=eval_path, max_drop=1.0, passes="cluster", space=space, workers=1, timing=timing,
                   metrics={"map": "textmap"}, force=True)
    k2 = next(c for c in first.candidates if c["status"] == "ok" and c["recipe"][-1]["pass"] == "cluster")
    built, _ = apply_recipe(reference, recipe_from_json(k2["recipe"]), registry=load_registry(), sessions=SessionFactory(),
                            calibration=None, evaluation=split.selection)
    ref, out = run_model(model, {"x": x})[0], run_model(built, {"x": x})[0]
    drop = _f1_drop(ref, out)
    error = np.array([_f1_drop(ref[i], out[i]) for i in range(len(x))]).std(ddof=1) / np.sqrt(len(x))
    assert drop > 0.0 and error > 0.0
    assert k2["drop"] == pytest.approx(drop, abs=1e-12) and k2["drop_margin"] == pytest.approx(error, rel=1e-9)
    limit = float(drop + error / 2)  # within by the pooled drop alone, over with the margin
    assert within_budget(k2, float(drop + 2 * error)) and not within_budget(k2, limit)
    second = search(model, eval_data=eval_path, max_drop=limit, passes="cluster", space=space, workers=1,
                    timing=timing, metrics={"map": "textmap"}, force=True)
    assert second.best is None or second.best["recipe"][-1]["pass"] != "cluster"


def test_quant_fallback_adds_the_per_sample_margin_to_a_textmap_drop(tmp_path: Path) -> None:
    """quant's fallback: the all-int8 model's pooled textmap drop on the selection part (computed here on ORT) is within
    the budget, but not with one standard error of its per-sample drops: a node goes back to float."""
    model, eval_path = _detector(tmp_path)
    np.savez(tmp_path / "calib.npz", x=np.random.default_rng(5).standard_normal((16, 8, 16, 16)).astype(np.float32))
    with np.load(eval_path) as f:
        x_all = f["x"]
    x = x_all[split_dataset(Dataset(str(eval_path), {"x": x_all}, []), 0).selection_indices]
    common = {"data": tmp_path / "calib.npz", "eval_data": eval_path, "metrics": {"map": "textmap"}, "force": True}
    onnxopt.apply(model, "quant", tmp_path / "int8.onnx", settings={"quant": {"fallback": False, "speed_guard": "off"}},
                  **common)
    ref, out = run_model(model, {"x": x})[0], run_model(tmp_path / "int8.onnx", {"x": x})[0]
    drop = _f1_drop(ref, out)
    error = np.array([_f1_drop(ref[i], out[i]) for i in range(len(x))]).std(ddof=1) / np.sqrt(len(x))
    assert drop > 0.0 and error > 0.0
    limit = float(drop + error / 2)
    run = onnxopt.apply(model, "quant", tmp_path / "out.onnx", settings={"quant": {"speed_guard": "off"}}, max_drop=limit,
                        **common)
    figures = run.passes[0].figures
    first = figures["budget"]["tried"][0]
    assert first["setting"] == "all quantized" and first["drop"] == pytest.approx(drop, abs=1e-12)
    assert first["margin"] == pytest.approx(error, rel=1e-9) and not first["within"]
    assert figures["fallback"]["kept_float"]  # the margin, not the drop, sent a node back to float
    assert all(t["within"] == (t["drop"] + t["margin"] <= limit + 1e-12) for t in figures["budget"]["tried"])


def test_chain_rolls_back_a_pass_within_by_its_textmap_drop_alone_but_not_with_its_margin(tmp_path: Path) -> None:
    """The chain's keep-or-roll-back is a choice made on the selection part: the same drop + one standard error rule
    as the ladders. cluster k=2 (set by hand: no ladder) leaves the chain with a pooled textmap drop within the budget
    but not once the standard error of its per-sample drops (computed here on ORT) is added: it is rolled back; with
    a budget of two standard errors it is kept. (Before the chain had a margin, the first run kept it.)"""
    model, eval_path = _detector(tmp_path)
    with np.load(eval_path) as f:
        x_all = f["x"]
    x = x_all[split_dataset(Dataset(str(eval_path), {"x": x_all}, []), 0).selection_indices]
    settings = {"cluster": {"k": 2, "min_size": 16}}
    common = {"eval_data": eval_path, "metrics": {"map": "textmap"}, "settings": settings, "force": True}
    onnxopt.apply(model, "cluster", tmp_path / "k2.onnx", **common)
    ref, out = run_model(model, {"x": x})[0], run_model(tmp_path / "k2.onnx", {"x": x})[0]
    drop = _f1_drop(ref, out)
    error = np.array([_f1_drop(ref[i], out[i]) for i in range(len(x))]).std(ddof=1) / np.sqrt(len(x))
    assert drop > 0.0 and error > 0.0

    tight = onnxopt.apply(model, ["fold", "cluster"], tmp_path / "tight.onnx", max_drop=float(drop + error / 2), **common)
    row = tight.ledger[-1]
    assert row["pass"] == "cluster" and row["drop_selection"] == pytest.approx(drop, abs=1e-12)
    assert row["drop_selection"] <= drop + error / 2 and row["action"] == "rolled back"
    assert row["margin_selection"] == pytest.approx(error, rel=1e-9)
    assert "margin" in row["reason"] and tight.passes[-1].summary.startswith("rolled back")
    # the chain went on from the model before cluster: the original's text map
    np.testing.assert_array_equal(run_model(tmp_path / "tight.onnx", {"x": x})[0], ref)

    loose = onnxopt.apply(model, ["fold", "cluster"], tmp_path / "loose.onnx", max_drop=float(drop + 2 * error), **common)
    assert loose.ledger[-1]["action"] == "kept" and loose.ledger[-1]["margin_selection"] == pytest.approx(error, rel=1e-9)
