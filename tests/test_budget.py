"""Budget machinery: per-output drop metrics, the selection/confirmation split, the budget helper, the chain ledger."""

from __future__ import annotations

import dataclasses
import json
import types
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from onnxopt import Pass, PassResult, hookimpl
from onnxopt.api import apply, load_data
from onnxopt.budget import Drop, margin, strongest_within
from onnxopt.data import Dataset
from onnxopt.io import load_model
from onnxopt.metrics import choose_metric
from onnxopt.plugins import get_plugin_manager, load_registry
from onnxopt.split import split_dataset
from onnxopt.validate import validate
from tests.graphs import init, make_model
from tests.helpers import run_cli, to_ir

# -- per-output metrics ---------------------------------------------------------------------------------------------


def _detector(noise: float, seed: int = 0) -> onnx.ModelProto:
    """x [N, 16, 8] -> scores [N, 10] (softmax over classes) and boxes [N, 84, 2100] (anchors last, like YOLOv8)."""
    rng = np.random.default_rng(seed)
    w_s = rng.standard_normal((128, 10)).astype(np.float32)
    w_b = rng.standard_normal((128, 84 * 2100)).astype(np.float32) * 0.1
    if noise:
        jitter = np.random.default_rng(99)
        w_s = w_s + noise * jitter.standard_normal(w_s.shape).astype(np.float32)
        w_b = w_b + noise * 0.1 * jitter.standard_normal(w_b.shape).astype(np.float32)
    nodes = [
        helper.make_node("Flatten", ["x"], ["flat"], axis=1),
        helper.make_node("MatMul", ["flat", "w_s"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["scores"], axis=-1),
        helper.make_node("MatMul", ["flat", "w_b"], ["b2"]),
        helper.make_node("Reshape", ["b2", "shape"], ["boxes"]),
    ]
    return make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16, 8])],
                      [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["N", 10]),
                       helper.make_tensor_value_info("boxes", TensorProto.FLOAT, ["N", 84, 2100])],
                      [init("w_s", w_s), init("w_b", w_b), init("shape", np.array([-1, 84, 2100], np.int64))])


def test_automatic_metric_is_top1_only_where_the_last_axis_is_classes() -> None:
    rng = np.random.default_rng(0)
    assert choose_metric(rng.standard_normal((8, 10)).astype(np.float32))[0] == "top1"
    probs = rng.random((4, 25, 37)).astype(np.float32)
    assert choose_metric(probs / probs.sum(-1, keepdims=True))[0] == "top1"  # per-timestep softmax (OCR-style)
    metric, reason = choose_metric(rng.standard_normal((2, 84, 2100)).astype(np.float32))
    assert metric == "cosine" and "2100" in reason
    assert choose_metric(rng.standard_normal((8, 5000)).astype(np.float32))[0] == "cosine"  # too many to be classes
    assert choose_metric(np.arange(6).reshape(2, 3))[0] == "match"


def test_detector_output_is_gated_by_cosine_not_top1_over_anchors() -> None:
    reference, candidate = to_ir(_detector(0.0)), to_ir(_detector(0.05))
    x = np.random.default_rng(1).standard_normal((6, 16, 8)).astype(np.float32)
    data = Dataset("synthetic", {"x": x})
    result = validate(reference, candidate, data, latency=False)
    rows = {r["output"]: r for r in result.drop_outputs}
    assert rows["scores"]["metric"] == "top1" and rows["boxes"]["metric"] == "cosine"
    boxes = result.outputs["boxes"]
    # the boxes barely moved (cosine ~1), while the arg-max over 2,100 anchors moved a lot: the old drop was that
    assert rows["boxes"]["drop"] == pytest.approx(1.0 - boxes["cosine"], abs=1e-9) and rows["boxes"]["drop"] < 0.01
    assert 1.0 - boxes["top1_agreement"] > 0.05
    assert result.drop == pytest.approx(max(rows["scores"]["drop"], rows["boxes"]["drop"]))
    # declared: only the declared outputs are gated, with the declared metric
    declared = validate(reference, candidate, data, latency=False, declared={"boxes": "snr"})
    assert declared.drop == pytest.approx(10 ** (-declared.outputs["boxes"]["snr_db"] / 10), rel=1e-6)
    assert declared.drop_basis.startswith("1 / linear SNR") or "SNR" in declared.drop_basis
    none = validate(reference, candidate, data, latency=False, declared={"scores": "none", "boxes": "cosine"})
    assert none.drop == pytest.approx(rows["boxes"]["drop"])


def test_metric_errors_are_one_line(tmp_path: Path, digits: Path) -> None:
    proc = run_cli("apply", digits / "mlp.onnx", "--pass", "fold", "--eval", digits / "eval.npz", "--metric", "logits=map50")
    assert proc.returncode == 2 and "unknown metric" in proc.stderr and proc.stderr.count("\n") == 1
    proc = run_cli("apply", digits / "mlp.onnx", "--pass", "fold", "--eval", digits / "eval.npz", "--metric", "boxes=cosine")
    assert proc.returncode == 2 and "does not have" in proc.stderr
    recipe = tmp_path / "r.toml"
    recipe.write_text('passes = ["fold"]\n[metric]\nlogits = "cosine"\n')
    proc = run_cli("apply", digits / "mlp.onnx", "--recipe", recipe, "--eval", digits / "eval.npz", "--report", tmp_path / "r.json")
    assert proc.returncode == 0, proc.stderr
    rows = json.loads((tmp_path / "r.json").read_text())["validation"]["drop_outputs"]
    assert rows[0]["metric"] == "cosine" and rows[0]["reason"].startswith("declared")


# -- selection and confirmation ---------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ProbeConfig:
    """Keys of the probe pass."""

    scale: float = dataclasses.field(default=0.0, metadata={"doc": "unused"})


class ProbePass(Pass[ProbeConfig]):
    """Record the evaluation samples a pass is given (a chooser must only see the selection part)."""

    name = "probe"
    Config = ProbeConfig
    seen: list[np.ndarray] = []

    def run(self, model, config, ctx):
        ProbePass.seen.append(ctx.evaluation.arrays["x"].copy())
        return PassResult(model, False, self.new_report(config))


def test_split_is_disjoint_deterministic_and_covers_eval(digits: Path) -> None:
    model = load_model(digits / "cnn.onnx")
    data = load_data(model, digits / "eval.npz")
    a, b, c = split_dataset(data, 0), split_dataset(data, 0), split_dataset(data, 1)
    assert len(np.intersect1d(a.selection_indices, a.confirmation_indices)) == 0
    assert np.array_equal(np.union1d(a.selection_indices, a.confirmation_indices), np.arange(len(data)))
    assert np.array_equal(a.selection_indices, b.selection_indices)
    assert not np.array_equal(a.selection_indices, c.selection_indices)
    assert np.array_equal(a.selection.arrays["x"], data.arrays["x"][a.selection_indices])
    assert np.array_equal(a.confirmation.labels, data.labels[a.confirmation_indices])


def test_passes_see_only_the_selection_part_and_the_gate_only_the_confirmation(digits: Path) -> None:
    @hookimpl
    def onnxopt_register_passes(register):
        register(ProbePass)

    pm = get_plugin_manager()
    pm.register(types.SimpleNamespace(onnxopt_register_passes=onnxopt_register_passes), name="probe_plugin")
    ProbePass.seen.clear()
    run = apply(digits / "cnn.onnx", ["probe"], eval_data=digits / "eval.npz", max_drop=0.01, seed=3,
                registry=load_registry(pm))
    x = np.load(digits / "eval.npz")["x"]
    split = split_dataset(load_data(load_model(digits / "cnn.onnx"), digits / "eval.npz"), 3)
    assert np.array_equal(ProbePass.seen[0], x[split.selection_indices])
    assert run.validation is not None and run.validation.samples == len(split.confirmation_indices)
    assert run.split == split.to_dict() and run.split["disjoint"]
    # --holdout: all of --eval selects, the holdout file confirms
    ProbePass.seen.clear()
    run = apply(digits / "cnn.onnx", ["probe"], eval_data=digits / "eval.npz", holdout=digits / "calib.npz",
                registry=load_registry(pm))
    assert np.array_equal(ProbePass.seen[0], x)
    assert run.validation is not None and run.validation.samples == len(np.load(digits / "calib.npz")["x"])


# -- the budget helper and the chain ledger ---------------------------------------------------------------------------


def test_strongest_within_bisects_and_greedy_walks() -> None:
    ladder = list(range(10))  # drop grows with the rung: 0.004 per rung
    calls: list[int] = []

    def measure(rung: int) -> float:
        calls.append(rung)
        return 0.004 * rung

    choice = strongest_within(ladder, measure, 0.02)
    assert choice.value == 5 and calls[0] == 9 and len(calls) <= 5  # strongest first, then bisection
    assert all(t["within"] == (t["drop"] <= 0.02 + 1e-12) for t in choice.tried)
    calls.clear()
    greedy = strongest_within(ladder, measure, 0.02, mode="greedy")
    assert greedy.value == 5 and calls == [0, 1, 2, 3, 4, 5, 6]
    none = strongest_within(ladder, lambda r: 0.5, 0.02)
    assert none.chosen is None and "over the budget" in none.reason
    # with a sample count, a rung must be within by one standard error as well
    padded = strongest_within(ladder, measure, 0.02, samples=100)
    assert padded.value is not None and padded.value < 5
    assert 0.004 * padded.value + margin(0.004 * padded.value, 100) <= 0.02
    # the measure says per rung whether its drop is a share of samples (top-1) or not (1 - cosine: no margin)
    assert strongest_within(ladder, lambda r: Drop(0.004 * r, 100), 0.02).value == padded.value
    assert strongest_within(ladder, lambda r: Drop(0.004 * r, None), 0.02, samples=100).value == 5


def test_chain_rolls_back_a_pass_forced_over_budget(tmp_path: Path, digits: Path) -> None:
    out = tmp_path / "out.onnx"
    run = apply(digits / "cnn.onnx", ["prune", "cluster"], out, settings={"cluster": {"k": 2}}, data=digits / "calib.npz",
                eval_data=digits / "eval.npz", max_drop=0.02, report=tmp_path / "r.json")
    prune, cluster = run.ledger
    # prune chose its own strength within the budget; cluster's k=2 was the user's and broke it: rolled back
    assert prune["action"] == "kept" and run.passes[0].figures["budget"]["chosen"] is not None
    assert prune["drop_selection"] <= 0.02
    assert cluster["action"] == "rolled back" and cluster["drop_selection"] > 0.02
    assert run.passes[1].summary.startswith("rolled back")
    assert run.written and run.validation is not None
    ops = {n.op_type for n in onnx.load(out).graph.node}
    assert "BitShift" not in ops and "GatherElements" not in ops  # no cluster decode: the model is prune's
    assert run.drop_selection == pytest.approx(prune["drop_selection"])
    assert run.validation.drop == pytest.approx(prune["drop_confirmation"])
    doc = json.loads((tmp_path / "r.json").read_text())
    assert [r["action"] for r in doc["ledger"]] == ["kept", "rolled back"]
    assert doc["budget_choices"][0]["pass"] == "prune" and doc["optimism"] == pytest.approx(
        doc["drop_confirmation"] - doc["drop_selection"])


def test_a_lossy_pass_without_budget_warns_loudly_with_the_command(tmp_path: Path, digits: Path) -> None:
    args = ["apply", digits / "cnn.onnx", "--pass", "cluster", "--set", "cluster.k=2", "--data", digits / "calib.npz",
            "--eval", digits / "eval.npz", "-o", tmp_path / "o.onnx"]
    proc = run_cli(*args)
    assert proc.returncode == 0, proc.stderr
    head = proc.stdout.splitlines()[:8]
    assert "WARNING" in head[0]
    text = " ".join(" ".join(line.strip("│ ") for line in head).split())
    assert "--max-drop 0.01" in text and "--pass cluster" in text and "cluster.k" in text
    proc = run_cli(*args[:-2], "--max-drop", "0.02")  # with a budget: no such warning (k=2 set by hand is rolled back)
    assert "no budget was given" not in proc.stdout and "rolled back" in proc.stdout


def test_registered_metrics_become_drops() -> None:
    from onnxopt.metrics import Metric, metric_drop

    rng = np.random.default_rng(0)
    ref = rng.standard_normal((16, 5)).astype(np.float32)
    cand = ref + 0.1 * rng.standard_normal(ref.shape).astype(np.float32)
    labels = ref.argmax(1)
    close = Metric("close", lambda r, c: float(np.mean(np.abs(r - c) < 0.1)), "compare", True)
    error = Metric("error", lambda r, c: float(np.abs(r - c).max()), "compare", False)
    hits = Metric("hits", lambda o, y: float(np.mean(o.argmax(1) == y)), "labels", True)
    registered = {m.name: m for m in (close, error, hits)}
    assert metric_drop("close", ref, cand, None, registered)[0] == pytest.approx(1 - np.mean(np.abs(ref - cand) < 0.1))
    assert metric_drop("error", ref, cand, None, registered)[0] == pytest.approx(np.abs(ref - cand).max())
    drop, _, acc = metric_drop("hits", ref, cand, labels, registered)
    assert acc is not None and drop == pytest.approx(1.0 - np.mean(cand.argmax(1) == labels))
    snr = metric_drop("snr", ref, cand, None)[0]
    assert snr == pytest.approx(np.sum((ref - cand) ** 2) / np.sum(ref ** 2), rel=1e-5)
    with pytest.raises(KeyError):
        metric_drop("nope", ref, cand, None, registered)


def test_top1_of_a_sequence_output_gets_the_margin_of_its_per_sample_shares_not_a_binomial_over_samples() -> None:
    """A [N, T, C] output (a recognizer's frames): its top-1 agreement is a share of N x T positions that move
    together within a sample. The margin is the standard error of the N per-sample shares; a classifier's [N, C]
    output keeps the binomial margin over N."""
    from onnxopt.sessions import SessionFactory
    from onnxopt.validate import budget_drop

    rng = np.random.default_rng(3)
    n, t, c = 40, 24, 12
    w = rng.standard_normal((8, c)).astype(np.float32)
    noisy = w + rng.normal(0, 0.25, w.shape).astype(np.float32)

    def model(weight: np.ndarray, shape: list[int]) -> onnx.ModelProto:
        # softmax probabilities per frame, as a recognizer's output: read as top-1 by the automatic metric
        nodes = [helper.make_node("MatMul", ["x", "w"], ["z"]), helper.make_node("Softmax", ["z"], ["y"], axis=-1)]
        return make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [*shape, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [*shape, c])], [init("w", weight)])

    x = rng.standard_normal((n, t, 8)).astype(np.float32)
    ref, cand = to_ir(model(w, ["N", t])), to_ir(model(noisy, ["N", t]))
    sessions = SessionFactory()
    measured = budget_drop(ref, cand, Dataset("eval", {"x": x}), sessions)
    y_ref, y_cand = (sessions.create(m).run(None, {"x": x})[0] for m in (ref, cand))
    flipped = (y_ref.argmax(-1) != y_cand.argmax(-1)).mean(axis=1)  # each sample's share of frames flipped
    assert measured.value == pytest.approx(flipped.mean()) and 0 < measured.value < 0.5
    assert measured.margin == pytest.approx(flipped.std(ddof=1) / np.sqrt(n), rel=1e-6)
    assert measured.margin < 0.6 * margin(measured.value, n)  # what the binomial over samples claimed

    # one position per sample: the same rows as a classifier's outputs, binomial over their number
    flat = x.reshape(-1, 8)
    ref2, cand2 = to_ir(model(w, ["N"])), to_ir(model(noisy, ["N"]))
    measured2 = budget_drop(ref2, cand2, Dataset("eval", {"x": flat}), sessions)
    assert measured2.value == pytest.approx(measured.value)
    assert measured2.margin == pytest.approx(margin(measured2.value, n * t))
