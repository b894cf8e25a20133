"""Every weight covered: LSTM, GRU and If branches reading outer-scope weights, clustered and quantized, checked on ORT.

Each model is compared with the original on ONNX Runtime; a weight two
branches share is compressed once and both branches read the one copy.
"""

from __future__ import annotations

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
