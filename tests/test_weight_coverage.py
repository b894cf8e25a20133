"""Every weight covered: LSTM, GRU and If branches reading outer-scope weights, clustered and quantized, checked on ORT.

Each model is compared with the original on ONNX Runtime; a weight two
branches share is compressed once and both branches read the one copy.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from onnxopt import PassContext
from onnxopt.io import serialize_model
from onnxopt_passes.cluster import ClusterConfig, ClusterPass
from onnxopt_passes.quant import QuantConfig, QuantPass

from tests.graphs import init, make_model
from tests.helpers import run_model, to_ir

RNG = np.random.default_rng(11)
SEQ, BATCH, FEATURES, HIDDEN = 6, 2, 32, 64


def _f32(*shape: int, scale: float) -> np.ndarray:
    return (RNG.standard_normal(shape) * scale).astype(np.float32)


def _recurrent(op: str, gates: int, direction: str = "forward") -> onnx.ModelProto:
    """x[seq, batch, features] -> op(hidden) -> Y[seq, dirs, batch, hidden]; weights are most of the model."""
    dirs = 2 if direction == "bidirectional" else 1
    inits = [init("W", _f32(dirs, gates * HIDDEN, FEATURES, scale=0.2)), init("R", _f32(dirs, gates * HIDDEN, HIDDEN, scale=0.15)),
             init("B", _f32(dirs, 2 * gates * HIDDEN, scale=0.1))]
    node = helper.make_node(op, ["x", "W", "R", "B"], ["Y"], hidden_size=HIDDEN, direction=direction, name=op.lower())
    return make_model([node], [helper.make_tensor_value_info("x", TensorProto.FLOAT, [SEQ, BATCH, FEATURES])],
                      [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [SEQ, dirs, BATCH, HIDDEN])], inits)


def _if_outer_scope() -> onnx.ModelProto:
    """An If whose two branches run an LSTM on the same outer-scope W, R, B (a streaming model's reset / carry
    branches), then a MatMul head."""
    def branch(name: str, scale: float) -> onnx.GraphProto:
        nodes = [helper.make_node("Mul", ["x", f"{name}_s"], [f"{name}_x"]),
                 helper.make_node("LSTM", [f"{name}_x", "W", "R", "B"], [f"{name}_y"], hidden_size=HIDDEN, name=f"{name}_lstm")]
        return helper.make_graph(nodes, name, [], [helper.make_tensor_value_info(f"{name}_y", TensorProto.FLOAT,
                                                                                 [SEQ, 1, BATCH, HIDDEN])],
                                 [init(f"{name}_s", np.array(scale, np.float32))])
    nodes = [helper.make_node("If", ["cond"], ["h"], then_branch=branch("then", 1.0), else_branch=branch("else", 0.5)),
             helper.make_node("Squeeze", ["h", "axis1"], ["h3"]),
             helper.make_node("MatMul", ["h3", "head"], ["y"], name="head_mm")]
    inits = [init("W", _f32(1, 4 * HIDDEN, FEATURES, scale=0.2)), init("R", _f32(1, 4 * HIDDEN, HIDDEN, scale=0.15)),
             init("B", _f32(1, 8 * HIDDEN, scale=0.1)), init("axis1", np.array([1], np.int64)),
             init("head", _f32(HIDDEN, 16, scale=0.2))]
    return make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [SEQ, BATCH, FEATURES]),
                              helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, [SEQ, BATCH, 16])], inits)


MODELS = {
    "lstm": lambda: _recurrent("LSTM", 4),
    "gru": lambda: _recurrent("GRU", 3),
    "bidirectional-lstm": lambda: _recurrent("LSTM", 4, "bidirectional"),
    "if-outer-scope": _if_outer_scope,
}


def _feeds(proto: onnx.ModelProto) -> list[dict[str, np.ndarray]]:
    x = RNG.standard_normal((SEQ, BATCH, FEATURES)).astype(np.float32)
    if any(i.name == "cond" for i in proto.graph.input):
        return [{"x": x, "cond": np.array(c)} for c in (True, False)]
    return [{"x": x}]


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


@pytest.mark.parametrize("name", list(MODELS))
def test_cluster_covers_recurrent_and_outer_scope_weights(name: str) -> None:
    proto = MODELS[name]()
    result = ClusterPass().apply(to_ir(proto), ClusterConfig(k=16, mode="packed"), PassContext())
    clustered = {item["tensor"] for item in result.report.items}
    assert {"W", "R", "B"} <= clustered, result.report.skipped
    # each weight once, however many nodes read it
    assert len(clustered) == len(result.report.items)
    before, after = len(proto.SerializeToString()), len(serialize_model(result.model))
    for feed in _feeds(proto):
        (ref,), (got,) = run_model(proto, feed), run_model(result.model, feed)
        assert _cosine(got, ref) >= 0.98
    if name != "if-outer-scope":  # weights are (nearly) all recurrent: 4-bit indices and a 16-value codebook
        assert after <= 0.16 * before, (after, before)


def test_shared_outer_scope_weight_is_decoded_once_and_read_by_both_branches() -> None:
    proto = _if_outer_scope()
    result = ClusterPass().apply(to_ir(proto), ClusterConfig(k=16, mode="packed"), PassContext())
    model = result.model
    w = [v for v in model.graph.initializers.values()]
    assert not any(v.name == "W" for v in w)  # the float weight is gone
    decoded = next(node.outputs[0] for node in model.graph if node.outputs and node.outputs[0].name == "W")
    readers = {node.name for node, _ in decoded.uses()}
    assert readers == {"then_lstm", "else_lstm"}  # one decoded copy, both branches read it
    assert sum(item["tensor"] == "W" for item in result.report.items) == 1


@pytest.mark.parametrize("name", list(MODELS))
def test_dynamic_quant_covers_recurrent_weights(name: str) -> None:
    proto = MODELS[name]()
    result = QuantPass().apply(to_ir(proto), QuantConfig(mode="dynamic"), PassContext())
    assert result.modified, result.report.summary
    tensors = {item.get("tensor") for item in result.report.items}
    assert {"W", "R"} <= tensors, result.report.items
    model = result.model
    dqs = [n for g in [model.graph] for n in g if n.op_type == "DequantizeLinear"]
    assert {n.outputs[0].name for n in dqs} >= {"W", "R"}  # one DequantizeLinear per weight, in the owning graph
    before, after = len(proto.SerializeToString()), len(serialize_model(model))
    assert after < 0.4 * before
    for feed in _feeds(proto):
        (ref,), (got,) = run_model(proto, feed), run_model(model, feed)
        # 0.998 on an AVX2-only EPYC (no VNNI), where ORT's u8 x s8 MatMul kernels lose more (tests/conftest.py)
        assert _cosine(got, ref) >= 0.999
        assert np.abs(got - ref).max() > 0  # it did change: int8 weights, not the float ones


def test_embedding_table_read_by_gather_is_quantized_and_shared() -> None:
    table = _f32(500, 32, scale=1.0)
    nodes = [helper.make_node("Gather", ["table", "ids"], ["e"], name="embed"),
             helper.make_node("Gather", ["table", "ids2"], ["e2"], name="embed_again"),
             helper.make_node("Add", ["e", "e2"], ["y"])]
    proto = make_model(nodes, [helper.make_tensor_value_info("ids", TensorProto.INT64, [4]),
                               helper.make_tensor_value_info("ids2", TensorProto.INT64, [4])],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 32])], [init("table", table)])
    feed = {"ids": np.array([0, 7, 499, 3]), "ids2": np.array([1, 1, 2, 250])}
    (ref,) = run_model(proto, feed)
    for pass_, config in ((QuantPass(), QuantConfig(mode="dynamic")), (ClusterPass(), ClusterConfig(k=16))):
        result = pass_.apply(to_ir(proto), config, PassContext())
        assert sum(item.get("tensor") == "table" for item in result.report.items) == 1
        (got,) = run_model(result.model, feed)
        assert _cosine(got, ref) >= 0.99 and np.abs(got - ref).max() > 0


def test_fold_keeps_an_outer_scope_weight_shared() -> None:
    """graphsurgeon copies an outer-scope constant into every body that reads it; the fold pass puts it back once."""
    from onnxopt.graph import iter_graphs
    from onnxopt_passes.fold import FoldConfig, FoldPass

    proto = _if_outer_scope()
    result = FoldPass().apply(to_ir(proto), FoldConfig(), PassContext())
    owners = [g.name for g in iter_graphs(result.model) for name in g.initializers if name == "W"]
    assert owners == [result.model.graph.name]
    for feed in _feeds(proto):
        np.testing.assert_array_equal(run_model(result.model, feed)[0], run_model(proto, feed)[0])


def test_static_quant_lists_the_recurrent_weights_it_leaves_float() -> None:
    from onnxopt.data import Dataset

    proto = _recurrent("LSTM", 4)
    data = Dataset("t", _feeds(proto)[0], batch_size=SEQ)  # the fixed [seq, batch, features] input as one batch
    result = QuantPass().apply(to_ir(proto), QuantConfig(), PassContext(calibration=data))
    assert not result.modified
    assert "2 recurrent/embedding weight(s) stay float" in result.report.summary  # W and R of the LSTM
    assert "quant.mode=dynamic" in result.report.summary


def _reordered(source: str, block: int, name: str) -> list[onnx.NodeProto]:
    """An exporter's gate reordering (PyTorch i,f,g,o -> ONNX i,o,f,c): Slice the source's row blocks, Concat them,
    Unsqueeze a direction axis; reads ``source`` from the outer scope."""
    order = [(0, 1), (3, 4), (1, 3)]
    nodes = [helper.make_node("Slice", [source, f"{name}_s{i}", f"{name}_e{i}", "zero"], [f"{name}_p{i}"])
             for i in range(len(order))]
    nodes.append(helper.make_node("Concat", [f"{name}_p{i}" for i in range(len(order))], [f"{name}_cat"], axis=0))
    nodes.append(helper.make_node("Unsqueeze", [f"{name}_cat", "zero"], [name]))
    return nodes


def _reorder_inits(name: str, block: int) -> list[onnx.TensorProto]:
    order = [(0, 1), (3, 4), (1, 3)]
    return [t for i, (a, b) in enumerate(order)
            for t in (init(f"{name}_s{i}", np.array([a * block], np.int64)), init(f"{name}_e{i}", np.array([b * block], np.int64)))]


def _nested_if_gate_reorder() -> onnx.ModelProto:
    """Silero VAD's layout in small: the weights are initializers of an outer If's branch; an inner If's two branches
    each reorder their gates (Slice/Concat/Unsqueeze) and run an LSTM on them."""
    def inner(name: str) -> onnx.GraphProto:
        nodes = [*_reordered("Wsrc", HIDDEN, f"{name}_W"), *_reordered("Rsrc", HIDDEN, f"{name}_R"),
                 helper.make_node("Unsqueeze", ["Bsrc", "zero"], [f"{name}_B"]),
                 helper.make_node("LSTM", ["x", f"{name}_W", f"{name}_R", f"{name}_B"], [f"{name}_y"], hidden_size=HIDDEN,
                                  name=f"{name}_lstm")]
        return helper.make_graph(nodes, name, [], [helper.make_tensor_value_info(f"{name}_y", TensorProto.FLOAT,
                                                                                 [SEQ, 1, BATCH, HIDDEN])],
                                 [*_reorder_inits(f"{name}_W", HIDDEN), *_reorder_inits(f"{name}_R", HIDDEN)])
    outer_then = helper.make_graph(
        [helper.make_node("If", ["cond2"], ["t_y"], then_branch=inner("a"), else_branch=inner("b"))], "outer_then", [],
        [helper.make_tensor_value_info("t_y", TensorProto.FLOAT, [SEQ, 1, BATCH, HIDDEN])],
        [init("Wsrc", _f32(4 * HIDDEN, FEATURES, scale=0.2)), init("Rsrc", _f32(4 * HIDDEN, HIDDEN, scale=0.15)),
         init("Bsrc", _f32(8 * HIDDEN, scale=0.1))])
    outer_else = helper.make_graph(
        [helper.make_node("Concat", ["x", "x"], ["e_cat"], axis=2), helper.make_node("Unsqueeze", ["e_cat", "one"], ["e_y"])],
        "outer_else", [], [helper.make_tensor_value_info("e_y", TensorProto.FLOAT, [SEQ, 1, BATCH, HIDDEN])])
    nodes = [helper.make_node("If", ["cond"], ["y"], then_branch=outer_then, else_branch=outer_else)]
    return make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [SEQ, BATCH, FEATURES]),
                              helper.make_tensor_value_info("cond", TensorProto.BOOL, []),
                              helper.make_tensor_value_info("cond2", TensorProto.BOOL, [])],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, [SEQ, 1, BATCH, HIDDEN])],
                      [init("zero", np.array([0], np.int64)), init("one", np.array([1], np.int64))])


def _nested_feeds() -> list[dict[str, np.ndarray]]:
    x = RNG.standard_normal((SEQ, BATCH, FEATURES)).astype(np.float32)
    return [{"x": x, "cond": np.array(True), "cond2": np.array(c)} for c in (True, False)]


def test_weight_reads_follow_value_moving_ops_and_map_the_channel_axis() -> None:
    from onnxopt.graph import weight_reads

    model = to_ir(_nested_if_gate_reorder())
    owner = next(g for g in [model.graph, *model.graph.subgraphs()] if "Wsrc" in g.initializers)
    reads = weight_reads(owner.initializers["Wsrc"])
    # one read per path: each of the three Slices reaches each LSTM's W
    assert sorted(r.node.name for r in reads) == ["a_lstm"] * 3 + ["b_lstm"] * 3
    for read in reads:
        assert [n.op_type for n in read.path] == ["Slice", "Concat", "Unsqueeze"] and read.index == 1
        assert read.rank == 3 and read.source_axis(1) == 0 and read.source_axis(0) is None  # gate rows = source rows
    # a Transpose moves the axis, a Reshape loses it
    nodes = [helper.make_node("Transpose", ["w"], ["wt"], perm=[1, 0]), helper.make_node("MatMul", ["x", "wt"], ["y"]),
             helper.make_node("Reshape", ["w", "shape"], ["wr"]), helper.make_node("MatMul", ["x2", "wr"], ["y2"])]
    proto = make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8]),
                               helper.make_tensor_value_info("x2", TensorProto.FLOAT, [2, 4])],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4]),
                        helper.make_tensor_value_info("y2", TensorProto.FLOAT, [2, 8])],
                       [init("w", _f32(4, 8, scale=1.0)), init("shape", np.array([4, 8], np.int64))])
    by_op = {tuple(n.op_type for n in r.path): r for r in weight_reads(to_ir(proto).graph.initializers["w"])}
    assert by_op[("Transpose",)].source_axis(1) == 0 and by_op[("Reshape",)].source_axis(1) is None


@pytest.mark.parametrize("granularity", ["tensor", "channel"])
def test_cluster_covers_weights_read_through_gate_reordering_in_nested_ifs(granularity: str) -> None:
    proto = _nested_if_gate_reorder()
    result = ClusterPass().apply(to_ir(proto), ClusterConfig(k=16, granularity=granularity), PassContext())
    items = {item["tensor"]: item for item in result.report.items}
    assert set(items) == {"Wsrc", "Rsrc", "Bsrc"}, result.report.skipped  # each once, though two LSTMs read each
    assert items["Wsrc"]["read_through"] == ["Slice", "Concat", "Unsqueeze"]
    if granularity == "channel":  # one codebook per gate row of R (64 per row): the LSTM's axis 1 is the source's axis 0
        assert items["Rsrc"]["granularity"] == "channel" and items["Rsrc"]["shape"] == [4 * HIDDEN, HIDDEN]
    for feed in _nested_feeds():
        (ref,), (got,) = run_model(proto, feed), run_model(result.model, feed)
        assert _cosine(got, ref) >= 0.98 and np.abs(got - ref).max() > 0
    before, after = len(proto.SerializeToString()), len(serialize_model(result.model))
    assert after < 0.25 * before, (after, before)


def test_dynamic_quant_covers_weights_read_through_gate_reordering_once() -> None:
    proto = _nested_if_gate_reorder()
    result = QuantPass().apply(to_ir(proto), QuantConfig(mode="dynamic"), PassContext())
    model = result.model
    dqs = [n for g in [model.graph, *model.graph.subgraphs()] for n in g if n.op_type == "DequantizeLinear"]
    # quant folds first: the reordered W and R of both inner branches are the same constants, stored (and
    # quantized) once in the branch that encloses both, each read by both LSTMs
    assert len(dqs) == 2, [n.outputs[0].name for n in dqs]
    for dq in dqs:
        assert sorted(node.name for node, _ in dq.outputs[0].uses()) == ["a_lstm", "b_lstm"]
    for feed in _nested_feeds():
        (ref,), (got,) = run_model(proto, feed), run_model(model, feed)
        assert _cosine(got, ref) >= 0.999 and np.abs(got - ref).max() > 0
    assert len(serialize_model(model)) < 0.4 * len(proto.SerializeToString())


def test_fold_stores_a_weight_folded_identically_in_two_branches_once() -> None:
    from onnxopt.graph import iter_graphs
    from onnxopt_passes.fold import FoldConfig, FoldPass

    proto = _nested_if_gate_reorder()
    result = FoldPass().apply(to_ir(proto), FoldConfig(), PassContext())
    big = [(g.name, name) for g in iter_graphs(result.model) for name, v in g.initializers.items()
           if v.const_value is not None and v.const_value.nbytes >= 4 * HIDDEN * FEATURES * 4]
    assert len(big) == 2 and {g for g, _ in big} == {"outer_then"}, big  # W and R once each, not once per branch
    assert len(serialize_model(result.model)) <= len(proto.SerializeToString())
    for feed in _nested_feeds():
        np.testing.assert_array_equal(run_model(result.model, feed)[0], run_model(proto, feed)[0])


def test_dynamic_quant_says_why_it_leaves_float16_recurrent_weights() -> None:
    """A float16 LSTM: its weights are found but not int8-stored, and the skip says why (it said 'no LSTM weight')."""
    inits = [init("W", _f32(1, 4 * HIDDEN, FEATURES, scale=0.2).astype(np.float16)),
             init("R", _f32(1, 4 * HIDDEN, HIDDEN, scale=0.15).astype(np.float16))]
    node = helper.make_node("LSTM", ["x", "W", "R"], ["Y"], hidden_size=HIDDEN, name="lstm")
    proto = make_model([node], [helper.make_tensor_value_info("x", TensorProto.FLOAT16, [SEQ, BATCH, FEATURES])],
                       [helper.make_tensor_value_info("Y", TensorProto.FLOAT16, [SEQ, 1, BATCH, HIDDEN])], inits)
    result = QuantPass().apply(to_ir(proto), QuantConfig(mode="dynamic"), PassContext())
    assert not result.modified
    assert "LSTM weight W: float16 weight: weight-only int8 takes float32 weights" in result.report.summary


def test_cluster_brings_a_trained_lstm_reader_to_016x_at_cosine_098_as_a_user_runs_it(digits: Path, tmp_path: Path) -> None:
    """Issue 16's target on trained weights: examples/digits/lstm.onnx (98% of its weights LSTM W/R/B, trained by
    examples/digits/train_lstm.py), `onnxopt apply lstm.onnx --pass cluster` with the defaults (k=16, packed):
    the written file at most 0.16x the input's, outputs on eval.npz at cosine >= 0.98 on ONNX Runtime."""
    from tests.helpers import run_cli

    source, out = digits / "lstm.onnx", tmp_path / "lstm_k16.onnx"
    result = run_cli("apply", str(source), "--pass", "cluster", "-o", str(out), "--no-validate")
    assert result.returncode == 0, result.stderr
    assert out.stat().st_size <= 0.16 * source.stat().st_size, (out.stat().st_size, source.stat().st_size)
    x = np.load(digits / "eval.npz")["x"]
    (ref,), (got,) = run_model(str(source), {"x": x}), run_model(str(out), {"x": x})
    assert _cosine(got, ref) >= 0.98 and np.abs(got - ref).max() > 0  # clustered, not left as it was
    lstm_weights = {t.name for t in onnx.load(str(source)).graph.initializer if "LSTM" in t.name}
    assert lstm_weights and not lstm_weights & {t.name for t in onnx.load(str(out)).graph.initializer}
