"""prune: dependency patterns against numpy, exactness, reports, config, and the digits examples end to end."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest

import onnxopt
from onnxopt import OnnxoptError, PassContext
from onnxopt.data import load_dataset, input_specs
from onnxopt.graph import constant_array
from onnxopt.io import load_model
from onnxopt.measure import count_parameters
from onnxopt_passes.prune import PruneConfig, PrunePass

from tests.graphs import init, make_model
from tests.graphs_prune import PATTERNS, Pattern, zero_channel_chain
from tests.helpers import run_cli, run_model, to_ir


def _weight(model: ir.Model, node: str, index: int) -> np.ndarray:
    found = [n for n in model.graph if n.name == node]
    assert found, f"node {node} is gone"
    array = constant_array(found[0].inputs[index])
    assert array is not None
    return array


def _kept(dense: np.ndarray, pruned: np.ndarray, axis: int) -> np.ndarray:
    """Which slices of ``dense`` along ``axis`` survive in ``pruned`` (slices are copied, not changed)."""
    d = np.moveaxis(dense, axis, 0).reshape(dense.shape[axis], -1)
    p = np.moveaxis(pruned, axis, 0).reshape(pruned.shape[axis], -1)
    dist = ((p[:, None, :] - d[None, :, :]) ** 2).sum(-1)
    idx = dist.argmin(axis=1)
    assert np.allclose(dist[np.arange(len(idx)), idx], 0), "a pruned filter is not a copy of a dense one"
    assert len(set(idx.tolist())) == len(idx) and (np.diff(idx) > 0).all(), "filters reordered or duplicated"
    mask = np.zeros(dense.shape[axis], dtype=bool)
    mask[idx] = True
    return mask


def _masked_reference(pattern: Pattern, pruned: ir.Model, x: np.ndarray) -> np.ndarray:
    """numpy on the dense weights with the readers' columns of removed channels zeroed."""
    kept: dict[str, np.ndarray] = {}
    for link in pattern.links:
        for seg in link.segments:
            if seg.producer in kept:
                continue
            # a Conv's bias is sliced by its filters only (its weight may also lose input channels)
            index = 2 if (seg.producer, 2) in pattern.weights and pattern.weights[(seg.producer, 1)].ndim == 4 else 1
            kept[seg.producer] = _kept(pattern.weights[(seg.producer, index)], _weight(pruned, seg.producer, index),
                                       seg.axis if index == 1 else 0)
    weights = dict(pattern.weights)
    for link in pattern.links:
        mask = np.concatenate([np.repeat(kept[s.producer][s.start : s.stop], s.repeat) for s in link.segments])
        if link.blocks > 1:
            rows = mask.reshape(link.blocks, -1)
            assert (rows == rows[:1]).all(), "blocks of a grouped conv pruned unevenly"
            mask = rows[0]
        w = weights[(link.node, link.index)].copy()
        index: list[slice | np.ndarray] = [slice(None)] * w.ndim
        index[link.axis] = ~mask
        w[tuple(index)] = 0
        weights[(link.node, link.index)] = w
    return pattern.forward(x.astype(np.float64), {k: v.astype(np.float64) for k, v in weights.items()})


@pytest.mark.parametrize("name", sorted(PATTERNS))
def test_pattern_pruned_matches_numpy(name: str) -> None:
    pattern = PATTERNS[name]()
    x = np.random.default_rng(0).standard_normal(pattern.x_shape).astype(np.float32)
    dense_model = to_ir(pattern.proto)
    (dense_out,) = run_model(pattern.proto, {"x": x})
    np.testing.assert_allclose(dense_out, pattern.forward(x.astype(np.float64), pattern.weights), rtol=1e-4, atol=1e-4)

    config = PruneConfig(ratio=0.5, round_to=1, attention_heads=pattern.attention_heads)
    result = PrunePass().apply(dense_model, config, PassContext())
    assert result.modified, result.report.summary
    pruned = result.model
    for producer, filters in pattern.producers.items():
        assert _weight(pruned, producer, 1).shape[pattern.producer_axis.get(producer, 0)] == filters, producer
    (got,) = run_model(pruned, {"x": x})
    assert got.shape == dense_out.shape
    np.testing.assert_allclose(got, _masked_reference(pattern, pruned, x), rtol=1e-4, atol=1e-4)
    assert count_parameters(pruned) < count_parameters(dense_model)
    onnx.checker.check_model(ir.serde.serialize_model(pruned), full_check=True)  # shapes stay consistent


def test_attention_heads_are_pruned_whole() -> None:
    pattern = PATTERNS["attention"]()
    result = PrunePass().apply(to_ir(pattern.proto), PruneConfig(ratio=0.5, attention_heads=True), PassContext())
    masks = [_kept(pattern.weights[(p, 1)], _weight(result.model, p, 1), 1) for p in "qkv"]
    assert (masks[0] == masks[1]).all() and (masks[0] == masks[2]).all()
    heads = masks[0].reshape(4, 4)
    assert ((heads.all(axis=1)) | (~heads.any(axis=1))).all() and heads.all(axis=1).sum() == 2
    split = [n for n in result.model.graph if n.op_type == "Reshape" and n.name.endswith("_split")]
    assert all(int(constant_array(n.inputs[1])[2]) == 2 for n in split)
    without = PrunePass().apply(to_ir(pattern.proto), PruneConfig(ratio=0.5), PassContext())
    assert not without.modified and "attention_heads=true" in without.report.summary


def test_zero_ratio_is_exact(digits) -> None:
    model = load_model(digits / "cnn.onnx")
    result = PrunePass().apply(model, PruneConfig(ratio=0.0), PassContext())
    assert result.report.figures["channels_removed"] == 0 and not result.modified
    x = np.load(digits / "eval.npz")["x"][:64]
    np.testing.assert_array_equal(run_model(result.model, {"x": x})[0], run_model(digits / "cnn.onnx", {"x": x})[0])


def test_zero_channels_prune_losslessly() -> None:
    proto = zero_channel_chain()
    result = PrunePass().apply(to_ir(proto), PruneConfig(ratio=0.5, round_to=1), PassContext())
    pruned = result.model
    assert _weight(pruned, "c1", 1).shape[0] == 4 and _weight(pruned, "c2", 1).shape == (4, 4, 3, 3)
    assert not np.abs(_weight(pruned, "c1", 1)).sum(axis=(1, 2, 3)).min() == 0  # the zero filters went
    x = np.random.default_rng(3).standard_normal((4, 3, 6, 6)).astype(np.float32)
    np.testing.assert_allclose(run_model(pruned, {"x": x})[0], run_model(proto, {"x": x})[0], rtol=1e-5, atol=1e-6)


def _unprunable_model() -> onnx.ModelProto:
    """One clean Conv chain, and one Conv whose channels a Reshape mixes with space, then DepthToSpace."""
    from onnx import TensorProto, helper

    rng = np.random.default_rng(5)
    inits = [init(n, rng.standard_normal(s).astype(np.float32)) for n, s in
             (("w1", (8, 3, 3, 3)), ("w2", (4, 8, 3, 3)), ("w3", (8, 3, 3, 3)), ("w4", (8, 3, 3, 3)))]
    inits.append(init("mix", np.array([0, 2, 144], dtype=np.int64)))
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["a"], name="c1", pads=[1] * 4),
        helper.make_node("Relu", ["a"], ["ar"], name="r1"),
        helper.make_node("Conv", ["ar", "w2"], ["y"], name="c2", pads=[1] * 4),
        helper.make_node("Conv", ["x", "w3"], ["b"], name="c3", pads=[1] * 4),
        helper.make_node("Reshape", ["b", "mix"], ["z"], name="mixing_reshape"),
        helper.make_node("Conv", ["x", "w4"], ["c"], name="c4", pads=[1] * 4),
        helper.make_node("DepthToSpace", ["c"], ["d"], name="d2s", blocksize=2),
    ]
    outs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in
            (("y", ["N", 4, 6, 6]), ("z", ["N", 2, 144]), ("d", ["N", 2, 12, 12]))]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 6, 6])], outs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    return model


def test_unfollowable_groups_are_reported_and_untouched() -> None:
    proto = _unprunable_model()
    result = PrunePass().apply(to_ir(proto), PruneConfig(ratio=0.5, round_to=1), PassContext())
    reasons = {s.target: s.reason for s in result.report.skipped}
    assert "splits the channel axis" in reasons["c3"] and "mixing_reshape" in reasons["c3"]
    assert "DepthToSpace" in reasons["c4"]
    assert _weight(result.model, "c1", 1).shape[0] == 4
    assert _weight(result.model, "c3", 1).shape[0] == 8 and _weight(result.model, "c4", 1).shape[0] == 8
    x = np.random.default_rng(0).standard_normal((2, 3, 6, 6)).astype(np.float32)
    got, want = run_model(result.model, {"x": x}), run_model(proto, {"x": x})
    assert got[0].shape == want[0].shape
    np.testing.assert_array_equal(got[1], want[1])
    np.testing.assert_array_equal(got[2], want[2])


def test_nothing_prunable_is_a_skip() -> None:
    from onnx import TensorProto, helper

    w = np.random.default_rng(0).standard_normal((8, 3, 1, 1)).astype(np.float32)
    proto = make_model([helper.make_node("Conv", ["x", "w"], ["y"], name="c")],
                       [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 4, 4])],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8, 4, 4])], [init("w", w)])
    result = PrunePass().apply(to_ir(proto), PruneConfig(), PassContext())
    assert not result.modified and "no prunable channel group" in result.report.summary


def test_exclude_and_first_last_protect(digits) -> None:
    model = load_model(digits / "cnn.onnx")
    result = PrunePass().apply(model, PruneConfig(ratio=0.5, exclude=("node_Conv_12[34]",)), PassContext())
    reasons = {s.target: s.reason for s in result.report.skipped}
    assert "prune.exclude" in reasons["node_Conv_123"] and "prune.exclude" in reasons["node_Conv_124"]
    result = PrunePass().apply(model, PruneConfig(ratio=0.5, keep_first_last=True), PassContext())
    kept = {s.target for s in result.report.skipped}
    assert any(t.startswith("node_Conv_120") for t in kept) and any(t.startswith("node_Conv_125") for t in kept)


def test_targets_are_met(digits) -> None:
    model = load_model(digits / "cnn.onnx")
    for key in ("target_macs", "target_params"):
        result = PrunePass().apply(model, PruneConfig(**{key: 0.4}, round_to=1), PassContext())
        f = result.report.figures
        figure = "macs" if key == "target_macs" else "params"
        assert f[f"{figure}_after"] <= 0.4 * f[f"{figure}_before"] + 1
        assert f[f"{figure}_after"] >= 0.2 * f[f"{figure}_before"]  # not wildly over-pruned


def test_config_errors(digits) -> None:
    for bad in ({"ratio": "1.5"}, {"saliency": "l7"}, {"target_macs": "0.5", "target_params": "0.5"}):
        with pytest.raises(OnnxoptError):
            onnxopt.apply(digits / "cnn.onnx", "prune", settings={"prune": bad}, validate_result=False)
    with pytest.raises(OnnxoptError, match="--data"):
        onnxopt.apply(digits / "cnn.onnx", "prune", settings={"prune": {"saliency": "activation"}}, validate_result=False)


def test_does_not_mutate_input(digits) -> None:
    model = load_model(digits / "cnn.onnx")
    before = {k: v.const_value.numpy().copy() for k, v in model.graph.initializers.items()}
    PrunePass().apply(model, PruneConfig(ratio=0.5, reconstruct=True),
                      PassContext(calibration=load_dataset(digits / "calib.npz", input_specs(model))))
    for k, v in model.graph.initializers.items():
        np.testing.assert_array_equal(v.const_value.numpy(), before[k])


def _drop(digits, name: str, **settings: object) -> tuple[float, float]:
    run = onnxopt.apply(digits / f"{name}.onnx", "prune", settings={"prune": settings},
                        data=digits / "calib.npz", eval_data=digits / "eval.npz")
    assert run.validation is not None
    return run.validation.drop, run.validation.ratio("parameters") or 1.0


def _accuracy(model: ir.Model | onnx.ModelProto, digits) -> float:
    data = np.load(digits / "eval.npz")
    return float((run_model(model, {"x": data["x"]})[0].argmax(1) == data["labels"]).mean())


def test_digits_cnn_half_channels_with_reconstruction(digits) -> None:
    selected, params = _drop(digits, "cnn", ratio=0.5, saliency="reconstruct")  # end to end, as a user runs it
    assert params < 0.35
    assert selected <= 0.015  # the bound is 1.0 pt; a little slack for the data split
    model = load_model(digits / "cnn.onnx")
    ctx = PassContext(calibration=load_dataset(digits / "calib.npz", input_specs(model)))
    magnitude = _accuracy(PrunePass().apply(model, PruneConfig(ratio=0.5, reconstruct=False), ctx).model, digits)
    refit = _accuracy(PrunePass().apply(model, PruneConfig(ratio=0.5, reconstruct=True), ctx).model, digits)
    dense = _accuracy(model, digits)
    assert refit > magnitude + 0.2  # the least-squares refit recovers what magnitude pruning loses (same channels)
    assert dense - selected >= refit - 0.01  # choosing channels for the refit does at least about as well


def test_digits_mlp_and_transformer(digits) -> None:
    drop, params = _drop(digits, "mlp", ratio=0.5, saliency="reconstruct")
    assert drop <= 0.02 and params < 0.4
    drop, params = _drop(digits, "transformer", ratio=0.5, saliency="reconstruct", attention_heads=True)
    assert drop <= 0.05 and params < 0.75


def test_cli_writes_a_smaller_model(digits, tmp_path) -> None:
    out = tmp_path / "p.onnx"
    proc = run_cli("apply", digits / "cnn.onnx", "--pass", "prune", "--set", "prune.ratio=0.5",
                   "--data", digits / "calib.npz", "-o", out)
    assert proc.returncode == 0, proc.stderr
    assert count_parameters(load_model(out)) < 0.35 * count_parameters(load_model(digits / "cnn.onnx"))


def _conv_then_transpose() -> onnx.ModelProto:
    from onnx import TensorProto, helper

    rng = np.random.default_rng(0)
    inits = [init("w1", rng.standard_normal((16, 3, 3, 3)).astype(np.float32)), init("b1", rng.standard_normal(16).astype(np.float32)),
             init("wt", (rng.standard_normal((16, 4, 2, 2)) * 0.3).astype(np.float32)), init("bt", rng.standard_normal(4).astype(np.float32))]
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c"], pads=[1] * 4, name="c1"),
             helper.make_node("Relu", ["c"], ["r"], name="relu"),
             helper.make_node("ConvTranspose", ["r", "wt", "bt"], ["y"], strides=[2, 2], name="ct")]
    return make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 6, 6])],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 12, 12])], inits)


@pytest.mark.parametrize("build", ["conv_transpose", "mlp"])
def test_refit_reduces_the_error_of_the_readers(build: str, digits) -> None:
    from onnxopt.data import Dataset

    if build == "mlp":
        model, x = load_model(digits / "mlp.onnx"), np.load(digits / "calib.npz")["x"]
        proto: onnx.ModelProto | ir.Model = model
    else:
        proto = _conv_then_transpose()
        model, x = to_ir(proto), np.random.default_rng(1).standard_normal((64, 3, 6, 6)).astype(np.float32)
    ctx = PassContext(calibration=Dataset("calib", {"x": x}, batch_size=16))
    reference = run_model(proto, {"x": x})[0]
    errors = {}
    for refit in (False, True):
        result = PrunePass().apply(model, PruneConfig(ratio=0.5, round_to=1, reconstruct=refit), ctx)
        out = run_model(result.model, {"x": x})[0]
        errors[refit] = float(((out - reference) ** 2).sum() / (reference ** 2).sum())
        if refit:
            rows = [i for i in result.report.items if "refit" in i]
            assert rows and all(r["error_after"] <= r["error_before"] for r in rows)
    assert errors[True] < 0.8 * errors[False], errors


def test_sensitivity_scan_is_done_once_per_ladder(digits, monkeypatch) -> None:
    """Strength aside, the same model, data and settings give the same curves: a second strength reuses the scan and
    prunes exactly as a fresh scan would; another setting (round_to) scans again."""
    import onnxopt_passes.prune as prune_pkg
    from onnxopt.io import serialize_model
    from onnxopt_passes.prune import distribution

    model = load_model(digits / "cnn.onnx")
    calib = load_dataset(digits / "calib.npz", input_specs(model))
    scans = []
    real_scan = prune_pkg.scan_sensitivity
    monkeypatch.setattr(prune_pkg, "scan_sensitivity", lambda *a, **k: scans.append(1) or real_scan(*a, **k))

    def run(config: PruneConfig):
        return PrunePass().apply(model, config, PassContext(calibration=calib))

    weak, strong = (PruneConfig(target_macs=t, distribution="sensitivity", reconstruct=False) for t in (0.8, 0.5))
    distribution._SCANS.clear()
    fresh = serialize_model(run(strong).model)
    distribution._SCANS.clear()
    first = run(weak)
    second = run(strong)
    assert len(scans) == 2  # the fresh run and the ladder's first rung; its second rung scanned nothing
    assert not any("scan reused" in n for n in first.report.notes)
    assert any("scan reused" in n for n in second.report.notes)
    assert serialize_model(second.model) == fresh
    run(PruneConfig(target_macs=0.5, distribution="sensitivity", reconstruct=False, round_to=1))
    assert len(scans) == 3


def test_a_reused_scan_leaves_the_passes_after_it_the_same_draws(digits) -> None:
    """The scan draws from a generator of its own: scanned or reused, the run's generator is left in the same state
    (a chain's cluster after prune drew differently on a process's first apply than on later ones)."""
    from onnxopt_passes.prune import distribution

    model = load_model(digits / "cnn.onnx")
    calib = load_dataset(digits / "calib.npz", input_specs(model))
    config = PruneConfig(target_macs=0.8, distribution="sensitivity", reconstruct=True)
    distribution._SCANS.clear()
    draws, notes = [], []
    for _ in range(2):
        ctx = PassContext(calibration=calib, rng=np.random.default_rng(0))
        notes.append(PrunePass().apply(model, config, ctx).report.notes)
        draws.append(ctx.rng.random(4))
    assert not any("scan reused" in n for n in notes[0]) and any("scan reused" in n for n in notes[1])
    np.testing.assert_array_equal(draws[0], draws[1])
